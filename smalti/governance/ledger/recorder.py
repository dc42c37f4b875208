"""What the ledger measures in each optimizer step, kept on the device until it is written.

**Layers** are the modules that own parameters directly (``blocks.0.attn.qkv``,
``tok_emb``, an adapter's ``up``): the finest grouping an auditor can name
and a policy can route.

**Contributions.** Each microbatch holds one routing signature (a class, or
several classes for a mixed example), so the gradient its backward pass
produces is that signature's contribution. The recorder asks autograd for
that gradient, leaving ``.grad`` as it was (:func:`_gradients`), copies
it into its signature's row of one flat
:class:`~smalti.governance.ledger.layout.FlatLayout` buffer (adding, when
the signature comes back in the same step), and accumulates ``.grad`` the
way autograd itself would: the first gradient becomes ``.grad``, later ones
are added in place, in microbatch order. Training is bitwise unchanged by
recording, and costs no more memory traffic than autograd's own
accumulation; the recorder's only traffic is one copy per microbatch and
one read of its rows.

**Under FSDP2** the per-signature gradients are those of the unsharded
parameters the modules ran with (the router's ``autograd_params``). At the
end of the step every signature's row is reduce-scattered into the
parameters' dim-0 shards (:class:`smalti.fsdp.ShardedGradients`), each rank
computes the Gram matrix of its shards, and the ranks sum those partial
Gram matrices: the statistics come from sharded gradients, and only the
[L, R, R] matrices travel whole. The update statistics work the same way on
the parameters' local shards.

The step gradient G is the sum of the signatures' gradients G_s (plus, in
the rare step where something other than the recorder left a gradient in
``.grad``, that gradient, kept in a row of its own). So one per-layer Gram
matrix of the signature rows holds every number an entry needs: ``|G_s|^2``
on its diagonal, ``<G_s, G>`` as the sum of row s, ``|G|^2`` as the sum of
all. For every layer and signature s the entry records ``|G_s|`` and the
share ``<G_s, G> / |G|^2`` of the layer's step gradient: shares sum to 1
and a zero share means no gradient at all; an exact, additive
decomposition, computed before clipping (which rescales a cell uniformly and
so leaves shares unchanged). The Gram matrices stay on the device; the
entry's numbers are worked out from them in float64 when entries are written.

**Update-share rule** (declared in the ledger's first entry): Adam's update is
not a sum of per-class parts, so a class's share of a layer's *update* is
defined as its share of the layer's gradient in that step.

**Per-layer update statistics**: the update's norm, its size relative to the
parameters, its cosine with the layer's previous update, and the parameter
norm after the step. The update is the change of the weights since the
previous step's entry: the parameters are copied once per step, after the
optimizer, and that copy is the next step's "before" (copied afresh only
when training starts or resumes).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from smalti import distributed
from smalti.distributed import DistInfo
from smalti.governance.ledger.layout import FlatLayout
from smalti.governance.routing import MicrobatchPlan, Router, routed_backward

UPDATE_SHARE_RULE = (
    "gradient-share: a class's share of a layer's update is its share <G_c, G>/|G|^2 of the layer's summed "
    "step gradient G (before clipping); Adam's update is not otherwise separable by class"
)


def signature_key(classes: Sequence[int], class_names: Sequence[str]) -> str:
    """``"a/b"`` for one class, ``"a/b+c/d"`` for a mixed example's classes."""
    return "+".join(class_names[c] for c in sorted(set(classes)))


class ContributionRecorder:
    """Captures per-signature gradients in the microbatch loop and reduces them to per-layer Gram matrices."""

    def __init__(self, router: Router, dist: DistInfo = DistInfo()) -> None:
        self.router, self.dist = router, dist
        self.params = router.params
        self.holders = router.autograd_params()  # kept current by the router (the unsharded ones under FSDP2)
        self.sharded = bool(getattr(router, "sharded", False))
        self.names = router.names
        self._index = {id(p): i for i, p in enumerate(self.params)}
        # A layer is a module with parameters of its own; a tied parameter belongs to its first owner.
        self.layer_names: list[str] = []
        self.layer_parameters: list[list[str]] = []
        layer_of = np.full(len(self.params), -1, dtype=np.int64)
        for name, module in router.model.named_modules():
            own = [
                self._index[id(p)]
                for p in module.parameters(recurse=False)
                if id(p) in self._index and layer_of[self._index[id(p)]] < 0
            ]
            if own:
                layer_of[own] = len(self.layer_names)
                self.layer_names.append(name or "(model)")
                self.layer_parameters.append([router.names[i] for i in own])
        self.layer_of = torch.from_numpy(layer_of)
        self.layout = FlatLayout([p.numel() for p in self.params], layer_of, len(self.layer_names))
        self._shapes = [p.shape for p in self.params]
        device = self.params[0].device
        # Row 0: gradients the recorder did not make (a rare step has any); rows 1..: one per signature, grown
        # on demand. A row is written by copy where a parameter first appears in a step and by addition after
        # that; slices a step never wrote still hold an older step's numbers ("dirty") and are zeroed before use.
        self._rows = torch.zeros(2, self.layout.size, device=device)
        self._row_views = [self.layout.views(row, self._shapes) for row in self._rows]
        self._written = np.zeros((2, len(self.params)), dtype=bool)
        self._dirty = np.zeros((2, len(self.params)), dtype=bool)
        self._signatures: dict[str, int] = {}
        self._touched = np.zeros(len(self.params), dtype=bool)  # .grad holds this step's recorded gradient
        # The parameters after this step and after the previous one (rows 0 and 1 swap roles), this update
        # and the previous one (rows 2 and 3 swap roles).
        # Under FSDP2 the update rows hold this rank's dim-0 shards of the parameters (their own layout).
        self._shards = None
        self.update_layout, self._update_shapes = self.layout, self._shapes
        if self.sharded:
            from smalti.fsdp import ShardedGradients

            self._shards = ShardedGradients(self.params, dist)
            self._update_shapes = [p.to_local().shape for p in self.params]  # type: ignore[attr-defined]  # DTensors
            self.update_layout = FlatLayout([s.numel() for s in self._update_shapes], layer_of, len(self.layer_names))
            self.update_layout.layer_order(device)
        self._updates = torch.zeros(4, self.update_layout.size, device=device)
        self._update_views = [self.update_layout.views(row, self._update_shapes) for row in self._updates[:2]]
        self._after, self._before, self._current, self._previous = 0, 1, 2, 3
        self._have_before = False  # the "before" row holds the parameters as the coming step starts
        self.layout.layer_order(device)  # on the device before the first step

    # ---------------------------------------------------------------- microbatches

    def start_step(self) -> None:
        self._signatures = {}
        self._written[:] = False
        self._touched[:] = False
        self._take_outside_gradients()

    def _take_outside_gradients(self) -> None:
        """Keep every ``.grad`` the recorder has not reached in this step (see :meth:`_take_outside`)."""
        for i, p in enumerate(self.holders):
            if p.grad is not None and not self._touched[i]:
                self._take_outside(i)

    def _take_outside(self, i: int) -> None:
        """Parameter ``i``'s ``.grad``, there before the recorder reached it in this step, was made by something
        else: part of the step gradient but of no signature, it is copied into row 0."""
        self._row_views[0][i].copy_(self.holders[i].grad)  # type: ignore[arg-type]  # callers saw it is not None
        self._written[0, i] = True
        self._touched[i] = True

    def backward(self, loss: torch.Tensor, plan: MicrobatchPlan, signature: str) -> None:
        """Backward for one single-signature microbatch: its gradient is kept apart and added to ``.grad``."""
        grads = _gradients(loss, plan)
        indices, fresh = [], []
        for i, g in zip(plan.input_indices, grads):
            if g is not None:
                indices.append(i)
                fresh.append(g)
        if not indices:
            return
        self._accumulate(self._row_for(signature), indices, fresh)
        self._add_to_grad(indices, fresh)

    def _accumulate(self, row: int, indices: list[int], grads: list[torch.Tensor]) -> None:
        """``row += grads`` on these parameters' slices (``0 + g`` is ``g``, so a first write copies)."""
        views, written = self._row_views[row], self._written[row]
        first = [k for k, i in enumerate(indices) if not written[i]]
        if len(first) == len(indices):
            torch._foreach_copy_([views[i] for i in indices], grads)
        elif not first:
            torch._foreach_add_([views[i] for i in indices], grads)
        else:
            again = [k for k, i in enumerate(indices) if written[i]]
            torch._foreach_copy_([views[indices[k]] for k in first], [grads[k] for k in first])
            torch._foreach_add_([views[indices[k]] for k in again], [grads[k] for k in again])
        written[indices] = True

    def _add_to_grad(self, indices: list[int], grads: list[torch.Tensor]) -> None:
        """What autograd's accumulation does: a parameter's first gradient becomes its ``.grad`` (taken, not
        copied, when nothing else shares its memory), later ones are added in place.

        A ``.grad`` already there when the recorder first reaches a parameter in a step was put there by
        something else; it is part of the step gradient but of no signature, so it is copied into row 0.
        """
        targets, added = [], []
        copied = _must_copy(grads)
        for i, g in zip(indices, grads):
            p = self.holders[i]
            if p.grad is None:
                p.grad = g.clone(memory_format=torch.contiguous_format) if id(g) in copied else g
            else:
                if not self._touched[i]:
                    self._take_outside(i)
                targets.append(p.grad)
                added.append(g)
            self._touched[i] = True
        if targets:
            torch._foreach_add_(targets, added)

    def _row_for(self, signature: str) -> int:
        if signature not in self._signatures:
            row = len(self._signatures) + 1
            if row >= self._rows.shape[0]:  # more signatures in one step than ever before: grow
                grown = torch.zeros(2 * row, self.layout.size, device=self._rows.device)
                grown[:row].copy_(self._rows[:row])
                self._rows = grown
                self._row_views = [self.layout.views(r, self._shapes) for r in self._rows]
                extra = np.zeros((2 * row - self._written.shape[0], len(self.params)), dtype=bool)
                self._written = np.concatenate([self._written, extra])
                self._dirty = np.concatenate([self._dirty, extra])
            self._signatures[signature] = row
        return self._signatures[signature]

    def _clean(self, rows: int) -> None:
        """Zero the slices of the first ``rows`` rows that this step did not write."""
        for r in range(rows):
            stale = np.flatnonzero(self._dirty[r] & ~self._written[r])
            if stale.size:
                torch._foreach_zero_([self._row_views[r][i] for i in stale])
            self._dirty[r] = self._written[r]

    # ---------------------------------------------------------------- the step

    def gradient_statistics(self, inv_scale: float = 1.0) -> tuple[list[str], torch.Tensor, bool, float]:
        """The step's signatures and the per-layer Gram matrix [L, R, R] of their rows (preceded by the row of
        gradients from outside the recorder when ``outside``), for :func:`contribution_numbers`. Call after
        gradients are final (summed over ranks, unscaled) and before clipping."""
        if self.sharded:
            return self._sharded_gradient_statistics(inv_scale)
        if self.dist.enabled:  # outside gradients of any rank: always reduced, always in the Gram (other
            # ranks' parameters have gradients by now too, so none is taken here: they are not outside)
            self._clean(len(self._signatures) + 1)
            signatures, rows = self._all_reduce(sorted(self._signatures))
            outside = True
        else:  # row order is first appearance, the dict's order (an entry's tables are keyed, not ordered, by them)
            self._take_outside_gradients()
            self._clean(len(self._signatures) + 1)
            signatures = list(self._signatures)
            outside = bool(self._written[0].any())
            rows = self._rows[0 if outside else 1 : len(signatures) + 1]
        self._copy_before()
        return signatures, self.layout.gram(rows), outside, inv_scale

    def _sharded_gradient_statistics(self, inv_scale: float) -> tuple[list[str], torch.Tensor, bool, float]:
        """FSDP2: each row reduce-scattered into dim-0 shards, a Gram matrix of the shards per rank, summed."""
        assert self._shards is not None
        self._clean(len(self._signatures) + 1)
        local = sorted(self._signatures)
        everyone = sorted({s for part in distributed.all_gather_object(local, self.dist) for s in part})
        rows = torch.zeros(len(everyone) + 1, self.update_layout.size, device=self._rows.device)
        everything = list(range(len(self.params)))
        for k, source in enumerate([0] + [self._signatures.get(s) for s in everyone]):
            fulls = (
                self._row_views[source]
                if source is not None
                else [torch.zeros(s, device=rows.device) for s in self._shapes]
            )
            pieces = self._shards.reduce_scatter(everything, fulls)
            torch._foreach_copy_(self.update_layout.views(rows[k], self._update_shapes), pieces)
        gram = self.update_layout.gram(rows)
        distributed.all_reduce_sum(gram, self.dist)
        self._copy_before()
        return everyone, gram, True, inv_scale

    def _copy_before(self) -> None:
        if not self._have_before:  # training starts or resumes here: this is the "before" of the first update
            torch._foreach_copy_(self._update_views[self._before], self._current_values())
            self._have_before = True

    def _current_values(self) -> list[torch.Tensor]:
        """The parameters, or under FSDP2 this rank's shards of them."""
        if self.sharded:
            return [p.detach().to_local() for p in self.params]  # type: ignore[attr-defined]  # FSDP2: DTensors
        return [p.detach() for p in self.params]

    def _all_reduce(self, local: list[str]) -> tuple[list[str], torch.Tensor]:
        """Every rank ends with every signature's global contribution and the global gradient from outside the
        recorder (means over ranks, like the gradient)."""
        everyone = sorted({s for part in distributed.all_gather_object(local, self.dist) for s in part})
        rows = torch.zeros(len(everyone) + 1, self.layout.size, device=self._rows.device)
        rows[0].copy_(self._rows[0])
        for k, signature in enumerate(everyone):
            if signature in self._signatures:
                rows[k + 1].copy_(self._rows[self._signatures[signature]])
        distributed.all_reduce_sum(rows, self.dist)
        rows.div_(self.dist.world_size)
        return everyone, rows

    def update_statistics(self) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The per-layer Gram matrix [L, 4, 4] of the parameters after and before the step, this update and the
        previous one, and which row is which, for :func:`update_numbers`."""
        torch._foreach_copy_(self._update_views[self._after], self._current_values())
        rows = self._updates
        torch.sub(rows[self._after], rows[self._before], out=rows[self._current])
        gram = self.update_layout.gram(rows)
        if self.sharded:  # partial sums over this rank's shards
            distributed.all_reduce_sum(gram, self.dist)
        roles = (self._after, self._before, self._current, self._previous)
        self._after, self._before = self._before, self._after  # this step's "after" is the next one's "before"
        self._current, self._previous = self._previous, self._current  # this update is the next one's previous
        return gram, roles

    def layer_flags(self, parameter_flags: np.ndarray) -> np.ndarray:
        updated = np.zeros(len(self.layer_names), dtype=bool)
        np.logical_or.at(updated, self.layer_of.numpy(), parameter_flags)
        return updated

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """The previous update, by parameter name (independent of the flat layout and of the world size).

        Under FSDP2 every rank must call it: the shards are gathered into whole tensors."""
        previous = self.update_layout.views(self._updates[self._previous], self._update_shapes)
        local = {name: v.cpu().clone() for name, v in zip(self.names, previous)}
        if not self.sharded:
            return {"previous_update": local}
        gathered = distributed.all_gather_object(local, self.dist)
        return {
            "previous_update": {
                name: torch.cat([part[name] for part in gathered]) if local[name].dim() else local[name]
                for name in self.names
            }
        }

    def load_state_dict(self, state: dict) -> None:
        self._have_before = False  # the loaded weights are the next step's "before"
        saved = state.get("previous_update")
        if not isinstance(saved, dict):
            return
        previous = self.update_layout.views(self._updates[self._previous], self._update_shapes)
        for i, (name, view) in enumerate(zip(self.names, previous)):
            value = saved.get(name)
            if value is not None and self._shards is not None and value.shape == self._shapes[i]:
                value = self._shards.local_piece(i, value)  # this rank's shard at this world size
            if value is not None and value.shape == view.shape:
                view.copy_(value.to(view.device))


def contribution_numbers(gram: np.ndarray, outside: bool, inv_scale: float) -> tuple[np.ndarray, ...]:
    """From a step's Gram matrix of signature rows [L, R, R] (row 0 the outside gradient when ``outside``):
    per signature and layer ``|G_s|`` and ``<G_s, G>``, and per layer ``|G|^2`` (float64 arrays [S, L],
    [S, L], [L]); G is the sum of all rows."""
    gram = gram.astype(np.float64)
    first = 1 if outside else 0
    diagonal = np.diagonal(gram, axis1=1, axis2=2).T  # [R, L]
    norms = np.sqrt(np.clip(diagonal[first:], 0.0, None)) * inv_scale
    dots = gram.sum(axis=2).T[first:] * inv_scale**2
    gradient_sq = np.clip(gram.sum(axis=(1, 2)), 0.0, None) * inv_scale**2
    return norms, dots, gradient_sq


def update_numbers(gram: np.ndarray, roles: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    """From the update Gram matrix [L, 4, 4] and its rows' roles (after, before, this update, the previous
    one): per layer the update's norm, the parameters' norms before and after, the dot product with the
    previous update and the previous update's norm."""
    after, before, current, previous = roles
    gram = gram.astype(np.float64)
    norm = np.sqrt(np.clip(np.diagonal(gram, axis1=1, axis2=2), 0.0, None)).T  # [4, L]
    return norm[current], norm[before], norm[after], gram[:, current, previous], norm[previous]


def _gradients(loss: torch.Tensor, plan: MicrobatchPlan) -> list[torch.Tensor | None]:
    """The gradient of ``loss`` for each of ``plan.inputs`` (None where it has none), ``.grad`` left as it was:
    the routed backward pass (:func:`~smalti.governance.routing.routed_backward`, which skips ``inputs=``
    where it can, 1.5-2% of a step cheaper) into emptied ``.grad``s, which are then put back."""
    params = plan.inputs
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        routed_backward(loss, plan)
        return [p.grad for p in params]
    finally:
        for p, grad in zip(params, held):
            p.grad = grad


def _must_copy(grads: list[torch.Tensor]) -> set[int]:
    """``id`` of every gradient that must be copied, not taken, to become a ``.grad``: one autograd returned
    for more than one parameter, a view of other memory, or not contiguous (autograd's own accumulation
    copies these too)."""
    seen: set[int] = set()
    copied: set[int] = set()
    for g in grads:
        if g._is_view() or not g.is_contiguous() or id(g) in seen:
            copied.add(id(g))
        seen.add(id(g))
    return copied
