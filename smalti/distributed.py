"""A thin layer over torch.distributed: what rank am I, and the few collectives the loop needs.

Processes are launched by ``torchrun`` (or any launcher that sets RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT); Smalti never launches its own.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether we created the process group (and so must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def device_type_for(requested: str) -> str:
    """The device type a recipe's ``train.device`` trains on, which picks the backend (NCCL or gloo)."""
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up; a plain ``python`` run is world size 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=10)
        store = _restart_store(world_size, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout
            )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        owns_group=owns,
    )


def _restart_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The agent's store, under a prefix of its own for each restart of the worker group.

    Under ``torchrun --max-restarts`` with the c10d rendezvous, every worker connects to its agent's
    TCPStore, and torch keeps that store across restarts (``torch.distributed.rendezvous`` assumes a
    new store per retry and adds no prefix). The restarted workers then read the addresses the dead
    ones published, and gloo's connectFullMesh fails with "Connection refused" until the restarts run
    out (seen with torch 2.13). Keys under ``smalti/restart-N`` are the current group's only. None:
    not a restart-capable torchelastic worker (the usual ``env://`` initialisation applies).
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"smalti/restart-{restart}", agent_store)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int, info: DistInfo) -> int:
    if not info.enabled:
        return value
    box = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box[0])


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Tear down a process group we created: left to interpreter exit, gloo can abort the process."""
    if info.owns_group and dist.is_initialized():
        dist.barrier()  # every rank has finished its collectives before any rank tears down
        dist.destroy_process_group()
