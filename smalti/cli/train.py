"""``smalti train RECIPE``: train, or resume the run directory's last checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smalti.cli.output import console as output_console, table as new_table
from smalti.config import Recipe, load_recipe


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a recipe (resumes automatically)",
        description=(
            "Train the model a recipe describes. If the run directory already holds a checkpoint "
            "(from a crash, a kill or an earlier run), training resumes from it exactly. "
            "Works the same under 'torchrun --nproc-per-node N -m smalti train ...'."
        ),
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML file (see recipes/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, e.g. --set train.max_duration=200ba (repeatable)",
    )
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="where checkpoints and logs go (default: runs/<recipe name>)"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="PARENT_RUN",
        help="a fine-tune: start from PARENT_RUN's final weights (only those), after verifying its ledger and the "
        "chain behind it; the run's first ledger entry names the parent (same as --set init.from_run=...)",
    )
    parser.set_defaults(run=run, trains=True)


def resolve_run_dir(recipe: Recipe, recipe_path: Path, override: Path | None) -> Path:
    if override is not None:
        return override
    if recipe.run_dir is not None:
        return recipe.run_dir
    return Path("runs") / recipe_path.stem


def run(args: argparse.Namespace) -> int:
    from smalti.trainer import Trainer  # torch import is slow; keep --help fast

    overrides = list(args.overrides) + ([f"init.from_run={args.init_from}"] if args.init_from is not None else [])
    recipe = load_recipe(args.recipe, overrides)
    trainer = Trainer(recipe, resolve_run_dir(recipe, args.recipe, args.run_dir))
    lock = trainer.run_lock
    if lock is not None and lock.took_over_stale:
        holder = lock.previous
        print(
            f"smalti: note: {trainer.run_dir}: its previous writer (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}) ended without releasing it; resuming",
            file=sys.stderr,
        )
    try:
        result = trainer.fit()
        if trainer.dist.is_main:
            print_summary(result)
    except KeyboardInterrupt:
        kept = trainer.checkpoints.latest() if trainer.dist.is_main else None
        raise KeyboardInterrupt(
            f"the last checkpoint is {kept}: run the same command again to resume from it"
            if kept
            else "no checkpoint was written yet: running the command again starts over"
        ) from None
    finally:
        trainer.close()
    return 0


def print_summary(result) -> None:
    ts = result.timestamp
    if result.already_complete:
        title = f"smalti train: the run is already complete (epoch {ts.epoch}, batch {ts.batch}); its recorded summary"
    else:
        title = "smalti train: summary"
    table = new_table(title, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("run directory", str(result.run_dir))
    if result.resumed_from is not None and not result.already_complete:
        table.add_row("resumed from", result.resumed_from.describe())
    table.add_row("trained to", f"epoch {ts.epoch}, batch {ts.batch}, {ts.sample:,} samples, {ts.token:,} tokens")
    table.add_row("parameters", f"{result.parameters:,}")
    if result.already_complete:
        table.add_row(
            "wall time",
            f"{result.total_seconds:.1f} s in all sessions (nothing trained now; raise train.max_duration to train on)",
        )
    else:
        total = f", {result.total_seconds:.1f} s in all sessions" if result.resumed_from is not None else ""
        table.add_row("wall time", f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s){total}")
    table.add_row("final train loss", f"{result.train_loss:.4f}")
    for name, value in result.eval_metrics.items():
        table.add_row(f"final {name}", f"{value:.4f}")
    table.add_row("checkpoint", str(result.checkpoint))
    table.add_row("metrics", str(result.run_dir / "metrics.jsonl"))
    output_console().print(table)
