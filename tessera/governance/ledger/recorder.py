"""What the ledger measures in each optimizer step, kept on the device until it is written.

**Layers** are the modules that own parameters directly (``blocks.0.attn.qkv``,
``tok_emb``, an adapter's ``up``): the finest grouping an auditor can name
and a policy can route.

**Contributions.** Each microbatch holds one routing signature (a class, or
several classes for a mixed example), so the gradient its backward pass
produces is that signature's contribution. The recorder asks autograd for
that gradient (``torch.autograd.grad``, which leaves ``.grad`` alone), adds
it to its signature's running sum and to the step's gradient, and points each
parameter's ``.grad`` at its slice of that step gradient: ``0 + g1 + g2 ...``
in microbatch order, the same sums autograd's own accumulation makes, so
training is bitwise unchanged by recording. All three live in one flat
:class:`~tessera.governance.ledger.layout.FlatLayout` each.
For every layer and signature s it records ``|G_s|`` and the share
``<G_s, G> / |G|^2`` of the layer's step gradient G. The shares of a layer
sum to 1 and a zero share means no gradient at all: an exact, additive
decomposition, computed before clipping (which rescales a cell uniformly and
so leaves shares unchanged).

**Update-share rule** (declared in the ledger's first entry): Adam's update is
not a sum of per-class parts, so a class's share of a layer's *update* is
defined as its share of the layer's gradient in that step.

**Per-layer update statistics**: the update's norm, its size relative to the
parameters, its cosine with the layer's previous update, and the
parameter norm after the step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tessera import distributed
from tessera.distributed import DistInfo
from tessera.governance.ledger.layout import FlatLayout
from tessera.governance.routing import MicrobatchPlan, Router

UPDATE_SHARE_RULE = (
    "gradient-share: a class's share of a layer's update is its share <G_c, G>/|G|^2 of the layer's summed "
    "step gradient G (before clipping); Adam's update is not otherwise separable by class"
)


def signature_key(classes: Sequence[int], class_names: Sequence[str]) -> str:
    """``"a/b"`` for one class, ``"a/b+c/d"`` for a mixed example's classes."""
    return "+".join(class_names[c] for c in sorted(set(classes)))


class ContributionRecorder:
    """Captures per-signature gradients in the microbatch loop and reduces them to per-layer numbers."""

    def __init__(self, router: Router, dist: DistInfo = DistInfo()) -> None:
        self.router, self.dist = router, dist
        self.params = router.params
        self.names = router.names
        self._index = {id(p): i for i, p in enumerate(self.params)}
        # A layer is a module with parameters of its own; a tied parameter belongs to its first owner.
        self.layer_names, self.layer_parameters = [], []
        layer_of = np.full(len(self.params), -1, dtype=np.int64)
        for name, module in router.model.named_modules():
            own = [self._index[id(p)] for p in module.parameters(recurse=False)
                   if id(p) in self._index and layer_of[self._index[id(p)]] < 0]
            if own:
                layer_of[own] = len(self.layer_names)
                self.layer_names.append(name or "(model)")
                self.layer_parameters.append([router.names[i] for i in own])
        self.layer_of = torch.from_numpy(layer_of)
        self.layout = FlatLayout([p.numel() for p in self.params], layer_of, len(self.layer_names))
        self._shapes = [p.shape for p in self.params]
        device = self.params[0].device
        # Row 0: the step's gradient (what .grad points into); rows 1..: one per signature, grown on demand.
        # A row is written by copy where a parameter first appears in a step and by addition after that;
        # slices a step never wrote still hold an older step's numbers ("dirty") and are zeroed before use.
        self._rows = torch.zeros(2, self.layout.size, device=device)
        self._row_views = [self.layout.views(row, self._shapes) for row in self._rows]
        self._written = np.zeros((2, len(self.params)), dtype=bool)
        self._dirty = np.zeros((2, len(self.params)), dtype=bool)
        self._signatures: dict[str, int] = {}
        self._bound = np.zeros(len(self.params), dtype=bool)  # .grad points into row 0
        # Parameters before the step, after it, this update, the previous update (rows 2 and 3 swap roles).
        self._updates = torch.zeros(4, self.layout.size, device=device)
        self._update_views = [self.layout.views(row, self._shapes) for row in self._updates[:2]]
        self._current, self._previous = 2, 3
        self._inputs_cache: dict[tuple[int, ...], list[int]] = {}
        self.layout.layer_order(device)  # on the device before the first step

    # ---------------------------------------------------------------- microbatches

    def start_step(self) -> None:
        self._signatures = {}
        self._written[:] = False
        self._bound[:] = False

    def backward(self, loss: torch.Tensor, plan: MicrobatchPlan, signature: str) -> None:
        """Backward for one single-signature microbatch: its gradient is kept apart and added to ``.grad``."""
        grads = torch.autograd.grad(loss, plan.inputs, allow_unused=True)
        key = tuple(id(p) for p in plan.inputs)
        if key not in self._inputs_cache:
            self._inputs_cache[key] = [self._index[id(p)] for p in plan.inputs]
        indices, fresh = [], []
        for i, g in zip(self._inputs_cache[key], grads):
            if g is not None:
                indices.append(i)
                fresh.append(g)
        if not indices:
            return
        row = self._row_for(signature)
        self._bind(indices)
        self._accumulate(0, indices, fresh)
        self._accumulate(row, indices, fresh)

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

    def _row_for(self, signature: str) -> int:
        if signature not in self._signatures:
            row = len(self._signatures) + 1
            if row >= self._rows.shape[0]:  # more signatures in one step than ever before: grow
                grown = torch.zeros(2 * row, self.layout.size, device=self._rows.device)
                grown[:row].copy_(self._rows[:row])
                self._rows = grown
                self._row_views = [self.layout.views(r, self._shapes) for r in self._rows]
                for i in np.flatnonzero(self._bound):  # .grad must keep pointing at the step gradient
                    self.params[i].grad = self._row_views[0][i]
                extra = np.zeros((2 * row - self._written.shape[0], len(self.params)), dtype=bool)
                self._written = np.concatenate([self._written, extra])
                self._dirty = np.concatenate([self._dirty, extra])
            self._signatures[signature] = row
        return self._signatures[signature]

    def _bind(self, indices: Sequence[int]) -> None:
        """Point ``.grad`` of these parameters at their slice of the step gradient (once per step)."""
        views = self._row_views[0]
        for i in indices:
            if not self._bound[i]:
                p = self.params[i]
                if p.grad is not None:  # a gradient from outside the recorder: it is part of the step's
                    views[i].copy_(p.grad)
                    self._written[0, i] = True
                p.grad = views[i]
                self._bound[i] = True

    def _clean(self, rows: int) -> None:
        """Zero the slices of the first ``rows`` rows that this step did not write."""
        for r in range(rows):
            stale = np.flatnonzero(self._dirty[r] & ~self._written[r])
            if stale.size:
                torch._foreach_zero_([self._row_views[r][i] for i in stale])
            self._dirty[r] = self._written[r]

    # ---------------------------------------------------------------- the step

    def gradient_statistics(self, inv_scale: float = 1.0) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-signature norms and dots with the step gradient, per layer. Call after gradients are final
        (summed over ranks, unscaled) and before clipping."""
        # Gradients the recorder did not make (another rank's parameters under DDP) join the step gradient.
        self._bind([i for i, p in enumerate(self.params) if p.grad is not None])
        self._clean(len(self._signatures) + 1)
        if self.dist.enabled:
            signatures, rows = self._all_reduce(sorted(self._signatures))
        else:  # row order is first appearance, the dict's order (an entry's tables are keyed, not ordered, by them)
            signatures = list(self._signatures)
            rows = self._rows[:len(signatures) + 1]
        gram = self.layout.gram(rows)  # [L, S+1, S+1]: every norm and dot product in one read of the rows
        norms_sq = gram.diagonal(dim1=1, dim2=2).T.contiguous()  # [S+1, L]
        gradient_sq = norms_sq[0]
        if len(signatures) == 1:  # one signature: its gradient is the step's, bit for bit
            dots = gradient_sq[None].clone()
        else:
            dots = gram[:, 1:, 0].T.contiguous()  # [S, L]: each signature's gradient with the step's
        return signatures, norms_sq[1:].sqrt() * inv_scale, dots * inv_scale**2, gradient_sq * inv_scale**2

    def _all_reduce(self, local: list[str]) -> tuple[list[str], torch.Tensor]:
        """Every rank ends with every signature's global contribution (mean over ranks, like the gradient).
        Row 0 (the step gradient) is already global: the router synchronised it."""
        everyone = sorted({s for part in distributed.all_gather_object(local, self.dist) for s in part})
        rows = torch.zeros(len(everyone) + 1, self.layout.size, device=self._rows.device)
        for k, signature in enumerate(everyone):
            if signature in self._signatures:
                rows[k + 1].copy_(self._rows[self._signatures[signature]])
        distributed.all_reduce_sum(rows[1:], self.dist)
        rows[1:].div_(self.dist.world_size)
        rows[0].copy_(self._rows[0])
        return everyone, rows

    def snapshot_parameters(self) -> None:
        torch._foreach_copy_(self._update_views[0], [p.detach() for p in self.params])

    def update_statistics(self) -> tuple[torch.Tensor, ...]:
        """Per layer: the update's norm, the parameters' norms before and after, and the update's dot
        product with the previous step's (the cosine's parts, so nothing waits for the device here)."""
        torch._foreach_copy_(self._update_views[1], [p.detach() for p in self.params])
        rows = self._updates
        torch.sub(rows[1], rows[0], out=rows[self._current])
        gram = self.layout.gram(rows)  # [L, 4, 4]: before, after, this update, the previous one
        norms_sq = gram.diagonal(dim1=1, dim2=2).T
        dot_previous = gram[:, self._current, self._previous]
        before_sq, after_sq = norms_sq[0], norms_sq[1]
        update_sq, previous_sq = norms_sq[self._current], norms_sq[self._previous]
        self._current, self._previous = self._previous, self._current  # this update is the next one's previous
        return update_sq.sqrt(), before_sq.sqrt(), after_sq.sqrt(), dot_previous, previous_sq.sqrt()

    def layer_flags(self, parameter_flags: np.ndarray) -> np.ndarray:
        updated = np.zeros(len(self.layer_names), dtype=bool)
        np.logical_or.at(updated, self.layer_of.numpy(), parameter_flags)
        return updated

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """The previous update, by parameter name (independent of the flat layout)."""
        previous = self.layout.views(self._updates[self._previous], self._shapes)
        return {"previous_update": {name: v.cpu().clone() for name, v in zip(self.names, previous)}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("previous_update")
        if not isinstance(saved, dict):
            return
        previous = self.layout.views(self._updates[self._previous], self._shapes)
        for name, view in zip(self.names, previous):
            if name in saved and saved[name].shape == view.shape:
                view.copy_(saved[name].to(view.device))
