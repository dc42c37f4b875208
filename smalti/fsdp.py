"""FSDP2: each transformer block and the root sharded with ``fully_shard``, and the sharded gradients of a
governed step.

Ungoverned runs use FSDP2 as torchtitan does: gradients are reduce-scattered on the step's last
microbatch only (``set_requires_gradient_sync``). Governed runs (a routing policy, layer freezing or the
ledger) must decide, after every rank's last backward pass, which parameters a step updated at all: a
parameter that no example of the global batch may update gets no gradient, so the optimizer leaves its
value and its moments alone (G1). FSDP2 reduce-scatters whatever gradients each rank holds, and the ranks
of a routed step hold gradients for different parameters (their examples are of different classes).
So a governed run keeps FSDP2's reduction off, lets autograd accumulate each microbatch's gradient in
the unsharded parameters as usual, and reduces once per step here (:class:`ShardedGradients`): the flags
of updated parameters are summed over ranks, and the gradients of exactly those parameters are
reduce-scattered into the sharded parameters' ``.grad``, cut as FSDP2 cuts the parameters (dim 0, in
``torch.chunk``'s pieces). The router reads the unsharded parameters autograd sees from the modules
while they run (:meth:`smalti.governance.routing.Router.autograd_params`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence, cast

import torch
import torch.distributed as dist
from torch import nn

from smalti.config import FSDPConfig
from smalti.distributed import DistInfo
from smalti.errors import RecipeError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: a model's ``fsdp_blocks()`` if it names them, else the
    modules whose class a Hugging Face model lists in ``_no_split_modules`` (its decoder layers)."""
    named = getattr(model, "fsdp_blocks", None)
    if callable(named):
        return list(named())
    no_split: set[str] = set()
    for module in model.modules():
        no_split |= set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in no_split]


def process_group_for_fsdp(info: DistInfo, device: torch.device) -> bool:
    """FSDP2 needs a process group even in one process: create a one-rank group there (True: we did)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_model(model: nn.Module, device: torch.device, options: FSDPConfig) -> nn.Module:
    """Apply ``fully_shard`` to every transformer block, then to the root; returns the same module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if options.cpu_offload and device.type != "cuda":
        raise RecipeError(
            "train.fsdp.cpu_offload moves sharded parameters from the GPU to the CPU; this run "
            "trains on the CPU already (set it false)"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict = {"mesh": mesh, "reshard_after_forward": options.reshard_after_forward}
    if options.param_dtype == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs["offload_policy"] = CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})  # the root's parameters are needed next
    return model


def reshard_all(model: nn.Module) -> None:
    """Free every gathered parameter (a no-op for modules already sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class ShardedGradients:
    """Reduce-scatters full gradients into FSDP2's dim-0 shards (means over ranks, as FSDP2 and DDP give).

    FSDP2 cuts dim 0 into ``world_size`` pieces of ``ceil(d0 / world_size)`` rows (the last ones shorter
    or empty); each parameter's piece is padded to that length in one flat buffer per destination rank.
    """

    def __init__(self, params: Sequence[nn.Parameter], info: DistInfo) -> None:
        self.params, self.info = cast("list[DTensor]", list(params)), info  # sharded by FSDP2: DTensors
        world = max(info.world_size, 1)
        self._rows = [math.ceil(p.shape[0] / world) if p.dim() else 1 for p in self.params]
        self._rest = [math.prod(p.shape[1:]) if p.dim() else 1 for p in self.params]

    def local_piece(self, i: int, full: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """Rank ``rank``'s dim-0 piece of a full tensor shaped like parameter ``i`` (a view)."""
        rank = self.info.rank if rank is None else rank
        if full.dim() == 0:
            return full
        start = min(rank * self._rows[i], full.shape[0])
        return full[start : min(start + self._rows[i], full.shape[0])]

    def reduce_scatter(self, indices: Sequence[int], fulls: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """For each parameter ``indices[k]``, this rank's piece of the sum over ranks of ``fulls[k]`` divided by
        the world size (one collective for all of them)."""
        world = max(self.info.world_size, 1)
        if world == 1:
            return [full.clone() for full in fulls]
        sizes = [self._rows[i] * self._rest[i] for i in indices]
        total = sum(sizes)
        send = fulls[0].new_zeros(world, total)
        for rank in range(world):
            offset = 0
            for k, (i, full) in enumerate(zip(indices, fulls)):
                piece = self.local_piece(i, full, rank).reshape(-1)
                send[rank, offset : offset + piece.numel()].copy_(piece)
                offset += sizes[k]
        received = fulls[0].new_empty(total)
        dist.reduce_scatter_tensor(received, send.reshape(-1))
        received.div_(world)
        out, offset = [], 0
        for k, (i, full) in enumerate(zip(indices, fulls)):
            shape = self.local_piece(i, full).shape
            out.append(received[offset : offset + math.prod(shape)].view(shape))
            offset += sizes[k]
        return out

    def set_sharded_grads(self, updated: Sequence[bool], holders: Sequence[torch.Tensor | None]) -> None:
        """Every updated parameter's ``.grad`` becomes its reduced shard (zeros where this rank had none); every
        other parameter's ``.grad`` is None. ``holders``: the unsharded tensors autograd accumulated into."""
        from torch.distributed.tensor import DTensor

        indices = [i for i, flag in enumerate(updated) if flag]
        fulls = []
        for i in indices:
            holder = holders[i]
            grad = holder.grad if holder is not None else None
            fulls.append(
                grad.float()
                if grad is not None
                else torch.zeros(self.params[i].shape, device=self.params[i].to_local().device)
            )
        shards = self.reduce_scatter(indices, fulls) if indices else []
        for holder in holders:
            if holder is not None:
                holder.grad = None
        for p in self.params:
            p.grad = None
        for i, shard in zip(indices, shards):
            p = self.params[i]
            p.grad = DTensor.from_local(
                shard.to(p.dtype).contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
