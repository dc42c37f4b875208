"""Recipes: the YAML files that say what to train, validated before anything runs.

Every section is a small pydantic model that forbids unknown keys, so a typo
is a one-line error naming the key and the file, not a silently ignored
setting. Relative paths in a recipe are relative to the recipe file; paths
given with ``--set`` are relative to the current directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smalti.core.time import Time
from smalti.errors import RecipeError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _time(value: Any) -> str:
    """Validate a time string such as ``'500ba'`` and keep it as text (YAML round-trips it)."""
    return str(Time.parse(value))


class AdapterConfig(Section):
    classes: list[str] = Field(default_factory=list, description="classes that get their own adapter in every block")
    hidden: int = Field(32, ge=1, description="width of each adapter's hidden layer")
    gated: bool = Field(
        True,
        description="true: an adapter acts only on its class's rows, so nothing else ever "
        "depends on it; false: every row runs through every adapter (an SGTM-like shared slice that "
        "only an exclusive rule keeps other classes from updating)",
    )


class ResNetSection(Section):
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64], description="channels of each stage")
    blocks_per_stage: int = Field(1, ge=1)


class DiffusionSection(Section):
    """A diffusers UNet2DModel trained as a DDPM (``smalti.models.diffusion``) on data.images."""

    block_out_channels: list[int] = Field(
        default_factory=lambda: [32, 64], description="channels of each resolution level (each halves the image)"
    )
    attention: list[bool] = Field(
        default_factory=lambda: [False, True], description="self-attention at each level (as many as the levels)"
    )
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1, description="group norm groups (must divide every level's channels)")
    attention_head_dim: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    train_timesteps: int = Field(1000, ge=2, description="DDPM's noise levels")
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = Field(
        "squaredcos_cap_v2", description="the noise schedule (diffusers' DDPMScheduler names)"
    )

    @model_validator(mode="after")
    def _levels_agree(self) -> "DiffusionSection":
        if not self.block_out_channels or len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"model.diffusion.attention has {len(self.attention)} entries for "
                f"{len(self.block_out_channels)} levels of block_out_channels: give one per level"
            )
        odd = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if odd:
            raise ValueError(
                f"model.diffusion.block_out_channels: {odd[0]} is not a positive multiple of "
                f"norm_num_groups ({self.norm_num_groups})"
            )
        return self


class HFModelSection(Section):
    config: dict[str, Any] | None = Field(
        None,
        description="a transformers config, randomly initialised: model_type "
        "(llama, qwen2, gpt2, gpt_neox, ...) and its sizes; vocab_size defaults to "
        "the tokenizer's",
    )
    path: Path | None = Field(
        None, description="a local folder in save_pretrained layout (safetensors); never downloaded"
    )
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _one_source(self) -> "HFModelSection":
        if self.config is not None and self.path is not None:
            raise ValueError("give model.hf.config or model.hf.path, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.config is not None or self.path is not None


class LoraSection(Section):
    classes: list[str] = Field(
        default_factory=list,
        description="classes that get their own LoRA adapter (a policy's exclusive rule can confine each to it)",
    )
    r: int = Field(8, ge=1, description="rank")
    alpha: float = Field(16.0, gt=0.0, description="scaling numerator (scaling = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names the adapters wrap (peft's target_modules)",
    )
    freeze_base: bool = Field(
        True, description="train only the adapters (false: the base model too, as the policy allows)"
    )
    gated: bool = Field(
        True, description="as model.adapters.gated: false puts every class's adapter in every row's forward pass"
    )


class ModelConfig(Section):
    name: Literal["gpt", "resnet", "hf", "diffusion"] = Field(
        "gpt",
        description="gpt (text), resnet (data.images), hf (a Hugging Face causal LM: set model.hf) or "
        "diffusion (a DDPM on data.images: model.diffusion)",
    )
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=1)
    block_size: int = Field(64, ge=1, description="longest sequence the model accepts")
    mlp_ratio: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    alibi: bool = False
    adapters: AdapterConfig = AdapterConfig()
    resnet: ResNetSection = ResNetSection()
    diffusion: DiffusionSection = DiffusionSection()
    hf: HFModelSection = HFModelSection()
    lora: LoraSection = LoraSection()

    @model_validator(mode="before")
    @classmethod
    def _hf_names_itself(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("hf") and "name" not in data:
            return {**data, "name": "hf"}
        return data

    @model_validator(mode="after")
    def _hf_consistent(self) -> "ModelConfig":
        if (self.name == "hf") != self.hf.enabled:
            raise ValueError("model.name hf needs model.hf.config or model.hf.path, and model.hf needs model.name hf")
        if self.lora.classes and self.name not in ("hf", "diffusion"):
            raise ValueError(
                "model.lora adapts Hugging Face models (model.hf) and diffusion UNets; the bundled GPT has "
                "model.adapters"
            )
        return self


class LedgerConfig(Section):
    enabled: bool = Field(False, description="write the learning-dynamics ledger (one signed entry per step)")
    key: Path | None = Field(None, description="the trainer authority's Ed25519 private key; signs tree heads")
    entropy_every: int = Field(50, ge=0, description="steps between entropy profiles (0: never)")
    probe_samples: int = Field(1, ge=1, description="validation examples per class in the entropy probe")
    probe_tokens: int = Field(32, ge=2, description="token positions per class the entropy is computed over")
    flush_every: int = Field(50, ge=1, description="steps between commits to ledger.sqlite")
    log_name: str = Field(
        "smalti",
        pattern=r"^[^\s+]+$",
        description="the ledger's log name: each run's tree "
        "heads are C2SP checkpoints with origin LOG_NAME/RUN_ID (e.g. example.org/smalti), "
        "no spaces or '+'",
    )
    publish: str | None = Field(
        None,
        description="publish the ledger as a C2SP tlog-tiles log to this folder or "
        "fsspec URL at every checkpoint (append-only; a failure warns and is retried at the "
        "next checkpoint)",
    )
    publish_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options for publish")


class InitConfig(Section):
    from_run: Path | None = Field(
        None,
        description="start from this run's final weights (a fine-tune): its ledger "
        "is verified first and named in this run's first ledger entry",
    )
    trust: Path | None = Field(
        None, description="the parent's trainer public key (default: this taxonomy's trainer key or this run's own)"
    )


class GovernanceConfig(Section):
    policy: Path | None = Field(None, description="routing policy signed by the model-risk authority")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)


def _parse_bytes(value: Any) -> int:
    """``10GB``, ``512MiB``, ``1e9`` or a plain integer number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(value))
    if not match:
        raise ValueError(f"invalid size {value!r}: expected e.g. '512MB', '10GB', '2GiB' or a number of bytes")
    units = {
        None: 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KiB": 2**10,
        "MiB": 2**20,
        "GiB": 2**30,
        "TiB": 2**40,
    }
    return int(float(match.group(1)) * units[match.group(2)])


_ROOT_DESCRIPTION = "load only the dataset with this manifest root (hex): refuses every other release"
_VERSION_DESCRIPTION = "refuse a dataset whose signed manifest version is lower (a rolled-back release)"


class MixtureEntry(Section):
    url: str
    weight: float = Field(gt=0.0)
    manifest_root: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description=_ROOT_DESCRIPTION)
    min_version: int | None = Field(None, ge=1, description=_VERSION_DESCRIPTION)


class DataConfig(Section):
    # A raw corpus folder (no governance) ...
    corpus: Path | None = Field(None, description="folder with manifest.csv and the texts (raw, unsigned)")
    class_template: str = Field("{genre}/{work}", description="class of each corpus document, from its CSV columns")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="corpus only: last fraction of each text")
    # ... or a prepared, signed dataset at any fsspec URL.
    url: str | None = Field(None, json_schema_extra={"path": True}, description="prepared dataset (path or fsspec URL)")
    mixture: list[MixtureEntry] = Field(default_factory=list, description="several prepared datasets with weights")
    manifest_root: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="data.url: " + _ROOT_DESCRIPTION)
    min_version: int | None = Field(None, ge=1, description="data.url: " + _VERSION_DESCRIPTION)
    # ... or a bundled image task (offline).
    images: Literal["digits"] | None = Field(
        None, description="digits: scikit-learn's handwritten digits (needs the [vision] extra), for model.name resnet"
    )
    image_size: int = Field(32, ge=8, description="images: side length the digits are upsampled to")
    taxonomy: Path | None = Field(None, description="signed taxonomy the dataset was tagged under")
    trust: Path | None = Field(None, description="public key of the data-governance authority (the trust anchor)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec (e.g. endpoint_url)")
    cache_dir: Path = Field(
        Path("~/.cache/smalti/shards"),
        validate_default=True,  # the default is expanded too
        description="local cache for remote shards",
    )
    cache_limit: int = Field(10 * 10**9, gt=0, description="cache size limit, e.g. '10GB'")
    verify: Literal["eager", "lazy"] = Field("eager", description="eager: check every shard before training")
    memory_shards: int = Field(8, ge=2, description="decoded shards kept in memory per process (at least 2)")
    # How examples are ordered and batched.
    seq_len: int | None = Field(None, ge=1, description="training window; defaults to model.block_size")
    shuffle: bool = True
    batching: Literal["random", "stratified", "per_class"] | None = Field(
        None, description="default: per_class under a routing policy, else random"
    )
    class_unit: int | None = Field(
        None,
        ge=1,
        description="per_class: examples per single-class unit (default: train.microbatch_size, else the global batch)",
    )
    shuffle_block_shards: int | None = Field(
        None, ge=1, description="random: shuffle within blocks of this many shards"
    )
    workers: int = Field(0, ge=0, description="loader worker processes (the order does not depend on it)")
    # Deletion (G5): the counterfactual of forgetting a class, and an order that keeps forgetting cheap.
    exclude_classes: list[str] = Field(
        default_factory=list,
        description="leave these classes out of training (taxonomy nodes cover their subtrees; evaluation keeps them)",
    )
    deletable_late: bool = Field(
        False, description="place the classes the taxonomy marks deletable last in every epoch (with late_classes)"
    )
    late_classes: list[str] = Field(
        default_factory=list,
        description="place these classes last in every epoch, so forgetting them replays only the tail",
    )
    only_classes: list[str] = Field(
        default_factory=list,
        description="train on these classes only (taxonomy nodes cover their subtrees; evaluation keeps every class)",
    )
    train_examples: int | None = Field(
        None,
        ge=1,
        description="train on only this many examples of the kept "
        "classes, chosen once from the seed (a relearning attack's k); epochs cycle "
        "over them (batching random)",
    )

    _check_cache_limit = field_validator("cache_limit", mode="before")(_parse_bytes)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        given = [name for name in ("corpus", "url", "mixture", "images") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of data.corpus (a raw corpus), data.url (a prepared dataset), "
                "data.mixture (several prepared datasets) or data.images (a bundled image task)"
            )
        if given[0] not in ("corpus", "images") and (self.taxonomy is None or self.trust is None):
            raise ValueError(f"data.{given[0]} needs data.taxonomy and data.trust (the data-governance public key)")
        if given[0] == "images" and (self.taxonomy is None) != (self.trust is None):
            raise ValueError("data.images with a taxonomy needs both data.taxonomy and data.trust")
        if given[0] != "url" and (self.manifest_root or self.min_version):
            raise ValueError("data.manifest_root and data.min_version pin data.url (a mixture pins each entry)")
        return self


class OptimizerConfig(Section):
    name: Literal["adamw", "sgd", "adafactor", "muon", "lion", "schedulefree_adamw", "sophia"] = Field(
        "adamw", description="docs/routing.md lists what each couples, and so what routing proves with it"
    )
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = Field(
        (0.9, 0.95), description="AdamW, Lion, schedule-free AdamW (its beta1 interpolates) and Muon's AdamW"
    )
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, description="SGD only")
    fallback_lr: float = Field(
        3e-4, gt=0.0, description="Muon only: the lr of the AdamW that takes embeddings, the output head and vectors"
    )
    rho: float = Field(0.04, gt=0.0, description="Sophia only: how far the Hessian clips the update (gamma)")
    hessian_every: int = Field(
        10, ge=1, description="Sophia only: steps between Hessian estimates (each costs a forward and backward pass)"
    )


class SchedulerConfig(Section):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: str = "0ba"
    final_lr_fraction: float = Field(0.1, ge=0.0, le=1.0, description="lr at the end, as a fraction of lr")

    _check_warmup = field_validator("warmup", mode="before")(_time)


class FSDPConfig(Section):
    param_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: parameters all-gathered and computed in bf16, gradients reduced in fp32"
    )
    cpu_offload: bool = Field(
        False, description="keep sharded parameters, gradients and optimizer state in CPU memory (GPU runs)"
    )
    reshard_after_forward: bool = Field(
        True,
        description="free each block's gathered parameters after its "
        "forward (gathered again for backward): less memory, more communication",
    )


class TrainConfig(Section):
    max_duration: str = "1ep"
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under several processes: ddp replicates the model, fsdp shards it with FSDP2 "
        "(fully_shard per transformer block and the root) and checkpoints with torch.distributed.checkpoint",
    )
    fsdp: FSDPConfig = FSDPConfig()
    global_batch_size: int = Field(32, ge=1, description="samples per optimizer step, summed over ranks")
    microbatch_size: int | None = Field(None, ge=1, description="samples per forward/backward on one rank")
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    grad_clip_norm: float | None = Field(1.0, gt=0.0)
    compile: bool = False
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _check_duration = field_validator("max_duration", mode="before")(_time)

    @field_validator("max_duration")
    @classmethod
    def _not_dur(cls, value: str) -> str:
        if value.endswith("dur"):
            raise ValueError("max_duration cannot be in 'dur' (it defines what 1dur means)")
        return value


class EvalConfig(Section):
    interval: str = "500ba"
    max_samples: int | None = Field(1024, ge=1, description="validation windows per evaluation (None: all)")
    batch_size: int = Field(64, ge=1)
    classes: list[str] = Field(
        default_factory=list,
        description="evaluate only these classes' held-out examples (taxonomy nodes; default: every class)",
    )

    _check_interval = field_validator("interval", mode="before")(_time)


class CheckpointConfig(Section):
    interval: str = "500ba"
    keep: int = Field(3, ge=1, description="how many recent checkpoints to keep")
    load_path: str | None = Field(None, description="start from this checkpoint (path or fsspec URL)")
    autoresume: bool = True
    before_late_classes: bool = Field(
        True,
        description="with data.late_classes: also checkpoint just before "
        "they begin each epoch, and keep that checkpoint (a deletion restarts there)",
    )
    async_save: bool = Field(
        False,
        description="train.parallelism fsdp: write sharded checkpoints in the background "
        "(dcp.async_save) while training goes on; each becomes latest when every rank has "
        "written it, and the final checkpoint is waited for",
    )

    _check_interval = field_validator("interval", mode="before")(_time)


class WandbConfig(Section):
    project: str = Field(description="the W&B project")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: written under RUN_DIR/wandb, no "
        "network (upload later with `wandb sync`); online: streamed",
    )
    entity: str | None = Field(None, description="the W&B team or user (online)")
    name: str | None = Field(None, description="the run's display name (default: the run directory's name)")
    init_timeout: float = Field(
        30.0, gt=0.0, description="seconds to wait for W&B to start before warning and training on without it"
    )


class LoggingConfig(Section):
    interval: str = "1ba"
    console: bool = True
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    jsonl: bool = True
    mlflow: bool = False
    tensorboard: bool = Field(False, description="TensorBoard event files in RUN_DIR/tensorboard (extra tensorboard)")
    wandb: WandbConfig | None = Field(
        None, description="Weights & Biases (extra wandb): {project: ..., mode: offline|online}"
    )
    governance_layers: list[str] = Field(
        default_factory=lambda: ["*"],
        description="layers whose per-class "
        "gradient shares and updated flags trackers show (globs over the "
        "ledger's layer names)",
    )

    _check_interval = field_validator("interval", mode="before")(_time)


class Recipe(Section):
    seed: int = 17
    run_dir: Path | None = None
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(corpus=Path("data/shakespeare"))
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    governance: GovernanceConfig = GovernanceConfig()
    init: InitConfig = InitConfig()
    algorithms: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if (self.model.name in ("resnet", "diffusion")) != (self.data.images is not None):
            raise ValueError(
                f"model.name {self.model.name!r} does not fit the data: use model.name resnet or diffusion "
                "with data.images, gpt or hf with text"
            )
        if self.model.name == "diffusion" and self.optimizer.name == "sophia":
            raise ValueError(
                "optimizer.name sophia estimates its Hessian from labels sampled from the model's predicted "
                "distribution; a diffusion model predicts noise, not a distribution: choose another optimizer"
            )
        seq_len = self.data.seq_len or self.model.block_size
        if self.model.name != "hf" and seq_len > self.model.block_size:
            raise ValueError(f"data.seq_len ({seq_len}) exceeds model.block_size ({self.model.block_size})")
        if self.governance.ledger.enabled and self.governance.ledger.key is None:
            raise ValueError("governance.ledger.enabled needs governance.ledger.key (the trainer's private key)")
        if self.governance.policy is not None and self.data.taxonomy is None:
            raise ValueError(
                "governance.policy needs data.taxonomy: a prepared dataset (data.url), or data.images with a "
                "taxonomy naming its classes"
            )
        if (self.model.adapters.classes or self.model.lora.classes) and self.data.taxonomy is None:
            raise ValueError("model.adapters and model.lora name classes: they need data.taxonomy")
        if self.checkpoint.async_save and self.train.parallelism != "fsdp":
            raise ValueError(
                "checkpoint.async_save writes sharded checkpoints in the background: it needs "
                "train.parallelism fsdp (a single-file checkpoint is written by rank 0 at once)"
            )
        if self.optimizer.name == "sophia" and (self.train.precision == "amp_fp16" or self.train.parallelism == "fsdp"):
            raise ValueError(
                "optimizer.name sophia: its Hessian pass needs train.precision fp32 or amp_bf16 (no loss scaler) "
                "and one process without FSDP"
            )
        averaging = sorted({"ema", "swa"} & set(self.algorithms))
        if self.optimizer.name == "schedulefree_adamw" and averaging:
            raise ValueError(
                f"algorithms.{averaging[0]} averages weights, and optimizer.name schedulefree_adamw already trains "
                "an average (what evaluation, sampling and export use): use one of them"
            )
        if self.model.d_model % self.model.n_head:
            raise ValueError(
                f"model.d_model ({self.model.d_model}) is not divisible by model.n_head ({self.model.n_head})"
            )
        return self

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.block_size

    @property
    def batching(self) -> str:
        """``per_class`` under a policy (routing and per-class accounting are then free), else ``random``."""
        return self.data.batching or ("per_class" if self.governance.policy else "random")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, ignore: tuple[str, ...] = ()) -> str:
        """sha256 of the canonical JSON form, without the dotted keys in ``ignore``."""
        data = self.to_dict()
        for dotted in ignore:
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.get(key, {})
            node.pop(leaf, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# Settings a resumed run may change without invalidating the checkpoint: extending or shortening
# training, how it is observed, and where the (same, fingerprint-checked) data is read from.
RESUMABLE_CHANGES = (
    "governance.ledger.key",
    "governance.ledger.flush_every",
    "governance.ledger.log_name",
    "governance.ledger.publish",
    "governance.ledger.publish_options",
    "run_dir",
    "data.url",
    "data.taxonomy",
    "data.trust",
    "data.storage_options",
    "data.cache_dir",
    "data.cache_limit",
    "data.verify",
    "data.memory_shards",
    "data.workers",
    "train.max_duration",
    "checkpoint.keep",
    "checkpoint.load_path",
    "checkpoint.autoresume",
    "checkpoint.async_save",
    "logging",
    "eval.interval",
)


def _path_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every Path-typed field, so recipe-relative paths can be resolved."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _path_fields(annotation, f"{prefix}{name}.")
        elif annotation is Path or annotation == (Path | None) or (field.json_schema_extra or {}).get("path"):  # type: ignore[union-attr]  # always a dict in Smalti's fields
            found.append(f"{prefix}{name}")
    return found


def _is_relative_path(value: Any) -> bool:
    return (
        isinstance(value, str)
        and "://" not in value
        and not value.startswith(("~", "pkcs11:"))
        and not Path(value).is_absolute()
    )  # a pkcs11: URI names a key in a token, not a file


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(data: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: cannot set '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (``3``, ``1e-3``, ``[a, b]``, ``true``)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_duration=200ba")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({error.problem})") from None
    return key, value


def _describe_error(error: ErrorDetails) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent_path, key = error["loc"][:-1], str(error["loc"][-1])
        parent_model: type[BaseModel] = Recipe
        for part in parent_path:
            field = parent_model.model_fields.get(str(part))
            if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                break
            parent_model = field.annotation
        suggestion = difflib.get_close_matches(key, list(parent_model.model_fields), n=1)
        hint = f" (did you mean '{'.'.join([*map(str, parent_path), suggestion[0]])}'?)" if suggestion else ""
        return f"unknown key '{location}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if error["type"] == "literal_error" and isinstance(given, (str, int, float)) and len(str(given)) <= 80:
        message = f"{message}, not {given!r}"  # a choice among names: say which name was given
    return f"'{location}': {message}" if location else message


def _blame(location: tuple, overridden: dict[str, str], path: Path) -> str:
    """The ``--set`` that put the bad value there (it or a section above it), else the recipe file."""
    parts = [str(part) for part in location]
    for depth in range(len(parts), 0, -1):
        text = overridden.get(".".join(parts[:depth]))
        if text is not None:
            return f"--set {text}"
    return str(path)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, resolve and validate a recipe; any problem is a ``RecipeError`` naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for dotted in _path_fields(Recipe):
        value = _get(data, dotted)
        if _is_relative_path(value):
            _set(data, dotted, str((path.parent / value).resolve()), str(path))
    for entry in _get(data, "data.mixture") or []:  # a list: resolve its URLs here
        if isinstance(entry, dict) and _is_relative_path(entry.get("url")):
            entry["url"] = str((path.parent / entry["url"]).resolve())
    overridden: dict[str, str] = {}  # key -> the --set that gave it
    for text in overrides:
        key, value = parse_override(text)
        if key in _path_fields(Recipe) and _is_relative_path(value):
            value = str(Path(value).resolve())
        _set(data, key, value, f"--set {text}")
        overridden[key] = text
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise RecipeError(f"{_blame(first['loc'], overridden, path)}: {_describe_error(first)}{more}") from None
    from smalti.algorithms import validate_algorithm_configs  # imports torch: only once a recipe is read

    validate_algorithm_configs(recipe.algorithms, where=str(path))
    return recipe
