"""``smalti data prepare``: turn documents into tagged, signed shards.

Every example is a window of ``seq_len + 1`` tokens of one class's text, cut at stride ``seq_len``. What is held
out for validation (``PrepareOptions.holdout``):

- ``documents``: whole documents of each class, chosen by the SHA-256 of their ids (so the choice is the same
  on every machine and does not move when other documents are added), until they hold ``val_fraction`` of the
  class's tokens, at least ``min_holdout_documents`` of them, and never every document of the class. A class
  with a single document falls back to ``tail`` for that class. This is what packed short documents need: the
  tail of each short document would be a string of fragments, and every training row would stop mid-word;
  held-out losses measured on that are noise.
- ``tail``: the last ``val_fraction`` of every document (long documents, as the bundled plays are).
- ``auto`` (the default): ``documents`` when documents are packed (``--tokenizer``), ``tail`` for character
  windows inside each document.

The manifest records the mode and, per class, the documents held out. Everything is checked before a
byte is written: the signer must be a tagging authority of the taxonomy and
allowed to tag every class it signs. Shards are written first and the signed
manifest last, so an interrupted run leaves no dataset, only shards that the
next run overwrites. The output is a pure function of the inputs (no
timestamps), so preparing twice gives identical bytes.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from smalti import __version__, formats
from smalti.data.manifest import (
    MANIFEST,
    TOKENIZER_FILE,
    SPLITS,
    canonical_json,
    content_sha256,
    leaf_bytes,
    run_length,
)
from smalti.data.sources import Document
from smalti.data.tokenizer import CharTokenizer, HFTokenizer
from smalti.errors import DataError
from smalti.io import atomic_write_bytes, remote_filesystem
from smalti.trust import merkle
from smalti.trust.keys import SigningKey, sign_bytes
from smalti.trust.taxonomy import Taxonomy


HOLDOUT_MODES = ("auto", "documents", "tail")


@dataclass(frozen=True)
class PrepareOptions:
    name: str
    seq_len: int = 64
    val_fraction: float = 0.1
    holdout: str = "auto"  # documents | tail | auto (see the module docstring)
    min_holdout_documents: int = 1
    shard_examples: int = 20_000
    overwrite: bool = False
    version: int | None = None  # default: one more than the dataset this replaces at the same place, else 1


@dataclass
class _Example:
    example_id: str
    class_name: str
    tokens: np.ndarray
    digest: bytes


def _check_documents(documents: list[Document], taxonomy: Taxonomy, key: SigningKey) -> str:
    authority = taxonomy.authority_with_key(key.public.key_id)
    if authority is None or authority.role != "tagging":
        raise DataError(f"signing key {key.public.key_id} is not a tagging authority of taxonomy '{taxonomy.name}'")
    if not documents:
        raise DataError("the source has no documents")
    seen: set[str] = set()
    for doc in documents:
        if doc.doc_id in seen:
            raise DataError(f"document '{doc.doc_id}' appears twice in the source")
        seen.add(doc.doc_id)
        if doc.class_name not in taxonomy:
            close = difflib.get_close_matches(doc.class_name, taxonomy.classes, n=3, cutoff=0.6)
            hint = (
                f"; did you mean {' or '.join(repr(c) for c in close)}?"
                if close
                else " (map a column's values into the taxonomy with --class-template, e.g. 'acme/{source}')"
            )
            raise DataError(
                f"document '{doc.doc_id}': class '{doc.class_name}' is not in taxonomy '{taxonomy.name}'{hint}"
            )
        if not taxonomy.may_tag(authority, doc.class_name):
            raise DataError(f"document '{doc.doc_id}': '{authority.name}' may not tag class '{doc.class_name}'")
    return authority.name


def _windows(doc_id: str, split: str, class_name: str, ids: np.ndarray, seq_len: int) -> Iterable[_Example]:
    for k in range(max(0, (len(ids) - 1) // seq_len)):
        tokens = ids[k * seq_len : k * seq_len + seq_len + 1]
        yield _Example(f"{doc_id}/{split}/{k:06d}", class_name, tokens, content_sha256(tokens))


@dataclass(frozen=True)
class Holdout:
    """What validates: whole documents (by id) and the classes whose documents give their tails instead."""

    mode: str
    documents: frozenset[str]
    tail_classes: frozenset[str]

    def share(self, doc: Document, ids: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
        if doc.class_name in self.tail_classes:
            cut = int(len(ids) * (1.0 - val_fraction))
            return ids[:cut] if split == "train" else ids[cut:]
        held = doc.doc_id in self.documents
        return ids if held == (split == "val") else ids[:0]

    def record(self, docs: list[Document]) -> dict[str, Any]:
        by_class: dict[str, list[str]] = {}
        for doc in docs:
            if doc.doc_id in self.documents:
                by_class.setdefault(doc.class_name, []).append(doc.doc_id)
        return {
            "mode": self.mode,
            "tail_classes": sorted(self.tail_classes),
            "validation_documents": {c: sorted(ids) for c, ids in sorted(by_class.items())},
        }


def choose_holdout(
    docs: list[Document], lengths: dict[str, int], mode: str, val_fraction: float, min_documents: int = 1
) -> Holdout:
    """Which documents validate (``documents``), or that every document gives its tail (``tail``)."""
    if mode == "tail":
        return Holdout("tail", frozenset(), frozenset(d.class_name for d in docs))
    by_class: dict[str, list[Document]] = {}
    for doc in docs:
        by_class.setdefault(doc.class_name, []).append(doc)
    held: set[str] = set()
    tails: set[str] = set()
    for name, members in by_class.items():
        if len(members) < 2:
            tails.add(name)  # one document: its tail, or the class would have no training or no validation
            continue
        members = sorted(members, key=lambda d: hashlib.sha256(d.doc_id.encode()).hexdigest())
        goal, taken, chosen = val_fraction * sum(lengths[d.doc_id] for d in members), 0, 0
        for doc in members[:-1]:  # at least one document always trains
            if chosen >= min_documents and taken >= goal:
                break
            held.add(doc.doc_id)
            taken += lengths[doc.doc_id]
            chosen += 1
    return Holdout("documents", frozenset(held), frozenset(tails))


def _split_parts(
    docs: list[Document], encoded: dict[str, np.ndarray], split: str, holdout: Holdout, val_fraction: float
) -> Iterable[tuple[Document, np.ndarray]]:
    """Each document's share of ``split``."""
    for doc in docs:
        yield doc, holdout.share(doc, encoded[doc.doc_id], split, val_fraction)


def _packed(parts: Iterable[tuple[Document, np.ndarray]], split: str, eos: int, seq_len: int) -> Iterable[_Example]:
    """Rows of ``seq_len + 1`` tokens cut from each class's documents laid end to end with EOS after each:
    nothing is wasted on short documents, and a row never mixes two classes. (Document boundaries inside a
    row are not attention boundaries: a row's later document sees the end of the one before, of its class.)"""
    streams: dict[str, list[np.ndarray]] = {}
    for doc, ids in parts:
        if len(ids):
            streams.setdefault(doc.class_name, []).extend([ids, np.array([eos], dtype=np.int64)])
    for class_name, pieces in streams.items():
        yield from _windows(class_name, split, class_name, np.concatenate(pieces), seq_len)


def _shard_bytes(examples: list[_Example], length: int, dtype: Any) -> bytes:
    flat = np.concatenate([e.tokens for e in examples]).astype(dtype)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat), length)
    table = pa.table(
        {
            "id": pa.array([e.example_id for e in examples], pa.string()),
            "class": pa.array([e.class_name for e in examples], pa.string()).dictionary_encode(),
            "tokens": tokens,
            "content_sha256": pa.array([e.digest for e in examples], pa.binary(32)),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class _SplitWriter:
    """Cuts one split's examples into shards, writes them, and builds the split's manifest entry."""

    def __init__(
        self, split: str, fs: fsspec.AbstractFileSystem, root: str, length: int, dtype: Any, shard_examples: int
    ) -> None:
        self.split, self.fs, self.root, self.length, self.dtype = split, fs, root, length, dtype
        self.shard_examples = shard_examples
        self.shards: list[dict[str, Any]] = []
        self.leaves: list[bytes] = []
        self.counts: dict[str, int] = {}
        self.pending: list[_Example] = []

    def add(self, example: _Example) -> None:
        self.pending.append(example)
        self.counts[example.class_name] = self.counts.get(example.class_name, 0) + 1
        if len(self.pending) == self.shard_examples:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        data = _shard_bytes(self.pending, self.length, self.dtype)
        _write(self.fs, f"{self.root}/{name}", data)
        leaves = [merkle.leaf_hash(leaf_bytes(e.example_id, e.class_name, e.digest)) for e in self.pending]
        self.shards.append(
            {
                "name": name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "examples": len(self.pending),
                "first_example": len(self.leaves),
                "merkle_root": merkle.root(leaves).hex(),
                "classes": run_length([e.class_name for e in self.pending]),
            }
        )
        self.leaves.extend(leaves)
        self.pending = []

    def finish(self, seq_len: int) -> dict[str, Any]:
        if self.pending:
            self._flush()
        if not self.leaves:
            raise DataError(f"the {self.split} split is empty: documents are shorter than seq_len {seq_len}")
        return {
            "examples": len(self.leaves),
            "class_counts": dict(sorted(self.counts.items())),
            "merkle_root": merkle.root(self.leaves).hex(),
            "shards": self.shards,
        }


def _write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write whole files: atomically on a local disk; object stores write whole objects anyway."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        atomic_write_bytes(path, data)
    else:
        with fs.open(path, "wb") as handle:
            handle.write(data)


def prepare_dataset(
    documents: Iterable[Document],
    taxonomy: Taxonomy,
    key: SigningKey,
    out_url: str,
    options: PrepareOptions,
    storage_options: dict[str, Any] | None = None,
    tokenizer: CharTokenizer | HFTokenizer | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tag, tokenize and shard ``documents`` into a signed dataset at ``out_url``.

    With the character tokenizer each example is a window inside one document; with a
    Hugging Face tokenizer (``--tokenizer DIR``) each class's documents are packed, EOS
    between them, and the tokenizer file goes beside the shards under the signed manifest.
    """
    if options.seq_len < 1 or options.shard_examples < 1 or not 0.0 < options.val_fraction < 1.0:
        raise DataError("need seq_len >= 1, shard_examples >= 1 and 0 < val_fraction < 1")
    if options.holdout not in HOLDOUT_MODES or options.min_holdout_documents < 1:
        raise DataError(
            f"--holdout {options.holdout!r}: choose one of {', '.join(HOLDOUT_MODES)} (and at least one "
            f"document per class)"
        )
    docs = list(documents)
    signer = _check_documents(docs, taxonomy, key)
    tokenizer = tokenizer or CharTokenizer.from_texts(d.text for d in docs)
    encoded = {doc.doc_id: tokenizer.encode(doc.text, where=doc.doc_id) for doc in docs}
    mode = options.holdout if options.holdout != "auto" else ("tail" if tokenizer.eos_id is None else "documents")
    holdout = choose_holdout(
        docs, {k: len(v) for k, v in encoded.items()}, mode, options.val_fraction, options.min_holdout_documents
    )
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    length = options.seq_len + 1

    fs, root = remote_filesystem(out_url, storage_options)
    version = _next_version(fs, root, out_url, options)
    fs.makedirs(root, exist_ok=True)
    splits, all_leaves = _write_splits(docs, encoded, holdout, tokenizer, fs, root, dtype, options, show_progress)

    manifest = {
        "format": formats.DATASET,
        "name": options.name,
        "version": version,
        "created_by": f"smalti {__version__}",
        "taxonomy": {"name": taxonomy.name, "fingerprint": taxonomy.fingerprint},
        "signer": {"authority": signer, "key_id": key.public.key_id},
        "tokenizer": _tokenizer_record(tokenizer),
        "seq_len": options.seq_len,
        "example_length": length,
        "token_dtype": np.dtype(dtype).name,
        "val_fraction": options.val_fraction,
        "holdout": holdout.record(docs),
        "splits": splits,
        "merkle_root": merkle.root(all_leaves).hex(),
    }
    raw = canonical_json(manifest)
    if isinstance(tokenizer, HFTokenizer):  # beside the shards; the signed manifest holds its sha256
        _write(fs, f"{root}/{TOKENIZER_FILE}", tokenizer.spec.encode("utf-8"))
    _write(fs, f"{root}/{MANIFEST}.sig", sign_bytes(raw, key).to_json().encode())
    _write(fs, f"{root}/{MANIFEST}", raw)
    # A replaced dataset's extra shards would be unlisted data beside the new manifest: loaders refuse that.
    written = {shard["name"] for split in splits.values() for shard in split["shards"]}
    for path in fs.ls(root, detail=False):
        if str(path).endswith(".parquet") and str(path).rsplit("/", 1)[-1] not in written:
            fs.rm_file(path)
    return manifest


def _next_version(fs: Any, root: str, out_url: str, options: PrepareOptions) -> int:
    """The version this preparation writes: above the one it replaces (loaders refuse a rollback)."""
    replaced = _previous_version(fs, root, out_url)
    if replaced is not None and not options.overwrite:
        raise DataError(f"{out_url}: already holds a prepared dataset (pass --overwrite to replace it)")
    version = options.version if options.version is not None else (replaced or 0) + 1
    if version < 1 or (replaced is not None and version <= replaced):
        raise DataError(
            f"{out_url}: version {version} must be at least 1 and above the version it replaces "
            f"({replaced}), or loaders that saw that one refuse this as a rollback"
        )
    return version


def _write_splits(
    docs: list[Document],
    encoded: dict[str, Any],
    holdout: Any,
    tokenizer: Any,
    fs: Any,
    root: str,
    dtype: Any,
    options: PrepareOptions,
    show_progress: bool,
) -> tuple[dict[str, dict[str, Any]], list[bytes]]:
    """Each split's shards (characters: windows inside each document; a Hugging Face tokenizer: each class's
    documents packed); their records and the Merkle leaves of every example."""
    splits: dict[str, dict[str, Any]] = {}
    all_leaves: list[bytes] = []
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("preparing", total=len(docs) * len(SPLITS))
        for split in SPLITS:
            writer = _SplitWriter(split, fs, root, options.seq_len + 1, dtype, options.shard_examples)
            parts = _split_parts(docs, encoded, split, holdout, options.val_fraction)
            if tokenizer.eos_id is None:
                for doc, ids in parts:
                    for example in _windows(doc.doc_id, split, doc.class_name, ids, options.seq_len):
                        writer.add(example)
                    progress.advance(task)
            else:
                for example in _packed(_advancing(parts, progress, task), split, tokenizer.eos_id, options.seq_len):
                    writer.add(example)
            splits[split] = writer.finish(options.seq_len)
            all_leaves.extend(writer.leaves)
    return splits, all_leaves


def _advancing(parts, progress, task):
    for part in parts:
        yield part
        progress.advance(task)


def _tokenizer_record(tokenizer: CharTokenizer | HFTokenizer) -> dict[str, Any]:
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars}
    return {
        "kind": "hf",
        "file": TOKENIZER_FILE,
        "sha256": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eos_token": tokenizer.eos_token,
    }


def _previous_version(fs: fsspec.AbstractFileSystem, root: str, out_url: str) -> int | None:
    """The version of the dataset already at ``root`` (None if there is none); read, not trusted: it only sets
    the floor for the new number, and the loaders check what is signed."""
    try:
        previous = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DataError(f"{out_url}/{MANIFEST}: cannot read the dataset it would replace ({error})") from None
    return int(previous.get("version", 1)) if isinstance(previous, dict) else 1
