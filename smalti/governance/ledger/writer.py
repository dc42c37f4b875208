"""The trainer's side of the ledger: measure each step, append it, sign tree heads at checkpoints.

The trainer calls, per step: ``start_step`` (the loader's batch, and the
batch after algorithms), ``backward`` for each microbatch (instead of its own), ``gradient_statistics`` once gradients are final,
``after_optimizer_step`` once the weights moved; and ``sign`` when it writes a
checkpoint or finishes.

Nothing here waits for the device in the loop: a step's Gram matrices stay
tensors in ``pending`` and become entries every ``flush_every`` steps (one
transaction: a crash loses no committed entry). A checkpoint flushes, signs
a tree head and stores it in the checkpoint; resuming from that checkpoint
checks the ledger's first ``size`` entries still hash to the head's root and
drops whatever a crashed run appended after it, so the resumed run writes
the same entries an uninterrupted one would (G7).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from smalti import distributed
from smalti.core.batch import Batch
from smalti.distributed import DistInfo
from smalti.trust.keys import PublicKey, SigningKey
from smalti.software import software
from smalti.trust import merkle
from smalti.governance.ledger.entropy import EntropyProbe
from smalti.trust.entry import ZERO_HASH, TreeHead, encode_packed_entry, pack_table
from smalti.governance.ledger.recorder import (
    UPDATE_SHARE_RULE,
    ContributionRecorder,
    contribution_numbers,
    signature_key,
    update_numbers,
)
from smalti.governance.ledger.store import ENTRY_FORMAT, LedgerError, LedgerStore, ledger_path
from smalti.loggers.governance import StepSignals
from smalti.models.moe import ExpertCounts, attach_counts
from smalti.governance.routing import MicrobatchPlan, Router
from smalti.io import Closing

CONTRIBUTION_RULE = (
    "per layer and routing signature s (a class, or classes joined by '+' for a mixed example): norm = |G_s|, "
    "share = <G_s, G>/|G|^2, G_s the summed gradient of the step's examples with signature s, G the layer's step "
    "gradient, both before clipping; shares of a layer sum to 1"
)
LAYER_FIELDS = [
    "updated",
    "update_norm",
    "relative_update",
    "cosine_previous_update",
    "parameter_norm",
    "gradient_norm",
]


@dataclass
class _PendingStep:
    step: int
    time: dict[str, int]
    loss: torch.Tensor
    examples: dict[str, list[int]]
    dropped: list[int]
    skipped: bool
    updated: np.ndarray
    signatures: list[str]
    gradient: tuple[torch.Tensor, bool, float]  # Gram matrix of signature rows, outside row first?, 1/loss scale
    update: tuple[torch.Tensor, tuple[int, int, int, int]]  # Gram matrix of parameters and updates, row roles
    entropy: torch.Tensor | None = None
    experts: dict[str, list[list[int]]] | None = None  # tokens per expert per mixture-of-experts layer, per class


def _shares(gradient: tuple[np.ndarray, ...]) -> np.ndarray:
    """Each signature's share of each layer's gradient, ``<G_s, G> / |G|^2`` (0 where the layer had none)."""
    _, dots, gradient_sq = gradient
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gradient_sq > 0, dots / gradient_sq, 0.0)


def routing_record(router: Router, layer_of: np.ndarray, n_layers: int) -> list[dict[str, Any]]:
    """What the policy (and any algorithm's static rules) allowed, as the run entry records it: per phase,
    from its first batch, one string per class with a character per layer: ``1`` the class may update the
    layer, ``0`` it may not, ``p`` only some of its parameters. Decisions taken during training (an
    entropy-driven freeze) are not in it; each step's ``updated`` column says what did move."""
    phases = []
    for phase in router.phases:
        rows = []
        for allowed in phase.allowed:
            marks = []
            for layer in range(n_layers):
                cell = allowed[layer_of == layer]
                marks.append("1" if cell.all() else "0" if not cell.any() else "p")
            rows.append("".join(marks))
        phases.append({"start_batch": int(phase.start_batch), "layers": rows})
    return phases


class Ledger(Closing):
    def __init__(
        self,
        run_dir: str | Path,
        key: SigningKey,
        router: Router,
        class_names: list[str],
        fingerprints: dict[str, str | None],
        *,
        probe: Batch | None = None,
        entropy_every: int = 50,
        probe_tokens: int = 32,
        flush_every: int = 50,
        dist: DistInfo = DistInfo(),
        recipe_fingerprint: str = "",
        log_name: str = "smalti",
    ) -> None:
        self.key, self.dist, self.log_name = key, dist, log_name
        self.class_names = class_names
        self.fingerprints = fingerprints
        self.recorder = ContributionRecorder(router, dist)
        self.experts = attach_counts(router.model, len(class_names))  # None: the model has no experts
        self.entropy = (
            EntropyProbe(router.model, probe, class_names, probe_tokens)
            if probe is not None and entropy_every
            else None
        )
        self.entropy_every, self.flush_every = entropy_every, flush_every
        # The latest profile, (step, layer names, [classes, layers] entropies): what State.entropy_profile holds.
        self.last_entropy: tuple[int, list[str], torch.Tensor] | None = None
        self.pending: list[_PendingStep] = []
        self.listeners: list[Callable[[list[StepSignals]], None]] = []  # called with each committed batch of steps
        self.genesis = {
            "kind": "run",
            "format": ENTRY_FORMAT,
            "classes": list(class_names),
            "layers": [
                {"name": n, "parameters": p} for n, p in zip(self.recorder.layer_names, self.recorder.layer_parameters)
            ],
            "layer_fields": LAYER_FIELDS,
            "contribution_rule": CONTRIBUTION_RULE,
            "update_share_rule": UPDATE_SHARE_RULE,
            "fingerprints": fingerprints,
            "recipe_fingerprint": recipe_fingerprint,
            "trainer_key": key.public.key_id,
            "software": software(),
            "routing": routing_record(router, self.recorder.layer_of.numpy(), len(self.recorder.layer_names)),
            "entropy": None
            if self.entropy is None
            else {
                "every": entropy_every,
                "tokens_per_class": probe_tokens,
                "layers": self.entropy.layer_names,
                "classes": self.entropy.class_names,
                "probe_examples": probe.sample_ids.tolist(),  # type: ignore[union-attr]  # entropy implies a probe
            },
        }
        if self.experts is not None:  # a mixture-of-experts model: its layers of experts, named for the audit
            self.genesis["experts"] = {"layers": self.experts.layer_names, "count": self.experts.experts}
        self.store: LedgerStore | None = None
        self.frontier = merkle.Frontier()
        self._previous_leaf = ZERO_HASH
        if dist.is_main:
            self.store = LedgerStore(ledger_path(run_dir), create=True)
        # (examples by signature, dropped), set by start_step; the initial placeholder has another shape
        self._step_examples: tuple[dict[str, list[int]], list[int]] = ({}, [])  # set by start_step
        self._gradient: tuple[list[str], torch.Tensor, bool, float] | None = None

    # ---------------------------------------------------------------- start and resume

    def start(self, head: dict[str, Any] | None, parent: dict[str, Any] | None = None) -> None:
        """Continue the log a checkpoint's tree head describes, or start a new one (``head`` None); a new
        log of a run forked from another (a deletion) names the parent's signed tree head first."""
        if self.store is None:
            return
        if head is None:
            self.store.truncate(0)
            self.store.start_log(self.key.public, self.log_name)
            self._append_bodies([self.genesis if parent is None else dict(self.genesis, parent=parent)])
            return
        size, expected = int(head["size"]), bytes.fromhex(head["root"])
        recorded = self.store.get_meta("trainer_public_key")
        if recorded is not None and recorded != self.key.public.text:
            raise LedgerError(
                f"{self.store.path}: its tree heads are signed by trainer key {PublicKey.parse(recorded).key_id}, this "
                f"run's key is {self.key.public.key_id}; one ledger has one signing key (use that key, or continue in a "
                f"new run directory from the checkpoint)"
            )
        leaves = self.store.leaves(stop=size)
        if len(leaves) < size or merkle.root(leaves) != expected:
            raise LedgerError(
                f"{self.store.path}: its first {size} entries do not match the checkpoint's signed tree head "
                f"(root {expected.hex()[:16]}...); the ledger was altered or belongs to another run"
            )
        self.store.truncate(size)  # what a crashed run appended after this checkpoint
        for leaf in leaves:
            self.frontier.append(leaf)
        self._previous_leaf = leaves[-1] if leaves else ZERO_HASH

    # ---------------------------------------------------------------- per step

    def start_step(self, loaded: Batch, trained: Batch) -> None:
        """The examples the loader gave this step, and those still in it after algorithms ran."""
        kept = trained.sample_ids.tolist()
        kept_set = set(kept)
        dropped = [i for i in loaded.sample_ids.tolist() if i not in kept_set]
        by_signature: dict[str, list[int]] = {}
        for example, row in zip(kept, trained.provenance.tolist()):
            by_signature.setdefault(signature_key([c for c in row if c >= 0], self.class_names), []).append(example)
        self._step_examples = (by_signature, dropped)
        self.recorder.start_step()
        if self.experts is not None:
            self.experts.zero()

    def begin_microbatch(self, microbatch: Batch) -> None:
        """The experts count this microbatch's tokens by its rows' classes (what the ledger records)."""
        if self.experts is not None:
            self.experts.begin(microbatch.provenance)

    def end_microbatch(self) -> None:
        if self.experts is not None:
            self.experts.end()

    def backward(self, loss: torch.Tensor, plan: MicrobatchPlan, microbatch: Batch) -> None:
        """The backward pass of one single-signature microbatch, its contribution kept apart."""
        first = microbatch.provenance[0].tolist()
        self.recorder.backward(loss, plan, signature_key([c for c in first if c >= 0], self.class_names))

    def gradient_statistics(self, inv_scale: float = 1.0) -> None:
        """Gradients are final (summed over ranks, unscaled, not yet clipped): measure contributions."""
        self._gradient = self.recorder.gradient_statistics(inv_scale)

    def after_optimizer_step(
        self, step: int, time: dict[str, int], loss: torch.Tensor, updated: np.ndarray, skipped: bool = False
    ) -> None:
        assert self._gradient is not None, "gradient_statistics must run before the optimizer step"
        signatures, gram, outside, inv_scale = self._gradient
        update = self.recorder.update_statistics()
        self._gradient = None
        examples, dropped = self._step_examples
        if self.dist.enabled:  # rank order: the global batch's order
            gathered = distributed.all_gather_object((examples, dropped), self.dist)
            examples = {}
            for part, _ in gathered:
                for signature, ids in part.items():
                    examples.setdefault(signature, []).extend(ids)
            dropped = [i for _, part in gathered for i in part]
        experts = None
        if self.experts is not None:
            counts = self.experts.counts.clone()
            if self.dist.enabled:
                distributed.all_reduce_sum(counts, self.dist)
            experts = ExpertCounts.table_by_class(counts, self.class_names)
        entropy = None
        if self.entropy is not None and step % self.entropy_every == 0:
            entropy = self.entropy.measure()
            self.last_entropy = (step, self.entropy.layer_names, entropy)  # every rank: same model, same probe
        if not self.dist.is_main:
            return
        self.pending.append(
            _PendingStep(
                step=step,
                time=time,
                loss=loss.detach(),
                examples=examples,
                dropped=dropped,
                skipped=skipped,
                updated=self.recorder.layer_flags(updated) & (not skipped),
                signatures=signatures,
                gradient=(gram, outside, inv_scale),
                update=update,
                entropy=entropy,
                experts=experts,
            )
        )
        if len(self.pending) >= self.flush_every:
            self.flush()

    # ---------------------------------------------------------------- writing

    def flush(self) -> None:
        if self.store is None or not self.pending:
            return
        # One device-to-host copy for every pending number: one synchronisation per flush, not eight per step.
        host = iter(_to_host([t for p in self.pending for t in (p.loss, p.gradient[0], p.update[0])]))
        bodies, signals = [], []
        for p in self.pending:
            loss, gradient = next(host), contribution_numbers(next(host), *p.gradient[1:])
            update = update_numbers(next(host), p.update[1])
            step = StepSignals(
                p.step,
                list(p.signatures),
                _shares(gradient),
                p.updated.astype(bool),
                None if p.entropy is None else p.entropy.cpu().double().numpy(),
            )
            bodies.append(self._body(p, loss, gradient, update, step))
            signals.append(step)
        self._append_bodies(bodies)
        self.pending = []
        for listener in self.listeners:  # trackers' views of what was just committed (smalti.loggers.governance)
            listener(signals)

    def _append_bodies(self, bodies: list[dict[str, Any]]) -> None:
        """Append entries whose tables are already packed (the first entry has none)."""
        rows = []
        for body in bodies:
            index = self.frontier.size
            data = encode_packed_entry(index, self._previous_leaf, body)
            leaf = merkle.leaf_hash(data)
            rows.append((index, int(body.get("step", 0)), leaf, data))
            self.frontier.append(leaf)
            self._previous_leaf = leaf
        assert self.store is not None  # both callers return early without a store
        self.store.append(rows)

    def _body(
        self,
        p: _PendingStep,
        loss: np.ndarray,
        gradient: tuple[np.ndarray, ...],
        update: tuple[np.ndarray, ...],
        signals: StepSignals,
    ) -> dict[str, Any]:
        """A step entry with its tables packed straight from the arrays (NaN where a statistic is undefined;
        a signature's table runs to the last layer it reached, zero where it sent no gradient)."""
        norms, _, gradient_sq = gradient
        update_norm, before_norm, after_norm, dot_previous, previous_norm = update
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(before_norm > 0, update_norm / before_norm, np.nan)
            moved = (update_norm > 0) & (previous_norm > 0)
            cosine = np.where(moved, dot_previous / (update_norm * previous_norm), np.nan)
        shares = signals.shares
        layers = np.column_stack(
            [p.updated.astype(np.float64), update_norm, relative, cosine, after_norm, np.sqrt(gradient_sq)]
        )
        contributions = {}
        for s, signature in enumerate(p.signatures):
            reached = norms[s] > 0
            last = int(np.flatnonzero(reached)[-1]) + 1 if reached.any() else 0
            table = np.where(reached[:, None], np.stack([norms[s], shares[s]], axis=1), 0.0)[:last]
            contributions[signature] = pack_table(table)
        body: dict[str, Any] = {
            "kind": "step",
            "step": p.step,
            "time": p.time,
            "loss": float(loss),
            "examples": p.examples,
            "dropped": p.dropped,
            "counts": _class_counts(p.examples),
            "skipped": p.skipped,
            "fingerprints": self.fingerprints,
            "layers": pack_table(layers),
            "contributions": contributions,
        }
        if signals.entropy is not None:
            body["entropy"] = pack_table(signals.entropy)
        if p.experts is not None:
            body["expert_tokens"] = p.experts
        return body

    def sign(self, final: bool, weights: str = "") -> dict[str, Any] | None:
        """Commit what is pending and sign the tree head, with the digest of the model's weights if given
        (main rank; other ranks return None)."""
        if self.store is None:
            return None
        self.flush()
        head = TreeHead.signed(self.key, self.store.origin, self.frontier.size, self.frontier.root(), final, weights)
        self.store.add_head(head)
        return head.to_json()

    def state_dict(self) -> dict[str, Any]:
        return self.recorder.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recorder.load_state_dict(state)

    def close(self) -> None:
        if self.store is not None:
            self.flush()
            self.store.close()
            self.store = None


def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """float64 numpy copies of ``tensors``, through one transfer where they live on an accelerator."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach().double().numpy() for t in tensors]
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).cpu().numpy()
    ends = np.cumsum([t.numel() for t in tensors])
    return [part.reshape(t.shape) for part, t in zip(np.split(flat, ends[:-1]), tensors)]


def _class_counts(examples: dict[str, list[int]]) -> dict[str, int]:
    """Examples per class (a mixed example counts for each of its classes)."""
    counts: dict[str, int] = {}
    for signature, ids in examples.items():
        for name in signature.split("+"):
            counts[name] = counts.get(name, 0) + len(ids)
    return dict(sorted(counts.items()))
