"""Mixed precision: the autocast context and the gradient scaler, chosen in one place."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from smalti.errors import RecipeError


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "amp_fp16" and device.type != "cuda":
        raise RecipeError("train.precision 'amp_fp16' needs a CUDA device; on CPU use 'amp_bf16' or 'fp32'")


def autocast(precision: str, device: torch.device) -> ContextManager:
    """fp32: nothing; amp_bf16: bf16 autocast (CPU or CUDA); amp_fp16: fp16 autocast (CUDA)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    if precision == "amp_fp16":
        return torch.amp.GradScaler(device.type)
    return None
