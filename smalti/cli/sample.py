"""``smalti sample RUN_DIR --prompt TEXT``: generate text from a trained run; ``--out FILE.png``: images from a
diffusion run."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text (or, from a diffusion run, images) from a trained run",
        description="Generate a continuation of PROMPT with the run's latest checkpoint (or --checkpoint). "
        "From a diffusion run (model.name diffusion), --out FILE.png writes a grid of --images generated images.",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by 'smalti train'")
    parser.add_argument("--prompt", help="text to continue (only characters of the vocabulary); text models")
    parser.add_argument("--out", type=Path, help="a diffusion run: the PNG grid of generated images to write")
    parser.add_argument("--images", type=int, default=16, help="a diffusion run: how many images (default 16)")
    parser.add_argument(
        "--steps",
        type=int,
        default=250,
        help="a diffusion run: denoising steps, at most its training timesteps "
        "(default 250; fewer is faster and coarser)",
    )
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

    if args.out is not None:
        return _sample_images(args)
    if args.prompt is None:
        raise SmaltiError("give --prompt TEXT (a text model) or --out FILE.png (a diffusion model)")
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


def _sample_images(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from smalti.generation import sample_images
    from smalti.models.diffusion import save_png

    if args.prompt is not None:
        raise SmaltiError("--prompt continues text; a diffusion run takes --out alone")
    if not 1 <= args.images <= 1024:
        raise SmaltiError(f"--images must be between 1 and 1024, got {args.images}")
    if args.out.suffix.lower() != ".png":
        raise SmaltiError(f"--out {args.out}: write a .png file")
    if not args.out.parent.resolve().is_dir():
        raise SmaltiError(f"--out {args.out}: folder {args.out.parent} does not exist")
    images = sample_images(
        args.run_dir, args.images, args.steps, args.seed, args.checkpoint, args.weights, args.adapters
    )
    handle, temporary = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_png(images, temporary)
        os.replace(temporary, args.out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    adapters = f" with the adapter of {', '.join(args.adapters)}" if args.adapters else ""
    print(f"wrote {args.images} images ({args.steps} denoising steps{adapters}) to {args.out}")
    return 0
