"""Batch transforms for image tasks: each acts on ``AFTER_DATALOADER``, on the device, for training only.

Every class docstring is the method's card. The random draws use torch's
global generator, which checkpoints capture, so a resumed run repeats them.
MixUp and CutMix change the provenance (a mixed example belongs to both
sources' classes); the others keep each example's classes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from smalti.algorithms.configured import ConfiguredAlgorithm, NoOptions
from smalti.core.event import Event
from smalti.core.state import State
from smalti.functional.augment import augmix_batch, randaugment_batch
from smalti.functional.mixing import cutmix_batch, mixup_batch
from smalti.functional.occlusion import colout_batch, cutout_batch
from smalti.functional.progressive_resizing import resize_batch, resizing_scale
from smalti.core.logger import Logger


_Config = NoOptions


def _num_classes(state: State) -> int:
    config = getattr(state.model, "config", None)
    count = getattr(config, "num_classes", None)
    if count is None:
        raise ValueError("MixUp and CutMix need a classifier (model.name resnet); this model has no num_classes")
    return int(count)


def _images(state: State, method: str) -> torch.Tensor:
    assert state.batch is not None
    inputs = state.batch.inputs
    if inputs.dim() != 4 or not inputs.is_floating_point():
        raise ValueError(
            f"{method} works on image batches [B, C, H, W] (data.images); "
            f"this recipe's inputs have shape {tuple(inputs.shape)}"
        )
    return inputs


# Order on AFTER_DATALOADER (lower first), so a recipe's listing order never matters:
# per-image augmentations, then occlusion, then mixing two images (each already augmented), then the
# size changes (which every earlier transform saw at full size); selective backprop scores what will be
# trained (order 50) and channels-last converts the final tensor (order 100).
AUGMENT, OCCLUDE, MIX, RESIZE = -30, -20, -10, 0


class BatchTransform(ConfiguredAlgorithm):
    """Base: configured by keyword arguments; ``transform`` rewrites ``state.batch`` after loading."""

    changes = frozenset({"batch"})

    def match(self, event: Event, state: State) -> bool:
        return event is Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.transform(state)

    def transform(self, state: State) -> None:
        raise NotImplementedError


class CutOutConfig(_Config):
    num_holes: int = Field(1, ge=1)
    length: float = Field(0.5, gt=0, description="side of each hole; below 1: a fraction of the image side")


class CutOut(BatchTransform):
    """Zero random squares of each training image.

    Method card
        What: ``num_holes`` squares of side ``length`` per image, at uniform random centres (clipped).
        When it helps: CNNs that overfit small image datasets (CIFAR-10: ~-0.5-1% error).
        When it hurts: tiny images where the hole hides the object; short runs.
        Hyperparameters: ``num_holes`` 1, ``length`` 0.5 (CIFAR: 16 px of 32).
        Source: DeVries and Taylor, "Improved Regularization of CNNs with Cutout", 2017.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from CutOutConfig by ConfiguredAlgorithm.__init__
    num_holes: int
    length: float
    config_model = CutOutConfig
    order = OCCLUDE

    def transform(self, state: State) -> None:
        images = _images(state, "CutOut")
        assert state.batch is not None  # _images checked it
        state.batch = replace(state.batch, inputs=cutout_batch(images, self.num_holes, self.length))


class ColOutConfig(_Config):
    p_row: float = Field(0.15, ge=0.0, lt=1.0)
    p_col: float = Field(0.15, ge=0.0, lt=1.0)


class ColOut(BatchTransform):
    """Drop random rows and columns of the images (the same for the whole batch): smaller images, faster steps.

    Method card
        What: removes ``p_row`` of the rows and ``p_col`` of the columns; the images shrink.
        When it helps: compute-bound CNN training (Composer: ~1.1x on ImageNet at small cost).
        When it hurts: models that need a fixed input size; fine detail tasks.
        Hyperparameters: ``p_row`` = ``p_col`` = 0.15.
        Source: Composer's ColOut.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from ColOutConfig by ConfiguredAlgorithm.__init__
    p_row: float
    p_col: float
    config_model = ColOutConfig
    order = RESIZE

    def transform(self, state: State) -> None:
        images = _images(state, "ColOut")
        assert state.batch is not None  # _images checked it
        state.batch = replace(state.batch, inputs=colout_batch(images, self.p_row, self.p_col))


class MixUpConfig(_Config):
    alpha: float = Field(0.2, gt=0.0, description="Beta(alpha, alpha) draws the mixing weight")


class MixUp(BatchTransform):
    """Train on convex combinations of pairs of examples and of their labels.

    Method card
        What: ``x' = w x + (1 - w) x[perm]``, ``y' = w y + (1 - w) y[perm]``, w ~ Beta(alpha, alpha)
        per batch. Governance: the mixed example belongs to both sources' classes (provenance union),
        routing takes the intersection of what they may update, the ledger counts it under both.
        When it helps: long vision runs that overfit (ImageNet: +~1 top-1 at 90+ epochs).
        When it hurts: short runs (it slows convergence); tasks whose labels do not mix.
        Hyperparameters: ``alpha`` 0.2 (ImageNet), 1.0 (CIFAR).
        Source: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from MixUpConfig by ConfiguredAlgorithm.__init__
    alpha: float
    config_model = MixUpConfig
    order = MIX

    def transform(self, state: State) -> None:
        _images(state, "MixUp")
        assert state.batch is not None  # _images checked it
        weight = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        permutation = torch.randperm(state.batch.num_samples).to(state.batch.inputs.device)
        state.batch = mixup_batch(state.batch, _num_classes(state), weight, permutation)


class CutMixConfig(_Config):
    alpha: float = Field(1.0, gt=0.0, description="Beta(alpha, alpha) draws the kept area")


class CutMix(BatchTransform):
    """Paste a box from another example; the labels mix by the area each contributes.

    Method card
        What: a box of area ~(1 - w) from ``x[perm]`` replaces that region of ``x``;
        ``y' = w' y + (1 - w') y[perm]`` with w' the area actually kept. Governance as MixUp.
        When it helps: vision runs long enough to use the regularisation (ImageNet: +~1-2 top-1).
        When it hurts: short runs; small objects that the box can remove entirely.
        Hyperparameters: ``alpha`` 1.0.
        Source: Yun et al., "CutMix", ICCV 2019.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from CutMixConfig by ConfiguredAlgorithm.__init__
    alpha: float
    config_model = CutMixConfig
    order = MIX

    def transform(self, state: State) -> None:
        images = _images(state, "CutMix")
        assert state.batch is not None  # _images checked it
        weight = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        height, width = images.shape[-2:]
        center = (int(torch.randint(height, ())), int(torch.randint(width, ())))
        permutation = torch.randperm(state.batch.num_samples).to(images.device)
        state.batch = cutmix_batch(state.batch, _num_classes(state), weight, permutation, center)


class RandAugmentConfig(_Config):
    depth: int = Field(1, ge=1, description="ops per image")
    severity: int = Field(9, ge=0, le=10)
    augmentation_set: Literal["all", "safe"] = "all"


class RandAugment(BatchTransform):
    """``depth`` random image operations per image at a fixed strength.

    Method card
        What: each image gets ``depth`` ops drawn uniformly from rotate, shear, translate,
        posterize, solarize, equalize, autocontrast (+ brightness, contrast, color, sharpness in
        ``all``), at strength ``severity / 10``; batched torch ops, no torchvision.
        When it helps: long vision runs (ImageNet ResNet-50: +~1 top-1). When it hurts: short runs,
        and on a CPU the augmentation itself costs time.
        Hyperparameters: ``depth`` 1-2, ``severity`` 9.
        Source: Cubuk et al., "RandAugment", CVPR Workshops 2020.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from RandAugmentConfig by ConfiguredAlgorithm.__init__
    depth: int
    severity: int
    augmentation_set: Literal["all", "safe"]
    config_model = RandAugmentConfig
    order = AUGMENT

    def transform(self, state: State) -> None:
        images = _images(state, "RandAugment")
        assert state.batch is not None  # _images checked it
        state.batch = replace(
            state.batch, inputs=randaugment_batch(images, self.depth, self.severity, self.augmentation_set)
        )


class AugMixConfig(_Config):
    severity: int = Field(3, ge=1, le=10)
    depth: int = Field(-1, ge=-1, description="ops per chain; -1: 1 to 3 at random")
    width: int = Field(3, ge=1, description="chains mixed per image")
    alpha: float = Field(1.0, gt=0.0)
    augmentation_set: Literal["all", "safe"] = "all"


class AugMix(BatchTransform):
    """Mix several augmentation chains of each image with the image itself.

    Method card
        What: ``m x + (1 - m) sum_i w_i chain_i(x)``, w ~ Dirichlet(alpha), m ~ Beta(alpha, alpha),
        per image. (The paper's Jensen-Shannon consistency loss is not part of it, as in Composer.)
        When it helps: robustness to corruptions and distribution shift. When it hurts: clean
        accuracy on short runs; its cost grows with ``width`` x ``depth``.
        Hyperparameters: ``severity`` 3, ``width`` 3, ``depth`` -1, ``alpha`` 1.
        Source: Hendrycks et al., "AugMix", ICLR 2020.
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from AugMixConfig by ConfiguredAlgorithm.__init__
    severity: int
    depth: int
    width: int
    alpha: float
    augmentation_set: Literal["all", "safe"]
    config_model = AugMixConfig
    order = AUGMENT

    def transform(self, state: State) -> None:
        images = _images(state, "AugMix")
        assert state.batch is not None  # _images checked it
        state.batch = replace(
            state.batch,
            inputs=augmix_batch(images, self.severity, self.depth, self.width, self.alpha, self.augmentation_set),
        )


class ProgressiveResizingConfig(_Config):
    initial_scale: float = Field(0.5, gt=0.0, le=1.0)
    delay_fraction: float = Field(0.5, ge=0.0, le=1.0)
    finetune_fraction: float = Field(0.2, ge=0.0, le=1.0)
    size_increment: int = Field(4, ge=1)
    mode: Literal["resize", "crop"] = "resize"


class ProgressiveResizing(BatchTransform):
    """Train on smaller images first, growing them to full size.

    Method card
        What: image side ``initial_scale`` until ``delay_fraction`` of training, then linear to
        full size at ``1 - finetune_fraction``; rounded to ``size_increment``.
        When it helps: compute-bound CNNs (Composer: ~1.1-1.3x on ImageNet). When it hurts: models
        that need a fixed input size; tiny images (too little left to learn from).
        Hyperparameters: ``initial_scale`` 0.5, ``delay_fraction`` 0.5, ``finetune_fraction`` 0.2.
        Source: Composer's ProgressiveResizing, after fast.ai (Howard, 2018).
        Measured in Smalti: see docs/algorithms.md.
    """

    # the options, set from ProgressiveResizingConfig by ConfiguredAlgorithm.__init__
    initial_scale: float
    delay_fraction: float
    finetune_fraction: float
    size_increment: int
    mode: Literal["resize", "crop"]
    config_model = ProgressiveResizingConfig
    order = RESIZE

    def transform(self, state: State) -> None:
        images = _images(state, "ProgressiveResizing")
        assert state.batch is not None  # _images checked it
        scale = resizing_scale(state.elapsed_fraction, self.initial_scale, self.delay_fraction, self.finetune_fraction)
        state.batch = replace(state.batch, inputs=resize_batch(images, scale, self.mode, self.size_increment))
