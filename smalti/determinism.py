"""Seeds, deterministic kernels, and every RNG state a resume must restore."""

from __future__ import annotations

import os
import random
from typing import Any, cast

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def configure_determinism(enabled: bool) -> None:
    """Ask torch for deterministic kernels; an op without one raises instead of drifting.

    On CPU, results are bitwise repeatable for a fixed intra-op thread count.
    MKL may silently use fewer threads than asked on a busy machine
    (``MKL_DYNAMIC``, on by default), which changes the order of sums; we
    turn that off, effective if MKL has not run a routine yet. The test
    suite additionally pins one thread for every bitwise comparison.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark


def _to_bytes(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()


def _from_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """Every generator the loop may draw from, as plain Python values.

    Plain values (no tensors, no numpy objects) pickle anywhere: through
    ``all_gather_object`` to rank 0 and into a ``weights_only`` checkpoint.
    """
    kind, keys, position, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": _to_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_to_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(_from_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_bytes(s) for s in state["cuda"]])
