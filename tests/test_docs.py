"""The figures the docs quote are the ones benchmarks/demo.py last measured (docs/demo.json), everywhere."""

from __future__ import annotations

import json

from conftest import REPO

FIGURES = json.loads((REPO / "docs" / "demo.json").read_text())


def test_the_demo_time_is_stated_once_and_truthfully():
    minutes = f"{FIGURES['minutes_total']} minutes"
    for path in ("README.md", "docs/benchmarks.md", "recipes/shakespeare.yaml", "recipes/shakespeare-raw.yaml"):
        text = (REPO / path).read_text()
        assert minutes in text, f"{path} does not quote the measured demo time ({minutes})"
        for stale in ("~7 min", "About 4 minutes", "about 4 minutes", "168 s"):
            assert stale not in text, f"{path} still says {stale!r}"
    assert f"{FIGURES['seconds_install']} s" in (REPO / "docs" / "benchmarks.md").read_text()
    assert round(FIGURES["seconds_total"] / 60, 1) == FIGURES["minutes_total"]


def test_the_readme_shows_the_demo_as_it_ends():
    readme = (REPO / "README.md").read_text()
    final = FIGURES["final_eval"]
    assert f"[ep0 ba{final['batch']}] eval/loss {final['loss']}" in readme
    shown = "\n".join(FIGURES["sample_first_lines"])
    assert shown in readme, "the README's sample is not the demo's"
    assert f"**{final['loss']}**" in (REPO / "docs" / "benchmarks.md").read_text()
