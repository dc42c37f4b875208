"""Hugging Face causal language models as Smalti models, and per-class LoRA adapters on them.

Any ``AutoModelForCausalLM``, from a config (randomly initialised) or from a local folder in
``save_pretrained`` layout. Nothing is ever downloaded: a folder is read with
``local_files_only``, and the Hub is not consulted for configs either.

``HFCausalLM`` adopts the model's own children, so every parameter and module keeps the name
transformers gives it (``model.layers.0.self_attn.q_proj``, ``lm_head``): routing policies name
what users see in transformers, and checkpoints hold the model's own state-dict keys.

LoRA adapters come from ``peft`` (``inject_adapter_in_model``: the modules stay where they were,
with ``lora_A.<class>``/``lora_B.<class>`` beside ``base_layer``), one adapter per listed class,
all active at once and **gated per example by provenance** as Smalti's own adapters are
(``smalti.models.adapters``): an adapter adds its output only to the rows of its class. With an
exclusive rule (``params: ["@adapter"]``) a class is confined to its adapter; resetting the
adapter's ``lora_B`` (its initial value is zero) removes the class again.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import torch
from torch import nn

from smalti.errors import RecipeError
from smalti.models.adapters import AdapterGates
from smalti.models.moe import unfuse_experts
from smalti.models.objective import CausalLMObjective

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Where each family keeps its list of decoder layers (for the entropy probe), first match wins.
_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")


def _quiet_transformers() -> None:
    """No progress bars or download attempts: runs are offline, and their output is the trainer's."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class HFCausalLM(CausalLMObjective, nn.Module):
    """A transformers causal LM behind Smalti's model interface (ids -> logits, summed loss, sampling)."""

    hf: PreTrainedModel  # set in __init__ with object.__setattr__ (not registered as a child)

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "hf", hf_model)  # not a child: its children become ours, under their own names
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        own = list(hf_model.named_parameters(recurse=False)) + list(hf_model.named_buffers(recurse=False))
        if own:
            raise RecipeError(
                f"model.hf: {type(hf_model).__name__} holds tensors of its own ({own[0][0]}); "
                "only models whose weights live in submodules are supported"
            )
        # from_pretrained returns a model in eval mode while this wrapper starts in training mode: make every
        # module agree, so that nothing trains with dropout off until an evaluation happens to switch it on.
        self.train()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.aux_loss_coefficient):
            return self.hf(input_ids=idx, use_cache=False).logits
        output = self.hf(input_ids=idx, use_cache=False, output_router_logits=True)
        self.__dict__["_aux_loss"] = output.aux_loss  # this forward pass's load-balancing loss, added by ``loss``
        return output.logits

    @property
    def aux_loss_coefficient(self) -> float:
        """The mixture-of-experts load-balancing loss's weight, where the config asks for it (0: none)."""
        config = self.hf.config
        return (
            float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
            if getattr(config, "output_router_logits", False)
            else 0.0
        )

    @property
    def couples_rows(self) -> bool:
        """The load-balancing loss mixes every token of a batch: each row's gradient depends on the other rows'
        routing, so routing must run a batch one routing signature at a time (``Router.must_split``)."""
        return self.training and self.aux_loss_coefficient > 0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # reads the forward's loss
        """The summed cross-entropy, plus the load-balancing loss weighted as transformers weights it against the
        mean (so times the positions summed), where the model has one."""
        total = CausalLMObjective.loss(logits, targets)
        aux = self.__dict__.pop("_aux_loss", None)
        if aux is not None:
            total = total + self.aux_loss_coefficient * aux.float() * CausalLMObjective.loss_units(targets)
        return total

    def train(self, mode: bool = True) -> "HFCausalLM":
        super().train(mode)
        self.hf.training = mode  # the root's own flag, which some models read
        return self

    @property
    def context_length(self) -> int:
        config = self.hf.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def representation_layers(self) -> dict[str, nn.Module]:
        """The input embedding and every decoder layer's output: where the entropy profile looks."""
        modules = dict(self.named_modules())
        layers: dict[str, nn.Module] = {}
        embedding = self.hf.get_input_embeddings()
        names = {id(m): n for n, m in modules.items()}
        if id(embedding) in names:
            layers[names[id(embedding)]] = embedding
        for path in _LAYER_LISTS:
            if path in modules:
                layers.update({f"{path}.{i}": layer for i, layer in enumerate(modules[path])})
                break
        return layers

    def save_pretrained(self, directory: str | Path) -> None:
        """The model as transformers saves it (safetensors), without any LoRA adapters (see ``export``)."""
        self.hf.save_pretrained(str(directory), safe_serialization=True)


def build_hf_model(config: Any, vocab_size: int, seq_len: int) -> HFCausalLM:
    """From ``model.hf``: a config (randomly initialised from the current torch seed) or a local folder."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.path is not None:
        path = Path(config.path)
        if not (path / "config.json").is_file():
            raise RecipeError(f"model.hf.path {path}: not a save_pretrained folder (no config.json)")
        try:
            hf_model = _with_attention(
                lambda attention: AutoModelForCausalLM.from_pretrained(
                    str(path), local_files_only=True, attn_implementation=attention
                ),
                config.attn_implementation,
            )
        except (OSError, ValueError) as error:
            raise RecipeError(f"model.hf.path {path}: cannot load ({str(error).splitlines()[0]})") from None
        model_vocab = int(hf_model.config.vocab_size)
    else:
        settings = dict(config.config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise RecipeError("model.hf.config: needs model_type (llama, qwen2, gpt2, gpt_neox, ...)")
        settings.setdefault("vocab_size", vocab_size)
        try:
            hf_config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, KeyError, TypeError) as error:
            raise RecipeError(f"model.hf.config: {str(error).splitlines()[0]}") from None
        hf_model = _with_attention(
            lambda attention: AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention),
            config.attn_implementation,
        )
        model_vocab = int(hf_config.vocab_size)
    if model_vocab < vocab_size:
        raise RecipeError(
            f"model.hf: the model's vocabulary has {model_vocab} tokens, the tokenizer's {vocab_size}: "
            "this tokenizer's ids do not fit this model"
        )
    unfuse_experts(hf_model, str(hf_model.config.model_type))  # one module per expert, so a policy can name it
    model = HFCausalLM(hf_model)
    if seq_len > model.context_length:
        raise RecipeError(f"data.seq_len ({seq_len}) exceeds the model's context length ({model.context_length})")
    return model


def _with_attention(make: Callable[[str], Any], requested: str) -> Any:
    """``make(requested)``; where the default ``sdpa`` is one the model does not offer (a state-space model has
    no attention at all), its own eager implementation instead."""
    try:
        return make(requested)
    except ValueError as error:
        if requested != "sdpa" or "does not support an attention implementation" not in str(error):
            raise
        return make("eager")


def add_lora_adapters(
    model: nn.Module,
    lora: Any,
    class_names: Sequence[str],
    inner: nn.Module | None = None,
    hint: Callable[[Sequence[str]], str] | None = None,
) -> AdapterGates:
    """One LoRA adapter per class of ``lora.classes`` on ``lora.target_modules``, gated per example by provenance.

    ``inner``: the library model whose children ``model`` adopted (default ``model.hf``; a diffusion model's
    UNet); ``hint``: what to say when no module matches the targets."""
    inner = inner if inner is not None else cast(HFCausalLM, model).hf
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from smalti.trust.policy import adapter_key

    unknown = [c for c in lora.classes if c not in class_names]
    if unknown:
        raise RecipeError(f"model.lora: class '{unknown[0]}' is not in the taxonomy")
    keys = [adapter_key(c) for c in lora.classes]
    # GPT-2's projections are Conv1D (weights stored transposed): peft turns fan_in_fan_out on for them anyway,
    # with a warning on every run; say it up front instead.
    targets = list(lora.target_modules)
    transposed = any(
        type(m).__name__ == "Conv1D" and any(n == t or n.endswith("." + t) for t in targets)
        for n, m in inner.named_modules()
    )
    settings = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=transposed,
    )
    try:
        with warnings.catch_warnings():  # peft warns that a second adapter is one more adapter: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for key in keys:
                inject_adapter_in_model(settings, inner, adapter_name=key)
    except ValueError as error:
        where = hint(targets) if hint is not None else f"model.lora.target_modules {targets}"
        raise RecipeError(f"{where}: {str(error).splitlines()[0]}") from None
    for name, child in inner.named_children():  # injection replaced modules inside our children, not these
        if getattr(model, name) is not child:
            model.add_module(name, child)
    gates = AdapterGates(class_names, lora.classes, lora.gated)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(keys)  # every class's adapter active; the gates choose the rows
            for k, key in enumerate(keys):
                cast(nn.ModuleDict, module.lora_B)[key].register_forward_hook(_gate_hook(gates, k))
    for name, parameter in model.named_parameters():
        is_lora = ".lora_" in name
        parameter.requires_grad_(is_lora or not lora.freeze_base)
    # nn.Module's __setattr__ is typed for tensors and modules only
    model.adapter_gates = gates  # type: ignore[assignment]
    return gates


def _gate_hook(gates: AdapterGates, index: int):
    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        rows = gates.rows
        if not gates.gated:  # a shared slice: in every row's forward pass
            return output
        if rows is None:
            return output * 0.0  # no class given: every adapter off (``smalti sample --adapter`` turns one on)
        gate = rows[index].to(device=output.device, dtype=output.dtype)
        return output * gate.view(-1, *([1] * (output.dim() - 1)))

    return hook


def export(
    model: HFCausalLM, directory: Path, tokenizer: Any | None = None, leave_out: frozenset[str] = frozenset()
) -> list[str]:
    """A folder transformers loads unchanged: the base model (``save_pretrained``), the tokenizer, and each
    class's LoRA adapter as a peft adapter folder under ``adapters/<class key>``, except the classes in
    ``leave_out`` (adapters a deletion ablated: a reset adapter is no use, and its folder would name a deleted
    class). Returns what was written."""
    written = []
    gates = getattr(model, "adapter_gates", None)
    if gates is not None:
        written += _export_adapters(model, directory / "adapters", gates, leave_out)
    base = _without_lora(model)
    base.save_pretrained(str(directory), safe_serialization=True)
    written.append("model (save_pretrained)")
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(directory)
        written.append("tokenizer")
    return written


def _without_lora(model: HFCausalLM) -> PreTrainedModel:
    """A copy of the transformers model with every LoRA layer replaced by its base layer."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    hf = copy.deepcopy(model.hf)
    for name, module in list(hf.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = hf.get_submodule(parent_name) if parent_name else hf
            setattr(parent, child, module.get_base_layer())
    return hf


def _export_adapters(
    model: HFCausalLM, directory: Path, gates: AdapterGates, leave_out: frozenset[str] = frozenset()
) -> list[str]:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from smalti.trust.policy import adapter_key
    from smalti.io import atomic_write_text

    written = []
    config = _lora_config(model)
    for class_name in gates.adapter_classes:
        if class_name in leave_out:
            continue
        key = adapter_key(class_name)
        state = get_peft_model_state_dict(model.hf, adapter_name=key)
        folder = directory / key
        folder.mkdir(parents=True, exist_ok=True)
        # peft's own files name weights from the PeftModel wrapper down (base_model.model.<the model's names>)
        save_file(
            {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
            str(folder / "adapter_model.safetensors"),
        )
        settings = dict(config[key])
        settings["base_model_name_or_path"] = ".."
        import json

        atomic_write_text(folder / "adapter_config.json", json.dumps(settings, indent=1, default=list) + "\n")
        written.append(f"adapter {class_name}")
    return written


def _lora_config(model: HFCausalLM) -> dict[str, dict[str, Any]]:
    """Each adapter's LoraConfig as peft writes it (``to_dict``), from any layer that holds it."""
    configs = getattr(model.hf, "peft_config", {})
    return {key: value.to_dict() for key, value in configs.items()}
