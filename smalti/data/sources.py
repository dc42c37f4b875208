"""Where raw training text comes from before it is tagged: a folder with a CSV, or a table.

Each source yields ``Document`` s: an id, a provenance class, and the text.

- A folder of text files (``.txt`` or ``.txt.gz``) with a CSV mapping file.
  The CSV names each file in a ``file`` column, or in a ``work`` column as
  ``<work>.txt[.gz]``. The class comes from a ``class`` column or from a
  template over the CSV's columns, e.g. ``gutenberg/{genre}/{work}``. A
  ``sha256`` column, if present, is checked against each text. The bundled
  Shakespeare manifest works as is.
- A folder of text files without a CSV: every ``.txt``/``.txt.gz`` file under
  it, the class from a template over its place in the tree, e.g.
  ``gutenberg/{dir}/{stem}`` (``dir``: its folder relative to the source,
  ``stem``: its name without extensions).
- A Parquet, JSONL or CSV table, or a Hugging Face ``datasets`` dataset
  written with ``save_to_disk``, with a text column and a class column (and
  an optional id column; by default the row number).

``documents_from_source`` picks the reader from what the source is.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from smalti.errors import DataError


@dataclass(frozen=True)
class Document:
    doc_id: str
    class_name: str
    text: str


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def class_of_row(row: dict[str, str], template: str | None, where: str) -> str:
    if template is None:
        if "class" not in row:
            raise DataError(f"{where}: no 'class' column; give a class template such as 'gutenberg/{{genre}}/{{work}}'")
        return row["class"]
    missing = [name for name in _template_fields(template) if name not in row]
    if missing:
        raise DataError(f"{where}: class template '{template}' uses column(s) {', '.join(missing)} the CSV lacks")
    return template.format(**row)


def read_mapping(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: mapping CSV not found")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DataError(f"{csv_path}: mapping CSV has no rows")
    return rows


def classes_from_mapping(csv_path: Path, template: str | None) -> list[str]:
    """The distinct classes a mapping CSV assigns, in order of first appearance."""
    seen: dict[str, None] = {}
    for line, row in enumerate(read_mapping(csv_path), start=2):
        seen[class_of_row(row, template, f"{csv_path}:{line}")] = None
    return list(seen)


def documents_from_folder(folder: Path, mapping: Path | None = None, template: str | None = None) -> Iterator[Document]:
    folder = Path(folder)
    mapping = mapping or folder / "manifest.csv"
    for line, row in enumerate(read_mapping(mapping), start=2):
        where = f"{mapping}:{line}"
        if row.get("file"):
            candidates = [folder / row["file"]]
        elif row.get("work"):
            candidates = [folder / f"{row['work']}.txt.gz", folder / f"{row['work']}.txt"]
        else:
            raise DataError(f"{where}: needs a 'file' or 'work' column")
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{where}: file {candidates[0].name} not found in {folder}")
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        if row.get("sha256") and hashlib.sha256(raw).hexdigest() != row["sha256"]:
            raise DataError(f"{path}: sha256 does not match the mapping CSV ({where})")
        doc_id = row.get("work") or path.name.removesuffix(".gz").removesuffix(".txt")
        yield Document(doc_id=doc_id, class_name=class_of_row(row, template, where), text=raw.decode("utf-8"))


TREE_FIELDS = ("dir", "stem")


def documents_from_tree(folder: Path, template: str) -> Iterator[Document]:
    """Every text file under ``folder``, its class from ``template`` over ``{dir}`` and ``{stem}``."""
    folder = Path(folder)
    unknown = [name for name in _template_fields(template) if name not in TREE_FIELDS]
    if unknown:
        raise DataError(
            f"--class-template '{template}': a folder without a mapping CSV offers {{dir}} and {{stem}}, "
            f"not {{{unknown[0]}}}"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
    if not files:
        raise DataError(f"{folder}: no .txt or .txt.gz files (and no manifest.csv mapping)")
    for path in files:
        relative = path.relative_to(folder)
        stem = path.name.removesuffix(".gz").removesuffix(".txt")
        directory = relative.parent.as_posix()
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        doc_id = f"{directory}/{stem}" if directory != "." else stem
        yield Document(doc_id=doc_id, class_name=template.format(dir=directory, stem=stem), text=text)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _table_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for every row: ``file:LINE`` with the file's own line numbers where the table is text (JSONL,
    CSV: what an editor shows), ``file row N`` (from 1) where it is not (Parquet, a datasets folder)."""
    if _is_saved_dataset(path):
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{path}: a Hugging Face datasets folder needs the hf extra: pip install 'smalti[hf]'"
            ) from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise DataError(f"{path}: a dataset with splits {', '.join(loaded)}; give one split's folder")
            loaded = next(iter(loaded.values()))
        return [(f"{path} row {number}", row) for number, row in enumerate(loaded.to_list(), start=1)]
    if not path.is_file():
        raise DataError(f"{path}: table not found")
    rows: list[tuple[str, dict]] = []
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for line, text in enumerate(handle, start=1):
                if text.strip():
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{line}: not valid JSON") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{line}: not a JSON object")
                    rows.append((f"{path}:{line}", row))
    elif path.suffix == ".parquet":
        from smalti.data.manifest import read_parquet  # starts no Arrow thread (see there)

        table = read_parquet(path)
        rows = [(f"{path} row {number}", row) for number, row in enumerate(table.to_pylist(), start=1)]
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    else:
        raise DataError(f"{path}: expected a .parquet, .jsonl or .csv table, or a datasets folder (save_to_disk)")
    return rows


def documents_from_table(
    path: Path,
    text_column: str = "text",
    class_column: str = "class",
    id_column: str | None = None,
    template: str | None = None,
) -> Iterator[Document]:
    """A table's rows as documents; the class from ``class_column``, or from ``template`` over the row's columns
    (``acme/{source}`` maps a ``source`` column's values into the taxonomy)."""
    path = Path(path)
    rows = _table_rows(path)
    fields = _template_fields(template) if template is not None else []
    for number, (where, row) in enumerate(rows):
        needed = (
            [text_column] + (fields if template is not None else [class_column]) + ([id_column] if id_column else [])
        )
        for column in needed:
            if column not in row:
                hint = f" (for --class-template '{template}')" if column in fields else ""
                raise DataError(f"{where}: no '{column}' column{hint}")
        doc_id = str(row[id_column]) if id_column else f"row{number:08d}"
        class_name = (
            template.format(**{k: str(row[k]) for k in fields}) if template is not None else str(row[class_column])
        )
        yield Document(doc_id=doc_id, class_name=class_name, text=str(row[text_column]))


def documents_from_source(
    source: Path,
    mapping: Path | None = None,
    template: str | None = None,
    text_column: str = "text",
    class_column: str = "class",
    id_column: str | None = None,
) -> Iterator[Document]:
    """Any source: a folder with a mapping CSV, a folder of text files, a table, or a saved datasets folder."""
    source = Path(source)
    if _is_saved_dataset(source) or source.is_file():
        return documents_from_table(source, text_column, class_column, id_column, template)
    if not source.is_dir():
        raise DataError(f"{source}: source not found")
    if mapping is not None or (source / "manifest.csv").is_file():
        return documents_from_folder(source, mapping, template)
    if template is None:
        raise DataError(
            f"{source}: a folder of text files without a manifest.csv needs --class-template, e.g. "
            f"'gutenberg/{{dir}}/{{stem}}'"
        )
    return documents_from_tree(source, template)
