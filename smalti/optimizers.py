"""The optimizers a recipe can name, and what each means for routing (G1) and deletion.

Routing proves a class never reached a parameter by giving that parameter no gradient in any step the
class could have moved it (``smalti.governance.routing``). That holds for an optimizer exactly when it
skips a parameter whose gradient is None and its update of one parameter reads no other parameter's
gradient or state. Each optimizer here is listed with the widest thing its update couples:

- ``element``: each number of a parameter on its own (AdamW, SGD, Lion, schedule-free AdamW, Sophia, whose
  Hessian estimate comes from a second routed backward pass: ``smalti.sophia``);
- ``parameter``: one parameter tensor as a whole (Adafactor's factored second moment over rows and
  columns; Muon's orthogonalisation of a matrix's momentum).

Both keep G1 exact at Smalti's granularity, a whole parameter: a policy names parameters (or the modules
owning them), never parts of one. An optimizer whose update couples parameters (a global gradient norm,
a trust ratio over a group of parameters) would let one class's gradient scale another's update; none is
offered (the recipe schema refuses any name not listed here, in one line).

Deletion by ablation resets a confined parameter's optimizer state as well as its value: every tensor of
the state that summarises its gradients, whatever its shape (Adafactor keeps a row and a column vector).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from smalti.config import OptimizerConfig
from smalti.extras import require

Coupling = Literal["element", "parameter"]


@dataclass(frozen=True)
class OptimizerKind:
    name: str
    coupling: Coupling
    package: str  # where the implementation comes from (docs/dependencies.md says why)
    build: Callable[[list[dict[str, Any]], OptimizerConfig], Any]


def _adamw(groups: list[dict[str, Any]], c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps)


def _sgd(groups: list[dict[str, Any]], c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)


def _adafactor(groups: list[dict[str, Any]], c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(groups, lr=c.lr, foreach=False)


def _lion(groups: list[dict[str, Any]], c: OptimizerConfig) -> torch.optim.Optimizer:
    require("optimizers", "optimizer.name: lion", "pytorch_optimizer")
    from pytorch_optimizer import Lion

    return Lion(groups, lr=c.lr, betas=c.betas)


def _muon(groups: list[dict[str, Any]], c: OptimizerConfig) -> "MuonWithAdamW":
    return MuonWithAdamW(groups, c)


def _schedulefree_adamw(groups: list[dict[str, Any]], c: OptimizerConfig) -> Any:
    require("optimizers", "optimizer.name: schedulefree_adamw", "schedulefree")
    from smalti.schedule_free import ScheduleFreeAdamW

    return ScheduleFreeAdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps)


def _sophia(groups: list[dict[str, Any]], c: OptimizerConfig) -> Any:
    from smalti.sophia import SophiaG

    return SophiaG(groups, lr=c.lr, betas=c.betas, rho=c.rho, hessian_every=c.hessian_every)


KINDS: dict[str, OptimizerKind] = {
    kind.name: kind
    for kind in (
        OptimizerKind("adamw", "element", "torch", _adamw),
        OptimizerKind("sgd", "element", "torch", _sgd),
        OptimizerKind("adafactor", "parameter", "torch", _adafactor),
        OptimizerKind("muon", "parameter", "torch", _muon),
        OptimizerKind("lion", "element", "pytorch-optimizer", _lion),
        OptimizerKind("schedulefree_adamw", "element", "schedulefree", _schedulefree_adamw),
        OptimizerKind("sophia", "element", "smalti", _sophia),
    )
}


def parameter_groups(model: nn.Module, config: OptimizerConfig) -> list[tuple[str, list[str], float]]:
    """``(role, names, weight decay)`` per group, in the optimizer's order (its state's indices follow it).

    Weight decay on matrices and embeddings only; biases and norm gains are not decayed. For Muon, the
    hidden layers' matrices form a group of their own ("muon"); everything else goes to AdamW.
    Parameters are taken in ``named_parameters`` order, so the layout is the same on every rank and after
    a resume.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [n for n, p in trainable if p.dim() >= 2]
    no_decay = [n for n, p in trainable if p.dim() < 2]
    if config.name != "muon":
        return [("decay", decay, config.weight_decay), ("no_decay", no_decay, 0.0)]
    hidden = set(_hidden_matrices(model))
    return [
        ("muon", [n for n in decay if n in hidden], config.weight_decay),
        ("decay", [n for n in decay if n not in hidden], config.weight_decay),
        ("no_decay", no_decay, 0.0),
    ]


def _hidden_matrices(model: nn.Module) -> list[str]:
    """Weights of the linear layers between the embedding and the output head: what Muon is for. Embeddings,
    the output head (tied to the embedding or not) and anything not a 2-D linear weight go to AdamW."""
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.add(id(module.weight))
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else getattr(model, "head", None)
    if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
        excluded.add(id(head.weight))
    names = []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and isinstance(weight, nn.Parameter) and weight.dim() == 2 and id(weight) not in excluded:
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> Any:
    """The optimizer a recipe names, over ``parameter_groups``."""
    kind = KINDS[config.name]  # the recipe's schema admits only these names
    parameters = dict(model.named_parameters())
    groups = [
        {"params": [parameters[n] for n in names], "weight_decay": decay}
        | ({"role": role} if config.name == "muon" else {})
        for role, names, decay in parameter_groups(model, config)
    ]
    return kind.build(groups, config)


def optimizer_parameter_names(model: nn.Module, config: OptimizerConfig) -> list[str]:
    """The parameter name behind each index of ``build_optimizer``'s state dict.

    Whoever edits a saved optimizer state (deletion resets a class's moments) must map indices through
    this, not through the model's state dict order.
    """
    return [n for _, names, _ in parameter_groups(model, config) for n in names]


def evaluation_weights(optimizer: Any) -> contextlib.AbstractContextManager[None]:
    """The weights an optimizer means to produce, in the parameters while a block runs: schedule-free's
    averaged ``x`` (``smalti.schedule_free``); a no-op for every other optimizer."""
    swap = getattr(optimizer, "evaluation_weights", None)
    return swap() if callable(swap) else contextlib.nullcontext()


# State that holds a copy of the weights rather than a summary of gradients: schedule-free's base sequence.
_WEIGHT_COPIES = ("z",)


def reset_optimizer_state(state: dict[str, Any], weights: torch.Tensor) -> None:
    """Forget what a parameter's optimizer state learned from its gradients (ablation of a confined class);
    ``weights``: the parameter's reset value.

    Every tensor of the state but the step count (moments, factored rows and columns, momentum buffers) is
    zeroed, whatever its shape; the step count stays, so bias corrections and schedules go on where they were.
    A copy of the weights (schedule-free's ``z``) takes the reset value, so the point the optimizer evaluates
    at is the reset parameter too.
    """
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor) and key in _WEIGHT_COPIES:
            state[key] = weights.detach().clone().to(value.dtype)
        elif isinstance(value, torch.Tensor) and key != "step" and value.dim() > 0:
            state[key] = torch.zeros_like(value)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden layers' matrices, AdamW for every other parameter, stepped as one optimizer.

    One object, so the loop, the LR schedule (each group keeps its own base rate, ``base_lr``), gradient
    scaling and checkpoints see a single optimizer. Its state dict is a plain optimizer state dict: Muon's
    groups first, then AdamW's, indices numbered across both in ``parameter_groups`` order.
    """

    def __init__(self, groups: list[dict[str, Any]], config: OptimizerConfig) -> None:
        muon_groups = [dict(g, base_lr=config.lr) for g in groups if g["role"] == "muon"]
        adamw_groups = [dict(g, base_lr=config.fallback_lr) for g in groups if g["role"] != "muon"]
        self.muon = torch.optim.Muon(muon_groups, lr=config.lr, weight_decay=config.weight_decay)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=config.fallback_lr, betas=config.betas, eps=config.eps)
        super().__init__([p for g in groups for p in g["params"]], {})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self._children = (self.muon, self.adamw)

    @property  # type: ignore[override]
    def state(self) -> dict:  # a read-only view of both children's state
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns it; the children own it
        pass

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for child in self._children:
            child.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for child in self._children:
            child.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        offset = sum(len(g["params"]) for g in muon["param_groups"])
        state = dict(muon["state"]) | {i + offset: s for i, s in adamw["state"].items()}
        groups = muon["param_groups"] + [
            dict(g, params=[i + offset for i in g["params"]]) for g in adamw["param_groups"]
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        count = len(self.muon.param_groups)
        muon_groups, adamw_groups = state_dict["param_groups"][:count], state_dict["param_groups"][count:]
        offset = sum(len(g["params"]) for g in muon_groups)
        state = state_dict["state"]
        self.muon.load_state_dict(
            {"state": {i: s for i, s in state.items() if int(i) < offset}, "param_groups": muon_groups}
        )
        self.adamw.load_state_dict(
            {
                "state": {int(i) - offset: s for i, s in state.items() if int(i) >= offset},
                "param_groups": [dict(g, params=[int(i) - offset for i in g["params"]]) for g in adamw_groups],
            }
        )
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
