"""The signed manifest of a prepared dataset, and the checks that make loading fail closed.

A prepared dataset is a folder (at any fsspec URL) of zstd Parquet shards and
``manifest.json``, signed by a tagging authority (``manifest.json.sig``). The
manifest lists, per split and per shard: the shard's sha256 and size, its
number of examples, the class of every example (run-length encoded), and the
RFC 6962 Merkle root over its examples' leaves. A leaf is the UTF-8 JSON
array ``[id, class, content_sha256]`` with no spaces; ``content_sha256`` is
the sha256 of the example's token ids as little-endian uint32.

Shard columns: ``id`` (string), ``class`` (string), ``tokens``
(fixed-size list of uint16 or uint32, ``example_length`` long),
``content_sha256`` (32 bytes).

Verification order, cheapest first, so a bad dataset stops before any
gradient: the taxonomy (signed by the pinned data-governance key), the
manifest signature (a tagging authority of that taxonomy), every class known
and taggable by the signer; then each shard as it is first read: bytes
against the signed sha256, every example's content against its hash, every
example's class against the signed classes, and the Merkle root.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smalti import formats
from smalti.errors import DataError
from smalti.trust import merkle
from smalti.trust.keys import Signature, SignatureError, verify_bytes
from smalti.trust.taxonomy import Taxonomy

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face tokenizer's own file, beside the shards (sha256 signed)
SPLITS = ("train", "val")


def content_sha256(tokens: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u4").tobytes()).digest()


def leaf_bytes(example_id: str, class_name: str, digest: bytes) -> bytes:
    return json.dumps([example_id, class_name, digest.hex()], separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def canonical_json(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def run_length(values: Sequence[str]) -> list[list[Any]]:
    runs: list[list[Any]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return runs


def expand_runs(runs: Sequence[Sequence[Any]]) -> list[str]:
    return [name for name, count in runs for _ in range(int(count))]


@dataclass(frozen=True)
class ShardEntry:
    split: str
    name: str
    sha256: str
    bytes: int
    examples: int
    first_example: int  # index of its first example within the split
    merkle_root: str
    class_runs: tuple[tuple[str, int], ...]

    @classmethod
    def from_json(cls, split: str, data: dict[str, Any]) -> "ShardEntry":
        return cls(
            split=split,
            name=data["name"],
            sha256=data["sha256"],
            bytes=int(data["bytes"]),
            examples=int(data["examples"]),
            first_example=int(data["first_example"]),
            merkle_root=data["merkle_root"],
            class_runs=tuple((str(c), int(n)) for c, n in data["classes"]),
        )


@dataclass(frozen=True)
class Manifest:
    data: dict[str, Any]
    raw: bytes
    url: str
    signer: str

    @property
    def root(self) -> str:
        """The Merkle root over every example of every split: the dataset's identity."""
        return self.data["merkle_root"]

    @property
    def version(self) -> int:
        """The dataset's release number, signed: a later preparation of the same dataset has a higher one."""
        return int(self.data.get("version", 1))

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))

    @property
    def example_length(self) -> int:
        return int(self.data["example_length"])

    def shards(self, split: str) -> list[ShardEntry]:
        return [ShardEntry.from_json(split, s) for s in self.data["splits"][split]["shards"]]

    def examples(self, split: str) -> int:
        return int(self.data["splits"][split]["examples"])

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        splits = [split] if split else list(self.data["splits"])
        counts: dict[str, int] = {}
        for name in splits:
            for cls, n in self.data["splits"][name]["class_counts"].items():
                counts[cls] = counts.get(cls, 0) + int(n)
        return counts


def check_manifest(raw: bytes, signature: Signature, taxonomy: Taxonomy, url: str) -> Manifest:
    """Signature, format, taxonomy fingerprint, classes and signer's rights: all before any shard is read."""
    where = f"{url}/{MANIFEST}"
    authority = taxonomy.authority_with_key(signature.key_id)
    if authority is None or authority.role != "tagging" or authority.key is None:
        raise DataError(
            f"{where}: signed by key {signature.key_id}, which is no tagging authority of taxonomy '{taxonomy.name}'"
        )
    try:
        verify_bytes(raw, signature, authority.key, where)
    except SignatureError as error:
        raise DataError(str(error)) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise DataError(f"{where}: not valid JSON") from None
    problem = formats.format_problem(data.get("format") if isinstance(data, dict) else None, formats.DATASET, where)
    if problem:
        raise DataError(problem)
    if data["taxonomy"]["fingerprint"] != taxonomy.fingerprint:
        raise DataError(
            f"{where}: prepared under taxonomy {data['taxonomy']['fingerprint'][:12]}..., "
            f"not the given taxonomy {taxonomy.fingerprint[:12]}..."
        )
    manifest = Manifest(data=data, raw=raw, url=url, signer=authority.name)
    for split in data["splits"]:
        for entry in manifest.shards(split):
            for class_name, _ in entry.class_runs:
                if class_name not in taxonomy:
                    raise DataError(f"{url}/{entry.name}: class '{class_name}' is not in taxonomy '{taxonomy.name}'")
                if not taxonomy.may_tag(authority, class_name):
                    raise DataError(
                        f"{url}/{entry.name}: signer '{authority.name}' is not authorised to tag class '{class_name}'"
                    )
    return manifest


class ShardContent:
    """A decoded shard: the token matrix at once, the other columns only when asked for.

    ``source`` is the shard's bytes or file; columns other than the tokens
    are read from it on first use (verification needs them all, training
    only the tokens: the classes of training examples come from the manifest).
    """

    def __init__(self, table: pa.Table, source: bytes | Path) -> None:
        self._table, self._source = table, source
        self.tokens: np.ndarray = (
            table.column("tokens").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
        )

    def __len__(self) -> int:
        return self._table.num_rows

    def _column(self, name: str) -> pa.ChunkedArray:
        if name not in self._table.column_names:
            self._table = read_parquet(self._source)
        return self._table.column(name)

    @functools.cached_property
    def ids(self) -> list[str]:
        return self._column("id").to_pylist()

    @functools.cached_property
    def classes(self) -> list[str]:
        column = self._column("class").combine_chunks()
        if pa.types.is_dictionary(column.type):  # as written by prepare: decode via the small dictionary
            names = column.dictionary.to_pylist()
            return [names[i] for i in column.indices.to_numpy(zero_copy_only=False)]
        return column.to_pylist()

    @functools.cached_property
    def digests(self) -> list[bytes]:
        return self._column("content_sha256").to_pylist()


def read_parquet(source: bytes | Path, columns: list[str] | None = None) -> pa.Table:
    """Decoded on the calling thread, with no Arrow thread ever started.

    A shard is small and loading already runs on Smalti's own prefetch thread; Arrow's thread pools, once
    started, can abort the process at exit ("terminate called without an active exception",
    apache/arrow#34314; seen in CI after ``smalti audit``). ``pq.read_table`` starts one even with
    ``use_threads=False`` (its dataset layer), and a Python file object sends reads to Arrow's IO pool
    (apache/arrow#50482), so the shard is read with the plain Parquet reader from an in-memory buffer: the
    bytes, or the file memory-mapped (zero-copy). ``tests/test_data.py`` counts the process's threads.
    """
    buffer = pa.memory_map(str(source)).read_buffer() if isinstance(source, Path) else pa.py_buffer(source)
    return pq.ParquetFile(pa.BufferReader(buffer)).read(columns=columns, use_threads=False)


SHARD_COLUMNS = ("id", "class", "tokens", "content_sha256")


def parse_shard(data: bytes | Path, where: str, columns: list[str] | None = None) -> ShardContent:
    """Decode a shard without checking it (for bytes or a file already verified).

    ``columns=["tokens"]`` decodes only the payload (what training needs).
    """
    try:
        schema = pq.read_schema(data if isinstance(data, Path) else pa.BufferReader(data))
        missing = [c for c in SHARD_COLUMNS if c not in schema.names]
        if missing:
            raise DataError(f"{where}: missing column '{missing[0]}'")
        return ShardContent(read_parquet(data, columns), data)
    except (pa.ArrowException, OSError):
        raise DataError(f"{where}: not a readable Parquet shard") from None


# Signed shard entries whose bytes this process has verified row by row. Bytes with the SHA-256 such an
# entry signs are the same bytes, so the verdict stands without hashing every row again: a deletion
# builds the same dataset twice in one process, to replay and to evaluate.
_VERIFIED_ENTRIES: set[ShardEntry] = set()


def verify_shard(data: bytes, entry: ShardEntry, url: str) -> ShardContent:
    """Parse a shard and prove it is exactly what the manifest signed; name the example if not.

    Rows are checked before the file hash so that a changed example is named,
    not just the shard.
    """
    where = f"{url}/{entry.name}"
    bytes_ok = hashlib.sha256(data).hexdigest() == entry.sha256
    if bytes_ok and entry in _VERIFIED_ENTRIES:
        return parse_shard(data, where)
    try:
        content = parse_shard(data, where)
    except DataError:
        if bytes_ok:
            raise
        raise DataError(f"{where}: shard bytes differ from the signed manifest and do not parse") from None
    if len(content) != entry.examples:
        raise DataError(f"{where}: {len(content)} examples, the signed manifest says {entry.examples}")
    signed_classes = expand_runs(entry.class_runs)
    # Hash every row's tokens as little-endian uint32 without a per-row copy; compare whole columns
    # first and walk row by row only to name the first bad example (per-row Python was most of the cost).
    canonical = np.ascontiguousarray(content.tokens, dtype="<u4")
    # numpy stubs declare __buffer__ only on Python >= 3.12
    rows = memoryview(canonical).cast("B")  # type: ignore[arg-type]
    width = canonical.shape[1] * 4
    sha256 = hashlib.sha256
    ids, classes, digests = content.ids, content.classes, content.digests
    if len(set(ids)) != len(ids):  # a row copied over another keeps a valid hash and class: name it
        first: dict[str, int] = {}
        for row, example_id in enumerate(ids):
            if example_id in first:
                raise DataError(f"{where}: example '{example_id}' appears twice (rows {first[example_id]} and {row})")
            first[example_id] = row
    computed = [sha256(rows[start : start + width]).digest() for start in range(0, len(ids) * width, width)]
    if computed != digests or classes != signed_classes:
        for row, (example_id, class_name, digest) in enumerate(zip(ids, classes, digests)):
            if computed[row] != digest:
                raise DataError(f"{where}: example '{example_id}': content does not match its content_sha256")
            if class_name != signed_classes[row]:
                raise DataError(
                    f"{where}: example '{example_id}': class '{class_name}' differs from the signed "
                    f"class '{signed_classes[row]}'"
                )
    # The leaf is the canonical JSON [id, class, content_sha256 hex]: json.dumps(ensure_ascii=False) of a
    # string is encode_basestring, called directly here (~1 us a row less).
    quote = json.encoder.encode_basestring
    class_json = {name: quote(name) for name in set(classes)}
    leaves = [
        merkle.leaf_hash(f'[{quote(example_id)},{class_json[class_name]},"{digest.hex()}"]'.encode())
        for example_id, class_name, digest in zip(ids, classes, digests)
    ]
    if merkle.root(leaves).hex() != entry.merkle_root:
        raise DataError(
            f"{where}: the examples' ids, order or content hashes differ from what was signed "
            "(Merkle root mismatch: a row was changed, moved, removed or replaced)"
        )
    if not bytes_ok:
        raise DataError(f"{where}: shard bytes differ from the signed manifest (sha256 mismatch)")
    _VERIFIED_ENTRIES.add(entry)
    return content
