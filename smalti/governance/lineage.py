"""Lineage: a run that starts from another run, and the chain of runs behind a model.

A run can have a parent in two ways, recorded the same way:

- **init** (a fine-tune, ``smalti train --init-from PARENT``): the run starts from its parent's
  final weights, and only those (a new optimizer, new data, a new sampler);
- **replay** (a deletion, ``smalti forget``): the run restarts its parent's own training from a
  checkpoint with a class left out (``exact``), or resets a class's adapter in the parent's final
  weights (``ablate``).

Either way the child's first ledger entry (``parent`` in its run entry, signed by the child's
trainer) names the **link**: the parent's run directory, the parent's signed tree head the child
starts from (which signs the digest of the parent's weights at that point), the parent's trainer
key, the fingerprints of the data, taxonomy and policy the parent trained under, and the digest of
the weights the child actually started from. A child therefore vouches for its parent's key, so
verifying the child with its own key walks the whole chain (``verify_chain``): each parent's
ledger verifies, holds the head its child names, and that head's weights are what the child
started from. Chains have any depth (pretrain, fine-tune, fine-tune again).

``lineage.json`` in a run directory carries a replay's link from ``smalti forget`` to the trainer
that writes the run entry; a fine-tune's comes from its recipe (``init.from_run``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smalti import formats
from smalti.errors import CheckpointError, SmaltiError
from smalti.trust.keys import PublicKey
from smalti.governance.ledger.store import LedgerStore, ledger_path
from smalti.governance.ledger.verify import verify_ledger
from smalti.io import atomic_write_bytes

PENDING = "lineage.json"
REPLAY_CHANGES = ("data.exclude_classes",)  # what a replay may change against its parent's recipe


class LineageError(SmaltiError):
    """A parent that cannot be admitted, or a chain whose links do not hold."""


@dataclass
class Link:
    kind: str  # "init" | "replay"
    run_dir: str
    head: dict[str, Any]  # the parent's signed tree head the child starts from
    trainer_key: str = ""  # the parent's trainer public key ("ed25519:...")
    start_weights_sha256: str = ""  # the weights the child started from ("": a replay from the initial weights)
    fingerprints: dict[str, Any] = field(default_factory=dict)  # what the parent trained under
    fork_step: int | None = None  # replay: the parent's step the child restarts after
    forgotten: str | None = None  # replay: the class left out
    mode: str | None = None  # replay: exact | ablate

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Link":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{"kind": "replay", **known})


# ---------------------------------------------------------------------------------------------- pending


def write_pending(run_dir: Path, link: Link) -> None:
    body = {"format": formats.LINEAGE, "parent": link.to_json()}
    atomic_write_bytes(Path(run_dir) / PENDING, (json.dumps(body, indent=1) + "\n").encode())


def read_pending(run_dir: Path) -> Link | None:
    """The link ``smalti forget`` left for the trainer (None: an ordinary run)."""
    path = Path(run_dir) / PENDING
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except ValueError as error:
        raise LineageError(f"{path}: not a lineage description ({error})") from None
    problem = formats.format_problem(body.get("format") if isinstance(body, dict) else None, formats.LINEAGE, str(path))
    if problem:
        raise LineageError(problem)
    try:
        return Link.from_json(body["parent"])
    except (KeyError, TypeError) as error:
        raise LineageError(f"{path}: not a lineage description (no {error})") from None


# ---------------------------------------------------------------------------------------------- reading


def run_entry(run_dir: Path) -> dict[str, Any]:
    """The run entry (entry 0) of a run's ledger, decoded (callers verify first)."""
    from smalti.trust.entry import decode_entry

    store = LedgerStore(ledger_path(run_dir), read_only=True)
    try:
        row = next(store.rows(0, 1), None)
    finally:
        store.close()
    if row is None:
        raise LineageError(f"{ledger_path(run_dir)}: empty ledger")
    return decode_entry(row[3], canonical=False).body


def parent_of(run_dir: Path) -> Link | None:
    parent = run_entry(run_dir).get("parent")
    return Link.from_json(parent) if parent else None


def chain(run_dir: Path) -> list[tuple[Path, Link]]:
    """The run's ancestors, nearest first: (ancestor's run directory, the link to it)."""
    found, seen, current = [], {Path(run_dir).resolve()}, Path(run_dir)
    while (link := parent_of(current)) is not None:
        parent = Path(link.run_dir)
        if parent.resolve() in seen:
            raise LineageError(f"{current}: its lineage runs in a circle through {parent}")
        seen.add(parent.resolve())
        found.append((parent, link))
        if not ledger_path(parent).is_file():
            break
        current = parent
    return found


# ---------------------------------------------------------------------------------------------- checking


def _signed_head(run_dir: Path, head: dict[str, Any]) -> bool:
    """Whether the parent's ledger holds this exact signed head (size, root, time, flag, weights, signature)."""
    store = LedgerStore(ledger_path(run_dir), read_only=True)
    try:
        heads = {h.size: h for h in store.heads()}
    finally:
        store.close()
    stored = heads.get(int(head.get("size", -1)))
    return stored is not None and stored.to_json() == {k: head.get(k) for k in stored.to_json()}


def check_link(child: Path, link: Link, notes: list[str] | None = None) -> str | None:
    """One link, checked from the parent's side: None if it holds, else what is wrong, in one line. What an
    auditor should know though it holds (the parent trained on) is appended to ``notes``."""
    parent = Path(link.run_dir)
    where = f"{child}: its parent {parent}"
    if not ledger_path(parent).is_file():
        return f"{where} has no ledger here to check"
    try:
        key = PublicKey.parse(link.trainer_key, f"{child} parent trainer key")
    except SmaltiError as error:
        return f"{where}: the link names no usable trainer key ({error})"
    report = verify_ledger(parent, key)
    if not report.ok:
        return f"{where}: its ledger does not verify against its trainer key {key.key_id} ({report.problem})"
    if not _signed_head(parent, link.head):
        return f"{where}: does not hold the signed tree head the child names (size {link.head.get('size')})"
    if link.kind == "init":
        if not link.head.get("final"):
            return f"{where}: the head a fine-tune starts from must be the parent's final one"
        if link.start_weights_sha256 != link.head.get("weights"):
            return (
                f"{where}: the child started from weights {str(link.start_weights_sha256)[:16]}..., the parent's "
                f"final head signs {str(link.head.get('weights'))[:16]}..."
            )
        return _named_checkpoint_problem(parent, link.head, where, notes)
    elif link.start_weights_sha256 and link.head.get("weights") and link.start_weights_sha256 != link.head["weights"]:
        return f"{where}: the child did not start from the weights the parent's head signs"
    return None


def _named_checkpoint_problem(parent: Path, head: dict[str, Any], where: str, notes: list[str] | None) -> str | None:
    """The parent's checkpoint at the head its child names must still hold the weights that head signs. A parent
    may train on after a child started from it (its summary invites it): its latest checkpoint is then another
    one, and says nothing about the link. Where the named checkpoint was pruned since, the link rests on the
    weights' digest the signed head carries, and a note says so."""
    from smalti.checkpoint import CheckpointStore, load_payload, weights_sha256

    kept = CheckpointStore(parent / "checkpoints", keep=1).all() if (parent / "checkpoints").is_dir() else []
    if not kept:
        return None  # an auditor may hold the ledgers without the weights
    for path in reversed(kept):  # newest first: a fine-tune usually starts from the parent's latest
        try:
            payload = load_payload(path)
        except CheckpointError:
            continue  # a damaged older checkpoint is not the one named unless it is the only candidate
        if (payload.ledger_head or {}).get("root") != head.get("root"):
            continue
        if weights_sha256(payload.model or {}) != head.get("weights"):
            return (
                f"{where}: its checkpoint {path.name} at the head the child names no longer holds the weights "
                f"that head signs"
            )
        return None
    if notes is not None:
        notes.append(
            f"{parent} has trained on since the head its child names (size {head.get('size')}); that "
            f"head's checkpoint is no longer kept, so the link was checked against the weights' digest "
            f"the signed head carries"
        )
    return None


def verify_chain(run_dir: Path, notes: list[str] | None = None) -> str | None:
    """Every link behind a run (each checked as ``check_link`` does), nearest first; None if all hold."""
    current = Path(run_dir)
    for parent, link in chain(run_dir):
        problem = check_link(current, link, notes)
        if problem is not None:
            return problem
        current = parent
    return None


# ---------------------------------------------------------------------------------------------- admitting


def admit_parent(parent: Path, trusted: list[PublicKey], tokenizer_json: str | None) -> tuple[Link, dict[str, Any]]:
    """A fine-tune's parent, checked before a single weight is used: its ledger verifies against a trusted
    trainer key and is final, every link behind it holds, its final checkpoint is the one its final head
    signs, and it trained with the same tokenizer. Returns the link and the parent's final weights."""
    from smalti.checkpoint import CheckpointStore, load_payload, weights_sha256

    parent = Path(parent)
    where = f"init.from_run {parent}"
    if not ledger_path(parent).is_file():
        raise LineageError(f"{where}: no ledger (only a run trained with governance.ledger can be a parent)")
    store = LedgerStore(ledger_path(parent), read_only=True)
    try:
        recorded = store.get_meta("trainer_public_key") or ""
    finally:
        store.close()
    key = PublicKey.parse(recorded, f"{where} trainer key")
    if all(key.key_id != t.key_id for t in trusted):
        raise LineageError(
            f"{where}: its ledger is signed by trainer key {key.key_id}, which is not trusted "
            f"({', '.join(t.key_id for t in trusted) or 'no key'}; set init.trust to the parent's "
            f"trainer public key)"
        )
    report = verify_ledger(parent, key)
    if not report.ok:
        raise LineageError(f"{where}: its ledger does not verify ({report.problem})")
    final = report.last_head or {}
    if not final.get("final"):
        raise LineageError(f"{where}: its ledger has no final tree head (the parent did not finish training)")
    problem = verify_chain(parent)
    if problem is not None:
        raise LineageError(f"{where}: a link behind it does not hold ({problem})")
    latest = CheckpointStore(parent / "checkpoints", keep=1).latest()
    if latest is None:
        raise LineageError(f"{where}: no checkpoint")
    payload = load_payload(latest)
    assert payload.model is not None  # read with its tensors
    digest = weights_sha256(payload.model)
    if (payload.ledger_head or {}).get("root") != final.get("root") or digest != final.get("weights"):
        raise LineageError(
            f"{where}: {latest.name} is not the checkpoint its final signed head names (weights "
            f"{digest[:16]}..., the head signs {str(final.get('weights'))[:16]}...)"
        )
    if tokenizer_json is not None and payload.tokenizer not in (None, tokenizer_json):
        raise LineageError(f"{where}: it trained with another tokenizer; a fine-tune must use the parent's")
    head = next(h for h in _heads(parent) if h["size"] == final["size"])
    link = Link(
        kind="init",
        run_dir=str(parent.resolve()),
        head=head,
        trainer_key=recorded,
        start_weights_sha256=digest,
        fingerprints=run_entry(parent).get("fingerprints", {}),
    )
    return link, payload.model


def _heads(run_dir: Path) -> list[dict[str, Any]]:
    store = LedgerStore(ledger_path(run_dir), read_only=True)
    try:
        return [h.to_json() for h in store.heads()]
    finally:
        store.close()


def fitted_weights(parent: dict[str, Any], child_names: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The parent's weights under the child's names: a child that adds LoRA adapters names a wrapped layer's
    weights ``<layer>.base_layer.*``. Returns them and the child's tensors the parent does not have (new
    adapters, which keep their initial values)."""
    fitted, missing = {}, []
    for name in child_names:
        source = name if name in parent else name.replace(".base_layer.", ".")
        if source in parent:
            fitted[name] = parent[source]
        else:
            missing.append(name)
    return fitted, missing


def fit_parent_weights(parent: dict[str, Any], child_names: list[str], where: str) -> dict[str, Any]:
    """``fitted_weights``, refusing unless everything the child has that the parent has not is an adapter (a
    LoRA adapter of peft, or a per-class adapter of ``smalti.models.adapters``), and the parent has no weight
    the child has no place for."""
    fitted, missing = fitted_weights(parent, child_names)
    new = [n for n in missing if ".lora_" not in n and ".adapters." not in n]
    if new or len(fitted) < len(parent):
        extra = sorted(set(parent) - {n.replace(".base_layer.", ".") for n in fitted})
        raise CheckpointError(
            f"{where}: the parent's weights do not fit this model "
            f"({'missing ' + new[0] if new else 'no place for ' + extra[0]}); only adapters may be new"
        )
    return fitted
