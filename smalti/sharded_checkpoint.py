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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smalti.checkpoint_fields import META, SUMS, verify_sharded as verify
from smalti.errors import CheckpointCorrupt, CheckpointError
from smalti.io import atomic_writer, file_sha256

_MODEL, _OPTIMIZER = "model", "optimizer_state"


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP saves: the model's state and each parameter's optimizer state, by name (DTensor shards)."""
    from smalti.fsdp import reshard_all

    reshard_all(model)  # the root keeps its gathered parameters after a step; the optimizer holds the shards
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [p for p in optimizer.state if id(p) not in names]
    if missing:
        raise CheckpointError(f"{len(missing)} optimizer state entries belong to no parameter of the model")
    return {
        _MODEL: model.state_dict(),
        _OPTIMIZER: {names[id(p)]: dict(state) for p, state in optimizer.state.items() if id(p) in names},
    }


class PendingSave:
    """A sharded checkpoint the ranks are writing: at once (``future`` None) or in the background."""

    def __init__(self, temporary: Path, future: Any = None) -> None:
        self.temporary = temporary
        self.future = future

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> None:
        """Until this rank's part is written (rank 0's: every rank's, and DCP's ``.metadata``)."""
        if self.future is not None:
            try:
                self.future.result()
            except Exception as error:
                raise CheckpointError(f"{self.temporary}: the background checkpoint write failed ({error})") from None
            self.future = None

    def seal(self) -> Path:
        """Rank 0, once every rank has written: hash every file; the folder is then ready to commit."""
        sums = "".join(
            f"{file_sha256(path)}  {path.name}\n" for path in sorted(self.temporary.iterdir()) if path.name != SUMS
        )
        with atomic_writer(self.temporary / SUMS) as handle:
            handle.write(sums.encode())
        return self.temporary


def save(
    directory: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any] | None,
    is_main: bool,
    barrier,
    background_group: Any = None,
) -> PendingSave:
    """Every rank writes its shards into a temporary folder; rank 0 adds ``meta``. Rank 0 seals and commits
    the folder once every rank has written it (:meth:`PendingSave.seal`,
    :meth:`smalti.checkpoint.CheckpointStore.commit`).

    ``background_group``: write with ``dcp.async_save`` over this (gloo) group, which then coordinates the
    ranks' writes off the training thread; the state is copied before this returns, so the steps that
    follow do not change what is written. ``meta`` is written at once for the same reason."""
    import torch.distributed.checkpoint as dcp

    temporary = directory / f".{name}.tmp"
    if is_main:
        assert meta is not None
        _begin(temporary, meta)
    barrier()
    state = sharded_state(model, optimizer)
    if background_group is None:
        dcp.save(state, checkpoint_id=str(temporary))
        return PendingSave(temporary)
    return PendingSave(temporary, dcp.async_save(state, checkpoint_id=str(temporary), process_group=background_group))


def _begin(temporary: Path, meta: dict[str, Any]) -> None:
    """A fresh temporary folder holding ``meta.pt`` (written at once: later steps must not change it)."""
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    with atomic_writer(temporary / META) as handle:
        torch.save(meta, handle)


def save_whole(directory: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write a payload of whole tensors (a single-file checkpoint's, as :func:`consolidated` gives it) as a
    sharded checkpoint, in one process and without a process group; returns the folder to commit.

    An edit made offline (``smalti forget --mode ablate``) stays the run's format, so the run resumes
    under FSDP2 at any world size: DCP cuts whole tensors into each rank's shards on load."""
    import torch.distributed.checkpoint as dcp

    temporary = directory / f".{name}.tmp"
    _begin(temporary, {k: v for k, v in payload.items() if k not in ("model", "optimizer")})
    tensors = {_MODEL: payload["model"], _OPTIMIZER: payload["optimizer"]["state"]}
    dcp.save(tensors, checkpoint_id=str(temporary), no_dist=True)
    return PendingSave(temporary).seal()


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
        name, _, field = key[len(prefix) :].rpartition(".")
        if name not in params:
            raise CheckpointError(f"{path}: optimizer state for {name!r}, which this model does not have")
        param = params[name]
        same = tuple(info.size) == tuple(param.shape)
        target = (
            torch.zeros_like(param, dtype=info.properties.dtype)
            if same
            else torch.zeros(tuple(info.size), dtype=info.properties.dtype)
        )
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


def consolidated(path: Path) -> dict[str, Any]:
    """The whole checkpoint in this process alone, as a single-file checkpoint's payload: whole tensors,
    and the optimizer's state keyed by parameter name.

    Local even where a process group exists (``no_dist``): rank 0 of ``smalti forget`` under torchrun
    reads checkpoints while the other ranks wait, and a collective read would hang."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    payload = read_meta(path)
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    targets: dict[str, Any] = {_MODEL: {}, _OPTIMIZER: {}}
    for key, info in metadata.items():
        if not isinstance(info, TensorStorageMetadata):
            raise CheckpointCorrupt(f"{path}: {key!r} is not a tensor; not a Smalti sharded checkpoint")
        tensor = torch.empty(tuple(info.size), dtype=info.properties.dtype)
        group, _, rest = key.partition(".")
        if group == _MODEL:
            targets[_MODEL][rest] = tensor
        elif group == _OPTIMIZER:
            name, _, field = rest.rpartition(".")
            targets[_OPTIMIZER].setdefault(name, {})[field] = tensor
        else:
            raise CheckpointCorrupt(f"{path}: unexpected entry {key!r}; not a Smalti sharded checkpoint")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(targets, checkpoint_id=str(path), no_dist=True)
    payload["model"] = targets[_MODEL]
    payload["optimizer"] = {"state": targets[_OPTIMIZER], "param_groups": []}
    return payload
