"""Sharded checkpoints for FSDP2 runs, written by every rank with ``torch.distributed.checkpoint`` (DCP).

Layout of ``RUN_DIR/checkpoints/ep0-ba500.dcp/``::

    .metadata, __0_0.distcp, __1_0.distcp, ...   DCP's files: each rank writes its own shards
    meta.pt                                      everything that is not a sharded tensor (rank 0)
    SHA256SUMS                                   the sha256 of every file above

beside ``ep0-ba500.dcp.sha256`` (the sha256 of ``SHA256SUMS``), exactly as a single-file checkpoint has
its sidecar. The ranks write into ``.ep0-ba500.dcp.tmp/``; only when every rank has finished does rank 0
hash the files, rename the folder into place and move ``latest``: a checkpoint killed half-written is
a hidden temporary folder, removed at the next start and never loaded.

The optimizer state is saved by parameter name, only for the parameters that have one (a parameter no
class may update has no Adam moments, and must not get any on resume: G1). DCP reshards on load, so a
run saved by 4 ranks resumes on 2 or 1. Offline readers (``smalti forget``, ``export``, lineage) get the
same payload as from a single file, with whole tensors (:func:`consolidated`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smalti.checkpoint import file_sha256
from smalti.errors import CheckpointCorrupt, CheckpointError
from smalti.io import atomic_writer

SUMS = "SHA256SUMS"
META = "meta.pt"
_MODEL, _OPTIMIZER = "model", "optimizer_state"


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP saves: the model's state and each parameter's optimizer state, by name (DTensor shards)."""
    from smalti.fsdp import reshard_all

    reshard_all(model)  # the root keeps its gathered parameters after a step; the optimizer holds the shards
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [p for p in optimizer.state if id(p) not in names]
    if missing:
        raise CheckpointError(f"{len(missing)} optimizer state entries belong to no parameter of the model")
    return {_MODEL: model.state_dict(),
            _OPTIMIZER: {names[id(p)]: dict(state) for p, state in optimizer.state.items() if id(p) in names}}


def save(directory: Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
         meta: dict[str, Any] | None, is_main: bool, barrier) -> Path | None:
    """Every rank writes its shards into a temporary folder; rank 0 adds ``meta`` and the hashes and returns
    the folder to commit (:meth:`smalti.checkpoint.CheckpointStore.commit`); other ranks return None."""
    import torch.distributed.checkpoint as dcp

    temporary = directory / f".{name}.tmp"
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(temporary))
    if not is_main:
        return None
    assert meta is not None
    with atomic_writer(temporary / META) as handle:
        torch.save(meta, handle)
    sums = "".join(f"{file_sha256(path)}  {path.name}\n" for path in sorted(temporary.iterdir()) if path.name != SUMS)
    with atomic_writer(temporary / SUMS) as handle:
        handle.write(sums.encode())
    return temporary


def load_into(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into an FSDP2 model and its optimizer, at any world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from smalti.fsdp import reshard_all

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    reshard_all(model)
    params = dict(model.named_parameters())
    targets: dict[str, Any] = {_MODEL: model.state_dict(), _OPTIMIZER: {}}
    prefix = f"{_OPTIMIZER}."
    for key, info in metadata.items():
        if not key.startswith(prefix) or not isinstance(info, TensorStorageMetadata):
            continue
        name, _, field = key[len(prefix):].rpartition(".")
        if name not in params:
            raise CheckpointError(f"{path}: optimizer state for {name!r}, which this model does not have")
        param = params[name]
        same = tuple(info.size) == tuple(param.shape)
        target = torch.zeros_like(param, dtype=info.properties.dtype) if same else torch.zeros(
            tuple(info.size), dtype=info.properties.dtype)
        targets[_OPTIMIZER].setdefault(name, {})[field] = target
    try:
        dcp.load(targets, checkpoint_id=str(path))
    except Exception as error:  # DCP wraps the reason (a missing or misshapen key) in its own exception
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{path}: does not fit this model/optimizer ({reason})") from None
    model.load_state_dict(targets[_MODEL])
    optimizer.state.clear()
    for name, state in targets[_OPTIMIZER].items():
        optimizer.state[params[name]] = state


def read_meta(path: Path) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint, after checking every file against ``SHA256SUMS``."""
    verify(path)
    return torch.load(path / META, map_location="cpu", weights_only=True)


def verify(path: Path) -> None:
    sums = path / SUMS
    if not sums.is_file():
        raise CheckpointCorrupt(f"{path}: sharded checkpoint has no {SUMS}")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file() and sidecar.read_text(encoding="utf-8").split()[0] != file_sha256(sums):
        raise CheckpointCorrupt(f"{path}: checkpoint is corrupt ({SUMS} differs from {sidecar.name})")
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        file = path / name
        if not file.is_file():
            raise CheckpointCorrupt(f"{path}: checkpoint is missing {name}")
        if file_sha256(file) != digest:
            raise CheckpointCorrupt(f"{path}: checkpoint is corrupt ({name} differs from {SUMS})")


def consolidated(path: Path) -> dict[str, Any]:
    """The whole checkpoint in one process, as a single-file checkpoint's payload: whole tensors, and the
    optimizer in torch's own format (parameters numbered in the order the model's ``named_parameters``
    gives, which is the order Smalti's optimizers are built in)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    import warnings

    payload = read_meta(path)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        tensors = _load_state_dict_from_keys(checkpoint_id=str(path))
    payload["model"] = dict(tensors.get(_MODEL, {}))
    payload["optimizer"] = {"state": dict(tensors.get(_OPTIMIZER, {})), "param_groups": []}
    return payload
