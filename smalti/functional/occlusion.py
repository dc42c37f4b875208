"""CutOut (DeVries & Taylor, 2017) and ColOut (Composer) as pure functions on image batches."""

from __future__ import annotations

import torch


def cutout_batch(
    images: torch.Tensor, num_holes: int = 1, length: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero ``num_holes`` squares of side ``length`` (fraction of the shorter side) per image, centres uniform.

    A hole near the edge is clipped, as in the paper.
    """
    if images.dim() != 4:
        raise ValueError(f"CutOut works on image batches [B, C, H, W]; got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    side = int(length * min(height, width)) if length < 1 else int(length)
    rows = torch.arange(height, device=images.device)[None, :, None]
    cols = torch.arange(width, device=images.device)[None, None, :]
    keep = torch.ones(batch, height, width, dtype=torch.bool, device=images.device)
    for _ in range(num_holes):
        cy = torch.randint(height, (batch, 1, 1), generator=generator).to(images.device)
        cx = torch.randint(width, (batch, 1, 1), generator=generator).to(images.device)
        top, left = cy - side // 2, cx - side // 2
        keep &= ~((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side))
    return images * keep[:, None].to(images.dtype)


def colout_batch(
    images: torch.Tensor, p_row: float = 0.15, p_col: float = 0.15, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Drop a random ``p_row`` of the rows and ``p_col`` of the columns (the same ones for the whole batch).

    The images get smaller, which is the point: less compute per step. As Composer, the rows
    kept number ``int((1 - p_row) * height)`` (27 of 32 at 0.15), and likewise the columns; at
    least one of each is kept.
    """
    if images.dim() != 4:
        raise ValueError(f"ColOut works on image batches [B, C, H, W]; got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    keep_rows = torch.randperm(height, generator=generator)[: max(1, int((1 - p_row) * height))].sort().values
    keep_cols = torch.randperm(width, generator=generator)[: max(1, int((1 - p_col) * width))].sort().values
    return images[:, :, keep_rows.to(images.device)][:, :, :, keep_cols.to(images.device)]
