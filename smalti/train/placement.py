"""Where the model runs: one process, DDP, or FSDP2, and ``torch.compile`` on top. Everything the loop does
differently for them is here, so that the loop itself names none of them."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, cast

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from smalti import distributed
from smalti import fsdp as fsdp_support
from smalti.config import Recipe
from smalti.core.batch import Batch
from smalti.distributed import DistInfo
from smalti.errors import RecipeError
from smalti.io import Closing
from smalti.models.rows import set_rows


class Placement(Closing):
    """Shards the model (FSDP2) at once, and wraps it (DDP, compile) once the optimizer and seam hold it."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, dist: DistInfo, device: torch.device) -> None:
        self.model, self.dist, self.device = model, dist, device
        self.fsdp = recipe.train.parallelism == "fsdp"
        self.owns_fsdp_group = self.fsdp and fsdp_support.process_group_for_fsdp(dist, device)
        if self.fsdp:  # before anything holds the parameters (the optimizer, the router)
            fsdp_support.shard_model(model, device, recipe.train.fsdp)
        self.routed = False
        self.ddp: DistributedDataParallel | None = None
        self.forward_model: Any = model  # the module, or what DDP and torch.compile made of it
        self._compile = recipe.train.compile
        self._param_dtype = recipe.train.fsdp.param_dtype

    def adopt_routing(self) -> None:
        """A seam that routes reads each microbatch's fp32 gradients and reduces them itself (once per step)."""
        self.routed = True
        if not self.fsdp:
            return
        if self._param_dtype != "fp32":
            raise RecipeError(
                "train.fsdp.param_dtype bf16 cannot run with a routing policy or the ledger (they "
                "read each microbatch's fp32 gradients); use train.precision: amp_bf16 instead"
            )
        # A routed backward pass stops below the lowest parameter its examples may update, so ranks would
        # all-gather different blocks in backward: blocks stay gathered from forward to backward instead, and
        # backward has no collective at all.
        sharded = cast(FSDPModule, self.model)
        sharded.set_requires_gradient_sync(False)
        sharded.set_reshard_after_forward(False)

    def wrap(self) -> None:
        """DDP (several processes, not FSDP2) and torch.compile wrap what runs the forward pass; algorithms and
        checkpoints always see the plain module."""
        if self.dist.enabled and not self.fsdp:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.forward_model = self.ddp
        if self._compile:
            self.forward_model = torch.compile(self.forward_model)

    def no_sync_unless(self, sync: bool) -> contextlib.AbstractContextManager:
        """Under DDP, all-reduce gradients only on the last microbatch of a step (never when routing: the seam
        reduces the routed gradients itself); FSDP2 likewise reduce-scatters on the last one."""
        if self.fsdp:
            if not self.routed:
                cast(FSDPModule, self.model).set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if (sync and not self.routed) or self.ddp is None:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def after_microbatch(self) -> None:
        """Under FSDP2 with routing, a pass with nothing to learn ran no backward: free what it gathered."""
        if self.routed and self.fsdp:
            fsdp_support.reshard_all(self.model)

    def lockstep_forwards(self, count: int, sample: Batch) -> None:
        """Under FSDP2 every forward pass all-gathers, so every rank must run as many as the others. A routed
        step splits microbatches by signature, and ranks hold different classes: a rank with fewer passes
        runs the difference first, on one row without gradients, in eval mode (no dropout draws)."""
        if not (self.fsdp and self.dist.enabled):
            return
        missing = distributed.all_reduce_max(count, self.dist) - count
        if missing:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                for _ in range(missing):
                    set_rows(self.model, sample)  # per-class adapters need the row's class (a DDPM its id)
                    self.forward_model(sample.inputs)
                    fsdp_support.reshard_all(self.model)  # as a backward pass would (blocks stay gathered otherwise)
            self.model.train(was_training)

    def whole_weights(self) -> dict[str, Any]:
        """The model's whole weights (under FSDP2 gathered to rank 0's CPU: a collective; other ranks get {})."""
        if not self.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_whole_weights(self, weights: dict[str, Any]) -> None:
        """Whole tensors (every rank has them) into the model; under FSDP2 cut into this rank's shards."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.model.load_state_dict(weights, strict=False)

    def close(self) -> None:
        """DDP's reducer must go while the process group is still registered, or its destructor tears the group
        down holding the GIL that gloo's worker thread needs (a deadlock at exit)."""
        self.ddp = None
        self.forward_model = self.model
        if self.dist.enabled:  # the reducer, in a reference cycle, must go before the group
            gc.collect()
        distributed.shutdown(self.dist)
        if self.owns_fsdp_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
