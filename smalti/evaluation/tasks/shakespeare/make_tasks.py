"""Make the bundled evaluation tasks from the bundled corpus (``data/shakespeare``), deterministically.

``which_play.jsonl``: a line of verse and four plays; which one is it from? ``next_line.jsonl``: a line and four
candidate next lines from the same play; which one follows? Lines are chosen from each play with a fixed seed,
and only lines of plain letters and punctuation, so any model trained on the plays can read them.
``tests/test_evaluation.py`` checks that the shipped files are what this script makes.

    python smalti/evaluation/tasks/shakespeare/make_tasks.py data/shakespeare smalti/evaluation/tasks/shakespeare
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import sys
from pathlib import Path

PLAIN = re.compile(r"^[A-Za-z][A-Za-z ,.;:!?'-]{29,70}$")
PER_PLAY = 6
SEED = 2026


def verse_lines(text: str) -> list[str]:
    """Lines a character speaks: not stage directions, not speaker names, not headings."""
    lines = [line.strip() for line in text.splitlines()]
    return [
        line for line in lines if PLAIN.match(line) and not line.isupper() and not line.startswith(("Enter", "Exit"))
    ]


def make(corpus: Path, out: Path) -> None:
    rows = list(csv.DictReader((corpus / "manifest.csv").open(encoding="utf-8")))
    plays = {row["work"]: row["title"] for row in rows if row["genre"] != "poetry"}
    rng = random.Random(SEED)
    which, following = [], []
    for work, title in sorted(plays.items()):
        text = gzip.open(corpus / f"{work}.txt.gz", "rt", encoding="utf-8").read()
        raw = [line.strip() for line in text.splitlines()]
        lines = verse_lines(text)
        for line in rng.sample(lines, PER_PLAY):
            others = rng.sample(sorted(set(plays.values()) - {title}), 3)
            answer = rng.randrange(4)
            which.append(
                {"line": line, "choices": others[:answer] + [title] + others[answer:], "answer": answer, "work": work}
            )
        for line in rng.sample(lines, PER_PLAY):
            index = raw.index(line)
            nxt = raw[index + 1] if index + 1 < len(raw) else ""
            if not PLAIN.match(nxt):
                continue
            distractors = rng.sample([x for x in lines if x != nxt], 3)
            answer = rng.randrange(4)
            following.append(
                {
                    "line": line,
                    "choices": distractors[:answer] + [nxt] + distractors[answer:],
                    "answer": answer,
                    "work": work,
                }
            )
    for name, items in (("which_play.jsonl", which), ("next_line.jsonl", following)):
        (out / name).write_text("".join(json.dumps(item, sort_keys=True) + "\n" for item in items), encoding="utf-8")


if __name__ == "__main__":
    make(Path(sys.argv[1]), Path(sys.argv[2]))
