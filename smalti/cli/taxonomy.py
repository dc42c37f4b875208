"""``smalti taxonomy init|show``: write a taxonomy from a class list, or display a signed one."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.tree import Tree

from smalti.data.sources import classes_from_mapping
from smalti.cli.arguments import named_key
from smalti.cli.output import console as output_console, counted
from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey
from smalti.io import atomic_write_text
from smalti.trust.taxonomy import Taxonomy, taxonomy_yaml


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "taxonomy",
        help="write or show a provenance taxonomy",
        description="The taxonomy lists provenance classes, authorities and tagging rights.",
    )
    sub = parser.add_subparsers(dest="taxonomy_command", metavar="COMMAND", required=True)
    init = sub.add_parser(
        "init",
        help="write a taxonomy file (then sign it with the data-governance key)",
        description="Write a taxonomy YAML: classes from a CSV mapping (and --class), authorities from public keys. "
        "Sign it afterwards: smalti sign OUT --key data-governance.key",
    )
    init.add_argument("out", type=Path, help="taxonomy file to write")
    init.add_argument("--name", required=True, help="the taxonomy's name")
    init.add_argument("--classes-from", type=Path, help="CSV whose rows give classes (see --class-template)")
    init.add_argument(
        "--class-template",
        default=None,
        help="class of a CSV row from its columns, e.g. 'gutenberg/{genre}/{work}' (default: 'class' column)",
    )
    init.add_argument(
        "--class", dest="classes", action="append", default=[], metavar="PATH", help="add a class path (repeatable)"
    )
    init.add_argument("--data-governance", type=Path, required=True, metavar="PUB", help="data-governance public key")
    init.add_argument(
        "--tagger",
        action="append",
        default=[],
        metavar="NAME=PUB:SUBTREE[,SUBTREE]",
        help="a tagging authority, its public key and the subtrees it may tag (repeatable)",
    )
    init.add_argument("--model-risk", type=Path, metavar="PUB", help="model-risk public key (owns routing policies)")
    init.add_argument("--trainer", type=Path, metavar="PUB", help="trainer public key (signs ledgers)")
    init.add_argument(
        "--auditor",
        action="append",
        default=[],
        metavar="NAME=PUB",
        help="an auditor and its public key: may read runs through smalti serve (repeatable)",
    )
    init.add_argument(
        "--evaluator",
        action="append",
        default=[],
        metavar="NAME=PUB",
        help="an evaluator and its public key: signs evaluation attestations (smalti evaluate; repeatable)",
    )
    init.add_argument(
        "--deletable",
        action="append",
        default=[],
        metavar="CLASS",
        help="mark a class as one that may have to be deleted later (repeatable)",
    )
    init.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    init.set_defaults(run=run_init)

    show = sub.add_parser("show", help="verify a taxonomy and print its classes and authorities")
    show.add_argument("taxonomy", type=Path)
    show.add_argument(
        "--trust",
        type=Path,
        metavar="PUB",
        help="pinned data-governance public key; without it only self-consistency is checked",
    )
    show.set_defaults(run=run_show)


def _tagger(text: str) -> tuple[str, Path, list[str]]:
    try:
        name, rest = text.split("=", 1)
        pub, subtrees = rest.rsplit(":", 1)
    except ValueError:
        raise SmaltiError(f"--tagger {text!r}: expected NAME=PUB:SUBTREE[,SUBTREE]") from None
    return name, Path(pub), [s for s in subtrees.split(",") if s]


def run_init(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise SmaltiError(f"{args.out}: already exists (pass --force to overwrite)")
    classes = list(args.classes)
    if args.classes_from:
        classes += classes_from_mapping(args.classes_from, args.class_template)
    if not classes:
        raise SmaltiError("no classes: give --classes-from CSV or --class PATH")
    authorities: dict[str, dict] = {
        "data-governance": {"role": "data-governance", "key": PublicKey.load(args.data_governance).text}
    }
    for text in args.tagger:
        name, pub, subtrees = _tagger(text)
        authorities[name] = {"role": "tagging", "key": PublicKey.load(pub).text, "may_tag": subtrees}
    for role, path in (("model-risk", args.model_risk), ("trainer", args.trainer)):
        if path is not None:
            authorities[role] = {"role": role, "key": PublicKey.load(path).text}
    for role, entries in (("auditor", args.auditor), ("evaluator", args.evaluator)):
        for entry in entries:
            name, pub = named_key(entry, f"--{role}")
            if name in authorities:
                raise SmaltiError(f"--{role} {name}: an authority of that name exists already")
            authorities[name] = {"role": role, "key": PublicKey.load(pub).text}
    text = taxonomy_yaml(args.name, classes, authorities, args.deletable)
    Taxonomy.parse(text.encode(), str(args.out))  # refuse to write what would not load
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(
        f"{args.out}: {counted(len(classes), 'class')}, {counted(len(authorities), 'authority', 'authorities')}; "
        f"now sign it: smalti sign {args.out} --key <data-governance.key>"
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    trust = PublicKey.load(args.trust) if args.trust else None
    taxonomy = Taxonomy.load(args.taxonomy, trust)
    check = "pinned data-governance key" if trust else "its own data-governance key (not pinned)"
    tree = Tree(f"[bold]{taxonomy.name}[/bold]  (signature verified against {check})")
    nodes = {"": tree}
    for name in taxonomy.classes:
        parent = name.rsplit("/", 1)[0] if "/" in name else ""
        label = name.rsplit("/", 1)[-1] + ("  [red]deletable[/red]" if name in taxonomy.deletable else "")
        nodes[name] = nodes[parent].add(label)
    console = output_console()  # names are never cut, in a terminal or not
    console.print(tree)
    for authority in taxonomy.authorities.values():
        key = authority.key.key_id if authority.key else "-"
        rights = f"  may tag: {', '.join(authority.may_tag)}" if authority.may_tag else ""
        console.print(f"{authority.name}: {authority.role}, key {key}{rights}", highlight=False)
    print(f"fingerprint {taxonomy.fingerprint}")
    return 0
