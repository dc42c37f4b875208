"""The audit report: one self-contained HTML file an auditor opens offline.

Plots are drawn with matplotlib (the standard, well-kept plotting library) as
inline SVG with real text, so the file needs no network, no JavaScript and no
companion files, and its names can be searched and selected. It is laid out
for a 1280-pixel screen: every figure scales to the page width, nothing scrolls
sideways.

What it shows, in the order an auditor asks: is the evidence intact (the
verification, the signed tree head); what governed the run (software, dataset,
taxonomy and its authorities by name, the policy's rules and what they allowed
per phase, from the ledger's own record); what each layer learned from which
class (the contribution heatmap, on a log scale, forbidden cells marked); how
each class fares on held-out data; how training moved (update norms, class
composition, entropy profiles); and, for a run made by ``smalti forget``, its
deletion certificate.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import yaml

from smalti.errors import SmaltiError
from smalti.governance.ledger.audit import Ledger
from smalti.governance.ledger.verify import VerifyReport
from smalti.io import atomic_write_bytes
from smalti.software import describe, software

EVIDENCE = "evidence"  # RUN_DIR/evidence/: the trainer's copies of the signed taxonomy and policy

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.sub { color: #555; margin-top: 0; }
.status { padding: 0.8rem 1rem; border-radius: 6px; font-weight: 600; }
.ok { background: #e4f5e9; color: #14532d; } .bad { background: #fde8e8; color: #7f1d1d; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 0 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
td, th { border: 1px solid #ddd; padding: 0.2rem 0.5rem; vertical-align: top; }
th { background: #f5f5f5; text-align: left; } code { font-size: 0.8rem; word-break: break-all; }
td.y { background: #dcfce7; text-align: center; } td.n { background: #fee2e2; text-align: center; }
td.p { background: #fef9c3; text-align: center; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figcaption { color: #555; font-size: 0.85rem; }
svg { max-width: 100%; height: auto; }
"""


# ---------------------------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any, spec: str = ".4f") -> str:
    """A number as text (a non-number as itself, escaped by the caller): ledgers and certificates are the audited
    party's writing, so nothing in them is assumed to be the type it should be."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in pairs) + "</table>"


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _group(name: str) -> str:
    """The taxonomy node a class sits under (``gutenberg/tragedy`` for ``gutenberg/tragedy/hamlet``)."""
    return name.rsplit("/", 1)[0] if "/" in name else ""


@dataclass(frozen=True)
class ServedBy:
    """How the audit service renders the report of a folder the audited party wrote: files are read only where
    no symbolic link leads out of the run, paths are shown by ``path_label``, a certificate is checked against
    the taxonomy's trainer key alone (no ledger it names is opened), and a checkpoint over ``max_checkpoint_bytes``
    is not read."""

    path_label: Callable[[str], str]
    certificate_key: Any  # a PublicKey
    max_checkpoint_bytes: int
    evaluators: dict[str, Any] = field(default_factory=dict)  # name -> PublicKey: the taxonomy's evaluators


def plain_file(run_dir: Path, *parts: str) -> Path | None:
    """``run_dir/parts...`` if every folder on the way is a real folder and the end a plain file (no link)."""
    path = run_dir
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return None
    path = path / parts[-1]
    return path if path.is_file() and not path.is_symlink() else None


def _read_evidence(run_dir: Path, name: str, fingerprint: str | None) -> tuple[bytes | None, str]:
    """A signed document the trainer copied into the run, if its sha256 is the one the ledger records."""
    import hashlib

    path = plain_file(run_dir, EVIDENCE, name)
    if path is None:
        return None, f"not in the run directory ({EVIDENCE}/{name})"
    data = path.read_bytes()
    if fingerprint and hashlib.sha256(data).hexdigest() != fingerprint:
        return None, f"{EVIDENCE}/{name} is not the document the ledger records (sha256 differs): not shown"
    return data, f"{EVIDENCE}/{name}, sha256 as the ledger records"


# ---------------------------------------------------------------------------------------------- figures


def _label(name: str) -> str:
    """A row's name: the class and the node above it (``tragedy/hamlet``), or each class of a mixed signature."""
    return "+".join("/".join(n.split("/")[-2:]) for n in name.split("+"))


def contribution_matrix(ledger: Ledger) -> tuple[list[str], np.ndarray]:
    """Rows and the [rows, layers] mean share of each layer's gradient: every class examples can carry (the
    taxonomy's leaves, in its order, and any other class that contributed), then each mixed signature."""
    names = list(ledger.run["classes"])
    reached = {s for e in ledger.steps for s in e["contributions"]}
    leaves = [c for c in names if not any(o.startswith(c + "/") for o in names) or c in reached]
    rows = leaves + sorted(s for s in reached if s not in names)
    index = {s: i for i, s in enumerate(rows)}
    totals = np.zeros((len(rows), len(ledger.layer_names)))
    for _, signature, layer, _, share in ledger.contributions():
        totals[index[signature], layer] += share
    sums = totals.sum(axis=0, keepdims=True)
    return rows, np.divide(totals, sums, out=np.zeros_like(totals), where=sums > 0)


def forbidden_cells(ledger: Ledger, rows: list[str]) -> np.ndarray:
    """[rows, layers]: 2 the policy denied the class the layer in every phase, 1 in some, 0 never."""
    phases = ledger.run.get("routing") or []
    classes = ledger.run["classes"]
    marks = np.zeros((len(rows), len(ledger.layer_names)), dtype=int)
    if not phases:
        return marks
    for r, name in enumerate(rows):
        if name not in classes:
            continue
        strings = [phase["layers"][classes.index(name)] for phase in phases]
        for layer in range(len(ledger.layer_names)):
            cells = [s[layer] for s in strings]
            marks[r, layer] = 2 if all(c == "0" for c in cells) else 1 if any(c != "1" for c in cells) else 0
    return marks


def _heatmap(ledger: Ledger) -> str:
    import matplotlib.colors as colors
    import matplotlib.pyplot as plt

    rows, matrix = contribution_matrix(ledger)
    forbidden = forbidden_cells(ledger, rows)
    layers = ledger.layer_names
    width = min(13.0, 2.6 + 0.26 * len(layers))
    height = max(3.0, 0.19 * len(rows) + 1.8)
    fig, ax = plt.subplots(figsize=(width, height))
    shown = np.ma.masked_less_equal(matrix, 0.0)  # never reached: blank, not the scale's darkest colour
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    floor = max(1e-4, float(shown.min()) if shown.count() else 1e-4)
    image = ax.imshow(
        shown, aspect="auto", cmap=cmap, norm=colors.LogNorm(vmin=floor, vmax=1.0), interpolation="nearest"
    )
    for r, layer in zip(*np.nonzero(forbidden)):
        ax.text(
            layer, r, "×" if forbidden[r, layer] == 2 else "/", ha="center", va="center", fontsize=7, color="#b91c1c"
        )
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6.5)
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=6.5)
    groups = [_group(r) for r in rows]
    for r in range(1, len(rows)):  # a line between the taxonomy's groups
        if groups[r] != groups[r - 1]:
            ax.axhline(r - 0.5, color="#333", linewidth=0.8)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="share of the layer's gradient, over the run (log scale)", pad=0.09, fraction=0.03)
    return _svg(fig)


def _update_norms(ledger: Ledger) -> str:
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in ledger.steps]
    norms = np.array([[layer[1] for layer in e["layers"]] for e in ledger.steps]).T  # [L, steps]
    fig, ax = plt.subplots(figsize=(12, max(3, 0.16 * len(ledger.layer_names) + 1)))
    image = ax.imshow(
        np.log10(np.maximum(norms, 1e-12)),
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(norms) - 0.5, -0.5),
        vmin=-8,
    )
    ax.set_yticks(range(len(ledger.layer_names)), ledger.layer_names, fontsize=6.5)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label="log10 update norm (black: not updated)")
    return _svg(fig)


def _composition(ledger: Ledger, top: int = 12) -> str:
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in ledger.steps]
    totals: dict[str, int] = {}
    for e in ledger.steps:
        for name, n in e["counts"].items():
            totals[name] = totals.get(name, 0) + n
    shown = sorted(totals, key=lambda n: -totals[n])[:top]
    series = [[e["counts"].get(name, 0) for e in ledger.steps] for name in shown]
    other = [sum(n for c, n in e["counts"].items() if c not in shown) for e in ledger.steps]
    window = max(1, len(steps) // 100)  # smooth long runs so the bands stay readable
    smooth = lambda xs: np.convolve(xs, np.ones(window) / window, mode="same")  # noqa: E731
    palette = [plt.get_cmap("tab20")(i) for i in range(20)]
    labels = [_label(n) for n in shown] + (["all other classes"] if any(other) else [])
    data = [smooth(s) for s in series] + ([smooth(other)] if any(other) else [])
    colours = palette[: len(shown)] + (["#bdbdbd"] if any(other) else [])  # "other" never shares a colour
    fig, ax = plt.subplots(figsize=(12, 3.8))
    ax.stackplot(steps, *data, labels=labels, colors=colours)
    ax.set_xlabel("step")
    ax.set_ylabel("examples per step")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig)


def _entropy(ledger: Ledger) -> str | None:
    import matplotlib.pyplot as plt

    config = ledger.run.get("entropy")
    measured = [e for e in ledger.steps if "entropy" in e]
    if not config or not measured:
        return None
    layers, classes = config["layers"], config["classes"]
    steps = [e["step"] for e in measured]
    values = np.array([e["entropy"] for e in measured])  # [T, C, L]
    # Constrained layout makes room for the right panel's class names (long taxonomy paths) instead of letting
    # them run into the left panel; the legend sits under the left panel, clear of both.
    fig, (over_time, profile) = plt.subplots(
        1,
        2,
        figsize=(12, max(3.8, 0.16 * len(classes) + 1.2)),
        gridspec_kw={"width_ratios": [1, 1]},
        layout="constrained",
    )
    palette = plt.get_cmap("tab10" if len(layers) <= 10 else "tab20")
    for j, layer in enumerate(layers):
        over_time.plot(steps, values[:, :, j].mean(axis=1), label=layer, color=palette(j % palette.N))
    over_time.set_xlabel("step")
    over_time.set_ylabel("spectral entropy (mean over classes)")
    over_time.legend(
        fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, len(layers)), frameon=False
    )
    image = profile.imshow(values[-1], aspect="auto", cmap="cividis", interpolation="nearest")
    profile.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    profile.set_yticks(range(len(classes)), [_label(c) for c in classes], fontsize=6.5)
    profile.set_title(f"every class, at step {steps[-1]}", fontsize=9)
    fig.colorbar(image, ax=profile, label="spectral entropy")
    return _svg(fig)


# ---------------------------------------------------------------------------------------------- sections


def _governance(run_dir: Path, ledger: Ledger, path_label: Callable[[str], str] = str) -> str:
    """Software, data, taxonomy with its authorities by name, the policy's rules and what they allowed."""
    fingerprints = ledger.run.get("fingerprints") or {}
    data = _json_object(run_dir / "data.json")
    run_software = ledger.run.get("software") or {}
    facts: list[tuple[str, Any]] = [("trained with", _describe(run_software)), ("this report by", describe(software()))]
    if data.get("source") == "dataset":
        url = str(data.get("url"))
        shown = url if "://" in url and not url.startswith("file://") else path_label(url)
        facts += [
            ("dataset", f"{data.get('name', '?')} version {data.get('manifest_version', '?')} at {shown}"),
            ("dataset manifest root", data.get("manifest_root")),
            ("tagged and signed by", data.get("signer")),
        ]
    elif data:
        facts.append(("data", data.get("corpus") or data.get("source")))
    facts += [(f"{k} fingerprint", v) for k, v in fingerprints.items()]
    parts = [f"<h2>What governed the run</h2>{_rows(facts)}"]

    taxonomy_bytes, where = _read_evidence(run_dir, "taxonomy.yaml", fingerprints.get("taxonomy"))
    trainer = ledger.run.get("trainer_key")
    taxonomy = None
    if taxonomy_bytes is not None:
        from smalti.trust.taxonomy import Taxonomy, TaxonomyError

        try:
            taxonomy = Taxonomy.parse(taxonomy_bytes, where)
        except TaxonomyError as error:
            where = f"{where}, but it does not parse ({error})"
    if taxonomy is not None:
        rows = "".join(
            f"<tr><td>{_e(a.name)}</td><td>{_e(a.role)}</td><td><code>{_e(a.key.key_id if a.key else '-')}</code>"
            f"{' (signs this ledger)' if a.key and a.key.key_id == trainer else ''}</td>"
            f"<td>{_e(', '.join(a.may_tag))}</td></tr>"
            for a in taxonomy.authorities.values()
        )
        parts.append(
            f"<h3>Taxonomy {_e(taxonomy.name)}: authorities</h3><p class='sub'>{_e(where)}</p>"
            f"<table><tr><th>authority</th><th>role</th><th>key id</th><th>may tag</th></tr>{rows}</table>"
        )
    else:
        parts.append(
            f"<h3>Taxonomy</h3><p>{_e(where)}; the ledger records fingerprint "
            f"<code>{_e(fingerprints.get('taxonomy'))}</code> and trainer key <code>{_e(trainer)}</code>.</p>"
        )

    parts.append(_policy(run_dir, fingerprints))
    parts.append(_allow_matrix(ledger))
    return "".join(parts)


def _experts(ledger: Ledger) -> str:
    """Per layer of experts, the tokens each class sent each expert over the run (a mixture-of-experts model;
    empty otherwise). The ledger's shapes were checked on loading; every value is still escaped."""
    experts = ledger.run.get("experts")
    if not isinstance(experts, dict):
        return ""
    classes = sorted({name for entry in ledger.steps for name in entry.get("expert_tokens", {})})
    parts = [
        "<h2>Tokens per expert, by class</h2><p class='sub'>How many tokens of each class the gate sent to each "
        "expert over the run (a token sent to two experts counts for both), from the ledger's step entries.</p>"
    ]
    reached = {c: ledger.experts_reached(c) or {} for c in classes}
    header = "".join(f"<th>expert {_e(e)}</th>" for e in range(int(experts["count"])))
    for layer in experts["layers"]:
        body = "".join(
            f"<tr><th>{_e(c)}</th>" + "".join(f"<td>{_e(n)}</td>" for n in by_layer[layer]["tokens"]) + "</tr>"
            for c, by_layer in reached.items()
        )
        parts.append(
            f"<table class='experts'><caption>{_e(layer)}</caption><tr><th>class</th>{header}</tr>{body}</table>"
        )
    return "".join(parts)


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object from the run folder, or {} if it is missing, a link, or not an object."""
    if plain_file(path.parent, path.name) is None:
        return {}
    try:
        found = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def _describe(recorded: Any) -> str:
    try:
        return describe(recorded) if isinstance(recorded, dict) and recorded else "not recorded"
    except (TypeError, AttributeError, KeyError):
        return "not readable"


def _policy(run_dir: Path, fingerprints: dict[str, Any]) -> str:
    """The routing policy's rules, from the trainer's copy, if it is the one the ledger records and parses."""
    policy_bytes, where = _read_evidence(run_dir, "policy.yaml", fingerprints.get("policy"))
    if policy_bytes is not None:
        try:
            return _policy_rules(policy_bytes, where)
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError) as error:
            where = f"{where}, but it does not parse ({type(error).__name__})"
    if fingerprints.get("policy"):
        return (
            f"<h3>Routing policy</h3><p>{_e(where)}; the ledger records fingerprint "
            f"<code>{_e(fingerprints.get('policy'))}</code>.</p>"
        )
    return ""


def _policy_rules(policy_bytes: bytes, where: str) -> str:
    spec = yaml.safe_load(policy_bytes.decode("utf-8")) or {}
    rules = "".join(
        f"<tr><td>{i}</td><td>{_e(', '.join(r.get('classes', [])))}</td>"
        f"<td>{_e(', '.join(r.get('params', [])))}</td><td>{_e(r.get('phase', 'always'))}</td>"
        f"<td>{_e(r.get('action'))}</td></tr>"
        for i, r in enumerate(spec.get("rules") or [], 1)
    )
    exclusive = "".join(
        f"<tr><td>{_e(', '.join(r.get('classes', [])))}</td><td>{_e(', '.join(r.get('params', [])))}</td></tr>"
        for r in spec.get("exclusive") or []
    )
    return (
        f"<h3>Routing policy {_e(spec.get('policy', ''))}</h3><p class='sub'>{_e(where)}; default "
        f"<b>{_e(spec.get('default', 'allow'))}</b>; the first matching rule decides</p>"
        f"<table><tr><th>#</th><th>classes</th><th>parameters</th><th>phase</th><th>action</th></tr>{rules}</table>"
        + (
            f"<p>Exclusive (the class may update only these; no other class may):</p><table><tr><th>classes</th>"
            f"<th>parameters</th></tr>{exclusive}</table>"
            if exclusive
            else ""
        )
    )


def _allow_matrix(ledger: Ledger) -> str:
    """Per phase, layers down and groups of classes that were allowed alike across (from the ledger's record)."""
    phases = ledger.run.get("routing") or []
    if not phases:
        return ""
    from smalti.trust.policy import group_label, leaf_classes

    names, layers = ledger.run["classes"], ledger.layer_names
    leaves = set(leaf_classes(names))  # nodes carry no examples; the same columns as smalti policy check
    last_step = ledger.steps[-1]["step"] if ledger.steps else 0
    out = [
        "<h3>What the policy allowed, per phase</h3><p class='sub'>From the ledger's run entry: ✓ the "
        "classes may update the layer, ✗ they may not, ~ only some of its parameters. Decisions taken during "
        "training (an entropy-driven freeze) show in the update norms below, not here.</p>"
    ]
    for number, phase in enumerate(phases):
        end = phases[number + 1]["start_batch"] if number + 1 < len(phases) else last_step
        groups: dict[str, list[str]] = {}
        for name, row in zip(names, phase["layers"]):
            if name in leaves:
                groups.setdefault(row, []).append(name)
        if len(groups) == 1 and set(next(iter(groups))) == {"1"}:
            out.append(
                f"<p>Batches {_e(phase['start_batch'])}&ndash;{_e(end)}: every class may update every layer.</p>"
            )
            continue
        keys = list(groups)
        head = "".join(f"<th>({i}) {_e(group_label(groups[k]))}</th>" for i, k in enumerate(keys, 1))
        body = "".join(
            f"<tr><td><code>{_e(layer)}</code></td>"
            + "".join(
                {"1": "<td class='y'>✓</td>", "0": "<td class='n'>✗</td>"}.get(k[j], "<td class='p'>~</td>")
                for k in keys
            )
            + "</tr>"
            for j, layer in enumerate(layers)
        )
        legend = "".join(f"<li>({i}) {_e(', '.join(_label(c) for c in groups[k]))}</li>" for i, k in enumerate(keys, 1))
        out.append(
            f"<p><b>Batches {_e(phase['start_batch'])}&ndash;{_e(end)}</b></p><div class='grid'><table><tr><th>layer"
            f"</th>{head}</tr>{body}</table><ul>{legend}</ul></div>"
        )
    return "".join(out)


def _held_out(run_dir: Path, max_bytes: int | None = None) -> str:
    """Each class's held-out loss at the run's last evaluation (recorded in its latest checkpoint; read only if it
    is a plain file within ``max_bytes``, as the service asks)."""
    from smalti.checkpoint_fields import latest_checkpoint, read_fields  # no torch: the service renders this
    from smalti.errors import CheckpointError

    try:
        folder = run_dir / "checkpoints"
        if max_bytes is not None and (
            folder.is_symlink()
            or not folder.is_dir()
            or ((folder / "latest").exists() and plain_file(folder, "latest") is None)
        ):
            return "<h2>Held-out loss per class</h2><p>Not shown: the run holds no checkpoints folder of its own.</p>"
        latest = latest_checkpoint(folder)
        if (
            latest is not None
            and max_bytes is not None
            and (plain_file(folder, latest.name) is None or latest.stat().st_size > max_bytes)
        ):
            return (
                f"<h2>Held-out loss per class</h2><p>Not shown: {_e(latest.name)} is not a plain checkpoint file "
                f"of at most {max_bytes >> 20} MB.</p>"
            )
        payload = read_fields(latest) if latest is not None else None
    except CheckpointError as error:
        shown = "the latest checkpoint cannot be read" if max_bytes is not None else str(error)  # no server paths
        return f"<h2>Held-out loss per class</h2><p>{_e(shown)}</p>"
    losses = payload.eval_by_class if payload is not None else {}
    if not isinstance(losses, dict) or not losses:
        return "<h2>Held-out loss per class</h2><p>Not recorded (no evaluation in the latest checkpoint).</p>"
    assert payload is not None and latest is not None  # the losses came from the latest checkpoint
    at = payload.evaluated_at
    rows = "".join(
        f"<tr><td>{_e(_group(str(name)))}</td><td>{_e(str(name).rsplit('/', 1)[-1])}</td>"
        f"<td class='num'>{_e(_number(loss))}</td></tr>"
        for name, loss in sorted(losses.items(), key=str)
    )
    return (
        f"<h2>Held-out loss per class</h2><p class='sub'>At the evaluation after batch {_e(at)} "
        f"({_e(latest.name)}), the validation examples of each class.</p><div class='grid'><table><tr><th>under"
        f"</th><th>class</th><th>loss</th></tr>{rows}</table></div>"
    )


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else empty: a signed statement's fields are still typed before use."""
    return value if isinstance(value, dict) else {}


def _evaluations(run_dir: Path, served: ServedBy | None = None) -> str:
    """The run's evaluation attestations (``RUN/evaluations/``): each checked against the taxonomy's evaluators
    (the service's own when served; else the run's), at most 100 of at most 1 MB; what did not verify is said."""
    from smalti.evaluation.attestation import EVALUATIONS, check_evaluations

    folder = run_dir / EVALUATIONS
    if folder.is_symlink() or not folder.is_dir():
        return ""
    if served is not None:
        keys = served.evaluators
    else:
        from smalti.evaluation.attestation import evaluator_keys

        try:
            keys = evaluator_keys(run_dir)
        except SmaltiError as error:
            return f"<h2>Evaluations</h2><p class='status bad'>NOT CHECKED: {_e(error)}</p>"
    rows = []
    for found in check_evaluations(folder, lambda file: plain_file(run_dir, EVALUATIONS, file), keys):
        name = found["name"]
        if not found["verified"]:
            rows.append(
                f"<tr><th>{_e(name)}</th><td colspan='3' class='bad'>NOT VERIFIED: {_e(found['problem'])}</td></tr>"
            )
            continue
        evaluator, statement = found["evaluator"], found["statement"]
        predicate = _mapping(statement.get("predicate"))
        listed = predicate.get("tasks")
        tasks: list[Any] = listed if isinstance(listed, list) else []
        measured = "; ".join(
            f"{t.get('name')}: "
            + ", ".join(
                f"{k} {_number(v)}" for k, v in sorted(t.get("metrics", {}).items()) if k in ("acc", "acc_norm")
            )
            for t in tasks
            if isinstance(t, dict) and isinstance(t.get("metrics"), dict)
        )
        model = _mapping(predicate.get("model"))
        losses = _mapping(_mapping(predicate.get("held_out")).get("losses_by_class"))
        held_text = f"{len(losses)} classes" if losses else "not measured"
        rows.append(
            f"<tr><th>{_e(name)}</th><td>{_e(evaluator)} (verified), of {_e(model.get('checkpoint'))}</td>"
            f"<td>{_e(measured or 'no tasks')}</td><td>held-out loss: {_e(held_text)}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<h2>Evaluations</h2><p class='sub'>Attestations in the run's evaluations/ folder, each checked against "
        "the evaluators the taxonomy names (docs/closure.md).</p><table>" + "".join(rows) + "</table>"
    )


def _certificate(run_dir: Path, served: ServedBy | None = None, log: str = "") -> str:
    from smalti.workflows.certificate import CERTIFICATE

    path = plain_file(run_dir, CERTIFICATE)
    if path is None:
        return ""
    path_label = served.path_label if served is not None else str
    try:
        certificate = json.loads(path.read_text())
        if not isinstance(certificate, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as error:
        return f"<h2>Deletion certificate</h2><p class='status bad'>CERTIFICATE UNREADABLE: {_e(error)}</p>"
    status = _certificate_status(run_dir, certificate, served, log)
    evaluation = (
        cast(dict[str, Any], certificate.get("evaluation")) if isinstance(certificate.get("evaluation"), dict) else {}
    )
    before = cast(dict[str, Any], evaluation.get("before")) if isinstance(evaluation.get("before"), dict) else {}
    after = cast(dict[str, Any], evaluation.get("after")) if isinstance(evaluation.get("after"), dict) else {}
    forgotten = cast(list[Any], certificate.get("classes")) if isinstance(certificate.get("classes"), list) else []
    losses = "".join(
        f"<tr><td>{_e(n)}{' (forgotten)' if n in forgotten else ''}</td>"
        f"<td class='num'>{_e(_number(before[n]))}</td><td class='num'>{_e(_number(after.get(n, math.nan)))}"
        f"</td></tr>"
        for n in sorted(before, key=str)
    )
    parent = cast(dict[str, Any], certificate.get("parent")) if isinstance(certificate.get("parent"), dict) else {}
    facts = [
        ("forgotten", certificate.get("class")),
        ("mode", certificate.get("mode")),
        ("parent run", path_label(parent["run_dir"]) if isinstance(parent.get("run_dir"), str) else None),
        ("first contribution step", certificate.get("first_contribution_step")),
        ("steps replayed", f"{certificate.get('steps_replayed')} of {certificate.get('full_retrain_steps')}"),
        ("signed", certificate.get("timestamp")),
        ("by trainer key", certificate.get("key_id")),
        (
            "software",
            describe(certificate["software"]) if isinstance(certificate.get("software"), dict) else "not recorded",
        ),
    ]
    return f"<h2>Deletion certificate</h2>{status}{_rows(facts)}" + (
        f"<table><tr><th>class</th><th>loss before</th><th>loss after</th></tr>{losses}</table>" if losses else ""
    )


def _certificate_status(run_dir: Path, certificate: dict[str, Any], served: ServedBy | None, log: str) -> str:
    """Offline, the full check (the parent's ledger, the replay's, the certified weights); served, only the
    signature under the taxonomy's trainer key: a certificate names its parent by a path the audited party chose,
    and the service opens no ledger outside the folder it serves."""
    from smalti.workflows.certificate import signed_message, verify_certificate

    if served is None:
        problem = verify_certificate(run_dir)
        return (
            "<p class='status ok'>CERTIFICATE VERIFIED against the trainer key the parent ledger records</p>"
            if problem is None
            else f"<p class='status bad'>CERTIFICATE FAILED: {_e(problem)}</p>"
        )
    key = served.certificate_key
    try:
        valid = (
            key is not None
            and certificate.get("key_id") == key.key_id
            and key.verify(bytes.fromhex(str(certificate.get("signature", ""))), signed_message(certificate))
        )
    except (ValueError, TypeError):
        valid = False
    if not valid:
        return (
            "<p class='status bad'>CERTIFICATE NOT SIGNED by the taxonomy's trainer key"
            f"{' ' + _e(key.key_id) if key is not None else ''}</p>"
        )
    certified = (
        cast(dict[str, Any], certificate.get("ledger_head")) if isinstance(certificate.get("ledger_head"), dict) else {}
    )
    if certified.get("origin") != log:  # a genuine certificate of another run, copied in
        return (
            f"<p class='status bad'>CERTIFICATE OF ANOTHER RUN: it certifies the log "
            f"{_e(certified.get('origin'))}, this run's ledger is {_e(log)}</p>"
        )
    return (
        f"<p class='status ok'>CERTIFICATE SIGNATURE VERIFIED against the taxonomy's trainer key {_e(key.key_id)}"
        "</p><p class='sub'>The service checks the signature only; smalti ledger verify on the runs checks the "
        "parent's ledger, the replay's and the certified weights.</p>"
    )


def _forget_eval(run_dir: Path) -> str:
    """What ``smalti eval-forget`` measured for this deletion, if it was run (its default output folder)."""
    path = plain_file(run_dir, "forget-eval", "forget-eval.json")
    if path is None:
        return ""
    try:
        result = json.loads(path.read_text())
        quality, mia, utility = result["forget_quality"], result["membership_inference_auc"], result["retained_utility"]
        return _forget_eval_rows(path, result, quality, mia, utility)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"<h2>How much was forgotten (smalti eval-forget)</h2><p>Unreadable: {_e(type(error).__name__)}</p>"


def _forget_eval_rows(
    path: Path, result: dict[str, Any], quality: dict[str, Any], mia: dict[str, Any], utility: dict[str, Any]
) -> str:
    import base64

    facts = [
        ("class", result["class"]),
        (
            "held-out loss on it: parent / forgotten / counterfactual",
            " / ".join(_number(quality["loss_on_class"][r]) for r in ("parent", "forgotten", "counterfactual")),
        ),
        (
            "forget quality: KS forgotten vs counterfactual",
            f"{_number(quality['ks_statistic'])} (p = {_number(quality['ks_p_value'], '.3g')})",
        ),
        (
            "other classes' mean loss change vs parent / vs counterfactual",
            f"{_number(utility['change_vs_parent'])} / {_number(utility['change_vs_counterfactual'])}",
        ),
        (
            "membership inference AUC: parent / forgotten / counterfactual",
            " / ".join(_number(mia[r], ".3f") for r in ("parent", "forgotten", "counterfactual")),
        ),
    ]
    facts += [
        (
            f"relearning, {r['model']}, k={r['examples']}: steps back to the parent's loss",
            r["steps_to_parent_loss"]
            if r["steps_to_parent_loss"] is not None
            else f"more than {result['relearning']['budget']['steps']}",
        )
        for r in result["relearning"]["runs"]
    ]
    png = plain_file(path.parent.parent, path.parent.name, "relearning.png")
    image = (
        f'<img alt="relearning curves" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
        if png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else ""
    )
    return f"<h2>How much was forgotten (smalti eval-forget)</h2>{_rows(facts)}{image}"


def write_report(run_dir: str | Path, out: str | Path, verified: VerifyReport) -> Path:
    """Render the report for ``run_dir`` into ``out`` (atomically, with the usual permissions); returns the path."""
    out = Path(out)
    atomic_write_bytes(out, render_report(run_dir, verified).encode("utf-8"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)
    return out


def _figures(ledger: Ledger) -> list[tuple[str, str, str, str]]:
    """The report's figures (id, title, caption, SVG): none for a run without steps of its own."""
    import matplotlib.pyplot as plt

    # Text stays text, and names are never read as TeX: a layer called "$\\foo$" is the ledger's writing.
    with plt.rc_context({"svg.fonttype": "none", "font.family": "sans-serif", "text.parse_math": False}):
        sections = (
            []
            if not ledger.steps
            else [
                (
                    "heatmap",
                    "Which classes each layer learned from",
                    "Mean share of each layer's step gradient per class, over the run, on a log scale: blank, the class "
                    "never reached the layer; × the policy forbade it in every phase; / in some phases. Classes are grouped "
                    "under their taxonomy node.",
                    _heatmap(ledger),
                ),
                (
                    "updates",
                    "Update norms per layer over time",
                    "Norm of each layer's update per step; black: skipped (frozen, or no class allowed).",
                    _update_norms(ledger),
                ),
                (
                    "composition",
                    "Class composition over time",
                    "Examples per class in each step (the most frequent classes; grey: all others).",
                    _composition(ledger),
                ),
            ]
        )
        entropy = _entropy(ledger) if ledger.steps else None
    if entropy is not None:
        sections.append(
            (
                "entropy",
                "Entropy profiles",
                "Spectral entropy of each probed layer's representation "
                "on the fixed probe set: over time (left), and for every class at the last profile (right).",
                entropy,
            )
        )
    return sections


def _status(verified: VerifyReport, untrusted: str | None) -> str:
    """The verdict line: verified, not trusted (a signer the taxonomy does not name), or failed."""
    status = (
        f'<p class="status ok" id="status">VERIFIED: {_e(verified.entries)} entries, every leaf, the tree and '
        f"{_e(verified.heads)} signed tree heads check out</p>"
        if verified.ok and untrusted is None
        else f'<p class="status bad" id="status">NOT TRUSTED: {_e(untrusted)}</p>'
        if untrusted is not None
        else f'<p class="status bad" id="status">VERIFICATION FAILED: {_e(verified.problem or "")}</p>'
    )
    return status


def render_report(
    run_dir: str | Path,
    verified: VerifyReport,
    read_only: bool = False,
    title: str | None = None,
    untrusted: str | None = None,
    served: ServedBy | None = None,
) -> str:
    """The report as one self-contained HTML page.

    Everything in it that the run folder supplies is escaped: the ledger, its certificate and its files are
    the audited party's writing. The service renders with ``read_only`` (the ledger opened read-only),
    ``title`` (the run's name rather than a path of its machine), ``untrusted`` (why the signer is not the
    taxonomy's trainer, shown in red above everything) and ``served`` (``ServedBy``)."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    ledger = Ledger.load(run_dir, read_only=read_only)
    status = _status(verified, untrusted)
    head = verified.last_head or {}
    head_rows = [
        ("entries", verified.entries),
        ("signed tree heads", verified.heads),
        ("checked against", f"key {verified.key_id} ({verified.key_source})"),
    ]
    head_rows += [
        ("log" if k == "origin" else k, head[k])
        for k in ("origin", "size", "root", "timestamp", "final", "key_id", "signature")
        if k in head
    ]
    sections = _figures(ledger)
    figures = "".join(
        f'<figure id="{fid}"><h2>{_e(title)}</h2>{svg}<figcaption>{_e(caption)}</figcaption></figure>'
        for fid, title, caption, svg in sections[:1]
    )
    later = "".join(
        f'<figure id="{fid}"><h2>{_e(title)}</h2>{svg}<figcaption>{_e(caption)}</figcaption></figure>'
        for fid, title, caption, svg in sections[1:]
    )
    name = title if title is not None else str(run_dir)
    if ledger.steps:
        first, last = ledger.steps[0], ledger.steps[-1]
        loss_text = ", ".join(_number(v) for v in (first.get("loss"), last.get("loss")))
        summary = (
            f"steps {_e(first['step'])}&ndash;{_e(last['step'])} &middot; training loss (first, last): {_e(loss_text)}"
        )
    else:  # an ablation: a run entry that names its parent, and no steps of its own
        summary = "no training steps of its own (a deletion by ablation of its parent's weights)"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Smalti audit report: {_e(name)}</title><style>{_STYLE}</style></head><body>
<h1>Smalti audit report</h1>
<p class="sub">{_e(name)} &middot; {summary}</p>
<h2>Verification</h2>{status}{_rows(head_rows)}
{_certificate(run_dir, served, str(head.get("origin", "")))}
{_forget_eval(run_dir)}
{_governance(run_dir, ledger, served.path_label if served else str)}
{_experts(ledger)}
<p>Contribution rule: {_e(ledger.run.get("contribution_rule", ""))}.<br>
Update-share rule: {_e(ledger.run.get("update_share_rule", ""))}.</p>
{figures}
{_held_out(run_dir, served.max_checkpoint_bytes if served else None)}
{_evaluations(run_dir, served)}
{later}
</body></html>
"""
    return page
