"""Language-model data from a corpus on disk: split, tokenized, windowed and ordered."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tessera.core.state import DataShape
from tessera.data.batch import Batch
from tessera.data.corpus import load_corpus
from tessera.data.sampler import DeterministicSampler
from tessera.data.tokenizer import CharTokenizer
from tessera.data.windows import TokenWindows


@dataclass(frozen=True)
class CorpusDataConfig:
    corpus: Path
    seq_len: int
    global_batch_size: int
    val_fraction: float = 0.1
    shuffle: bool = True
    seed: int = 0


class CorpusData:
    """Train and validation windows of a corpus, one provenance class per work.

    The last ``val_fraction`` of every work is validation, so each work is
    represented in both and no window straddles the two.
    """

    def __init__(self, config: CorpusDataConfig) -> None:
        if not 0.0 < config.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {config.val_fraction}")
        works = load_corpus(config.corpus)
        self.tokenizer = CharTokenizer.from_texts(w.text for w in works)
        self.class_names = [w.class_name for w in works]
        train_docs, val_docs = [], []
        for index, work in enumerate(works):
            ids = self.tokenizer.encode(work.text, where=work.name)
            cut = int(len(ids) * (1.0 - config.val_fraction))
            train_docs.append((index, ids[:cut]))
            val_docs.append((index, ids[cut:]))
        self.train = TokenWindows(train_docs, config.seq_len, self.class_names)
        self.val = TokenWindows(val_docs, config.seq_len, self.class_names)
        self.sampler = DeterministicSampler(
            len(self.train), config.global_batch_size, config.seed, self.train.fingerprint, config.shuffle
        )
        self.shape = DataShape(
            batches_per_epoch=self.sampler.batches_per_epoch,
            global_batch_size=config.global_batch_size,
            tokens_per_sample=config.seq_len,
        )

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint

    def train_batches(self, epoch: int, start_batch: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """This rank's share of each global batch of ``epoch``, from ``start_batch`` on."""
        for index in range(start_batch, self.sampler.batches_per_epoch):
            global_batch = self.sampler.global_batch(epoch, index)
            yield self.train.gather(self.sampler.rank_slice(global_batch, rank, world_size))

    def eval_batches(
        self, batch_size: int, max_samples: int | None, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """A fixed, evenly spaced subset of validation windows (every work represented)."""
        count = len(self.val) if max_samples is None else min(max_samples, len(self.val))
        indices = torch.linspace(0, len(self.val) - 1, count).round().long().unique()
        mine = indices.tensor_split(world_size)[rank]
        for start in range(0, mine.numel(), batch_size):
            yield self.val.gather(mine[start : start + batch_size])
