"""The audit report: one self-contained HTML file an auditor opens offline.

Plots are drawn with matplotlib (the standard, well-kept plotting library)
as inline SVG, so the file needs no network, no JavaScript and no companion
files. Sections: verification status and the signed tree head; the
layer x class contribution heatmap; update norms per layer over time; class
composition over time; entropy profiles.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

import numpy as np

from smalti.governance.ledger.audit import Ledger
from smalti.governance.ledger.verify import VerifyReport
from smalti.io import atomic_write_bytes

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; } .sub { color: #666; margin-top: 0; }
.status { padding: 0.8rem 1rem; border-radius: 6px; font-weight: 600; }
.ok { background: #e4f5e9; color: #14532d; } .bad { background: #fde8e8; color: #7f1d1d; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { border: 1px solid #ddd; padding: 0.25rem 0.6rem; }
th { background: #f5f5f5; text-align: left; } code { font-size: 0.85rem; word-break: break-all; }
figure { margin: 1.5rem 0; } figcaption { color: #555; font-size: 0.9rem; }
"""


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1] if "+" not in name else "+".join(n.rsplit("/", 1)[-1] for n in name.split("+"))


def contribution_matrix(ledger: Ledger) -> tuple[list[str], np.ndarray]:
    """Signatures and the [layers, signatures] mean share of each layer's gradient over the run."""
    signatures = sorted({sig for e in ledger.steps for sig in e["contributions"]})
    column = {s: i for i, s in enumerate(signatures)}
    totals = np.zeros((len(ledger.layer_names), len(signatures)))
    for _, signature, layer, _, share in ledger.contributions():
        totals[layer, column[signature]] += share
    sums = totals.sum(axis=1, keepdims=True)
    return signatures, np.divide(totals, sums, out=np.zeros_like(totals), where=sums > 0)


def _heatmap(ledger: Ledger) -> str:
    import matplotlib.pyplot as plt

    signatures, matrix = contribution_matrix(ledger)
    layers = ledger.layer_names
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(signatures) + 3), max(3, 0.22 * len(layers) + 1)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(signatures)), [_short(s) for s in signatures], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("class (routing signature)")
    fig.colorbar(image, ax=ax, label="share of the layer's gradient, over the run")
    return _svg(fig)


def _update_norms(ledger: Ledger) -> str:
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in ledger.steps]
    norms = np.array([[layer[1] for layer in e["layers"]] for e in ledger.steps]).T  # [L, steps]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(ledger.layer_names) + 1)))
    image = ax.imshow(np.log10(np.maximum(norms, 1e-12)), aspect="auto", cmap="magma", interpolation="nearest",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(norms) - 0.5, -0.5), vmin=-8)
    ax.set_yticks(range(len(ledger.layer_names)), ledger.layer_names, fontsize=7)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label="log10 update norm (black: not updated)")
    return _svg(fig)


def _composition(ledger: Ledger, top: int = 10) -> str:
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
    fig, ax = plt.subplots(figsize=(10, 3.5))
    labels = [_short(n) for n in shown] + (["other"] if any(other) else [])
    data = [smooth(s) for s in series] + ([smooth(other)] if any(other) else [])
    ax.stackplot(steps, *data, labels=labels)
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
    fig, (over_time, profile) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [e["step"] for e in measured]
    values = np.array([e["entropy"] for e in measured])  # [T, C, L]
    for j, layer in enumerate(layers):
        over_time.plot(steps, values[:, :, j].mean(axis=1), label=layer)
    over_time.set_xlabel("step")
    over_time.set_ylabel("spectral entropy (mean over classes)")
    over_time.legend(fontsize=7)
    last = values[-1]
    for c, name in enumerate(classes[:12]):
        profile.plot(range(len(layers)), last[c], marker="o", label=_short(name))
    profile.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    profile.set_ylabel(f"entropy at step {steps[-1]}")
    profile.legend(fontsize=6, ncol=2)
    return _svg(fig)


def _head_table(verified: VerifyReport) -> str:
    head = verified.last_head or {}
    rows = [("entries", verified.entries), ("signed tree heads", verified.heads),
            ("checked against", f"key {verified.key_id} ({verified.key_source})")]
    rows += [(k, head[k]) for k in ("size", "root", "timestamp", "final", "key_id", "signature") if k in head]
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(str(v))}</code></td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def write_report(run_dir: str | Path, out: str | Path, verified: VerifyReport) -> Path:
    """Render the report for ``run_dir`` into ``out`` (atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    ledger = Ledger.load(run_dir)
    if not ledger.steps:
        raise ValueError(f"{run_dir}: the ledger has no steps to report")
    status = (f'<p class="status ok" id="status">VERIFIED: {verified.entries} entries, every leaf, the tree and '
              f"{verified.heads} signed tree heads check out</p>" if verified.ok else
              f'<p class="status bad" id="status">VERIFICATION FAILED: {html.escape(verified.problem or "")}</p>')
    first, last = ledger.steps[0], ledger.steps[-1]
    fingerprints = ledger.run.get("fingerprints", {})
    finger_rows = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(str(v))}</code></td></tr>"
                          for k, v in fingerprints.items())
    sections = [
        ("heatmap", "Which classes each layer learned from",
         "Mean share of each layer's step gradient per class (routing signature), over the run. "
         "A blank cell: that class never reached that layer.", _heatmap(ledger)),
        ("updates", "Update norms per layer over time", "Norm of each layer's update per step; black: skipped "
         "(frozen, or no class allowed).", _update_norms(ledger)),
        ("composition", "Class composition over time", "Examples per class in each step.", _composition(ledger)),
    ]
    entropy = _entropy(ledger)
    if entropy is not None:
        sections.append(("entropy", "Entropy profiles", "Spectral entropy of each layer's representation on the "
                         "fixed probe set: over time (left) and across depth per class at the last profile (right).",
                         entropy))
    figures = "".join(f'<figure id="{fid}"><h2>{html.escape(title)}</h2>{svg}<figcaption>{html.escape(caption)}'
                      f"</figcaption></figure>" for fid, title, caption, svg in sections)
    loss_text = ", ".join(f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)
                          for v in (first["loss"], last["loss"]))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Smalti audit report: {html.escape(str(run_dir))}</title>
<style>{_STYLE}</style></head><body>
<h1>Smalti audit report</h1>
<p class="sub">{html.escape(str(Path(run_dir).resolve()))} &middot; steps {first['step']}&ndash;{last['step']}
&middot; loss (first, last): {loss_text}</p>
<h2>Verification</h2>{status}{_head_table(verified)}
<h2>Fingerprints</h2><table>{finger_rows}</table>
<p>Contribution rule: {html.escape(ledger.run.get('contribution_rule', ''))}.<br>
Update-share rule: {html.escape(ledger.run.get('update_share_rule', ''))}.</p>
{figures}
</body></html>
"""
    out = Path(out)
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
