"""The runs under one folder, read as the audited party may have written them.

Everything here treats a run folder as hostile:

- a run is named by its folder's name among the root's children, looked up and never joined onto a path;
  a run folder, a ledger or a certificate that is a symbolic link is refused (it could point anywhere);
- the ledger is opened read-only and, when no trainer is writing it, immutable, so nothing is created in it;
- a run is *trusted* only if its heads are signed by a key the signed taxonomy names as a trainer; the key a
  ledger records about itself proves nothing (anyone can re-sign a ledger with a key of their own);
- every cost is proportional to what is asked: tiles read their 256 entries, the heatmap reads cumulative
  sums kept every 256 entries, queries stream the entries instead of keeping them, and every cache is an LRU
  with a bound (``Limits``).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey
from smalti.trust import merkle
from smalti.governance.ledger.audit import Ledger, check_step_shape
from smalti.trust.entry import EntryFormatError, TreeHead, decode_entry
from smalti.governance.ledger.store import LEDGER_FILE, LedgerError, LedgerStore
from smalti.governance.ledger.tiles import MAX_ENTRY, WIDTH
from smalti.evaluation.attestation import evaluators_of
from smalti.trust.taxonomy import Taxonomy

SUMMARY_EVERY = 256  # entries between the heatmap's cumulative snapshots
MAX_CERTIFICATE_BYTES = 1 << 20


class NotFound(SmaltiError):
    """What was asked for is not there (404)."""


class BadRequest(SmaltiError):
    """The request asks for something that cannot exist (400)."""


class Unprocessable(SmaltiError):
    """The run's own files are malformed: the party that wrote them is at fault, not the request (422)."""


@dataclass(frozen=True)
class Limits:
    """How much any one reader can make the service hold or do."""

    cached_runs: int = 8  # runs whose leaves, heatmap snapshots and verdicts are kept
    cached_hashes: int = 4_000_000  # Merkle hashes kept over all runs (about 2 per entry; 128 MB)
    cached_reports: int = 4
    max_report_checkpoint_bytes: int = 512 << 20  # the report reads held-out losses from one checkpoint


@dataclass(frozen=True)
class Trust:
    """Whether a run's signed heads are the taxonomy's trainer's, and why not if not."""

    trusted: bool
    reason: str
    trainer: str | None = None  # the taxonomy's name for the signer
    key: PublicKey | None = None

    def to_json(self) -> dict[str, Any]:
        return {"trusted": self.trusted, "reason": self.reason, "trainer": self.trainer}


class BoundedCache:
    """A thread-safe LRU with a cap on entries and on a total weight (e.g. Merkle hashes held). A value is built
    once however many readers ask for it at the same time: the others wait for that build (single flight)."""

    def __init__(self, entries: int, weight: int | None = None) -> None:
        self.entries, self.weight = entries, weight
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._building: dict[Any, threading.Event] = {}
        self._held = 0
        self._lock = threading.Lock()

    def peek(self, key: Any) -> Any | None:
        """The kept value, or None: never builds, never waits (what an event loop may call)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        return None

    def get(self, key: Any, make: Callable[[], Any], weigh: Callable[[Any], int] = lambda _: 0) -> Any:
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key][0]
                building = self._building.get(key)
                if building is None:
                    self._building[key] = threading.Event()
                    break
            building.wait()  # another reader builds it; then look again (its build may have failed)
        try:
            value = make()  # outside the lock: a slow build does not stall other keys
            weight = weigh(value)
        except BaseException:
            with self._lock:
                self._building.pop(key).set()
            raise
        with self._lock:
            if self.weight is None or weight <= self.weight:  # else too big to keep: answered, not cached
                self._items[key] = (value, weight)
                self._held += weight
                while len(self._items) > self.entries or (self.weight is not None and self._held > self.weight):
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._held -= dropped
            self._building.pop(key).set()
        return value


def _regular_file(path: Path) -> bool:
    """A plain file, not a symbolic link (lstat: the link itself, never what it points to)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _real_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class Runs:
    """The runs under ``root``, with the taxonomy that says who may sign them."""

    def __init__(self, root: Path, taxonomy: Taxonomy, limits: Limits = Limits()) -> None:
        self.root = Path(root).resolve()
        self.limits = limits
        self.trainers = {a.key.key_id: a for a in taxonomy.authorities.values() if a.role == "trainer" and a.key}
        self.others = {a.key.key_id: a for a in taxonomy.authorities.values() if a.role != "trainer" and a.key}
        self.evaluators = evaluators_of(taxonomy)
        self._leaves = BoundedCache(limits.cached_runs * 4, limits.cached_hashes)
        self._summaries = BoundedCache(limits.cached_runs)
        self._verdicts = BoundedCache(256)
        self._run_entries = BoundedCache(limits.cached_runs * 4)
        self.reports = BoundedCache(limits.cached_reports)

    # ---------------------------------------------------------------- naming

    def names(self) -> list[str]:
        return sorted(
            entry.name
            for entry in os.scandir(self.root)
            if not entry.name.startswith(".")
            and entry.is_dir(follow_symlinks=False)
            and _regular_file(Path(entry.path) / "recipe.yaml")
        )

    def is_run(self, name: str) -> bool:
        try:
            self.path(name)
        except NotFound:
            return False
        return True

    def path(self, name: str) -> Path:
        """The run's folder: one of the root's real children, by name ("..", "%2e%2e" and links land on 404).
        One ``lstat`` per check, not a listing: the cost of a request does not grow with the number of runs."""
        if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 255:
            raise NotFound(f"no run named {name!r} here")
        path = self.root / name
        if not _real_folder(path) or not _regular_file(path / "recipe.yaml"):
            raise NotFound(f"no run named {name!r} here")
        return path

    def file(self, name: str, relative: str) -> Path | None:
        """A plain file the run holds at ``relative`` (no link anywhere on the way), or None."""
        path = self.path(name)
        for part in Path(relative).parts[:-1]:
            path = path / part
            if not _real_folder(path):
                return None
        path = path / Path(relative).name
        return path if _regular_file(path) else None

    def label(self, path: str | Path) -> str:
        """How a path a run names (its parent, say) is shown: the run's name when it is one of ours, never an
        absolute path of this machine."""
        try:
            relative = Path(path).resolve().relative_to(self.root)
        except (ValueError, OSError, RuntimeError):
            return f"(outside the served folder) {Path(str(path)).name}"
        return str(relative)

    @contextlib.contextmanager
    def store(self, name: str) -> Iterator[LedgerStore]:
        ledger = self.file(name, LEDGER_FILE)
        if ledger is None:
            raise NotFound(f"run {name!r} has no ledger")
        for suffix in ("-wal", "-shm"):  # SQLite writes a -shm it finds: never through a link out of the folder
            companion = ledger.with_name(ledger.name + suffix)
            if os.path.lexists(companion) and not _regular_file(companion):
                raise Unprocessable(f"run {name!r}: {companion.name} is not a plain file")
        try:
            store = LedgerStore(ledger, read_only=True)
        except LedgerError as error:
            raise Unprocessable(f"run {name!r}: {error}") from None
        try:
            yield store
        finally:
            store.close()

    # ---------------------------------------------------------------- heads and trust

    def head(self, name: str) -> tuple[TreeHead, str]:
        """The latest signed head and the key the ledger records as its signer."""
        with self.store(name) as store:
            head, recorded = store.latest_head(), store.get_meta("trainer_public_key") or ""
        if head is None:
            raise NotFound(f"run {name!r} has no signed tree head yet")
        return head, recorded

    def trust(self, name: str, head: TreeHead, recorded: str) -> Trust:
        """Whether ``head`` is signed by a trainer the taxonomy names (cached per head)."""
        return self._verdicts.get((name, head.size, head.root, head.signature), lambda: self._judge(head, recorded))

    def _judge(self, head: TreeHead, recorded: str) -> Trust:
        try:
            key = PublicKey.parse(recorded, "the ledger's recorded trainer key")
        except SmaltiError:
            return Trust(False, "the ledger records no usable signing key")
        authority = self.trainers.get(key.key_id)
        if authority is None:
            other = self.others.get(key.key_id)
            named = f"the taxonomy's {other.role} '{other.name}'" if other else "a key the taxonomy does not name"
            return Trust(
                False,
                f"signed by key {key.key_id}, {named}, not by a trainer the taxonomy names "
                f"({', '.join(sorted(self.trainers)) or 'none'})",
            )
        if head.key_id != key.key_id or not key.verify(head.signature, head.message()):
            return Trust(
                False,
                f"its latest tree head (size {head.size}) is not signed by the taxonomy's trainer '{authority.name}'",
                authority.name,
                key,
            )
        return Trust(
            True, f"signed by the taxonomy's trainer '{authority.name}' (key {key.key_id})", authority.name, key
        )

    def trainer_key(self, recorded: str) -> PublicKey | None:
        """The taxonomy's trainer key a ledger should be checked against: the one it claims, if the taxonomy
        names it; else the taxonomy's only trainer (so the check fails with the right key named)."""
        try:
            key = PublicKey.parse(recorded, "recorded key")
            if key.key_id in self.trainers:
                return self.trainers[key.key_id].key
        except SmaltiError:
            pass
        return next(iter(self.trainers.values())).key if len(self.trainers) == 1 else None

    # ---------------------------------------------------------------- entries

    def run_entry(self, name: str, head: TreeHead) -> dict[str, Any]:
        """Entry 0, decoded and type-checked (cached per log: it never changes)."""

        def read() -> dict[str, Any]:
            with self.store(name) as store:
                rows = list(store.rows(0, 1))
            if not rows:
                raise Unprocessable(f"run {name!r}: the ledger has no run entry")
            body = self._decode(name, 0, rows[0][3])
            if body["kind"] != "run" or "classes" not in body or "layers" not in body:
                raise Unprocessable(f"run {name!r}: entry 0 is not a run entry naming its classes and layers")
            return body

        return self._run_entries.get((name, head.origin, head.signature if head.size == 1 else b""), read)

    def _decode(self, name: str, index: int, data: bytes) -> dict[str, Any]:
        try:
            return decode_entry(data, canonical=False).body
        except EntryFormatError as error:
            raise Unprocessable(f"run {name!r}: entry {index} is malformed ({error})") from None

    def steps(
        self, name: str, head: TreeHead, start: int = 1, stop: int | None = None, run: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Step entries ``start``..``stop - 1`` (default: all under the head), decoded one at a time and checked
        against the run entry's shape; nothing is kept."""
        run = run if run is not None else self.run_entry(name, head)
        stop = head.size if stop is None else min(stop, head.size)
        with self.store(name) as store:
            for index, _, _, data in store.rows(max(1, start), stop):
                body = self._decode(name, index, data)
                try:
                    check_step_shape(run, body)
                except EntryFormatError as error:
                    raise Unprocessable(f"run {name!r}: entry {index} is malformed ({error})") from None
                yield body

    def ledger(self, name: str, head: TreeHead) -> Ledger:
        """A ``Ledger`` whose steps are streamed from the store at each pass (for the forensic queries)."""
        run = self.run_entry(name, head)
        runs = self

        class Streamed:
            def __iter__(self) -> Iterator[dict[str, Any]]:
                return runs.steps(name, head, run=run)

            def __len__(self) -> int:
                return head.size - 1

        return Ledger(run=run, steps=Streamed())  # type: ignore[arg-type]

    def entry(self, name: str, head: TreeHead, index: int) -> tuple[int, bytes, bytes]:
        """(step, leaf, bytes) of entry ``index`` under ``head``."""
        if not 0 <= index < head.size:
            raise BadRequest(f"entry {index}: out of range (the signed tree holds 0..{head.size - 1})")
        with self.store(name) as store:
            rows = list(store.rows(index, index + 1))
        if not rows:
            raise Unprocessable(f"run {name!r}: entry {index} is missing under its signed head")
        _, step, leaf, data = rows[0]
        return step, leaf, data

    def index_of_step(self, name: str, step: int) -> int | None:
        with self.store(name) as store:
            found = store.entry_at_step(step)
        return None if found is None else found[0]

    # ---------------------------------------------------------------- Merkle tree

    def tree(
        self, name: str, head: TreeHead, build: Callable[[Callable[[], Any]], Any] = lambda work: work()
    ) -> merkle.Tree:
        """The Merkle tree under ``head`` (every aligned subtree's hash), checked against its signed root once,
        then kept (bounded): proofs and tiles read it instead of the store. ``build`` runs the whole-ledger read
        (the service runs it in a heavy slot)."""

        def read() -> merkle.Tree:
            with self.store(name) as store:
                leaves = store.leaf_range(0, head.size)
            tree = merkle.Tree(leaves)
            if len(leaves) != head.size or tree.root() != head.root:
                raise Unprocessable(
                    f"run {name!r}: the stored leaves do not hash to the signed root at size {head.size}"
                )
            return tree

        return self._leaves.get((name, head.size, head.root), lambda: build(read), weigh=len)

    def kept_tree(self, name: str, head: TreeHead) -> merkle.Tree | None:
        """The tree under ``head`` if it is already built and checked; None otherwise (nothing is read)."""
        return self._leaves.peek((name, head.size, head.root))

    def tile(
        self,
        name: str,
        head: TreeHead,
        level: str,
        index: int,
        width: int | None,
        build: Callable[[Callable[[], Any]], Any] = lambda work: work(),
    ) -> bytes:
        """One C2SP tlog-tiles tile or entry bundle of the tree at ``head``, reading only what it covers."""
        if level == "entries":
            available = max(0, min(WIDTH, head.size - index * WIDTH))
            width = self._tile_width(available, width, f"entries/{index}")
            with self.store(name) as store:
                rows = list(store.rows(index * WIDTH, index * WIDTH + width))
            if any(len(row[3]) > MAX_ENTRY for row in rows):
                raise Unprocessable(f"run {name!r}: an entry of bundle {index} is longer than a bundle can hold")
            return b"".join(struct.pack(">H", len(row[3])) + row[3] for row in rows)
        height = int(level)
        span = WIDTH**height  # leaves under one hash of this level
        available = max(0, min(WIDTH, head.size // span - index * WIDTH))
        width = self._tile_width(available, width, f"{level}/{index}")
        hashes = self.tree(name, head, build).levels[8 * height]  # a level-L tile: complete subtrees of 256**L leaves
        return b"".join(hashes[index * WIDTH : index * WIDTH + width])

    @staticmethod
    def _tile_width(available: int, asked: int | None, where: str) -> int:
        if available <= 0:
            raise NotFound(f"no tile {where} in this tree")
        if asked is None:
            if available < WIDTH:
                raise NotFound(f"tile {where} is partial at this size: ask for {where}.p/{available}")
            return WIDTH
        if asked > available:
            raise NotFound(f"tile {where}.p/{asked}: this tree holds only {available} there")
        return asked

    # ---------------------------------------------------------------- the heatmap

    def summary(self, name: str, head: TreeHead, upto_step: int | None) -> dict[str, Any]:
        """Each layer's step-gradient shares per class, summed up to a step (a signature's share split evenly
        among its classes, as the UI always drew it): from the nearest kept snapshot plus at most 255 entries."""
        run = self.run_entry(name, head)
        classes, layers = run["classes"], [layer["name"] for layer in run["layers"]]
        snapshots, steps = self._summaries.get((name, head.size, head.root), lambda: self._snapshots(name, head, run))
        if not len(steps):  # a run with no steps of its own (an ablation: its run entry names its parent)
            shown = _shown_classes(classes, snapshots[0])
            return {
                "classes": [classes[c] for c in shown],
                "layers": layers,
                "upto_step": 0,
                "first_step": 0,
                "last_step": 0,
                "entries": 0,
                "matrix": [[0.0] * len(shown) for _ in layers],
            }
        upto = int(steps[-1]) if upto_step is None else upto_step
        stop = int(np.searchsorted(steps, upto, side="right")) + 1  # entries 1..stop-1 are at or before
        base = (stop - 1) // SUMMARY_EVERY
        matrix = snapshots[base].copy()
        self._accumulate(matrix, self.steps(name, head, base * SUMMARY_EVERY + 1, stop, run), classes)
        shown = _shown_classes(classes, matrix)
        return {
            "classes": [classes[c] for c in shown],
            "layers": layers,
            "upto_step": upto,
            "first_step": int(steps[0]),
            "last_step": int(steps[-1]),
            "entries": stop - 1,
            "matrix": [[float(matrix[layer, c]) for c in shown] for layer in range(len(layers))],
        }

    def _snapshots(self, name: str, head: TreeHead, run: dict[str, Any]) -> tuple[list[np.ndarray], np.ndarray]:
        classes = run["classes"]
        matrix = np.zeros((len(run["layers"]), len(classes)))
        snapshots, steps = [matrix.copy()], []
        for body in self.steps(name, head, run=run):
            self._accumulate(matrix, [body], classes)
            steps.append(body["step"])
            if len(steps) % SUMMARY_EVERY == 0:
                snapshots.append(matrix.copy())
        return snapshots, np.asarray(steps, dtype=np.int64)

    @staticmethod
    def _accumulate(matrix: np.ndarray, bodies: Any, classes: list[str]) -> None:
        index = {c: i for i, c in enumerate(classes)}
        for body in bodies:
            for signature, cells in body["contributions"].items():
                members = [index[c] for c in signature.split("+") if c in index]
                for layer, _, share in cells:
                    if type(share) is not str:
                        for c in members:
                            matrix[layer, c] += share / len(members)

    # ---------------------------------------------------------------- certificate

    def certificate(self, name: str) -> tuple[dict[str, Any], bytes]:
        """The deletion certificate as parsed, and the exact bytes its signature covers."""
        from smalti.workflows.certificate import CERTIFICATE, signed_message

        path = self.file(name, CERTIFICATE)
        if path is None:
            raise NotFound(f"run {name!r} has no deletion certificate")
        if path.stat().st_size > MAX_CERTIFICATE_BYTES:
            raise Unprocessable(f"run {name!r}: {CERTIFICATE} is larger than {MAX_CERTIFICATE_BYTES} bytes")
        try:
            certificate = json.loads(path.read_bytes())
            if type(certificate) is not dict:
                raise ValueError("not an object")
            return certificate, signed_message(certificate)
        except (ValueError, UnicodeDecodeError) as error:
            raise Unprocessable(f"run {name!r}: {CERTIFICATE} is not a JSON object ({error})") from None

    def evaluations(self, name: str) -> list[dict[str, Any]]:
        """The run's evaluation attestations, each checked against the served taxonomy's evaluators (never a key
        the run folder names): verified ones with their statement, the rest with why not."""
        from smalti.evaluation.attestation import EVALUATIONS, check_evaluations

        folder = self.path(name) / EVALUATIONS
        if not _real_folder(folder):
            return []
        return check_evaluations(folder, lambda file: self.file(name, f"{EVALUATIONS}/{file}"), self.evaluators)


def _shown_classes(classes: list[str], matrix: np.ndarray) -> list[int]:
    """The heatmap's columns: the taxonomy's leaves (nodes carry no examples), and any node that did contribute."""
    reached = matrix.sum(axis=0) > 0
    return [i for i, c in enumerate(classes) if reached[i] or not any(other.startswith(c + "/") for other in classes)]
