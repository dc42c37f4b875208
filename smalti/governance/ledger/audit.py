"""Forensic questions answered from a ledger's entries (read after ``verify``; never from the model).

- ``layer(L)``: which classes contributed to layer L, how much (summed gradient
  norms and mean share over the steps the layer was updated), and in how many steps;
- ``for_class(C)``: which layers C (or any class under the node C) touched, in which steps;
- ``example(ID)``: which steps held the example and which layers its signature
  contributed to there (or that it was dropped);
- ``parameter(NAME)``: the layer holding the parameter, then as ``layer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from smalti.errors import SmaltiError
from smalti.trust.entry import EntryFormatError, decode_entry
from smalti.governance.ledger.store import LedgerStore, ledger_path
from smalti.trust.taxonomy import Taxonomy, unknown_class


class AuditError(SmaltiError):
    """A question the ledger cannot answer (an unknown layer, class or parameter)."""


def step_ranges(steps: list[int]) -> str:
    """``1-4, 7, 9-10``: steps as compact ranges."""
    parts, start = [], None
    for i, step in enumerate(steps):
        if start is None:
            start = step
        if i + 1 == len(steps) or steps[i + 1] != step + 1:
            parts.append(str(start) if start == step else f"{start}-{step}")
            start = None
    return ", ".join(parts)


def describe_steps(steps: list[int], max_runs: int = 6) -> str:
    """``1,400 steps: 1-750, 900-1550`` when the ranges are few; otherwise ``195 steps from 9 to 1493``
    (``--json`` lists every step)."""
    if not steps:
        return "no step"
    count = f"{len(steps):,} step{'s' if len(steps) > 1 else ''}"
    ranges = step_ranges(steps)
    if ranges.count(",") < max_runs:
        return f"{count}: {ranges}"
    return f"{count} from {steps[0]} to {steps[-1]}"


def check_step_shape(run: dict[str, Any], step: dict[str, Any]) -> None:
    """A step entry's tables fit the run entry: a row per layer, layer indices in range, an entropy row per probed
    class. (Types are checked when entries are decoded; this is what only the run entry can tell.)"""
    if step.get("kind") != "step":
        raise EntryFormatError("not a step entry")
    if "layers" not in run:
        return  # a run entry that names no layers (only hand-made test ledgers): nothing to fit
    layers = len(run["layers"])
    if "layers" in step and len(step["layers"]) != layers:
        raise EntryFormatError(f"layers: {len(step['layers'])} rows for {layers} layers")
    for signature, cells in step.get("contributions", {}).items():
        if any(not 0 <= cell[0] < layers for cell in cells):
            raise EntryFormatError(f"contributions[{signature}]: a layer index outside 0..{layers - 1}")
    entropy, config = step.get("entropy"), run.get("entropy")
    if entropy is not None and (
        config is None
        or len(entropy) != len(config["classes"])
        or any(len(row) != len(config["layers"]) for row in entropy)
    ):
        raise EntryFormatError("entropy: not one row per probed class and a column per probed layer")
    tokens, experts = step.get("expert_tokens"), run.get("experts")
    if tokens is not None and (
        experts is None
        or not set(tokens) <= set(run.get("classes", []))
        or any(
            len(table) != len(experts["layers"]) or any(len(row) != experts["count"] for row in table)
            for table in tokens.values()
        )
    ):
        raise EntryFormatError(
            "expert_tokens: not a run class's table of a row per layer of experts, a column per expert"
        )


def _signature_classes(signature: str) -> list[str]:
    return signature.split("+")


@dataclass
class Ledger:
    """A ledger's entries decoded in memory (one pass over the store)."""

    run: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | Path, read_only: bool = False) -> "Ledger":
        store = LedgerStore(ledger_path(run_dir), read_only=read_only)
        bodies = []
        try:
            for index, _, _, data in store.rows():
                try:
                    bodies.append(decode_entry(data).body)
                except EntryFormatError as error:
                    raise AuditError(f"{ledger_path(run_dir)}: entry {index} is malformed ({error})") from None
        finally:
            store.close()
        if not bodies or bodies[0]["kind"] != "run":
            raise AuditError(f"{ledger_path(run_dir)}: empty ledger or no run entry")
        for index, body in enumerate(bodies[1:], 1):
            try:
                check_step_shape(bodies[0], body)
            except EntryFormatError as error:
                raise AuditError(f"{ledger_path(run_dir)}: entry {index} is malformed ({error})") from None
        return cls(run=bodies[0], steps=bodies[1:])

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.run["layers"]]

    def layer_index(self, name: str) -> int:
        names = self.layer_names
        if name not in names:
            close = [n for n in names if name in n][:5]
            hint = f"; did you mean {', '.join(close)}" if close else ""
            raise AuditError(f"--layer {name!r}: no such layer in this run ({len(names)} layers){hint}")
        return names.index(name)

    def contributions(self) -> Iterator[tuple[int, str, int, float, float]]:
        """(step, signature, layer, norm, share) for every recorded contribution."""
        for entry in self.steps:
            for signature, cells in entry["contributions"].items():
                for layer, norm, share in cells:
                    yield entry["step"], signature, layer, norm, share

    # ---------------------------------------------------------------- questions

    def layer(self, name: str) -> dict[str, Any]:
        index = self.layer_index(name)
        by_class: dict[str, dict[str, Any]] = {}
        for step, signature, layer, norm, share in self.contributions():
            if layer != index:
                continue
            row = by_class.setdefault(signature, {"steps": 0, "norm_sum": 0.0, "share_sum": 0.0})
            row["steps"] += 1
            row["norm_sum"] += norm
            row["share_sum"] += share
        updated = [e["step"] for e in self.steps if e["layers"][index][0]]
        total_share = sum(r["share_sum"] for r in by_class.values()) or 1.0
        for row in by_class.values():
            row["share_of_total"] = row["share_sum"] / total_share
        return {
            "layer": name,
            "parameters": self.run["layers"][index]["parameters"],
            "updated_steps": step_ranges(updated),
            "updated_count": len(updated),
            "updated_summary": describe_steps(updated),
            "classes": dict(sorted(by_class.items(), key=lambda kv: -kv[1]["share_sum"])),
        }

    def parameter(self, name: str) -> dict[str, Any]:
        for layer in self.run["layers"]:
            if name in layer["parameters"]:
                return self.layer(layer["name"])
        raise AuditError(f"--param {name!r}: no such parameter in this run")

    def for_class(self, node: str) -> dict[str, Any]:
        if not any(Taxonomy.covers(node, c) for c in self.run["classes"]):
            raise AuditError(unknown_class("--class", node, self.run["classes"]))
        touched: dict[int, list[int]] = {}
        seen_steps: list[int] = []
        examples = 0
        for entry in self.steps:
            count = sum(n for c, n in entry["counts"].items() if Taxonomy.covers(node, c))
            if count:
                seen_steps.append(entry["step"])
                examples += count
            for signature, cells in entry["contributions"].items():
                if any(Taxonomy.covers(node, c) for c in _signature_classes(signature)):
                    for layer, norm, _ in cells:
                        if norm > 0:
                            steps = touched.setdefault(layer, [])
                            if not steps or steps[-1] != entry["step"]:
                                steps.append(entry["step"])
        names = self.layer_names
        reached = self.experts_reached(node)
        return {
            **({"experts_reached": reached} if reached is not None else {}),
            "class": node,
            "examples_seen": examples,
            "steps_present": step_ranges(seen_steps),
            "steps_present_count": len(seen_steps),
            "steps_present_summary": describe_steps(seen_steps),
            "layers_touched": {
                names[j]: {
                    "steps": len(s),
                    "step_ranges": step_ranges(s),
                    "whenever_present": s == seen_steps,
                    "summary": describe_steps(s),
                }
                for j, s in sorted(touched.items())
            },
            "layers_never_touched": [names[j] for j in range(len(names)) if j not in touched],
        }

    def experts_reached(self, node: str) -> dict[str, dict[str, Any]] | None:
        """Per layer of experts, the tokens of the class (or node) each expert received over the run, and
        which experts those are (None: the model has no experts)."""
        experts = self.run.get("experts")
        if experts is None:
            return None
        totals = [[0] * experts["count"] for _ in experts["layers"]]
        for entry in self.steps:
            for name, table in entry.get("expert_tokens", {}).items():
                if Taxonomy.covers(node, name):
                    for row, counts in zip(totals, table):
                        for e, n in enumerate(counts):
                            row[e] += n
        return {
            layer: {"experts": [e for e, n in enumerate(row) if n], "tokens": row}
            for layer, row in zip(experts["layers"], totals)
        }

    def example(self, example_id: int, name: str | None = None) -> dict[str, Any]:
        names = self.layer_names
        appearances, dropped = [], []
        for entry in self.steps:
            if example_id in entry["dropped"]:
                dropped.append(entry["step"])
            for signature, ids in entry["examples"].items():
                if example_id in ids:
                    cells = entry["contributions"].get(signature, [])
                    appearances.append(
                        {
                            "step": entry["step"],
                            "classes": _signature_classes(signature),
                            "layers": [names[layer] for layer, norm, _ in cells if norm > 0],
                        }
                    )
        return {
            "example": example_id,
            "id": name,
            "steps": step_ranges([a["step"] for a in appearances]),
            "dropped_in_steps": step_ranges(dropped),
            "appearances": appearances,
        }


def training_index(run_dir: str | Path, example: str) -> int:
    """The ledger's index of an example named by its dataset id (``tempest/train/000925``), or by the index itself.

    Errors name examples by id; the ledger records them by their index in the training split.
    The id is looked up in the run's own dataset, read through the same fail-closed checks as
    training (the signed manifest of the release the run trained on, every shard read verified).
    """
    if example.isdigit():
        return int(example)
    import json

    from smalti.config import load_recipe
    from smalti.data.shards import ShardedSplit, read_manifest
    from smalti.trust.keys import PublicKey

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    data = recipe.data
    if data.url is None or data.taxonomy is None or data.trust is None:
        raise AuditError(
            f"--example {example!r}: ids name examples of a prepared dataset (data.url); this run did "
            f"not train on one, so give the example's index"
        )
    taxonomy = Taxonomy.load(data.taxonomy, PublicKey.load(data.trust))
    manifest = read_manifest(data.url, taxonomy, data.storage_options)
    trained_on = json.loads((run_dir / "data.json").read_text()).get("manifest_root")
    if trained_on and manifest.root != trained_on:
        raise AuditError(
            f"--example {example!r}: {data.url} now holds another release than the run trained on "
            f"(root {manifest.root[:16]}..., not {trained_on[:16]}...); give the example's index"
        )
    split = ShardedSplit(manifest, "train", taxonomy, data.storage_options, cache=None, memory_shards=2)
    try:
        for shard, entry in enumerate(split.shards):
            ids = split._load(shard)[1].ids  # read and verified as training reads it
            if example in ids:
                return entry.first_example + ids.index(example)
    finally:
        split.close()
    raise AuditError(f"--example {example!r}: no training example of {data.url} has this id")
