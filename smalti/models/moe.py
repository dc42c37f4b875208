"""Mixture-of-experts layers with one module per expert, so that governance can tell experts apart.

transformers 5 keeps a layer's experts in two fused 3-D parameters (``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]). One tensor for all experts means a policy cannot say "this class may update
expert 3 and nothing else", the router cannot keep one class's tokens out of another expert's gradient, and the
ledger cannot say which experts a class reached. So Smalti replaces each such module, when the model is built,
with ``UnfusedExperts``: the same computation, one small MLP per expert, named as transformers' own per-expert
checkpoints name them (Mixtral ``experts.3.w1``/``w3``/``w2``; Qwen2-MoE, Qwen3-MoE and OLMoE
``experts.3.gate_proj``/``up_proj``/``down_proj``). transformers fuses those names again when it loads them,
so an exported folder loads in plain transformers.

The block around the experts flattens the batch to one row per token, and each expert runs on the tokens the
gate sent it; both say so (``smalti.models.rows``), and the router splits each expert's rows by the example
they came from. While the ledger records a microbatch, each layer counts the tokens every expert received per
class (``ExpertCounts``).
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterator, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from smalti.errors import RecipeError
from smalti.models import rows

# model_type -> (gate, up, down) names of one expert's projections, as transformers' per-expert checkpoints
# name them (its conversion mapping fuses them on loading)
EXPERT_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
}


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, three bias-free linear layers the router can split."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act: Callable) -> None:
        super().__init__()
        self.names, self.act = names, act
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(up, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(down, nn.Linear(intermediate, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class ExpertCounts:
    """Tokens each expert received, per class, over the microbatches the ledger records in one step.

    A top-k router sends a token to k experts: each counts it. A token of an example with several classes
    counts for each of them (as the ledger's example counts do)."""

    def __init__(self, layer_names: Sequence[str], experts: int, classes: int) -> None:
        self.layer_names, self.experts = list(layer_names), experts
        self.counts = torch.zeros(classes, len(layer_names), experts, dtype=torch.int64)
        self.provenance: torch.Tensor | None = None  # set while a recorded microbatch runs

    def zero(self) -> None:
        self.counts.zero_()

    def begin(self, provenance: torch.Tensor) -> None:
        self.provenance = provenance.cpu()

    def end(self) -> None:
        self.provenance = None

    def add(self, layer: int, top_k_index: torch.Tensor) -> None:
        provenance = self.provenance
        if provenance is None:
            return
        per_token = F.one_hot(top_k_index.detach().cpu(), self.experts).sum(1)  # [tokens, experts]
        per_example = per_token.reshape(provenance.shape[0], -1, self.experts).sum(1)  # [examples, experts]
        for column in provenance.T:
            present = column >= 0
            self.counts[:, layer].index_add_(0, column[present], per_example[present])

    @staticmethod
    def table_by_class(counts: torch.Tensor, class_names: Sequence[str]) -> dict[str, list[list[int]]]:
        """``{class: [[tokens per expert] per layer]}`` for the classes that reached any expert."""
        return {name: counts[c].tolist() for c, name in enumerate(class_names) if bool(counts[c].any())}


class UnfusedExperts(nn.ModuleList):
    """A layer's experts as separate modules (``experts.0``, ``experts.1``, ...), computing what the fused
    module computes."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str]) -> None:
        gate_up, down = cast(nn.Parameter, fused.gate_up_proj).detach(), cast(nn.Parameter, fused.down_proj).detach()
        experts, intermediate, hidden = gate_up.shape[0], gate_up.shape[1] // 2, gate_up.shape[2]
        act = cast(Callable, fused.act_fn)
        super().__init__(ExpertMLP(names, hidden, intermediate, act) for _ in range(experts))
        self.num_experts = experts
        with torch.no_grad():
            for e, expert in enumerate(self):
                getattr(expert, names[0]).weight.copy_(gate_up[e, :intermediate])
                getattr(expert, names[1]).weight.copy_(gate_up[e, intermediate:])
                getattr(expert, names[2]).weight.copy_(down[e])
        self.counts: ExpertCounts | None = None
        self.layer = 0

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.counts is not None and self.training:
            self.counts.add(self.layer, top_k_index)
        output = torch.zeros_like(hidden_states)
        total = hidden_states.shape[0]
        with torch.no_grad():
            mask = F.one_hot(top_k_index, self.num_experts).permute(2, 1, 0)  # [experts, k, tokens]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:
            slot, tokens = torch.where(mask[e])
            with rows.gathered(tokens, total):
                result = self[e](hidden_states[tokens])
            result = result * top_k_weights[tokens, slot, None]
            output.index_add_(0, tokens, result.to(output.dtype))
        return output


def _declares_flattened_rows(block: nn.Module) -> None:
    """The block flattens ``[batch, tokens, hidden]`` to one row per token before its gate and experts.

    The class's forward is looked up on the instance each call (not captured), so a deep copy of the model
    runs its own block."""

    def forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with rows.gathered(None, hidden_states.shape[0] * hidden_states.shape[1]):
            return type(self).forward(self, hidden_states, *args, **kwargs)

    block.forward = types.MethodType(forward, block)


def _fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, parent block, module) of every fused experts module: 3-D ``gate_up_proj`` and ``down_proj``."""
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            yield name, parent, module


def unfuse_experts(model: nn.Module, model_type: str) -> list[str]:
    """Replace every fused experts module of ``model`` in place; the names of the replaced modules.

    A model type whose layout Smalti does not know is refused in one line rather than guessed at: a wrong
    guess (transposed weights, interleaved gate and up rows) would train a different model."""
    found = list(_fused_experts(model))
    if not found:
        return []
    layout = EXPERT_LAYOUTS.get(model_type)
    if layout is None:
        raise RecipeError(
            f"model.hf: {model_type} keeps its experts fused ({found[0][0]}); Smalti unfuses the experts of "
            f"{', '.join(sorted(EXPERT_LAYOUTS))} so that a policy can name them (see docs/models.md)"
        )
    for name, parent, fused in found:
        for flag in ("has_bias", "is_transposed"):
            if getattr(fused, flag, False) or getattr(type(fused), flag, False):
                raise RecipeError(f"model.hf: {name} has {flag.replace('_', ' ')}: not a layout Smalti can unfuse")
        unfused = UnfusedExperts(fused, layout)
        unfused.train(fused.training)
        parent.add_module(name.rsplit(".", 1)[-1], unfused)
        _declares_flattened_rows(parent)
    return [name for name, _, _ in found]


def attach_counts(model: nn.Module, classes: int) -> ExpertCounts | None:
    """Give every unfused experts layer one shared counter (None: the model has no experts)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    if not layers:
        return None
    counts = ExpertCounts([n for n, _ in layers], layers[0][1].num_experts, classes)
    for index, (_, module) in enumerate(layers):
        module.counts, module.layer = counts, index
    return counts
