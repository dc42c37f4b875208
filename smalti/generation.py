"""Load a trained run for generation, without its corpus or recipe file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from smalti.build import build_model, with_recipe_surgery
from smalti.checkpoint import CheckpointStore, load_payload, load_weights
from smalti.config import Recipe
from smalti.data.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer
from smalti.errors import CheckpointError, SmaltiError
from smalti.models.gpt import GPT


@dataclass
class Generator:
    model: GPT
    tokenizer: CharTokenizer | HFTokenizer
    adapters: list[str] = field(default_factory=list)  # per-class adapters switched on while generating

    def sample(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = None,
        rng: torch.Generator | None = None,
    ) -> str:
        if not prompt:
            raise SmaltiError("the prompt is empty")
        if temperature <= 0:
            raise SmaltiError(f"temperature must be positive, got {temperature}")
        try:
            ids = self.tokenizer.encode(prompt, where="prompt")
        except ValueError as error:
            raise SmaltiError(str(error)) from None
        context = torch.as_tensor(ids, dtype=torch.long)[None, :]
        gates = getattr(self.model, "adapter_gates", None)
        if gates is not None:
            gates.set_on(self.adapters, batch_size=1)
        out = self.model.generate(context, max_new_tokens, temperature=temperature, top_k=top_k, generator=rng)
        return self.tokenizer.decode(out[0].tolist())


def load_generator(
    run_dir: Path, checkpoint: str | None = None, weights: str = "auto", adapters: list[str] | None = None
) -> Generator:
    model, tokenizer, where = load_trained_model(run_dir, checkpoint, weights, adapters)
    if tokenizer is None:
        raise CheckpointError(f"{where}: a diffusion model samples images: give --out FILE.png, not --prompt")
    # a text model: the GPT or a Hugging Face one, both with CausalLMObjective's generate
    return Generator(model=model, tokenizer=tokenizer, adapters=list(adapters or []))  # type: ignore[arg-type]


def load_trained_model(
    run_dir: Path, checkpoint: str | None = None, weights: str = "auto", adapters: list[str] | None = None
) -> tuple[torch.nn.Module, CharTokenizer | HFTokenizer | None, str]:
    """A run's model as its recipe builds it, with a checkpoint's weights (the latest by default), in eval mode;
    its tokenizer (None for a diffusion model); and the checkpoint it came from. ``adapters`` are checked
    against the model's."""
    if checkpoint is None:
        if not Path(run_dir).is_dir():
            raise CheckpointError(f"{run_dir}: run directory not found")
        latest = CheckpointStore(Path(run_dir) / "checkpoints", keep=1).latest()
        if latest is None:
            raise CheckpointError(f"{run_dir}: no checkpoint yet (train first)")
        checkpoint = str(latest)
    payload = load_payload(checkpoint)
    recipe = Recipe.model_validate(payload.recipe)
    tokenizer = None
    if recipe.model.name != "diffusion":
        if payload.tokenizer is None:
            raise CheckpointError(
                f"{checkpoint}: not a text or diffusion model (an image classifier); nothing to sample"
            )
        tokenizer = load_tokenizer(payload.tokenizer)
    vocab_size = tokenizer.vocab_size if tokenizer is not None else 0
    model = with_recipe_surgery(build_model(recipe, vocab_size, payload.classes), recipe)
    assert payload.model is not None  # read with its tensors
    load_weights(model, payload.model, checkpoint)
    gates = getattr(model, "adapter_gates", None)
    unknown = [a for a in adapters or [] if gates is None or a not in gates.adapter_classes]
    if unknown:
        available = ", ".join(gates.adapter_classes) if gates is not None else "none"
        raise SmaltiError(f"{checkpoint}: no adapter for class '{unknown[0]}' (this run has: {available})")
    averages = payload.algorithms.get("EMA", {}).get("averages")
    if weights == "ema" and averages is None:
        raise CheckpointError(f"{checkpoint}: --weights ema, but this run has no EMA weights")
    if weights in ("ema", "auto") and averages is not None:
        with torch.no_grad():  # by name, so tied weights (head = tok_emb) stay tied; buffers too (EMA averages them)
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                tensor.copy_(averages[name])
    elif weights == "auto" and recipe.optimizer.name == "schedulefree_adamw" and payload.optimizer is not None:
        _schedule_free_point(model, recipe, payload.optimizer)
    model.eval()
    return model, tokenizer, checkpoint


def _schedule_free_point(model: torch.nn.Module, recipe: Recipe, optimizer: dict) -> None:
    """Schedule-free AdamW's parameters hold ``y``, the point gradients were taken at; the model it trained is
    ``x``, computed here from each parameter's ``z`` (``smalti.schedule_free``), as evaluation saw it."""
    from smalti.optimizers import optimizer_parameter_names
    from smalti.schedule_free import evaluation_point

    names = optimizer_parameter_names(model, recipe.optimizer)
    parameters = dict(model.named_parameters())
    beta1 = recipe.optimizer.betas[0]
    with torch.no_grad():
        for index, state in optimizer.get("state", {}).items():
            name = (
                index
                if isinstance(index, str)
                else names[index]
                if isinstance(index, int) and index < len(names)
                else None
            )
            if name in parameters and isinstance(state.get("z"), torch.Tensor):
                parameters[name].copy_(evaluation_point(parameters[name], state["z"], beta1))


def sample_images(
    run_dir: Path,
    count: int,
    steps: int,
    seed: int = 0,
    checkpoint: str | None = None,
    weights: str = "auto",
    adapters: list[str] | None = None,
) -> torch.Tensor:
    """``count`` images [N, C, H, W] in [0, 1] from a diffusion run, its class adapters ``adapters`` switched on."""
    from smalti.models.diffusion import DiffusionUNet

    model, _, where = load_trained_model(run_dir, checkpoint, weights, adapters)
    if not isinstance(model, DiffusionUNet):
        raise CheckpointError(f"{where}: not a diffusion model; --out samples images from model.name diffusion")
    gates = getattr(model, "adapter_gates", None)
    if gates is not None:
        gates.set_on(list(adapters or []), batch_size=count)
    return model.sample(count, steps, generator=torch.Generator().manual_seed(seed))
