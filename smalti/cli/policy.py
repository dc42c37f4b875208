"""``smalti policy check``: validate a routing policy against a recipe and show what it allows."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from smalti.cli.output import console as output_console, counted, table as new_table
from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "policy",
        help="check a routing policy and print its allow-matrix",
        description="Routing policies decide which parameters learn from which classes.",
    )
    sub = parser.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    check = sub.add_parser(
        "check",
        help="validate a policy against a recipe's model and taxonomy; print the allow-matrix",
        description=(
            "Check the policy's signature (by the model-risk authority of the recipe's taxonomy), its taxonomy "
            "and model fingerprints, every class and every parameter pattern, and that exclusive rules do not "
            "overlap; then print, for each phase of training, which classes may update which layers. "
            "With --bind OUT, read the (unsigned) policy, write a copy bound to this taxonomy and model to OUT, "
            "and check that; sign OUT afterwards with the model-risk key."
        ),
    )
    check.add_argument("policy", type=Path)
    check.add_argument("--recipe", type=Path, required=True, help="the recipe the policy will train under")
    check.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override, as for 'smalti train' (repeatable)",
    )
    check.add_argument("--bind", type=Path, metavar="OUT", help="write a copy bound to the taxonomy and model")
    check.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    from smalti.build import build_model, with_recipe_surgery
    from smalti.config import load_recipe
    from smalti.core.state import DataShape
    from smalti.core.time import Time
    from smalti.data.shards import open_tokenizer, read_manifest
    from smalti.trust.keys import PublicKey
    from smalti.trust.policy import Policy, leaf_classes, model_fingerprint
    from smalti.governance.routing import Router
    from smalti.trust.taxonomy import Taxonomy
    from smalti.io import atomic_write_text

    recipe = load_recipe(args.recipe, args.overrides)
    data = recipe.data
    if data.taxonomy is None or data.trust is None or (data.url is None and data.images is None):
        raise SmaltiError(
            f"{args.recipe}: a policy needs a recipe with data.taxonomy and data.trust, and data.url (or data.images)"
        )
    taxonomy = Taxonomy.load(data.taxonomy, PublicKey.load(data.trust))
    if data.url is not None:
        manifest = read_manifest(data.url, taxonomy, data.storage_options)
        vocab_size, train_examples = open_tokenizer(manifest).vocab_size, manifest.examples("train")
    else:  # the bundled digits: their classes checked against the taxonomy as training will
        from smalti.build import build_data
        from smalti.distributed import DistInfo

        images = build_data(recipe, DistInfo())
        vocab_size, train_examples = 0, len(images.train)
    model = with_recipe_surgery(build_model(recipe, vocab_size, list(taxonomy.classes)), recipe)
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    fingerprint = model_fingerprint(shapes)

    path = args.policy
    if args.bind is not None:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict):
            raise SmaltiError(f"{path}: a policy is a mapping")
        spec["taxonomy"] = {"name": taxonomy.name, "fingerprint": taxonomy.fingerprint}
        spec["model"] = {"fingerprint": fingerprint}
        Policy.parse(yaml.safe_dump(spec, sort_keys=False).encode(), str(path)).check(
            taxonomy, [n for n, _ in shapes], fingerprint, str(path)
        )
        atomic_write_text(args.bind, yaml.safe_dump(spec, sort_keys=False))
        print(
            f"{args.bind}: bound to taxonomy {taxonomy.fingerprint[:12]}... and model {fingerprint[:12]}...; "
            f"sign it: smalti sign {args.bind} --key <model-risk.key>"
        )
        path = args.bind
    policy = Policy.load(path, taxonomy, signed=args.bind is None)
    policy.check(taxonomy, [n for n, _ in shapes], fingerprint, str(path))

    batch = recipe.train.global_batch_size
    shape = DataShape(train_examples // batch, batch, recipe.seq_len)
    max_duration = Time.parse(recipe.train.max_duration)
    router = Router(model, list(taxonomy.classes), policy, [], lambda t: shape.batches_in(t, max_duration))
    router.close()
    print_matrix(router, leaf_classes(list(taxonomy.classes)), shape.batches_in(max_duration, max_duration))
    state = "bound, not yet signed" if args.bind else "signature verified"
    print(
        f"{path}: valid ({state}); {counted(len(policy.rules), 'rule')}, {len(policy.exclusive)} exclusive; "
        f"fingerprint {policy.fingerprint}"
    )
    return 0


def print_matrix(router, classes: list[str], total_batches: float) -> None:
    """One table per phase: layers down, groups of classes that behave alike across (numbered as the audit
    report numbers them: the taxonomy's leaves, in its order)."""
    from smalti.trust.policy import group_label

    layers: dict[str, list[int]] = {}
    for i, name in enumerate(router.names):
        layers.setdefault(name.rsplit(".", 1)[0], []).append(i)
    console = output_console()  # names are never cut, in a terminal or not
    starts = [p.start_batch for p in router.phases] + [int(total_batches)]
    for phase, end in zip(router.phases, starts[1:]):
        columns: dict[bytes, list[str]] = {}
        rows = [router.class_names.index(c) for c in classes]
        for c, index in zip(classes, rows):
            columns.setdefault(phase.allowed[index].tobytes(), []).append(c)
        label = f"phase: batches {phase.start_batch}..{end} ({phase.start_batch / total_batches:.2f}..{end / total_batches:.2f}dur)"
        table = new_table(label)
        table.add_column("layer", overflow="fold")  # a long adapter name folds at 80 columns, never cut
        groups = list(columns.values())
        for number, members in enumerate(groups, start=1):
            table.add_column(f"({number}) {group_label(members)}", justify="center", overflow="fold")
        for layer, indices in layers.items():
            marks = []
            for members in groups:
                allowed = phase.allowed[router.class_names.index(members[0]), indices]
                marks.append("[green]✓" if allowed.all() else "[red]✗" if not allowed.any() else "[yellow]~")
            table.add_row(layer, *marks)
        console.print(table)
        for number, members in enumerate(groups, start=1):
            console.print(f"  ({number}) {', '.join(members)}", highlight=False, soft_wrap=True)
