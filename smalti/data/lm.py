"""Language-model training data: examples with classes, ordered by the deterministic sampler.

Two ways in, one interface out (``LanguageModelData``):

- ``corpus_data``: a raw corpus folder (``manifest.csv`` + texts), split and
  windowed in memory. No governance: for quick experiments.
- ``dataset_data``: a prepared, signed dataset at any fsspec URL (see
  ``smalti.data.manifest``), verified fail-closed and streamed through the
  local shard cache.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from smalti.core.state import DataShape
from smalti.core.batch import Batch
from smalti.data.freshness import FreshnessRule, check_freshness
from smalti.data.sampler import (
    DeterministicSampler,
    FilteredOrder,
    MixtureOrder,
    PerClassOrder,
    RandomOrder,
    SampleOrder,
    make_order,
)
from smalti.data.shards import CacheConfig, ShardedSplit, open_tokenizer, read_manifest
from smalti.data.sources import documents_from_folder
from smalti.data.tokenizer import CharTokenizer, HFTokenizer
from smalti.data.windows import TokenWindows
from smalti.errors import DataError
from smalti.trust.taxonomy import Taxonomy


GATHER_BATCHES = 32


class ExampleSource(Protocol):
    @property
    def classes(self) -> torch.Tensor: ...  # class index of every example (an attribute or a property)

    @property
    def fingerprint(self) -> str: ...  # read-only: an attribute or a property

    def __len__(self) -> int: ...

    def gather(self, indices: torch.Tensor) -> Batch: ...


@dataclass(frozen=True)
class OrderConfig:
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    batching: str = "random"
    class_unit: int | None = None
    shuffle_block_shards: int | None = None
    exclude_classes: tuple[str, ...] = ()  # taxonomy nodes (a node covers its subtree) left out of training
    late_classes: tuple[str, ...] = ()  # placed last in every epoch
    only_classes: tuple[str, ...] = ()  # train on these taxonomy nodes only
    train_examples: int | None = None  # only this many examples of the kept classes, chosen once from the seed


@dataclass
class LanguageModelData:
    """Training and validation examples with classes, a deterministic order, and what the run records.

    Despite the name (kept for the public API) it also carries image tasks
    (``smalti.data.images``), which have no tokenizer.
    """

    train: ExampleSource
    val: ExampleSource
    tokenizer: CharTokenizer | HFTokenizer | None  # None for tasks without text (images)
    class_names: list[str]
    order: OrderConfig
    provenance: dict[str, Any] = field(default_factory=dict)  # what the run directory records about the data
    sample_order: SampleOrder | None = None  # default: from ``order.batching``
    workers: int = 0
    taxonomy: Taxonomy | None = None  # for prepared datasets: the verified taxonomy

    def __post_init__(self) -> None:
        shard_sizes = getattr(self.train, "shard_sizes", lambda: None)()
        try:
            sample_order = self.sample_order or make_order(
                self.order.batching,
                self.train.classes,
                shuffle=self.order.shuffle,
                unit=self.order.class_unit,
                shard_sizes=shard_sizes,
                block_shards=self.order.shuffle_block_shards,
            )
            if (
                self.order.exclude_classes
                or self.order.late_classes
                or self.order.only_classes
                or self.order.train_examples
            ):
                sample_order = self._filtered(sample_order)
            self.sampler = DeterministicSampler(
                sample_order, self.order.global_batch_size, self.order.seed, self.train.fingerprint, len(self.train)
            )
        except ValueError as error:
            raise DataError(f"data: {error}") from None
        # A "token" is one input element: a character for text, a pixel value for images.
        elements = self.train.gather(torch.tensor([0])).inputs[0].numel()
        self.shape = DataShape(
            batches_per_epoch=self.sampler.batches_per_epoch,
            global_batch_size=self.order.global_batch_size,
            tokens_per_sample=elements,
        )

    def _filtered(self, inner: SampleOrder) -> FilteredOrder:
        if not isinstance(inner, (RandomOrder, PerClassOrder)):
            raise ValueError("exclude_classes, late_classes and only_classes work with batching random or per_class")
        if self.order.train_examples and not isinstance(inner, RandomOrder):
            raise ValueError("train_examples works with batching random")
        chosen = {}
        for option in ("exclude_classes", "late_classes", "only_classes"):
            found: set[int] = set()
            for node in getattr(self.order, option):
                covered = {i for i, name in enumerate(self.class_names) if Taxonomy.covers(node, name)}
                if not covered:
                    raise ValueError(f"{option}: {node!r} names no class of this dataset")
                found |= covered
            chosen[option] = frozenset(found)
        if self.order.only_classes:
            chosen["exclude_classes"] |= frozenset(range(len(self.class_names))) - chosen["only_classes"]
        classes = self.train.classes
        labels = classes.numpy() if isinstance(classes, torch.Tensor) else np.asarray(classes)
        chosen_rows = None
        if self.order.train_examples:
            kept = np.flatnonzero(~np.isin(labels, sorted(chosen["exclude_classes"])))
            if self.order.train_examples > len(kept):
                raise ValueError(
                    f"train_examples: {self.order.train_examples} asked, the kept classes have {len(kept)}"
                )
            picked = np.random.default_rng(self.order.seed).permutation(kept)[: self.order.train_examples]
            chosen_rows = np.zeros(len(labels), dtype=bool)
            chosen_rows[picked] = True
        return FilteredOrder(
            inner, labels, chosen["exclude_classes"], chosen["late_classes"] - chosen["exclude_classes"], chosen_rows
        )

    def first_late_batch(self) -> int | None:
        """Where, in every epoch, the late classes begin (a deletion-aware checkpoint goes just before)."""
        order = self.sampler.order
        return order.first_late_batch(self.order.global_batch_size) if isinstance(order, FilteredOrder) else None

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint

    def batch_indices(self, epoch: int, start_batch: int, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        for index in range(start_batch, self.sampler.batches_per_epoch):
            yield self.sampler.rank_slice(self.sampler.global_batch(epoch, index), rank, world_size)

    def train_batches(self, epoch: int, start_batch: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """This rank's share of each global batch of ``epoch``, from ``start_batch`` on.

        With ``workers`` > 0 the batches are gathered in worker processes
        (a ``DataLoader`` over batch indices, which keeps their order), so
        what a rank sees never depends on the number of workers.
        """
        indices = list(self.batch_indices(epoch, start_batch, rank, world_size))
        if self.workers == 0:
            plan = getattr(self.train, "plan", None)
            if plan is not None and indices:
                # The next epoch's order is already fixed, so its first shards can be read ahead too.
                upcoming = list(itertools.islice(self.batch_indices(epoch + 1, 0, rank, world_size), GATHER_BATCHES))
                plan(torch.cat(indices + upcoming))
            # Gather GATHER_BATCHES batches with one indexing operation, then hand out views:
            # per-batch Python overhead, not decoding, is what limits a loader with small batches.
            for start in range(0, len(indices), GATHER_BATCHES):
                group = indices[start : start + GATHER_BATCHES]
                bulk = self.train.gather(torch.cat(group))
                offset = 0
                for chunk in group:
                    yield bulk.select(slice(offset, offset + len(chunk)))
                    offset += len(chunk)
            return
        loader = torch.utils.data.DataLoader(
            _Gather(self.train, indices),
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=4,
        )
        yield from loader

    def eval_indices(self, max_samples: int | None, classes: Sequence[str] = ()) -> torch.Tensor:
        """A fixed, evenly spaced subset of the validation examples (of ``classes``, taxonomy nodes, if given):
        the one held-out set the trainer's evaluation and ``smalti eval-forget`` both measure."""
        rows = torch.arange(len(self.val))
        if classes:
            covered = [i for i, name in enumerate(self.class_names) if any(Taxonomy.covers(c, name) for c in classes)]
            if not covered:
                raise DataError(f"eval.classes: {', '.join(classes)} names no class of this dataset")
            rows = torch.isin(torch.as_tensor(self.val.classes), torch.tensor(covered)).nonzero().squeeze(1)
        count = len(rows) if max_samples is None else min(max_samples, len(rows))
        return rows[torch.linspace(0, len(rows) - 1, count).round().long().unique()] if count else rows[:0]

    def eval_batches(
        self, batch_size: int, max_samples: int | None, rank: int = 0, world_size: int = 1, classes: Sequence[str] = ()
    ) -> Iterator[Batch]:
        """The held-out examples of :meth:`eval_indices` (every class represented), this rank's share."""
        mine = self.eval_indices(max_samples, classes).tensor_split(world_size)[rank]
        for start in range(0, mine.numel(), batch_size):
            yield self.val.gather(mine[start : start + batch_size])


def corpus_data(
    corpus: Path, seq_len: int, order: OrderConfig, val_fraction: float = 0.1, class_template: str = "{genre}/{work}"
) -> LanguageModelData:
    """A raw corpus folder, split per document (the last ``val_fraction`` of each is validation)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    documents = list(documents_from_folder(Path(corpus), template=class_template))
    tokenizer = CharTokenizer.from_texts(d.text for d in documents)
    class_names = list(dict.fromkeys(d.class_name for d in documents))
    train_docs, val_docs = [], []
    for doc in documents:
        ids = tokenizer.encode(doc.text, where=doc.doc_id)
        cut = int(len(ids) * (1.0 - val_fraction))
        index = class_names.index(doc.class_name)
        train_docs.append((index, ids[:cut]))
        val_docs.append((index, ids[cut:]))
    return LanguageModelData(
        train=TokenWindows(train_docs, seq_len, class_names),
        val=TokenWindows(val_docs, seq_len, class_names),
        tokenizer=tokenizer,
        class_names=class_names,
        order=order,
        provenance={"source": "corpus", "corpus": str(corpus)},
    )


def dataset_data(
    url: str,
    taxonomy: Taxonomy,
    seq_len: int,
    order: OrderConfig,
    storage_options: dict[str, Any] | None = None,
    cache: CacheConfig | None = None,
    verify: str = "eager",
    memory_shards: int = 8,
    workers: int = 0,
    freshness: FreshnessRule = FreshnessRule(),
) -> LanguageModelData:
    """A prepared, signed dataset; ``verify='eager'`` checks every shard before training starts."""
    manifest = read_manifest(url, taxonomy, storage_options)
    check_freshness(manifest, freshness, cache.directory if cache is not None else None)
    if seq_len > manifest.data["seq_len"]:
        raise DataError(f"{url}: examples hold {manifest.data['seq_len']} tokens, fewer than seq_len {seq_len}")
    splits = [
        ShardedSplit(manifest, split, taxonomy, storage_options, cache, memory_shards) for split in ("train", "val")
    ]
    if verify == "eager":
        for split in splits:
            split.verify_all()
    train, val = (_Truncated(s, seq_len) if seq_len < manifest.data["seq_len"] else s for s in splits)
    return LanguageModelData(
        train=train,
        val=val,
        tokenizer=open_tokenizer(manifest, storage_options),
        class_names=list(taxonomy.classes),
        order=order,
        provenance={
            "source": "dataset",
            "url": url,
            "name": manifest.name,
            "manifest_root": manifest.root,
            "manifest_version": manifest.version,
            "manifest_sha256": hashlib.sha256(manifest.raw).hexdigest(),
            "signer": manifest.signer,
            "taxonomy": taxonomy.name,
            "taxonomy_fingerprint": taxonomy.fingerprint,
        },
        workers=workers,
        taxonomy=taxonomy,
    )


class _Gather(torch.utils.data.Dataset):
    def __init__(self, source: ExampleSource, indices: list[torch.Tensor]) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Batch:
        return self.source.gather(self.indices[item])


class ConcatSource:
    """Several sources in one index space: source ``d``'s example ``i`` is ``offset[d] + i``."""

    def __init__(self, sources: list[ExampleSource]) -> None:
        self.sources = sources
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in sources])])
        self.classes = torch.cat([s.classes for s in sources])
        self.fingerprint = hashlib.sha256("|".join(s.fingerprint for s in sources).encode()).hexdigest()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, indices: torch.Tensor) -> Batch:
        owner = np.searchsorted(self.offsets, indices.numpy(), side="right") - 1
        pieces = []
        for d in np.unique(owner):
            mask = torch.from_numpy(owner == d)
            pieces.append((mask, self.sources[int(d)].gather(indices[mask] - int(self.offsets[d]))))
        first = pieces[0][1]
        out = {
            name: torch.empty((len(indices), *getattr(first, name).shape[1:]), dtype=getattr(first, name).dtype)
            for name in ("inputs", "targets", "provenance")
        }
        for mask, batch in pieces:
            for name, tensor in out.items():
                tensor[mask] = getattr(batch, name)
        return Batch(sample_ids=indices, **out)


def mixture_data(
    urls: list[str],
    weights: list[float],
    taxonomy: Taxonomy,
    seq_len: int,
    order: OrderConfig,
    freshness: list[FreshnessRule] | None = None,
    **options: Any,
) -> LanguageModelData:
    """Several prepared datasets (one taxonomy, one tokenizer) drawn with fixed ``weights``."""
    if order.batching != "random":
        raise DataError("data.mixture supports batching 'random' only")
    rules = freshness or [FreshnessRule()] * len(urls)
    parts = [dataset_data(url, taxonomy, seq_len, order, freshness=rule, **options) for url, rule in zip(urls, rules)]
    # a prepared dataset always has a tokenizer
    if len({part.tokenizer.fingerprint for part in parts}) != 1:  # type: ignore[union-attr]
        raise DataError("data.mixture: the datasets were prepared with different tokenizers or vocabularies")
    train = ConcatSource([p.train for p in parts])
    return LanguageModelData(
        train=train,
        val=ConcatSource([p.val for p in parts]),
        tokenizer=parts[0].tokenizer,
        class_names=list(taxonomy.classes),
        order=order,
        provenance={"source": "mixture", "weights": list(weights), "datasets": [p.provenance for p in parts]},
        sample_order=MixtureOrder(tuple(len(p.train) for p in parts), tuple(weights)),
        workers=parts[0].workers,
        taxonomy=taxonomy,
    )


class _Truncated:
    """A source whose examples are cut to a shorter sequence length than they were prepared with."""

    def __init__(self, source: ShardedSplit, seq_len: int) -> None:
        self.source, self.seq_len = source, seq_len
        self.classes, self.fingerprint = source.classes, f"{source.fingerprint}:{seq_len}"

    def __len__(self) -> int:
        return len(self.source)

    def shard_sizes(self) -> list[int]:
        return self.source.shard_sizes()

    def plan(self, indices: torch.Tensor) -> None:
        self.source.plan(indices)

    def close(self) -> None:
        self.source.close()

    def gather(self, indices: torch.Tensor) -> Batch:
        batch = self.source.gather(indices)
        return Batch(
            batch.inputs[:, : self.seq_len], batch.targets[:, : self.seq_len], batch.sample_ids, batch.provenance
        )
