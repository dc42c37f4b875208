"""A text corpus on disk: works listed in ``manifest.csv``, each checked against its sha256."""

from __future__ import annotations

import csv
import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import DataError

REQUIRED_COLUMNS = ("work", "genre", "sha256")


class CorpusError(DataError):
    """The corpus on disk is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class Work:
    name: str
    title: str
    genre: str
    text: str

    @property
    def class_name(self) -> str:
        """The work's provenance class: its genre, then the work (``tragedy/hamlet``)."""
        return f"{self.genre}/{self.name}"


def load_corpus(root: str | Path) -> list[Work]:
    """Read every work in ``root/manifest.csv`` (``<work>.txt.gz`` or ``<work>.txt``).

    Each text's sha256 must equal the manifest's: a corpus that silently
    changed would make every later fingerprint and comparison meaningless.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise CorpusError(f"{manifest}: corpus manifest not found")
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(f"{manifest}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise CorpusError(f"{manifest}: lists no works")
    works = []
    for line, row in enumerate(rows, start=2):
        name = row["work"]
        path = next((p for p in (root / f"{name}.txt.gz", root / f"{name}.txt") if p.is_file()), None)
        if path is None:
            raise CorpusError(f"{manifest}:{line}: text for work '{name}' not found in {root}")
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != row["sha256"]:
            raise CorpusError(f"{path}: sha256 {digest[:12]}... does not match the manifest's {row['sha256'][:12]}...")
        works.append(Work(name=name, title=row.get("title") or name, genre=row["genre"], text=raw.decode("utf-8")))
    return works
