"""Progressive resizing (Composer; after fast.ai's DAWNBench work) as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resizing_scale(
    elapsed: float, initial_scale: float = 0.5, delay_fraction: float = 0.5, finetune_fraction: float = 0.2
) -> float:
    """The image scale at ``elapsed`` (fraction of training): ``initial_scale`` until ``delay_fraction``,
    then linear up to 1 at ``1 - finetune_fraction``, and full size after."""
    if not 0.0 < initial_scale <= 1.0:
        raise ValueError(f"initial_scale must be in (0, 1], got {initial_scale}")
    if delay_fraction + finetune_fraction > 1.0:
        raise ValueError("delay_fraction + finetune_fraction must not exceed 1")
    if elapsed < delay_fraction:
        return initial_scale
    ramp = 1.0 - finetune_fraction - delay_fraction
    if ramp <= 0.0 or elapsed >= 1.0 - finetune_fraction:
        return 1.0
    return initial_scale + (1.0 - initial_scale) * (elapsed - delay_fraction) / ramp


def scaled_size(size: int, scale: float, size_increment: int = 4) -> int:
    """``size * scale`` rounded down to a multiple of ``size_increment`` (at least one increment)."""
    return max(size_increment, int(size * scale) // size_increment * size_increment) if scale < 1.0 else size


def resize_batch(
    images: torch.Tensor,
    scale: float,
    mode: str = "resize",
    size_increment: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Shrink images to ``scale``: ``resize`` (bilinear, antialiased) or ``crop`` (one random crop per batch)."""
    if images.dim() != 4:
        raise ValueError(f"progressive resizing works on image batches [B, C, H, W]; got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    new_h, new_w = scaled_size(height, scale, size_increment), scaled_size(width, scale, size_increment)
    if (new_h, new_w) == (height, width):
        return images
    if mode == "resize":
        return F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    if mode == "crop":
        top = int(torch.randint(height - new_h + 1, (), generator=generator))
        left = int(torch.randint(width - new_w + 1, (), generator=generator))
        return images[:, :, top : top + new_h, left : left + new_w]
    raise ValueError(f"mode must be 'resize' or 'crop', got {mode!r}")
