"""The model-surgery methods: each changes the model's structure once, before training.

They never act on loop events; ``smalti.core.surgery.apply_surgery`` calls
their ``surgery`` in a fixed, documented order. Every class docstring is
the method's card. "Measured in Smalti" quotes ``docs/algorithms.md``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import Field
from torch import nn

from smalti.algorithms.configured import ConfiguredAlgorithm, NoOptions
from smalti.core.event import Event
from smalti.core.state import State
from smalti.functional.alibi import apply_alibi
from smalti.functional.blurpool import apply_blurpool
from smalti.functional.channels_last import apply_channels_last, to_channels_last
from smalti.functional.factorize import apply_factorization
from smalti.functional.gated_linear_units import apply_gated_linear_units
from smalti.functional.ghost_batchnorm import apply_ghost_batchnorm
from smalti.functional.gyro_dropout import apply_gyro_dropout
from smalti.functional.low_precision_norm import apply_low_precision_groupnorm, apply_low_precision_layernorm
from smalti.functional.noop_model import apply_noop_model
from smalti.functional.squeeze_excite import apply_squeeze_excite
from smalti.functional.stochastic_depth import apply_stochastic_depth
from smalti.functional.weight_standardization import apply_weight_standardization
from smalti.core.logger import Logger


_Config = NoOptions


class SurgeryAlgorithm(ConfiguredAlgorithm):
    """Base: configured by keyword arguments, acts only through ``surgery``; ``replaced`` counts what it changed."""

    changes = frozenset({"model"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.replaced = 0

    def match(self, event: Event, state: State) -> bool:
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:  # pragma: no cover - never matched
        raise AssertionError("surgery algorithms do not act on events")

    def surgery(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError


class BlurPoolConfig(_Config):
    min_channels: int = Field(16, ge=1, description="only strided convs with at least this many input channels")
    replace_maxpools: bool = True


class BlurPool(SurgeryAlgorithm):
    """Low-pass filter before every strided convolution (and max-pool), so downsampling does not alias.

    Method card
        What: a fixed [1 2 1]x[1 2 1]/16 depthwise blur in front of each strided conv; max-pools pool
        densely, then blur and subsample.
        When it helps: CNNs whose accuracy suffers from shift sensitivity (ImageNet ResNets: +0.5-1
        top-1 in the paper, at ~+5-10% time). When it hurts: tiny images, where blurring removes
        detail; compute-bound runs that cannot spare the extra conv.
        Hyperparameters: ``min_channels`` 16, ``replace_maxpools`` true.
        Source: Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019.
        Measured in Smalti: see docs/algorithms.md (digits ResNet).
    """

    # the options, set from BlurPoolConfig by ConfiguredAlgorithm.__init__
    min_channels: int
    replace_maxpools: bool
    config_model = BlurPoolConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_blurpool(model, self.min_channels, self.replace_maxpools)
        return model


class SqueezeExciteConfig(_Config):
    min_channels: int = Field(64, ge=1, description="only convs with at least this many output channels")
    latent_channels: float = Field(64, gt=0, description="bottleneck width; below 1: a fraction of the channels")


class SqueezeExcite(SurgeryAlgorithm):
    """Channel attention after each large convolution: ``x * sigmoid(W2 relu(W1 mean(x)))``.

    Method card
        What: a two-layer gate on each conv's channels, from their global average.
        When it helps: mid-size CNNs (ImageNet ResNet-50: +~1 top-1 at ~+10% time in the paper).
        When it hurts: small models and images, where the extra layers cost more than they add;
        latency-bound inference.
        Hyperparameters: ``min_channels`` 64 (Composer's default), ``latent_channels`` 64.
        Source: Hu, Shen and Sun, "Squeeze-and-Excitation Networks", CVPR 2018.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from SqueezeExciteConfig by ConfiguredAlgorithm.__init__
    min_channels: int
    latent_channels: float
    config_model = SqueezeExciteConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_squeeze_excite(model, self.min_channels, self.latent_channels)
        return model


class GhostBatchNormConfig(_Config):
    ghost_batch_size: int = Field(32, ge=1)


class GhostBatchNorm(SurgeryAlgorithm):
    """Batch norm computed over "ghost" sub-batches, for small-batch regularisation at any batch size.

    Method card
        What: each batch norm normalises chunks of ``ghost_batch_size`` rows separately in training
        (the same module, shared running statistics); evaluation is unchanged.
        When it helps: large-batch training that lost the regularising noise of small batches.
        When it hurts: batches already small (no effect, some overhead); sequential chunks cost time.
        Hyperparameters: ``ghost_batch_size`` 32 (16-64).
        Source: Hoffer, Hubara and Soudry, "Train longer, generalize better", NeurIPS 2017.
        Measured in Smalti: outputs in evaluation equal plain batch norm (tests).
    """

    # the options, set from GhostBatchNormConfig by ConfiguredAlgorithm.__init__
    ghost_batch_size: int
    config_model = GhostBatchNormConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_ghost_batchnorm(model, self.ghost_batch_size)
        return model


class WeightStandardizationConfig(_Config):
    n_last_layers_ignore: int = Field(0, ge=0, description="leave the last N convolutions alone")


class WeightStandardization(SurgeryAlgorithm):
    """Standardize each conv filter to zero mean, unit variance (a ``torch.nn.utils.parametrize`` view).

    Method card
        What: the conv uses ``(W - mean) / std`` per output filter; the optimizer updates the raw W
        (stored as ``<conv>.parametrizations.weight.original``).
        When it helps: with group norm or small batches, where batch norm's statistics are noisy.
        When it hurts: it costs a little per step and changes the parameter names policies match.
        Hyperparameters: ``n_last_layers_ignore`` 0.
        Source: Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
        Standardization", 2019.
        Measured in Smalti: the functional form matches a hand computation (tests).
    """

    # the options, set from WeightStandardizationConfig by ConfiguredAlgorithm.__init__
    n_last_layers_ignore: int
    config_model = WeightStandardizationConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_weight_standardization(model, self.n_last_layers_ignore)
        return model


class StochasticDepthConfig(_Config):
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0, description="drop probability of the deepest block")
    drop_distribution: Literal["linear", "uniform"] = "linear"
    mode: Literal["sample", "block"] = "sample"


class StochasticDepth(SurgeryAlgorithm):
    """Randomly skip residual branches while training (ResNet blocks and GPT blocks).

    Method card
        What: each residual branch is dropped with probability p (growing linearly with depth);
        ``sample`` drops per example, ``block`` for the whole batch.
        When it helps: deep residual networks trained long (regularisation; ``block`` also saves
        compute). When it hurts: short runs and shallow models, which underfit.
        Hyperparameters: ``drop_rate`` 0.1-0.2, ``linear``, ``sample``.
        Source: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from StochasticDepthConfig by ConfiguredAlgorithm.__init__
    drop_rate: float
    drop_distribution: Literal["linear", "uniform"]
    mode: Literal["sample", "block"]
    config_model = StochasticDepthConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_stochastic_depth(model, self.drop_rate, self.drop_distribution, self.mode)
        return model


class FactorizeConfig(_Config):
    factorize_linears: bool = True
    factorize_convs: bool = True
    min_features: int = Field(256, ge=1)
    min_channels: int = Field(256, ge=1)
    latent_features: float = Field(0.25, gt=0)
    latent_channels: float = Field(0.25, gt=0)


class Factorize(SurgeryAlgorithm):
    """Split big linear and conv layers into two low-rank ones (truncated SVD of the weights).

    Method card
        What: W (out x in) becomes U_r S_r^1/2 and S_r^1/2 V_r^T, the best rank-r approximation,
        where that saves multiply-adds. At full rank the outputs are unchanged.
        When it helps: wide layers whose compute dominates (big MLPs, 1x1-heavy CNNs).
        When it hurts: small layers (skipped by the thresholds); accuracy drops if r is too low.
        Hyperparameters: ``latent_features`` / ``latent_channels`` 0.25-0.5 of the smaller side.
        Source: Composer's Factorize, after Jaderberg et al. 2014 / Zhang et al. 2015.
        Measured in Smalti: outputs preserved at full rank; best rank-r error otherwise (tests).
    """

    # the options, set from FactorizeConfig by ConfiguredAlgorithm.__init__
    factorize_linears: bool
    factorize_convs: bool
    min_features: int
    min_channels: int
    latent_features: float
    latent_channels: float
    config_model = FactorizeConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_factorization(
            model,
            self.factorize_linears,
            self.factorize_convs,
            self.min_features,
            self.min_channels,
            self.latent_features,
            self.latent_channels,
        )
        return model


class GatedLinearUnitsConfig(_Config):
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    hidden: int | None = Field(None, ge=1, description="GLU width (default 2/3 of the MLP's: same parameters)")


class GatedLinearUnits(SurgeryAlgorithm):
    """Replace each GPT MLP with a gated one: ``proj(act(gate(x)) * up(x))``.

    Method card
        What: a learned, input-dependent gate on the MLP's hidden units, at equal parameter count.
        When it helps: transformer language models (lower loss at equal compute in the paper).
        When it hurts: a freshly initialised gate does not reproduce the old MLP's outputs, so apply
        it before training, not to a trained model; slightly more activations in memory.
        Hyperparameters: ``activation`` gelu (GEGLU), ``hidden`` 2/3 of the MLP width.
        Source: Shazeer, "GLU Variants Improve Transformer", 2020.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from GatedLinearUnitsConfig by ConfiguredAlgorithm.__init__
    activation: Literal["gelu", "relu", "silu"]
    hidden: int | None
    config_model = GatedLinearUnitsConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_gated_linear_units(model, self.activation, self.hidden)
        return model


class AlibiConfig(_Config):
    max_sequence_length: int | None = Field(
        None, ge=1, description="longest sequence at inference (default block_size)"
    )


class Alibi(SurgeryAlgorithm):
    """Attention with linear biases instead of learned positions (ALiBi).

    Method card
        What: removes the position embedding; each head adds ``-slope * distance`` to its scores.
        When it helps: training on short sequences and evaluating on longer ones; pairs with
        sequence-length warmup. When it hurts: tasks that need absolute positions.
        Hyperparameters: ``max_sequence_length`` (default the model's block size).
        Source: Press, Smith and Lewis, "Train Short, Test Long", ICLR 2022.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from AlibiConfig by ConfiguredAlgorithm.__init__
    max_sequence_length: int | None
    config_model = AlibiConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_alibi(model, self.max_sequence_length)
        return model


class GyroDropoutConfig(_Config):
    sigma: int = Field(256, ge=1, description="sub-networks (masks) pre-selected")
    tau: int = Field(16, ge=1, description="sub-networks trained at once, each on its share of the batch")
    rotate_every: int = Field(1, ge=1, description="steps before the next tau masks take over")


class GyroDropout(SurgeryAlgorithm):
    """Dropout over a fixed set of sub-networks, each trained many times.

    Method card
        What: replaces every ``nn.Dropout`` (p > 0) with ``sigma`` pre-drawn masks, ``tau`` of them
        active per step on slices of the batch. Masks and step count are buffers (checkpointed).
        When it helps: dropout-regularised classifier heads trained for many epochs.
        When it hurts: models without dropout (nothing to replace); short runs.
        Hyperparameters: ``sigma`` 256, ``tau`` 16 (Composer's defaults).
        Source: Park et al., "Gyro Dropout", MLSys 2022.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from GyroDropoutConfig by ConfiguredAlgorithm.__init__
    sigma: int
    tau: int
    rotate_every: int
    config_model = GyroDropoutConfig

    def surgery(self, model: nn.Module) -> nn.Module:
        if self.tau > self.sigma:
            raise ValueError(f"GyroDropout: tau ({self.tau}) must not exceed sigma ({self.sigma})")
        self.replaced = apply_gyro_dropout(model, self.sigma, self.tau, self.rotate_every)
        return model


class LowPrecisionLayerNorm(SurgeryAlgorithm):
    """Layer norms in the autocast dtype (bf16/fp16) instead of fp32, on CUDA.

    Method card
        What: swaps the class of every ``nn.LayerNorm`` (same parameters and names); under CUDA
        autocast the norm runs in low precision. On CPU or in fp32 it is the original exactly.
        When it helps: GPU mixed-precision transformer training (memory-bound norms).
        When it hurts: fp16 with large activations (overflow); no effect on CPU.
        Source: Composer's LowPrecisionLayerNorm (successor of FusedLayerNorm).
        Measured in Smalti: outputs identical on CPU (tests); GPU speed not yet measured.
    """

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_low_precision_layernorm(model)
        return model


class LowPrecisionGroupNorm(SurgeryAlgorithm):
    """Group norms in the autocast dtype (bf16/fp16) instead of fp32, on CUDA.

    Method card
        What: as LowPrecisionLayerNorm, for ``nn.GroupNorm``.
        When it helps: GPU mixed-precision CNNs with group norm. When it hurts: as above.
        Source: Composer's LowPrecisionGroupNorm.
        Measured in Smalti: outputs identical on CPU (tests); GPU speed not yet measured.
    """

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = apply_low_precision_groupnorm(model)
        return model


class ChannelsLast(SurgeryAlgorithm):
    """Store conv weights and image batches NHWC (channels last).

    Method card
        What: ``model.to(memory_format=channels_last)``, and each image batch converted likewise.
        Outputs are unchanged (same math, another layout).
        When it helps: convolutional models on GPUs with tensor cores (Composer: up to ~1.2x).
        When it hurts: nothing to gain on CPU or for models without convolutions.
        Source: PyTorch memory-format tutorial; Composer's ChannelsLast.
        Measured in Smalti: outputs equal (tests); GPU speed not yet measured.
    """

    changes = frozenset({"model", "batch"})
    order = 100  # converts the batch after every other transform has made its final tensor

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = 1
        return apply_channels_last(model)

    def match(self, event: Event, state: State) -> bool:
        return event is Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        assert state.batch is not None
        if state.batch.inputs.dim() == 4:
            state.batch = replace(state.batch, inputs=to_channels_last(state.batch.inputs))


class NoOpModel(SurgeryAlgorithm):
    """Replace the model with one that computes nothing: what is left is the loop's own cost.

    Method card
        What: a single-parameter model producing zeros of the right shape, keeping the original's loss.
        When it helps: finding data-loading and bookkeeping bottlenecks. When it hurts: always,
        for learning (it learns nothing by design).
        Source: Composer's NoOpModel.
        Measured in Smalti: see docs/algorithms.md (steps per second with the model removed).
    """

    def surgery(self, model: nn.Module) -> nn.Module:
        self.replaced = 1
        return apply_noop_model(model)
