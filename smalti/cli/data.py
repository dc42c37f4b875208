"""``smalti data prepare|verify``: tag a source into signed shards, and check a prepared dataset."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from smalti.config import parse_override
from smalti.cli.output import console as output_console, counted, table as new_table
from smalti.errors import SmaltiError

TRUST_HELP = (
    "pinned data-governance public key; without it the taxonomy is checked only against "
    "the data-governance key it lists itself"
)


def _writer_lock(out: str):
    """One writer per local dataset folder: a lock beside it (inside, it would be a file the manifest does not
    list); a remote destination (s3://, http://) has no lock here."""
    import contextlib

    from smalti.locks import FolderLock

    if "://" in out and not out.startswith("file://"):
        return contextlib.nullcontext()
    folder = Path(out.removeprefix("file://")).resolve()
    return FolderLock(folder.parent / f".{folder.name}.lock", f"preparing the dataset {out}")


def _storage_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for text in pairs:
        key, value = parse_override(text)
        options[key] = value
    return options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare or verify a tagged, signed dataset",
        description="Provenance-tagged Parquet shards with a signed manifest.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    _add_prepare_command(sub)
    _add_verify_command(sub)


def _add_prepare_command(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser(
        "prepare",
        help="turn a source into signed shards",
        description=(
            "Tag every example of SOURCE with its class, write zstd Parquet shards and a manifest signed by the "
            "tagging key to OUT (a path or any fsspec URL). SOURCE is a folder of texts with a CSV mapping "
            "(default SOURCE/manifest.csv; class from a 'class' column or --class-template), a folder of .txt files "
            "without one (class from --class-template over {dir} and {stem}, e.g. 'gutenberg/{dir}/{stem}'), a "
            ".parquet/.jsonl/.csv table with text and class columns, or a Hugging Face datasets folder written with "
            "save_to_disk. With --tokenizer, each class's documents are packed into rows with EOS between them. "
            "Everything is checked before anything is written."
        ),
    )
    prepare.add_argument(
        "--source",
        type=Path,
        required=True,
        help="folder of texts, a .parquet/.jsonl/.csv table, or a datasets folder (save_to_disk)",
    )
    prepare.add_argument("--taxonomy", type=Path, required=True, help="signed taxonomy")
    prepare.add_argument("--trust", type=Path, metavar="PUB", help=TRUST_HELP)
    prepare.add_argument("--key", type=Path, required=True, help="the tagging authority's private key")
    prepare.add_argument("--out", required=True, help="output folder (path or fsspec URL)")
    prepare.add_argument("--name", default=None, help="dataset name (default: the source's name)")
    prepare.add_argument("--mapping", type=Path, default=None, help="CSV mapping files to classes (folder sources)")
    prepare.add_argument(
        "--class-template",
        default=None,
        help="the class from a row's columns, e.g. 'gutenberg/{genre}/{work}' (a mapping CSV), "
        "'acme/{source}' (a table's source column), 'gutenberg/{dir}/{stem}' (a folder of texts)",
    )
    prepare.add_argument("--text-column", default="text", help="table sources (default: text)")
    prepare.add_argument("--class-column", default="class", help="table sources (default: class)")
    prepare.add_argument("--id-column", default=None, help="table sources (default: row number)")
    prepare.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="DIR",
        help="a Hugging Face tokenizer directory (tokenizer.json), e.g. from 'smalti tokenizer train' "
        "(default: the characters of the source)",
    )
    _add_shaping_options(prepare)
    prepare.set_defaults(run=run_prepare)


def _add_shaping_options(prepare: argparse.ArgumentParser) -> None:
    """How examples are cut, held out, sharded and released."""
    prepare.add_argument(
        "--seq-len", type=int, default=64, help="tokens per example, plus one for the target (default 64)"
    )
    prepare.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="the share of each class's tokens held out for validation (default 0.1)",
    )
    prepare.add_argument(
        "--holdout",
        choices=("auto", "documents", "tail"),
        default="auto",
        help="what is held out: 'documents' whole documents per class, chosen by the hash of their "
        "ids (for many short documents); 'tail' the last part of every document (for long "
        "ones); 'auto' (default) documents when packing with --tokenizer, else tail. A class "
        "with one document always gives its tail",
    )
    prepare.add_argument(
        "--min-holdout-documents",
        type=int,
        default=1,
        metavar="N",
        help="with whole documents: at least N per class (default 1)",
    )
    prepare.add_argument("--shard-examples", type=int, default=20_000, help="examples per shard (default 20000)")
    prepare.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE", help="for fsspec (repeatable)"
    )
    prepare.add_argument("--overwrite", action="store_true", help="replace a dataset already at OUT")
    prepare.add_argument(
        "--version",
        type=int,
        default=None,
        metavar="N",
        help="the release number signed into the manifest (default: one above the dataset it "
        "replaces at OUT, else 1); loaders refuse a lower one than they saw (rollback)",
    )


def _add_verify_command(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser(
        "verify",
        help="check every signature, shard and example; print per-class counts",
        description="Exit 0 only if the taxonomy, the manifest signature, every shard's bytes and every example's "
        "class and content check out. Otherwise one line names the shard or example at fault.",
    )
    verify.add_argument("url", help="prepared dataset (path or fsspec URL)")
    verify.add_argument("--taxonomy", type=Path, required=True)
    verify.add_argument("--trust", type=Path, metavar="PUB", help=TRUST_HELP)
    verify.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE", help="for fsspec (repeatable)"
    )
    verify.set_defaults(run=run_verify)


def _load_taxonomy(path: Path, trust: Path | None):
    from smalti.trust.keys import PublicKey
    from smalti.trust.taxonomy import Taxonomy

    return Taxonomy.load(path, PublicKey.load(trust) if trust else None)


def run_prepare(args: argparse.Namespace) -> int:
    from smalti.data.prepare import PrepareOptions, prepare_dataset
    from smalti.data.sources import documents_from_source
    from smalti.data.tokenizer import HFTokenizer
    from smalti.trust.keys import SigningKey

    taxonomy = _load_taxonomy(args.taxonomy, args.trust)
    key = SigningKey.load(args.key)
    tokenizer = HFTokenizer.from_directory(args.tokenizer) if args.tokenizer is not None else None
    if tokenizer is not None and tokenizer.eos_id is None:
        raise SmaltiError(
            f"--tokenizer {args.tokenizer}: names no end-of-sequence token to put between packed "
            f"documents (tokenizer_config.json eos_token)"
        )
    documents = documents_from_source(
        args.source, args.mapping, args.class_template, args.text_column, args.class_column, args.id_column
    )
    options = PrepareOptions(
        name=args.name or args.source.stem,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        holdout=args.holdout,
        min_holdout_documents=args.min_holdout_documents,
        shard_examples=args.shard_examples,
        overwrite=args.overwrite,
        version=args.version,
    )
    started = time.perf_counter()
    with _writer_lock(args.out):
        manifest = prepare_dataset(
            documents,
            taxonomy,
            key,
            args.out,
            options,
            _storage_options(args.storage_option),
            tokenizer=tokenizer,
            show_progress=Console(stderr=True).is_terminal,
        )
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    examples = {name: s["examples"] for name, s in manifest["splits"].items()}
    print(
        f"{args.out}: {examples['train']:,} train + {counted(examples['val'], 'val example')} in "
        f"{counted(shards, 'shard')}, {counted(len(manifest['splits']['train']['class_counts']), 'class')}, signed by {manifest['signer']['authority']} "
        f"({time.perf_counter() - started:.1f} s)\nversion {manifest['version']}, manifest root {manifest['merkle_root']}"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from smalti.data.shards import ShardedSplit, read_manifest

    taxonomy = _load_taxonomy(args.taxonomy, args.trust)
    options = _storage_options(args.storage_option)
    manifest = read_manifest(args.url, taxonomy, options)
    started = time.perf_counter()
    total_bytes = 0
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        for split in manifest.data["splits"]:
            reader = ShardedSplit(manifest, split, taxonomy, options, cache=None, memory_shards=1)
            task = progress.add_task(f"verifying {split}", total=len(reader.shards))
            # mypy cannot infer the type of a lambda with a default argument
            reader.verify_all(lambda entry, task=task: progress.advance(task))  # type: ignore[misc]
            total_bytes += sum(entry.bytes for entry in reader.shards)
    seconds = time.perf_counter() - started
    table = new_table(f"{args.url}: verified")
    table.add_column("class", overflow="fold")
    for split in manifest.data["splits"]:
        table.add_column(split, justify="right")
    counts = {split: manifest.class_counts(split) for split in manifest.data["splits"]}
    for name in sorted(manifest.class_counts()):
        table.add_row(name, *(f"{counts[s].get(name, 0):,}" for s in counts))
    table.add_row("[bold]total", *(f"[bold]{manifest.examples(s):,}" for s in counts))
    output_console().print(table)
    print(
        f"signed by {manifest.signer}; taxonomy {taxonomy.name} ({taxonomy.fingerprint[:12]}...); "
        f"version {manifest.version}, manifest root {manifest.root}\n{total_bytes / 1e6:.1f} MB verified in {seconds:.2f} s"
    )
    return 0
