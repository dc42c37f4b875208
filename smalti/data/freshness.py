"""Rollback protection: an older, validly signed manifest of a dataset is refused before any shard is read.

A signature proves who prepared a manifest, not that it is the current one. Put an
old release back where the current one lives (a restored backup, an attacker with
write access to the bucket) and every signature still verifies: a class deleted from
the data for legal reasons would quietly train again. Every manifest therefore carries
a signed ``version`` (``smalti data prepare`` numbers each preparation of a location
one higher than the last), and three rules, checked in this order, refuse to go back:

1. the recipe's pin (``data.manifest_root``: exactly this dataset; ``data.min_version``:
   this release or a later one), the rule that also protects a machine that never saw
   the newer release;
2. this machine's record (``datasets-seen.json`` in the shard cache folder): the highest
   version of each dataset (by location and name) loaded here before; a lower one is
   refused, unless the recipe pins that exact root (reproducing an old run on purpose);
3. a resumed run's record: a checkpoint names the version and root it trained on, and a
   resume refuses any other (``smalti.trainer``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import dataclass
from pathlib import Path

from smalti.data.manifest import Manifest
from smalti.errors import DataError
from smalti.io import atomic_write_text

RECORD = "datasets-seen.json"


@dataclass(frozen=True)
class FreshnessRule:
    """What the recipe pins for one dataset (both optional)."""

    manifest_root: str | None = None
    min_version: int | None = None


def check_freshness(manifest: Manifest, rule: FreshnessRule, record_dir: Path | None) -> None:
    """Refuse a pinned-out or rolled-back manifest; otherwise raise this machine's record to its version."""
    where = f"{manifest.url}/manifest.json"
    if rule.manifest_root is not None and manifest.root != rule.manifest_root:
        raise DataError(
            f"{where}: manifest root {manifest.root[:16]}... is not the root data.manifest_root pins "
            f"({rule.manifest_root[:16]}...): another release of dataset '{manifest.name}'"
        )
    if rule.min_version is not None and manifest.version < rule.min_version:
        raise DataError(
            f"{where}: dataset '{manifest.name}' version {manifest.version} is older than data.min_version "
            f"{rule.min_version} (rolled back to an earlier release?)"
        )
    if record_dir is None:
        return
    key = f"{manifest.url} {manifest.name}"
    with _record(Path(record_dir)) as seen:
        previous = seen.get(key)
        if previous and manifest.version < previous["version"] and rule.manifest_root != manifest.root:
            raise DataError(
                f"{where}: dataset '{manifest.name}' version {manifest.version} is older than version "
                f"{previous['version']} already loaded from here on this machine (rolled back to an earlier "
                f"release?); to train on it on purpose, pin it with data.manifest_root: {manifest.root}"
            )
        if not previous or manifest.version > previous["version"]:
            seen[key] = {"version": manifest.version, "root": manifest.root}


@contextlib.contextmanager
def _record(directory: Path):
    """The machine's record under an exclusive lock (ranks and loader processes share it)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f".{RECORD}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = directory / RECORD
            seen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            before = json.dumps(seen, sort_keys=True)
            yield seen
            if json.dumps(seen, sort_keys=True) != before:
                atomic_write_text(path, json.dumps(seen, indent=1, sort_keys=True) + "\n")
    except (OSError, ValueError) as error:
        raise DataError(f"{directory / RECORD}: cannot read or write the record of datasets seen ({error})") from None
