"""``smalti export RUN --out DIR``: a trained Hugging Face model as a folder transformers loads unchanged."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a trained Hugging Face model as a save_pretrained folder",
        description="Write RUN's model (a model.hf run) from its latest checkpoint (or --checkpoint) as a folder "
        "that transformers' AutoModelForCausalLM.from_pretrained loads unchanged: config.json and "
        "safetensors weights, the tokenizer (for a Hugging Face tokenizer), and each class's LoRA adapter "
        "as a peft adapter folder under adapters/<class key> (PeftModel.from_pretrained loads it on the "
        "base). DIR must not exist; it appears whole or not at all.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--checkpoint", default=None, help="checkpoint path (default: the run's latest)")
    parser.add_argument(
        "--weights",
        choices=("auto", "raw", "ema"),
        default="auto",
        help="'ema': the EMA algorithm's average weights; 'auto' uses them when the run has them "
        "and, for optimizer.name schedulefree_adamw, the averaged weights it evaluates at; 'raw': the parameters as "
        "trained",
    )
    parser.add_argument(
        "--sign",
        action="store_true",
        help="sign the folder: the run's evaluations of this checkpoint (evaluations/, each signed by an "
        "evaluator of its taxonomy), an in-toto/SLSA provenance statement "
        "signed by the trainer key (provenance.intoto.json), then an OpenSSF model signature over "
        "every file (model.sig); check with smalti verify-model or model_signing verify",
    )
    parser.add_argument(
        "--trainer-key",
        type=Path,
        help="--sign: the trainer's Ed25519 private key, the one that "
        "signed the run's ledger (default: the recipe's governance.ledger.key)",
    )
    parser.add_argument(
        "--model-key",
        type=Path,
        help="--sign: the trainer's ECDSA P-256 private key for model signing (smalti keys new NAME --type ecdsa-p256)",
    )
    parser.set_defaults(run=run)

    verify = subparsers.add_parser(
        "verify-model",
        help="check a signed model folder: its model signature, provenance and ledger checkpoint",
        description="Check DIR as smalti export --sign wrote it: the OpenSSF model signature (model.sig) over every "
        "file, the in-toto statement's DSSE signature by the trainer key, that the files are the "
        "statement's subjects, and the final ledger checkpoint it carries (a C2SP signed note by the "
        "trainer key). Exit 1 naming the first thing that does not hold.",
    )
    verify.add_argument("directory", type=Path, metavar="DIR")
    verify.add_argument("--trainer-pubkey", type=Path, required=True, help="the trainer's Ed25519 public key")
    verify.add_argument("--model-pubkey", type=Path, required=True, help="the trainer's model-signing public key (PEM)")
    verify.set_defaults(run=run_verify)


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from smalti.generation import load_trained_model
    from smalti.models.hf import HFCausalLM, export

    if args.out.exists():
        raise SmaltiError(f"--out {args.out}: exists; name a new folder")
    from rich.console import Console

    progress = Console(stderr=True)
    if args.sign:
        trainer_key, model_key = _signing_keys(args)
    with progress.status("loading the trained model"):
        model, tokenizer, checkpoint = load_trained_model(args.run_dir, args.checkpoint, args.weights)
    if not isinstance(model, HFCausalLM):
        raise SmaltiError(
            f"{args.run_dir}: export writes Hugging Face models (model.hf); this run trained {type(model).__name__}"
        )
    from smalti.workflows.certificate import ablated_classes

    left_out = frozenset(ablated_classes(args.run_dir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        with progress.status("writing the model folder (transformers, peft)"):
            written = export(model, scratch, tokenizer, left_out)
        if args.sign:
            from smalti.checkpoint import load_payload
            from smalti.workflows.provenance import sign_model

            with progress.status("signing: in-toto provenance, then an OpenSSF model signature over every file"):
                evaluations = sign_model(
                    scratch,
                    args.run_dir,
                    load_payload(checkpoint, tensors=False).to_dict(),
                    trainer_key,
                    model_key,
                    Path(checkpoint).name,
                )
            written += [f"evaluation {name}" for name in evaluations] + ["provenance.intoto.json", "model.sig"]
        try:
            scratch.rename(args.out)  # whole or not at all; a second export to the same --out finds it taken
        except OSError:
            raise SmaltiError(
                f"--out {args.out}: appeared while exporting (another export?); nothing written"
            ) from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    print(f"{args.out}: {', '.join(written)} (from {Path(checkpoint).name})")
    for name in sorted(left_out):
        print(f"left out the adapter of {name}: ablated by smalti forget (see the run's deletion certificate)")
    return 0


def _signing_keys(args: argparse.Namespace):
    from smalti.config import load_recipe
    from smalti.trust.keys import SigningKey

    if args.model_key is None:
        raise SmaltiError("--sign needs --model-key (an ECDSA P-256 key: smalti keys new NAME --type ecdsa-p256)")
    trainer = args.trainer_key
    if trainer is None and (args.run_dir / "recipe.yaml").is_file():
        trainer = load_recipe(args.run_dir / "recipe.yaml").governance.ledger.key
    if trainer is None:
        raise SmaltiError("--sign needs --trainer-key (the run's recipe names no governance.ledger.key)")
    from smalti.workflows.provenance import check_model_key

    check_model_key(args.model_key)
    return SigningKey.load(trainer), args.model_key


def run_verify(args: argparse.Namespace) -> int:
    from smalti.trust.keys import PublicKey
    from smalti.workflows.provenance import verify_model

    for line in verify_model(args.directory, PublicKey.load(args.trainer_pubkey), args.model_pubkey):
        print(line)
    return 0
