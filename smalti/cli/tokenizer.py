"""``smalti tokenizer train``: a byte-level BPE trained with Hugging Face ``tokenizers`` on a source's texts."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer",
        description="Tokenizers for 'smalti data prepare --tokenizer DIR'.",
    )
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    train = sub.add_parser(
        "train",
        help="train a byte-level BPE on a source's texts",
        description="Train a byte-level BPE (Hugging Face tokenizers) on the texts of SOURCE, any source 'data "
        "prepare' reads, with one special token, <|endoftext|>, that ends every packed document. Writes "
        "DIR/tokenizer.json and DIR/tokenizer_config.json, which transformers' AutoTokenizer loads.",
    )
    train.add_argument(
        "--source",
        type=Path,
        required=True,
        help="folder of texts, a .parquet/.jsonl/.csv table, or a datasets folder (save_to_disk)",
    )
    train.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, at least 260")
    train.add_argument("--out", type=Path, required=True, metavar="DIR", help="the tokenizer directory to write")
    train.add_argument("--mapping", type=Path, default=None, help="CSV mapping files to classes (folder sources)")
    train.add_argument("--class-template", default=None, help="e.g. 'gutenberg/{genre}/{work}' (folder sources)")
    train.add_argument("--text-column", default="text", help="table sources (default: text)")
    train.add_argument("--class-column", default="class", help="table sources (default: class)")
    train.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in DIR")
    train.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from smalti.data.sources import documents_from_source
    from smalti.data.tokenizer import train_bpe
    from smalti.errors import DataError

    if (args.out / "tokenizer.json").exists() and not args.overwrite:
        raise DataError(f"{args.out}: already holds a tokenizer (pass --overwrite to replace it)")
    documents = documents_from_source(
        args.source, args.mapping, args.class_template, args.text_column, args.class_column
    )
    tokenizer = train_bpe((doc.text for doc in documents), args.vocab_size)
    tokenizer.save(args.out)
    print(
        f"{args.out}: byte-level BPE, {tokenizer.vocab_size:,} tokens, end of sequence {tokenizer.eos_token!r} "
        f"(id {tokenizer.eos_id}); sha256 {tokenizer.fingerprint}"
    )
    return 0
