"""Shared by the benchmarks: the baby GPT recipe, a hand-written reference loop, machine facts."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalti.config import Recipe  # noqa: E402
from smalti.core.callback import Callback  # noqa: E402
from smalti.models.gpt import GPT, GPTConfig  # noqa: E402

BABY_GPT = dict(n_layer=4, n_head=4, d_model=128, block_size=64)
# The Hugging Face benchmarks' model: a Llama-architecture config of about 2.6M parameters
# (with the 2,048-token BPE), context 256.
HF_LLAMA = dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def baby_recipe(steps: int, batch_size: int = 12, **sections: dict[str, Any]) -> Recipe:
    """The baby GPT of the issue: 4 layers, 4 heads, width 128, context 64, AdamW; no checkpoints, and no
    evaluation but the final one, over 64 held-out windows (never inside a timed step)."""
    data: dict[str, Any] = {
        "seed": 1,
        "model": dict(BABY_GPT),
        "data": {"corpus": str(REPO / "data" / "shakespeare")},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.99]},
        "scheduler": {"name": "cosine", "warmup": "10ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": batch_size, "grad_clip_norm": 1.0},
        "eval": {"interval": "1000000ba", "max_samples": 64},
        "checkpoint": {"interval": "1000000ba", "keep": 1},
        "logging": {"console": False, "jsonl": True},
    }
    for name, values in sections.items():
        merge = isinstance(values, dict) and isinstance(data.get(name, {}), dict)
        data[name] = {**data.get(name, {}), **values} if merge else values
    return Recipe.model_validate(data)


def cosine_lr(step: int, total: int, warmup: int, base: float, final_fraction: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


class HandwrittenLoop:
    """What a PyTorch user writes by hand: same model, batches, AdamW, schedule and clipping.

    ``step()`` runs one optimizer step and returns (wall seconds, loss), so a
    benchmark can interleave it with Smalti's steps and compare the two
    under the same machine conditions.
    """

    def __init__(self, recipe: Recipe, data, steps: int) -> None:
        torch.manual_seed(recipe.seed)
        self.model = self.build_model(recipe, data.tokenizer.vocab_size)
        torch.manual_seed(recipe.seed)  # Smalti reseeds per rank after building the model
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        opt = recipe.optimizer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr, betas=opt.betas, eps=opt.eps,
        )
        self.recipe, self.steps, self.step_index = recipe, steps, 0
        self.warmup = int(recipe.scheduler.warmup.removesuffix("ba"))
        self.batches = data.train_batches(0, 0)

    def build_model(self, recipe: Recipe, vocab_size: int) -> torch.nn.Module:
        m = recipe.model
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                             d_model=m.d_model))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def step(self) -> tuple[float, float]:
        start = time.perf_counter()
        batch = next(self.batches)
        opt = self.recipe.optimizer
        lr = cosine_lr(self.step_index, self.steps, self.warmup, opt.lr, self.recipe.scheduler.final_lr_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = self.logits(batch.inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        self.step_index += 1
        return time.perf_counter() - start, value


class HandwrittenHFLoop(HandwrittenLoop):
    """The same hand-written loop over a transformers model built straight from its config."""

    def build_model(self, recipe: Recipe, vocab_size: int) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        settings = dict(recipe.model.hf.config)
        config = AutoConfig.for_model(settings.pop("model_type"), **{"vocab_size": vocab_size, **settings})
        return AutoModelForCausalLM.from_config(config, attn_implementation=recipe.model.hf.attn_implementation)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs, use_cache=False).logits


def handwritten_losses(recipe: Recipe, data, steps: int) -> list[float]:
    loop = HandwrittenLoop(recipe, data, steps)
    return [loop.step()[1] for _ in range(steps)]


class PairedSteps(Callback):
    """Interleaves a hand-written step after every Smalti step and times both.

    Smalti's step is timed from the end of the previous hand-written step to
    its own BATCH_END, so it holds exactly one Smalti step (data, events,
    logging, schedule, clipping, optimizer) and nothing of the other loop.
    """

    def __init__(self, hand: HandwrittenLoop) -> None:
        self.hand = hand
        self.smalti: list[float] = []
        self.handwritten: list[float] = []
        self._last = 0.0

    def fit_start(self, state, logger) -> None:
        self._last = time.perf_counter()

    def batch_end(self, state, logger) -> None:
        self.smalti.append(time.perf_counter() - self._last)
        self.handwritten.append(self.hand.step()[0])
        self._last = time.perf_counter()


class TwinSteps:
    """Times every optimizer step of a trainer, each followed by one step of its twin, timed on its own.

    Both trainers are the same code but for the feature measured, so what
    is timed is each one's ``_train_batch`` (the optimizer step, everything
    the feature adds to it included) and not the loop around it: that loop
    (interval checks, events, the next batch) is identical in both and is
    run by the measured trainer only, so billing it to one side would
    count the harness as the feature's cost. The twin reads its own batches
    (the same ones: same recipe, same seed). On a GPU each timed step ends
    with a synchronisation, so work queued by one trainer is never billed
    to the other.
    """

    def __init__(self, measured, twin) -> None:
        self.measured: list[float] = []
        self.twin: list[float] = []
        self._twin_batches = twin.data.train_batches(0, 0)
        sync = torch.cuda.synchronize if twin.device.type == "cuda" else (lambda: None)
        step, twin_step = measured._train_batch, twin._train_batch

        def paired(batch):
            sync()
            started = time.perf_counter()
            result = step(batch)
            sync()
            self.measured.append(time.perf_counter() - started)
            twin_batch = next(self._twin_batches)
            started = time.perf_counter()
            twin_step(twin_batch)
            sync()
            self.twin.append(time.perf_counter() - started)
            return result

        measured._train_batch = paired  # this instance only


def interleaved_step_times(measured, twin, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Train ``measured`` with ``twin`` stepping beside it (``TwinSteps``), close both, and return each side's
    step times after the first ``warmup`` steps (those warm up allocators)."""
    pairs = TwinSteps(measured, twin)
    measured.fit()
    measured.close()
    twin.close()
    return pairs.measured[warmup:], pairs.twin[warmup:]


def twin_runs(make_pair, runs: int) -> tuple[list[float], list[float]]:
    """``runs`` times, ``make_pair(run)`` -> (measured, twin) Trainers stepped together (``interleaved_step_times``);
    every step time of each side, pooled over the runs."""
    measured, twin = [], []
    for run in range(runs):
        a, b = interleaved_step_times(*make_pair(run))
        measured += a
        twin += b
    return measured, twin


@dataclass(frozen=True)
class Governed:
    root: Path
    taxonomy: Path
    trust: Path
    dataset: Path
    model_risk_key: Path


def write_signed_policy(governed: Governed, path: Path, rules: list[dict[str, Any]] | None = None,
                        exclusive: list[dict[str, Any]] | None = None, name: str = "benchmark") -> Path:
    """A routing policy bound to the governed taxonomy and signed by its model-risk key: what `smalti policy
    check --bind` and `smalti sign` leave for a user."""
    import yaml

    from smalti.trust.keys import PublicKey, SigningKey, sign_bytes
    from smalti.trust.taxonomy import Taxonomy

    taxonomy = Taxonomy.load(governed.taxonomy, PublicKey.load(governed.trust))
    spec: dict[str, Any] = {"policy": name, "taxonomy": {"name": taxonomy.name, "fingerprint": taxonomy.fingerprint},
                            "default": "allow"}
    if exclusive:
        spec["exclusive"] = exclusive
    if rules:
        spec["rules"] = rules
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    path.with_name(path.name + ".sig").write_text(
        sign_bytes(path.read_bytes(), SigningKey.load(governed.model_risk_key)).to_json())
    return path


def governed_shakespeare(root: Path, shard_examples: int = 20_000, seq_len: int = 64,
                         bpe_vocab: int | None = None) -> Governed:
    """Keys, a signed taxonomy and the prepared, signed Shakespeare dataset (examples of ``seq_len`` tokens),
    made the way the demo makes them; ``bpe_vocab``: tokenized with a byte-level BPE of that size trained on
    the corpus (``make demo-finetune``'s way), else by character.

    With ``SMALTI_BENCH_DATA_CACHE`` set to a folder, each variant is made once there and reused (read
    only) by later benchmark processes: the test suite's smoke runs set it, so thirteen benchmarks do not
    prepare the same corpus thirteen times. Without it, everything is made under ``root``.
    """
    cache = os.environ.get("SMALTI_BENCH_DATA_CACHE")
    if cache:
        made = Path(cache) / f"shakespeare-{shard_examples}-{seq_len}-{bpe_vocab or 'chars'}"
        if not (made / ".complete").exists():
            partial = made.with_name(made.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            governed_shakespeare_in(partial, shard_examples, seq_len, bpe_vocab)
            (partial / ".complete").write_text("")
            partial.rename(made)
        keys = made / "keys"
        return Governed(made, made / "taxonomy.yaml", keys / "data-governance.pub", made / "dataset",
                        keys / "model-risk.key")
    return governed_shakespeare_in(root, shard_examples, seq_len, bpe_vocab)


def governed_shakespeare_in(root: Path, shard_examples: int, seq_len: int, bpe_vocab: int | None) -> Governed:
    """``governed_shakespeare``'s making, always under ``root``."""
    from smalti.data.prepare import PrepareOptions, prepare_dataset
    from smalti.data.sources import classes_from_mapping, documents_from_folder
    from smalti.data.tokenizer import train_bpe
    from smalti.trust.keys import PublicKey, SigningKey, sign_bytes, write_key_pair
    from smalti.trust.taxonomy import Taxonomy, taxonomy_yaml

    corpus, template = REPO / "data" / "shakespeare", "gutenberg/{genre}/{work}"
    keys = root / "keys"
    for name in ("data-governance", "tagger", "model-risk"):
        write_key_pair(name, keys)
    pub = lambda name: PublicKey.load(keys / f"{name}.pub").text  # noqa: E731
    authorities = {
        "data-governance": {"role": "data-governance", "key": pub("data-governance")},
        "tagger": {"role": "tagging", "key": pub("tagger"), "may_tag": ["gutenberg"]},
        "model-risk": {"role": "model-risk", "key": pub("model-risk")},
    }
    path = root / "taxonomy.yaml"
    path.write_text(taxonomy_yaml("shakespeare", classes_from_mapping(corpus / "manifest.csv", template), authorities))
    (root / "taxonomy.yaml.sig").write_text(
        sign_bytes(path.read_bytes(), SigningKey.load(keys / "data-governance.key")).to_json())
    taxonomy = Taxonomy.load(path, PublicKey.load(keys / "data-governance.pub"))
    tokenizer = train_bpe((d.text for d in documents_from_folder(corpus, template=template)), bpe_vocab) if bpe_vocab else None
    prepare_dataset(documents_from_folder(corpus, template=template), taxonomy, SigningKey.load(keys / "tagger.key"),
                    str(root / "dataset"), PrepareOptions(name="shakespeare", shard_examples=shard_examples, seq_len=seq_len),
                    tokenizer=tokenizer, show_progress=False)
    return Governed(root, path, keys / "data-governance.pub", root / "dataset", keys / "model-risk.key")


def torchrun_workers(agent: int) -> dict[int, int]:
    """A torchrun agent's worker processes by rank, read from their environment (as torchrun set it)."""
    found = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        try:  # the agent's threads come and go
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:  # gone already
                continue
            variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in variables:
                found[int(variables[b"RANK"])] = int(pid)
    return found


def free_port() -> int:
    """A port on loopback nothing listens on (for torchrun's master or a local server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> dict[str, Any]:
    """What the numbers were measured on; ``gpu`` names the CUDA device where one is visible."""
    facts: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def emit(result: dict[str, Any]) -> None:
    """Every benchmark ends by printing exactly one JSON line (and saving it under benchmarks/results/)."""
    line = json.dumps(result, sort_keys=False)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['benchmark']}.json").write_text(line + "\n")
    print(line, flush=True)
