"""RandAugment (Cubuk et al., 2020) and AugMix (Hendrycks et al., ICLR 2020) on tensors, without torchvision.

The image operations are the ones both papers use (after PIL's), written as
batched torch ops on images in [0, 1] with a per-image ``level`` in [0, 1]:
the whole batch is augmented on the device, each image with its own choice
of operations and strengths. Random choices come from torch's global
generator (or the one given), which the trainer checkpoints, so a resumed
run draws the same augmentations.

``augmentation_set``: ``all`` (every op), or ``safe``, which leaves out the
four "enhance" ops (brightness, color, contrast, sharpness) that overlap the
corruptions of ImageNet-C, as AugMix does for a fair robustness test.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images [n, C, H, W], signed levels [n]) -> images


def _per_image(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return levels.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def autocontrast(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to the full [0, 1] range (level unused)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 1.0 / (high - low).clamp(min=1e-12), torch.ones_like(high))
    return torch.where(high > low, (x - low) * scale, x)


def equalize(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per image and channel over 256 levels (level unused)."""
    n, c, h, w = x.shape
    q = (x.clamp(0, 1) * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    cdf = hist.cumsum(1)
    first = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(1, keepdim=True)
    span = (h * w - first).clamp(min=1)
    lut = ((cdf - first) / span * 255).clamp(0, 255)
    out = lut.gather(1, q) / 255.0
    constant = (first >= h * w).expand_as(out)
    return torch.where(constant, x.reshape(n * c, h * w), out).view(n, c, h, w).to(x.dtype)


def posterize(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Keep ``4 - int(4 * level)`` bits (at least 1) of each 8-bit pixel value."""
    bits = (4 - (levels.abs() * 4).long()).clamp(min=1)
    mask = (0xFF << (8 - bits)) & 0xFF
    q = (x.clamp(0, 1) * 255).long()
    return (q & mask.view(-1, 1, 1, 1)).to(x.dtype) / 255.0


def solarize(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Invert every pixel above ``1 - level``."""
    threshold = 1.0 - _per_image(levels.abs(), x)
    return torch.where(x >= threshold, 1.0 - x, x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Rotate by ``30 * level`` degrees (the sign of the level picks the direction)."""
    angle = levels * (30.0 * math.pi / 180.0)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _shear_or_translate(x: torch.Tensor, levels: torch.Tensor, index: tuple[int, int]) -> torch.Tensor:
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, index[0], index[1]] = levels
    return _affine(x, theta)


def shear_x(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _shear_or_translate(x, levels * 0.3, (0, 1))


def shear_y(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _shear_or_translate(x, levels * 0.3, (1, 0))


def translate_x(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Shift by a third of the width times the level (grid units span 2, hence the factor)."""
    return _shear_or_translate(x, levels * (2.0 / 3.0), (0, 2))


def translate_y(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _shear_or_translate(x, levels * (2.0 / 3.0), (1, 2))


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's enhance: ``other + factor * (x - other)``; factor 1 is the identity."""
    return (other + _per_image(factor, x) * (x - other)).clamp(0, 1)


def _enhance_factor(levels: torch.Tensor) -> torch.Tensor:
    return 1.0 + levels * 0.9


def brightness(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), _enhance_factor(levels))


def contrast(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), _enhance_factor(levels))


def color(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the grayscale image (the identity on one-channel images)."""
    return _blend(x, _grayscale(x).expand_as(x), _enhance_factor(levels))


def sharpness(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13.0
    channels = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(channels, 1, 3, 3), groups=channels)
    return _blend(x, smooth, _enhance_factor(levels))


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


SAFE_OPS: dict[str, Op] = {
    "autocontrast": autocontrast,
    "equalize": equalize,
    "posterize": posterize,
    "solarize": solarize,
    "rotate": rotate,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}
ALL_OPS: dict[str, Op] = {
    **SAFE_OPS,
    "brightness": brightness,
    "contrast": contrast,
    "color": color,
    "sharpness": sharpness,
}


def augmentation_ops(augmentation_set: str) -> list[Op]:
    if augmentation_set not in ("all", "safe"):
        raise ValueError(f"augmentation_set must be 'all' or 'safe', got {augmentation_set!r}")
    return list((ALL_OPS if augmentation_set == "all" else SAFE_OPS).values())


def apply_random_ops(
    x: torch.Tensor, ops: list[Op], levels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One op per image, chosen uniformly; ``levels`` [n] in [0, 1] get a random sign (direction)."""
    n = x.shape[0]
    choice = torch.randint(len(ops), (n,), generator=generator)
    sign = torch.randint(2, (n,), generator=generator) * 2 - 1
    signed = (levels.cpu() * sign).to(x.device)
    out = x.clone()
    for index, op in enumerate(ops):
        rows = (choice == index).nonzero().flatten().to(x.device)
        if rows.numel():
            out[rows] = op(x[rows], signed[rows]).to(x.dtype)
    return out


def randaugment_batch(
    x: torch.Tensor,
    depth: int = 2,
    severity: int = 9,
    augmentation_set: str = "all",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``depth`` random ops per image, each at strength ``severity / 10``."""
    if not 0 <= severity <= 10:
        raise ValueError(f"severity must be in [0, 10], got {severity}")
    ops = augmentation_ops(augmentation_set)
    levels = torch.full((x.shape[0],), severity / 10.0)
    for _ in range(depth):
        x = apply_random_ops(x, ops, levels, generator)
    return x


def augmix_batch(
    x: torch.Tensor,
    severity: int = 3,
    depth: int = -1,
    width: int = 3,
    alpha: float = 1.0,
    augmentation_set: str = "all",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``m x + (1 - m) sum_i w_i chain_i(x)``, w ~ Dirichlet(alpha), m ~ Beta(alpha, alpha), per image.

    Each chain applies ``depth`` ops (1 to 3 at random if ``depth`` is -1),
    each at a strength drawn uniformly up to ``severity / 10``.
    """
    if not 1 <= severity <= 10 or width < 1 or alpha <= 0:
        raise ValueError(
            f"augmix needs 1 <= severity <= 10, width >= 1 and alpha > 0, got {severity}, {width}, {alpha}"
        )
    ops = augmentation_ops(augmentation_set)
    n = x.shape[0]
    concentration = torch.full((n, width), float(alpha))
    weights = torch._sample_dirichlet(concentration, generator=generator).to(x.device, x.dtype)
    skip = torch._sample_dirichlet(torch.full((n, 2), float(alpha)), generator=generator)[:, 0].to(x.device, x.dtype)
    mixed = torch.zeros_like(x)
    for chain in range(width):
        steps = depth if depth > 0 else int(torch.randint(1, 4, (), generator=generator))
        augmented = x
        for _ in range(steps):
            levels = torch.rand(n, generator=generator) * (severity / 10.0)
            augmented = apply_random_ops(augmented, ops, levels, generator)
        mixed += _per_image(weights[:, chain], x) * augmented
    return (_per_image(skip, x) * x + (1.0 - _per_image(skip, x)) * mixed).clamp(0, 1)
