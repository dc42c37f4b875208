"""Routing gradients: each parameter learns only from the examples the policy allows.

The policy and any algorithm's rules (layer freezing) compile into one
**allow-matrix** per phase: classes x parameters, phases cut at the batches
where some rule starts or stops. For each microbatch the router works out
each row's **routing signature** (its classes) and the parameters each
signature may update, then:

- runs the backward pass with ``inputs=`` the parameters at least one row may
  update, so nothing else receives (or even computes) a gradient;
- where a module's parameters are allowed for some rows and not others, runs
  that module on its rows in partitions, the forbidden partition seeing the
  parameters detached: activations and input gradients are unchanged, and
  the parameter's gradient sums exactly the allowed rows. Modules whose
  parameters every row agrees on run once, at full batch.

We chose this per-module split by measurement (docs/routing.md): on the
baby GPT, one sub-batch per signature cost 1.51x and per-sample gradients
1.88x a plain step for 4 signatures, against a goal of 1.25x.

A parameter no row of the step may update gets no gradient at all, so the
optimizer skips it: its value and state (moments, step count, weight decay)
do not move. Clipping works per **cell** of parameters that the same classes
may update, so one class's gradients never change another cell's clipping.
Under several processes the router all-reduces the routed gradients itself
(DDP's hooks assume every rank computes the same parameters' gradients); under
FSDP2 it reduce-scatters them into the shards (``smalti.fsdp``), and reads the
unsharded parameters autograd sees from the modules as they run.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from smalti import distributed
from smalti.core.time import Time, TimeUnit
from smalti.distributed import DistInfo
from smalti.errors import SmaltiError
from smalti.fsdp import ShardedGradients
from smalti.models import rows
from smalti.trust.policy import Policy, Rule, matches
from smalti.io import Closing


class RoutingError(SmaltiError):
    """An example or module cannot be routed as the policy requires."""


@dataclass
class Phase:
    start_batch: int
    allowed: np.ndarray  # [classes, parameters] bool


# Normalisations that work token by token (each row of the batch on its own), whatever model they come
# from (LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm, ...): their own forward runs with substituted parameters.
_ROW_WISE_NORM_SUFFIXES = ("RMSNorm", "LayerNorm")
_NOT_ROW_WISE = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# transformers' mixture-of-experts gates (MixtralTopKRouter, Qwen2MoeTopKRouter, OlmoeTopKRouter, ...)
_TOKEN_ROUTER_SUFFIX = "TopKRouter"
# Modules whose own code reads their children's weights directly (Mamba's mixer multiplies by
# ``dt_proj.weight`` and, with kernels installed, hands every child's weight to one fused function): their
# children are never split by rows, and a microbatch whose rows disagree about any of them runs one routing
# signature at a time. ``guard_unrun_splits`` catches a module of this kind the list does not name.
_READS_CHILD_WEIGHTS = ("MambaMixer", "Mamba2Mixer", "FalconMambaMixer")


def _own_forward_with(module: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's class forward with some parameters swapped (the forbidden rows see them detached)."""
    saved = {name: module._parameters[name] for name in params}
    try:
        module._parameters.update(params)  # type: ignore[arg-type]  # detached tensors stand in for parameters
        return type(module).forward(module, x)
    finally:
        module._parameters.update(saved)


_EXACT: dict[type, Callable[[Any, torch.Tensor, dict], torch.Tensor]] = {  # each takes a module of its key's type
    nn.Linear: lambda m, x, p: F.linear(x, p["weight"], p.get("bias")),
    nn.Embedding: lambda m, x, p: F.embedding(
        x, p["weight"], m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse
    ),
    nn.LayerNorm: lambda m, x, p: F.layer_norm(x, m.normalized_shape, p.get("weight"), p.get("bias"), m.eps),
    nn.Conv1d: lambda m, x, p: m._conv_forward(x, p["weight"], p.get("bias")),
    nn.Conv2d: lambda m, x, p: m._conv_forward(x, p["weight"], p.get("bias")),
}
_ROW_WISE_BASES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d)


def _functional(module: nn.Module) -> Callable[[nn.Module, torch.Tensor, dict], torch.Tensor] | None:
    """How to run a module with substituted parameters, for the module types whose rows are independent
    (row i of the output depends on row i of the input alone). None: the router cannot prove that, and a
    microbatch whose rows disagree about the module's parameters is split by routing signature instead.

    torch's own layers run their functional form; their subclasses (a scaled embedding, say), GPT-2's
    ``Conv1D`` and any ``*RMSNorm``/``*LayerNorm`` of a model library run their own forward."""
    if isinstance(module, _NOT_ROW_WISE):
        return None
    if type(module) in _EXACT:
        return _EXACT[type(module)]
    if isinstance(module, _ROW_WISE_BASES) or type(module).__name__.endswith(_ROW_WISE_NORM_SUFFIXES):
        return _own_forward_with
    if type(module).__module__.startswith("transformers"):
        if type(module).__name__ == "Conv1D":
            return _own_forward_with  # GPT-2's transposed linear layer
        if type(module).__name__.endswith(_TOKEN_ROUTER_SUFFIX) and set(module._parameters) == {"weight"}:
            return _own_forward_with  # a mixture-of-experts gate: logits, softmax and top-k, token by token
    return None


@dataclass
class Split:
    """How one module runs on a mixed microbatch: row partitions, and the order to put them back in."""

    partitions: list[tuple[torch.Tensor, dict[str, bool]]]  # (rows, which of the module's parameters they may update)
    restore: torch.Tensor  # position of each original row in the concatenated partition outputs


@dataclass
class MicrobatchPlan:
    rows: int
    input_indices: list[int]  # the router's indices of the parameters some row may update
    holders: list[torch.Tensor]  # the tensors autograd accumulates into, by index (the router's, kept current)
    splits: dict[nn.Module, Split] = field(default_factory=dict)
    every_trainable: bool = False  # ``inputs`` are all the trainable parameters: no one is denied
    ran: set[nn.Module] = field(default_factory=set)  # the split modules whose (split) forward ran

    @functools.cached_property
    def allowed(self) -> frozenset[int]:
        """``input_indices`` as a set, made once per plan (a BatchNorm asks at each of its forward passes)."""
        return frozenset(self.input_indices)

    @property
    def inputs(self) -> list[torch.Tensor]:
        """What the backward pass differentiates: the parameters themselves, or under FSDP2 the unsharded
        parameters the modules ran with."""
        return [self.holders[i] for i in self.input_indices]


def routed_backward(loss: torch.Tensor, plan: MicrobatchPlan) -> None:
    """Backward for a routed microbatch: only ``plan.inputs`` receive (or even compute) a gradient.

    Where no trainable parameter is denied, a plain ``backward()`` does the same
    and is cheaper: ``inputs=`` measured 1.5-2% of a baby-GPT step slower on the
    CPU build machine (for the same kernels; the gradients are bitwise equal).
    """
    if plan.every_trainable:
        loss.backward()
    else:
        torch.autograd.backward(loss, inputs=plan.inputs)


class Router(Closing):
    """Compiled routing for one model; create once, then ``plan`` each microbatch."""

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        policy: Policy | None,
        extra_rules: Sequence[Rule],
        batches_in: Callable[[Time], float],
        dist: DistInfo = DistInfo(),
    ) -> None:
        self.model, self.dist = model, dist
        self.class_names = list(class_names)
        named = list(model.named_parameters())  # tied parameters appear once, under their first name
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.phases = self._compile(policy, list(extra_rules), batches_in)
        self._starts = [p.start_batch for p in self.phases]
        self._signature_cache: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        self._group_cache: dict[tuple, list] = {}
        self._plan_cache: dict[tuple, tuple] = {}
        self._must_split_cache: dict[tuple, bool] = {}
        self._cells: dict[int, list[list[int]]] = {}
        self._trainable = np.array([p.requires_grad for p in self.params], dtype=bool)
        self.active: MicrobatchPlan | None = None
        # What autograd accumulates into, per parameter: the parameter itself, or under FSDP2 the unsharded
        # parameter its module holds while it runs (recorded by a forward pre-hook).
        self.sharded = any(isinstance(p, DTensor) for p in self.params)
        self._holders: list[torch.Tensor] = list(self.params)
        self._hooks: list = []
        self._sharded_grads = ShardedGradients(self.params, dist) if self.sharded else None
        self._modules = self._patch_modules()
        # Parameters of modules that cannot be split by rows (see ``must_split``).
        self._unsplittable = np.zeros(len(self.params), dtype=bool)
        for module, (_, indices) in self._modules.items():
            if module not in self._functional:
                self._unsplittable[indices] = True
        self.step_updated = np.zeros(len(self.params), dtype=bool)
        self._coupling_modules = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for module in self._coupling_modules:
            if module in self._modules and module.track_running_stats:
                self._hooks.append(module.register_forward_pre_hook(self._keep_statistics_unless_allowed))
        self._saved_statistics: dict[nn.Module, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ compiling

    def _compile(self, policy: Policy | None, extra: list[Rule], batches_in: Callable[[Time], float]) -> list[Phase]:
        rules = extra + (policy.expanded_rules() if policy else [])
        self._policy_allows = {
            n
            for r in (policy.expanded_rules() if policy else [])
            if r.action == "allow"
            for n in self.names
            if any(matches(pat, n) for pat in r.params)
        }
        default = policy.default if policy else "allow"
        n_classes, n_params = len(self.class_names), len(self.names)
        covers = np.array([[r.covers(c) for c in self.class_names] for r in rules], dtype=bool).reshape(
            len(rules), n_classes
        )
        hits = np.array(
            [[any(matches(pat, n) for pat in r.params) for n in self.names] for r in rules], dtype=bool
        ).reshape(len(rules), n_params)
        windows = [
            (0, None) if r.phase is None else (round(batches_in(r.phase[0])), round(batches_in(r.phase[1])))
            for r in rules
        ]

        # Exclusive rules: hard constraints applied after the ordered rules.
        confined = np.zeros((n_classes, n_params), dtype=bool)  # class c may update p only if it is its own
        owned = np.ones((n_classes, n_params), dtype=bool)  # p confined to some node: only that node's classes
        own = np.zeros((n_classes, n_params), dtype=bool)
        for exclusive, params in zip(
            policy.exclusive if policy else [], policy.exclusive_parameters(self.names) if policy else []
        ):
            mask = np.array([n in params for n in self.names], dtype=bool)
            members = np.array([exclusive.covers(c) for c in self.class_names], dtype=bool)
            confined[members] = True
            own[np.ix_(members, mask)] = True
            owned[np.ix_(~members, mask)] = False
        exclusive_ok = owned & (~confined | own)

        training_end = batches_in(Time(1.0, TimeUnit.DURATION))  # a phase starting at the end of training never runs
        boundaries = sorted({0} | {b for w in windows for b in w if b is not None and 0 < b < training_end})
        phases: list[Phase] = []
        for start in boundaries:
            decided = np.zeros((n_classes, n_params), dtype=bool)
            allowed = np.zeros((n_classes, n_params), dtype=bool)
            for r, rule in enumerate(rules):
                begin, end = windows[r]
                if not (begin <= start and (end is None or start < end)):
                    continue
                cell = covers[r][:, None] & hits[r][None, :] & ~decided
                allowed |= cell & (rule.action == "allow")
                decided |= cell
            fallback = own | (default == "allow")
            allowed = np.where(decided, allowed, fallback) & exclusive_ok
            if not phases or not np.array_equal(phases[-1].allowed, allowed):
                phases.append(Phase(start_batch=start, allowed=allowed))
        return phases

    def protected_parameters(self) -> set[str]:
        """Parameters the policy explicitly allows some class to update: they must keep learning, so
        nothing (an entropy-driven freezing, say) may freeze them."""
        return set(self._policy_allows)

    def freeze(self, names: Sequence[str], from_batch: int) -> None:
        """Deny every class the parameters ``names`` from ``from_batch`` on (idempotent).

        For decisions taken during training (entropy-driven layer freezing): the
        caller records them, and replays them after a resume, so the phases are
        the same in the resumed run.
        """
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise RoutingError(f"cannot freeze {unknown[0]!r}: not a parameter of this model")
        protected = set(names) & self._policy_allows
        if protected:
            raise RoutingError(f"cannot freeze {sorted(protected)[0]!r}: the policy says it must keep learning")
        mask = np.array([n in set(names) for n in self.names], dtype=bool)
        index = bisect.bisect_right(self._starts, from_batch) - 1
        if self.phases[index].start_batch != from_batch:
            self.phases.insert(index + 1, Phase(start_batch=from_batch, allowed=self.phases[index].allowed.copy()))
        for phase in self.phases:
            if phase.start_batch >= from_batch:
                phase.allowed = phase.allowed & ~mask[None, :]
        self._starts = [p.start_batch for p in self.phases]
        for cache in (self._signature_cache, self._group_cache, self._plan_cache, self._cells, self._must_split_cache):
            cache.clear()

    def phase_at(self, batch: int) -> Phase:
        return self.phases[bisect.bisect_right(self._starts, batch) - 1]

    def allowed(self, class_name: str, batch: int = 0) -> set[str]:
        """The parameters a class may update at a batch (for reports and tests)."""
        row = self.phase_at(batch).allowed[self.class_names.index(class_name)]
        return {n for n, ok in zip(self.names, row) if ok}

    # ------------------------------------------------------------------ per microbatch

    def _signatures(self, provenance: torch.Tensor) -> tuple[list[tuple[int, ...]], torch.Tensor]:
        rows = provenance.numpy()  # provenance stays on the CPU
        if len(rows) and (rows == rows[0]).all():  # one signature (a per-class microbatch): no unique
            signatures = [tuple(c for c in sorted(rows[0].tolist()) if c >= 0)]  # no class left: refused below
            inverse = torch.zeros(len(rows), dtype=torch.long)
        elif provenance.shape[1] == 1:
            classes, inverse = torch.unique(provenance[:, 0], return_inverse=True)
            signatures = [(int(c),) for c in classes]
        else:
            rows, inverse = torch.unique(provenance.sort(dim=1).values, dim=0, return_inverse=True)
            signatures = [tuple(int(c) for c in row if c >= 0) for row in rows]
        for signature in signatures:
            if not signature or min(signature) < 0:
                raise RoutingError("an example without a provenance class reached a routed step (fail closed)")
        return signatures, inverse

    def _allowed_for(self, phase_index: int, signature: tuple[int, ...]) -> np.ndarray:
        key = (phase_index, signature)
        if key not in self._signature_cache:
            allowed = self.phases[phase_index].allowed
            self._signature_cache[key] = np.logical_and.reduce([allowed[c] for c in signature])
        return self._signature_cache[key]

    def _rows_coupled(self) -> bool:
        """Whether a module mixes the rows of a batch in the forward pass (a BatchNorm normalising by batch
        statistics, in training mode), or the model's loss does (a mixture of experts' load-balancing loss). Then no parameter can be routed by rows: an allowed row's gradient
        flows back through statistics the other rows took part in, so its contribution to any parameter
        depends on their content."""
        return any(module.training for module in self._coupling_modules) or bool(
            getattr(self.model, "couples_rows", False)
        )

    def must_split(self, provenance: torch.Tensor, batch: int) -> bool:
        """Whether this microbatch must run one routing signature at a time: some module the router cannot
        split by rows (BatchNorm, an unknown type) holds parameters its rows disagree about, or a module mixes
        the rows (``_rows_coupled``) and they disagree about any parameter."""
        coupled = self._rows_coupled()
        if not coupled and not self._unsplittable.any():
            return False
        phase_index = bisect.bisect_right(self._starts, batch) - 1
        signatures, _ = self._signatures(provenance)
        if len(signatures) < 2:
            return False
        key = (phase_index, tuple(signatures), coupled)
        if key not in self._must_split_cache:
            per_signature = np.stack([self._allowed_for(phase_index, s) for s in signatures])
            mixed = (per_signature.any(axis=0) & ~per_signature.all(axis=0)) & self._trainable
            self._must_split_cache[key] = bool(mixed.any() if coupled else mixed[self._unsplittable].any())
        return self._must_split_cache[key]

    def plan(self, provenance: torch.Tensor, batch: int) -> MicrobatchPlan:
        """Decide who learns from this microbatch; active until ``end_microbatch``."""
        phase_index = bisect.bisect_right(self._starts, batch) - 1
        signatures, inverse = self._signatures(provenance)
        key = (phase_index, tuple(signatures))
        if key not in self._plan_cache:
            per_signature = np.stack([self._allowed_for(phase_index, s) for s in signatures])  # [S, P]
            anyone = per_signature.any(axis=0) & self._trainable
            self._plan_cache[key] = (
                per_signature,
                anyone,
                np.flatnonzero(anyone).tolist(),
                bool(np.array_equal(anyone, self._trainable)),
            )
        per_signature, anyone, indices, every_trainable = self._plan_cache[key]
        self.step_updated |= anyone
        plan = MicrobatchPlan(
            rows=int(provenance.shape[0]), input_indices=indices, holders=self._holders, every_trainable=every_trainable
        )
        if len(signatures) > 1:
            mixed = anyone & ~per_signature.all(axis=0)  # allowed for some signatures, not all
            if mixed.any():
                rows_of = [np.flatnonzero(inverse.numpy() == k) for k in range(len(signatures))]
                for module, groups in self._module_groups(phase_index, tuple(signatures), per_signature, mixed):
                    plan.splits[module] = self._split(module, groups, rows_of)
        self.active = plan
        return plan

    def _module_groups(self, phase_index: int, signatures: tuple, per_signature: np.ndarray, mixed: np.ndarray):
        """Per module to split: its signatures grouped by what they allow it (cached per combination)."""
        key = (phase_index, signatures)
        if key not in self._group_cache:
            found = []
            for module, (names, indices) in self._modules.items():
                if not mixed[indices].any():
                    continue
                if module not in self._functional:  # the trainer splits such microbatches first (must_split)
                    raise RoutingError(
                        f"module {self._module_names[module]} ({type(module).__name__}) holds parameters that some "
                        "examples of this microbatch may update and others may not, and it cannot be split by rows"
                    )
                by_pattern: dict[bytes, tuple[np.ndarray, list[int]]] = {}
                for k, pattern in enumerate(per_signature[:, indices]):
                    by_pattern.setdefault(pattern.tobytes(), (pattern, []))[1].append(k)
                groups = [(pattern, members) for pattern, members in by_pattern.values()]
                found.append((module, [(names, indices, pattern, members) for pattern, members in groups]))
            self._group_cache[key] = found
        return self._group_cache[key]

    def _split(self, module: nn.Module, groups, rows_of: list[np.ndarray]) -> Split:
        partitions, order = [], []
        for names, indices, pattern, members in groups:
            rows = np.concatenate([rows_of[k] for k in members])
            partitions.append((torch.from_numpy(rows), {n: bool(ok) for n, ok in zip(names, pattern)}))
            order.append(rows)
        return Split(partitions=partitions, restore=torch.from_numpy(np.argsort(np.concatenate(order), kind="stable")))

    def end_microbatch(self) -> None:
        self.active = None
        self._restore_statistics()

    @contextlib.contextmanager
    def guard_unrun_splits(self, plan: MicrobatchPlan) -> Iterator[None]:
        """Fail closed where a module the plan splits never ran, yet its parameters reach the loss: some other
        module's code read them directly (as Mamba's mixer reads ``dt_proj.weight``), so every row's gradient
        would reach them. A gradient arriving for such a parameter stops the backward pass with a
        ``RoutingError`` before anything is applied. (A module that did not run and whose parameters get no
        gradient, an expert no token was sent to, is fine.)"""
        handles = []
        for module in plan.splits:
            if module in plan.ran:
                continue
            names, indices = self._modules[module]
            for name, index in zip(names, indices):
                holder = self._holders[index]
                if holder.requires_grad:
                    handles.append(holder.register_hook(_refuse_direct_use(self._module_names[module], name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ batch statistics

    def _keep_statistics_unless_allowed(self, module: nn.Module, args: Any) -> None:
        """A BatchNorm's running statistics learn from the rows that run through it in training mode. Where
        no row of this microbatch may update the norm's parameters (a mixed microbatch has been split by
        signature, so its rows agree), its statistics must not learn from them either: saved here, put back
        bitwise once the microbatch's backward pass is done (autograd may still hold the updated tensors)."""
        plan = self.active
        if plan is None or not module.training or plan.every_trainable:
            return
        if module in self._saved_statistics or any(index in plan.allowed for index in self._modules[module][1]):
            return  # already saved in this microbatch (a module run twice), or the rows may update it
        self._saved_statistics[module] = [b.detach().clone() for b in module.buffers(recurse=False)]

    def _restore_statistics(self) -> None:
        with torch.no_grad():
            for module, saved in self._saved_statistics.items():
                for buffer, value in zip(module.buffers(recurse=False), saved):
                    buffer.copy_(value)
        self._saved_statistics.clear()

    # ------------------------------------------------------------------ module patching

    def _patch_modules(self) -> dict[nn.Module, tuple[list[str], list[int]]]:
        """Give every module that owns parameters a forward that can split its rows when asked."""
        found: dict[nn.Module, tuple[list[str], list[int]]] = {}
        self._functional: dict[nn.Module, Callable] = {}
        self._module_names: dict[nn.Module, str] = {}
        opaque = {
            id(child)
            for module in self.model.modules()
            if type(module).__name__ in _READS_CHILD_WEIGHTS
            for child in module.modules()
        }
        for name, module in self.model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in self._index]
            if not own:
                continue
            found[module] = ([n for n, _ in own], [self._index[id(p)] for _, p in own])
            self._module_names[module] = name or "(model)"
            if self.sharded:
                self._hooks.append(module.register_forward_pre_hook(_holder_recorder(self, module, found[module])))
            functional = _functional(module) if id(module) not in opaque else None
            if functional is not None:
                self._functional[module] = functional
                module.forward = types.MethodType(_routed_forward(self, functional, module.forward), module)
        return found

    def close(self) -> None:
        for module in self._functional:
            module.__dict__.pop("forward", None)  # back to the class's forward
        for hook in self._hooks:
            hook.remove()

    def autograd_params(self) -> list[torch.Tensor]:
        """Per parameter, the tensor whose ``.grad`` autograd fills: the parameter, or under FSDP2 the unsharded
        parameter its module last ran with (None-free once every module has run)."""
        return self._holders

    # ------------------------------------------------------------------ per step

    def start_step(self) -> None:
        self.step_updated[:] = False

    def synchronize(self) -> np.ndarray:
        """All ranks agree on what was updated and hold the summed (averaged) routed gradients."""
        if self._sharded_grads is not None:  # FSDP2: reduce-scatter exactly the updated parameters' gradients
            self._agree_on_updated()
            self._sharded_grads.set_sharded_grads(self.step_updated.tolist(), self._holders)
        elif self.dist.enabled:
            self._agree_on_updated()
            grads = []
            for p, updated in zip(self.params, self.step_updated):
                if updated:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads)
                distributed.all_reduce_sum(flat, self.dist)
                flat.div_(self.dist.world_size)
                for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    grad.copy_(synced)
        return self.step_updated

    def _agree_on_updated(self) -> None:
        """A parameter is updated in this step if any rank's examples updated it."""
        flags = torch.from_numpy(self.step_updated.astype(np.int32))
        distributed.all_reduce_sum(flags, self.dist)
        self.step_updated = flags.numpy() > 0

    def clip(self, max_norm: float, batch: int) -> None:
        """Clip per cell of parameters that the same classes may update at this phase."""
        phase_index = bisect.bisect_right(self._starts, batch) - 1
        if phase_index not in self._cells:
            allowed = self.phases[phase_index].allowed
            cells: dict[bytes, list[int]] = {}
            for i in range(len(self.params)):
                cells.setdefault(allowed[:, i].tobytes(), []).append(i)
            self._cells[phase_index] = list(cells.values())
        for cell in self._cells[phase_index]:
            params = [self.params[i] for i in cell if self.params[i].grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, max_norm)


def _routed_forward(router: Router, functional: Callable, original: Callable) -> Callable:
    def forward(module: nn.Module, *args, **kwargs):
        plan = router.active
        split = plan.splits.get(module) if plan is not None else None
        if split is None:
            return original(*args, **kwargs)
        assert plan is not None  # a split comes from the active plan
        plan.ran.add(module)
        x = args[0]
        gathered = rows.current()
        if gathered is not None and (
            x.shape[0] != gathered.count or (gathered.positions is None and x.shape[0] == plan.rows)
        ):
            gathered = None  # not rows of the flattened batch (or they are the examples themselves)
        if gathered is None and x.shape[0] == 1 and plan.rows > 1:  # shared by every row (GPT-2's positions):
            x = x.expand(plan.rows, *x.shape[1:])  # one copy per row, so each row's gradient goes where it may
        partitions, restore = _partitions_of(router, module, split, plan.rows, x.shape, gathered)
        # under FSDP2, the unsharded parameters while the module runs; the split names only present ones
        current = cast("dict[str, nn.Parameter]", module._parameters)
        outputs = [
            functional(
                module,
                x.index_select(0, members),
                {n: current[n] if ok else current[n].detach() for n, ok in allowed.items()},
            )
            for members, allowed in partitions
        ]
        if isinstance(outputs[0], tuple):  # a gate's (logits, scores, experts): each row-aligned
            return tuple(torch.cat(parts).index_select(0, restore) for parts in zip(*outputs))
        return torch.cat(outputs).index_select(0, restore)

    return forward


def _partitions_of(
    router: Router,
    module: nn.Module,
    split: Split,
    batch_rows: int,
    shape: torch.Size,
    gathered: rows.GatheredRows | None,
) -> tuple[list[tuple[torch.Tensor, dict[str, bool]]], torch.Tensor]:
    """The split's partitions as rows of this input. Its rows are the examples, or (in a mixture-of-experts
    block, ``smalti.models.rows``) the tokens of the flattened batch or those gathered for one expert."""
    if gathered is not None:
        if gathered.total % batch_rows:
            raise RoutingError(
                f"module {router._module_names[module]}: {gathered.total} flattened rows do not split "
                f"into {batch_rows} examples"
            )
        examples = gathered.examples(batch_rows)
        partitions = [
            (torch.isin(examples, members).nonzero().flatten(), allowed) for members, allowed in split.partitions
        ]
        partitions = [(r, allowed) for r, allowed in partitions if r.numel()]
        order = torch.cat([r for r, _ in partitions])
        return partitions, torch.argsort(order)
    if shape[0] != batch_rows:
        raise RoutingError(
            f"module {router._module_names[module]} must be split by examples but its input has no batch "
            f"dimension (shape {tuple(shape)})"
        )
    return split.partitions, split.restore


def _refuse_direct_use(module: str, parameter: str) -> Callable[[torch.Tensor], None]:
    def refuse(_grad: torch.Tensor) -> None:
        raise RoutingError(
            f"module {module} was to be split by examples but never ran, and its {parameter} still reached the loss: "
            "another module reads it directly, so its rows cannot be routed (name that module's type in "
            "routing._READS_CHILD_WEIGHTS to run such microbatches one routing signature at a time)"
        )

    return refuse


def _holder_recorder(router: Router, module: nn.Module, owned: tuple[list[str], list[int]]) -> Callable:
    """A forward pre-hook that records the (unsharded) parameters ``module`` runs with, for ``inputs=``."""
    names, indices = owned

    def record(_module: nn.Module, _args: Any) -> None:
        current = cast("dict[str, nn.Parameter]", module._parameters)  # the names are of present parameters
        for name, index in zip(names, indices):
            router._holders[index] = current[name]

    return record
