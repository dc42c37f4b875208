"""MixUp (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) as pure functions.

Both make each training example from two: the batch and a permutation of
it. The targets become the matching mixture of the two one-hot labels, and
the provenance becomes the union of the two examples' classes, so routing
and the ledger treat a mixed example as belonging to both sources.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from smalti.core.batch import Batch, union_provenance


def _dense_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return targets.float() if targets.is_floating_point() else F.one_hot(targets, num_classes).float()


def _check_images(batch: Batch, method: str) -> None:
    if batch.inputs.dim() != 4 or not batch.inputs.is_floating_point():
        raise ValueError(
            f"{method} works on image batches [B, C, H, W]; got inputs of shape {tuple(batch.inputs.shape)}"
        )


def mix_batches(
    batch: Batch, permutation: torch.Tensor, inputs: torch.Tensor, weight: float, num_classes: int
) -> Batch:
    """The batch with ``inputs``, targets ``weight * y + (1 - weight) * y[perm]`` and provenance the union."""
    targets = _dense_targets(batch.targets, num_classes)
    mixed_targets = weight * targets + (1.0 - weight) * targets[permutation]
    provenance = union_provenance(batch.provenance, batch.provenance[permutation.cpu()])
    return replace(batch, inputs=inputs, targets=mixed_targets, provenance=provenance)


def mixup_batch(batch: Batch, num_classes: int, weight: float, permutation: torch.Tensor) -> Batch:
    """``x' = w x + (1 - w) x[perm]``, targets mixed the same way."""
    _check_images(batch, "MixUp")
    inputs = weight * batch.inputs + (1.0 - weight) * batch.inputs[permutation]
    return mix_batches(batch, permutation, inputs, weight, num_classes)


def cutmix_box(height: int, width: int, area_fraction: float, center: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (top, bottom, left, right) of about ``area_fraction`` of the image around ``center``, clipped."""
    cut = (1.0 - area_fraction) ** 0.5
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = center
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    return top, bottom, left, right


def cutmix_batch(
    batch: Batch, num_classes: int, weight: float, permutation: torch.Tensor, center: tuple[int, int]
) -> Batch:
    """Paste a box from ``x[perm]`` into ``x``; the label weight is the area actually kept."""
    _check_images(batch, "CutMix")
    height, width = batch.inputs.shape[-2:]
    top, bottom, left, right = cutmix_box(height, width, weight, center)
    inputs = batch.inputs.clone()
    inputs[:, :, top:bottom, left:right] = batch.inputs[permutation][:, :, top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return mix_batches(batch, permutation, inputs, kept, num_classes)
