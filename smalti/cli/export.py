"""``smalti export RUN --out DIR``: a trained Hugging Face model as a folder transformers loads unchanged."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a trained Hugging Face model as a save_pretrained folder",
        description="Write RUN's model (a model.hf run) from its latest checkpoint (or --checkpoint) as a folder "
                    "that transformers' AutoModelForCausalLM.from_pretrained loads unchanged: config.json and "
                    "safetensors weights, the tokenizer (for a Hugging Face tokenizer), and each class's LoRA adapter "
                    "as a peft adapter folder under adapters/<class key> (PeftModel.from_pretrained loads it on the "
                    "base). DIR must not exist; it appears whole or not at all.")
    parser.add_argument("run_dir", type=Path, metavar="RUN")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--checkpoint", default=None, help="checkpoint path (default: the run's latest)")
    parser.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                        help="'ema': the EMA algorithm's average weights; 'auto' uses them when the run has them")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from smalti.generation import load_trained_model
    from smalti.models.hf import HFCausalLM, export

    if args.out.exists():
        raise SmaltiError(f"--out {args.out}: exists; name a new folder")
    model, tokenizer, checkpoint = load_trained_model(args.run_dir, args.checkpoint, args.weights)
    if not isinstance(model, HFCausalLM):
        raise SmaltiError(f"{args.run_dir}: export writes Hugging Face models (model.hf); this run trained "
                          f"{type(model).__name__}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        written = export(model, scratch, tokenizer)
        scratch.rename(args.out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    print(f"{args.out}: {', '.join(written)} (from {Path(checkpoint).name})")
    return 0
