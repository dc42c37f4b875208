"""``smalti sample RUN_DIR --prompt TEXT``: generate text from a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text from a trained run",
        description="Generate a continuation of PROMPT with the run's latest checkpoint (or --checkpoint).",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by 'smalti train'")
    parser.add_argument("--prompt", required=True, help="text to continue (only characters of the vocabulary)")
    parser.add_argument("--tokens", type=int, default=300, help="how many tokens to generate (default 300)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same text (default 0)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint path or URL (default: the run's latest)")
    parser.add_argument(
        "--weights",
        choices=("auto", "raw", "ema"),
        default="auto",
        help="'ema' uses the EMA algorithm's average weights; 'auto' uses them when the run has them "
        "and, for optimizer.name schedulefree_adamw, the averaged weights it evaluates at; 'raw': the parameters as "
        "trained",
    )
    parser.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        default=[],
        metavar="CLASS",
        help="switch on the per-class adapter of CLASS (repeatable; default: the shared model alone)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from smalti.generation import load_generator

    if args.tokens < 1:
        raise SmaltiError(f"--tokens must be at least 1, got {args.tokens}")
    generator = load_generator(args.run_dir, checkpoint=args.checkpoint, weights=args.weights, adapters=args.adapters)
    text = generator.sample(
        args.prompt,
        max_new_tokens=args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        rng=torch.Generator().manual_seed(args.seed),
    )
    print(text)
    return 0
