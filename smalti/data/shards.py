"""Reading a prepared dataset: examples by global index, shards fetched and verified on demand."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import fsspec
import numpy as np

from smalti.data.cache import ShardCache
from smalti.data.manifest import (
    MANIFEST,
    TOKENIZER_FILE,
    Manifest,
    ShardContent,
    ShardEntry,
    check_manifest,
    expand_runs,
    parse_shard,
    verify_shard,
)
from smalti.data.tokenizer import CharTokenizer, HFTokenizer
from smalti.errors import DataError
from smalti.io import remote_filesystem, Closing
from smalti.trust.keys import Signature
from smalti.trust.taxonomy import Taxonomy

if TYPE_CHECKING:  # torch is imported where examples become tensors: `data verify` and `data prepare` never load it
    import torch

    from smalti.core.batch import Batch


PREFETCH_SHARDS = 2  # decoded ahead of use, in a background thread (pyarrow decodes without the GIL)


@dataclass(frozen=True)
class CacheConfig:
    directory: Path
    limit_bytes: int


def _filesystem(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    return remote_filesystem(url, storage_options)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def read_manifest(url: str, taxonomy: Taxonomy, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Fetch and check the signed manifest (no shard is read)."""
    fs, root = _filesystem(url, storage_options or {})
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        raise DataError(f"{url}: no {MANIFEST} (not a prepared dataset, or preparation did not finish)") from None
    except OSError as error:
        raise DataError(f"{url}/{MANIFEST}: cannot read ({error})") from None
    try:
        signature_text = fs.cat_file(f"{root}/{MANIFEST}.sig").decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{url}/{MANIFEST}: not signed (no {MANIFEST}.sig)") from None
    signature = Signature.from_json(signature_text, where=f"{url}/{MANIFEST}.sig")
    manifest = check_manifest(raw, signature, taxonomy, url)
    _refuse_unlisted_shards(fs, root, manifest)
    return manifest


def _refuse_unlisted_shards(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    """A shard file beside the manifest that it does not list is data nobody signed for: stop, naming it.

    Loading never reads such a file, but its presence means the folder is not what was signed
    (a half-finished copy, a shard slipped in, an earlier preparation's leftovers), which an
    auditor must hear about. Stores that cannot list a folder (a plain HTTP server without an
    index page) are not checked; everything they serve is still verified against the manifest.
    """
    try:
        names = {Path(str(path)).name for path in fs.ls(root, detail=False)}
    except (OSError, NotImplementedError, ValueError):
        return
    listed = {entry.name for split in manifest.data["splits"] for entry in manifest.shards(split)}
    unlisted = sorted(name for name in names if name.endswith(".parquet") and name not in listed)
    if unlisted:
        raise DataError(
            f"{manifest.url}/{unlisted[0]}: a shard the signed manifest does not list "
            f"({len(unlisted)} such file{'s' if len(unlisted) > 1 else ''}); remove it or prepare the dataset again"
        )


class ShardedSplit(Closing):
    """One split of a prepared dataset, addressed by example index.

    Example classes come from the signed manifest, so samplers that need
    them (stratified, per-class) never read a shard to plan an epoch. Shards
    are read when first needed; a shard read for the first time by this
    process (or first downloaded into the cache) is fully verified before any
    of its examples is returned. At most ``memory_shards`` (at least 2) decoded
    shards are kept in memory, plus up to ``PREFETCH_SHARDS`` being decoded
    ahead of use in a background thread, in the order ``plan`` announced.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        taxonomy: Taxonomy,
        storage_options: dict[str, Any] | None = None,
        cache: CacheConfig | None = None,
        memory_shards: int = 8,
    ) -> None:
        if split not in manifest.data["splits"]:
            raise DataError(f"{manifest.url}: no '{split}' split")
        self.manifest, self.split, self.url = manifest, split, manifest.url
        self.storage_options = dict(storage_options or {})
        self.shards: list[ShardEntry] = manifest.shards(split)
        self.starts = np.array([s.first_example for s in self.shards] + [manifest.examples(split)], dtype=np.int64)
        self.class_names = list(taxonomy.classes)
        self.class_tree_fingerprint = taxonomy.class_tree_fingerprint
        names = [name for shard in self.shards for name in expand_runs(shard.class_runs)]
        self._class_array = np.array([taxonomy.index(n) for n in names], dtype=np.int64)
        self.cache_config = cache if not is_local(self.url) else None
        self.memory_shards = max(2, memory_shards)  # a batch can straddle two consecutive shards
        if self.cache_config is not None:
            largest = max(self.shards, key=lambda s: s.bytes)
            ShardCache(self.cache_config.directory, self.cache_config.limit_bytes).check_fits(
                largest.bytes, largest.name
            )
        self._reset()

    def _reset(self) -> None:
        self._loaded: collections.OrderedDict[int, tuple[np.ndarray, ShardContent]] = collections.OrderedDict()
        self._verified: set[int] = set()
        self._cache: ShardCache | None = None
        self._fs: fsspec.AbstractFileSystem | None = None
        self._lock = threading.Lock()  # the cache and filesystem handles are shared with the prefetch thread
        self._prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._next_shard: dict[int, list[int]] = {}

    _TRANSIENT = ("_loaded", "_verified", "_cache", "_fs", "_lock", "_prefetcher", "_pending", "_next_shard")

    def __getstate__(self) -> dict[str, Any]:  # loader workers start with nothing loaded
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def classes(self) -> torch.Tensor:
        """Each example's class index, from the signed manifest (shares memory with the numpy copy)."""
        import torch

        return torch.from_numpy(self._class_array)

    @property
    def fingerprint(self) -> str:
        """What the sample order depends on: the examples, the split, and the class numbering.

        Never who signed them: the same examples re-signed, or tagged under a taxonomy whose
        keys were rotated, train the same model.
        """
        return f"{self.manifest.root}:{self.split}:{self.class_tree_fingerprint}"

    def shard_sizes(self) -> list[int]:
        return [s.examples for s in self.shards]

    # ------------------------------------------------------------ loading

    def _download(self, entry: ShardEntry) -> bytes:
        if self._fs is None:
            self._fs, self._root = _filesystem(self.url, self.storage_options)
        try:
            return self._fs.cat_file(f"{self._root}/{entry.name}")
        except FileNotFoundError:
            raise DataError(f"{self.url}/{entry.name}: shard listed in the manifest is missing") from None
        except OSError as error:
            raise DataError(f"{self.url}/{entry.name}: cannot read ({error})") from None

    def _fetch(self, shard: int) -> tuple[ShardContent, bool]:
        """Read (from the cache or the source) and decode, verifying unless already verified."""
        entry = self.shards[shard]
        where = f"{self.url}/{entry.name}"
        with self._lock:
            if self.cache_config is None:
                data, trusted = self._download(entry), shard in self._verified
            else:
                if self._cache is None:
                    self._cache = ShardCache(self.cache_config.directory, self.cache_config.limit_bytes)
                cached = self._cache.verified_path(entry.sha256)
                if cached is not None:  # verified when it entered the cache: decode straight from the file
                    data, trusted = cached, True  # type: ignore[assignment]  # a Path: parse_shard reads either
                else:
                    data, trusted = self._cache.read(entry.sha256, entry.bytes, lambda: self._download(entry))
        content = parse_shard(data, where, columns=["tokens"]) if trusted else verify_shard(data, entry, self.url)
        return content, trusted

    def plan(self, indices: torch.Tensor) -> None:
        """The examples about to be read, in order: lets the next shards be fetched while this one is used."""
        shard_of, _ = self._locate(indices.numpy())
        runs = shard_of[_run_starts(shard_of)]  # one per run of examples from the same shard: few, in order
        sequence = list(dict.fromkeys(runs.tolist()))  # shards in order of first use
        self._next_shard = {s: sequence[i + 1 : i + 1 + PREFETCH_SHARDS] for i, s in enumerate(sequence)}
        if sequence:
            self._prefetch(sequence[0])

    def _prefetch(self, shard: int) -> None:
        if shard in self._loaded or shard in self._pending:
            return
        if self._prefetcher is None:
            self._prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="smalti-prefetch")
        self._pending[shard] = self._prefetcher.submit(self._fetch, shard)

    def _load(self, shard: int) -> tuple[np.ndarray, ShardContent]:
        if shard in self._loaded:
            self._loaded.move_to_end(shard)
            return self._loaded[shard]
        pending = self._pending.pop(shard, None)
        content, trusted = pending.result() if pending is not None else self._fetch(shard)
        if not trusted:
            self._verified.add(shard)
            if self._cache is not None:
                with self._lock:
                    self._cache.mark_verified(self.shards[shard].sha256)
        self._loaded[shard] = (content.tokens, content)
        while len(self._loaded) > self.memory_shards:
            evicted, _ = self._loaded.popitem(last=False)
            if self._cache is not None:
                with self._lock:
                    self._cache.unpin(self.shards[evicted].sha256)
        for upcoming in self._next_shard.get(shard, ()):
            self._prefetch(upcoming)
        return self._loaded[shard]

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        return shard, positions - self.starts[shard]

    def gather(self, indices: torch.Tensor) -> Batch:
        import torch

        from smalti.core.batch import Batch

        positions = indices.numpy()
        shard_of, row_of = self._locate(positions)
        starts = _run_starts(shard_of)
        if len(starts) == 1:  # the common case: one shard
            rows = np.take(self._load(int(shard_of[0]))[0], row_of, axis=0)
        else:
            rows = np.empty((len(positions), self.manifest.example_length), dtype=self.manifest.data["token_dtype"])
            if len(starts) <= 4 * len(self.shards):  # block-shuffled: a few runs, each a row gather from one shard
                for start, end in zip(starts, [*starts[1:], len(positions)]):
                    np.take(self._load(int(shard_of[start]))[0], row_of[start:end], axis=0, out=rows[start:end])
            else:  # shards interleaved example by example: once per shard
                for shard in np.unique(shard_of):
                    where = np.flatnonzero(shard_of == shard)
                    rows[where] = self._load(int(shard))[0][row_of[where]]
        window = torch.from_numpy(rows.astype(np.int64))
        return Batch(
            inputs=window[:, :-1],
            targets=window[:, 1:],
            sample_ids=indices,
            provenance=torch.from_numpy(np.take(self._class_array, positions)[:, None]),
        )

    def example_ids(self, indices: torch.Tensor) -> list[str]:
        shard_of, row_of = self._locate(indices.numpy())
        return [self._load(int(s))[1].ids[int(r)] for s, r in zip(shard_of, row_of)]

    def verify_all(self, after_each: Callable[[ShardEntry], None] | None = None) -> None:
        """Read and verify every shard now (``data verify``, and eager loading)."""
        for shard, entry in enumerate(self.shards):
            self._load(shard)
            if after_each is not None:
                after_each(entry)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher, self._pending = None, {}
        if self._cache is not None:
            self._cache.close()


def _run_starts(shard_of: np.ndarray) -> np.ndarray:
    """Where each run of consecutive positions from the same shard begins (numpy: an epoch has millions)."""
    return np.flatnonzero(np.concatenate(([True], shard_of[1:] != shard_of[:-1]))) if len(shard_of) else shard_of[:0]


def open_tokenizer(manifest: Manifest, storage_options: dict[str, Any] | None = None) -> CharTokenizer | HFTokenizer:
    """The tokenizer the manifest signs: its characters, or the file beside the shards with the signed sha256."""
    spec = manifest.data["tokenizer"]
    if spec.get("kind") == "char":
        return CharTokenizer(spec["chars"])
    if spec.get("kind") != "hf":
        raise DataError(f"{manifest.url}: unsupported tokenizer {spec.get('kind')!r}")
    fs, root = _filesystem(manifest.url, storage_options or {})
    where = f"{manifest.url}/{TOKENIZER_FILE}"
    try:
        data = fs.cat_file(f"{root}/{TOKENIZER_FILE}")
    except FileNotFoundError:
        raise DataError(f"{where}: missing (the signed manifest names a tokenizer file)") from None
    if hashlib.sha256(data).hexdigest() != spec.get("sha256"):
        raise DataError(f"{where}: its sha256 differs from the signed manifest's")
    return HFTokenizer(data.decode("utf-8"), spec.get("eos_token"))
