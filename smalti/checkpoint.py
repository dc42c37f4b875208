"""Checkpoint files: written atomically, hashed, pruned, and found again after a crash.

Layout of ``RUN_DIR/checkpoints/``::

    ep0-ba500.pt          a checkpoint (torch.save of a dict of plain types and tensors)
    ep0-ba500.pt.sha256   its sha256, written after it
    ep0-ba500.dcp/        an FSDP2 run's sharded checkpoint instead (``smalti.sharded_checkpoint``)
    latest                the name of the newest complete checkpoint

A checkpoint is first written to a temporary file in the same folder, flushed
and fsynced, then renamed into place; only then is ``latest`` replaced the
same way. A kill at any moment leaves either the old ``latest`` or the new
one, each pointing at a complete file. Loads use ``weights_only=True``, so a
checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import torch

from smalti import formats
from smalti.checkpoint_fields import CHECKPOINT_NAME, LATEST, expected_digest, latest_checkpoint
from smalti.errors import CheckpointCorrupt, CheckpointError
from smalti.interrupts import interrupts_deferred
from smalti.io import atomic_write_bytes, atomic_writer, file_sha256
from smalti.payload import Payload, read_payload


class _HashingWriter(io.RawIOBase):
    """Forwards writes to a file while hashing them, so the bytes are read only once."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.digest.update(data)
        return self._handle.write(data)


def checkpoint_name(epoch: int, batch: int, sharded: bool = False) -> str:
    return f"ep{epoch}-ba{batch}.{'dcp' if sharded else 'pt'}"


class CheckpointStore:
    """A run's checkpoint folder. Only the main rank writes to it."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def remove_partial_writes(self) -> list[Path]:
        """Temporary files left by a process killed mid-write; never loaded, safe to delete."""
        removed = []
        if self.directory.is_dir():
            for leftover in self.directory.glob(".*.tmp"):
                if leftover.is_dir():  # a sharded checkpoint some rank was still writing
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
        return removed

    def all(self) -> list[Path]:
        """Every checkpoint in the folder, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted((path for path in self.directory.iterdir() if CHECKPOINT_NAME.match(path.name)), key=_order)

    def newest_intact(self, tensors: bool = True) -> tuple[Path, dict[str, Any], list[str]] | None:
        """The newest checkpoint that loads, and why each newer one did not (None: the folder has none).

        ``latest`` first; if it is missing, truncated or fails its hash, the next older ones, so a
        damaged file costs the steps since the checkpoint before it, never the run. A file that
        loads but is of another format or run still stops the caller: that is no accident.
        """
        try:
            pointed = self.latest()
            problems: list[str] = []
        except CheckpointError as error:  # the pointer names a file that is gone
            pointed, problems = None, [str(error)]
        found = self.all()
        if pointed is None and not found:
            return None
        newest_first = [pointed] if pointed is not None else []
        newest_first += [
            p for p in reversed(found) if p != pointed and (pointed is None or _order(p) < _order(pointed))
        ]
        for path in newest_first:
            try:
                return path, load_checkpoint(path, tensors=tensors), problems
            except CheckpointCorrupt as error:
                problems.append(str(error))
        raise CheckpointError(
            f"{self.directory}: no intact checkpoint ({'; '.join(problems)}); move the folder aside to start over"
        )

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def save(self, payload: dict[str, Any], name: str, keep_always: bool = False) -> Path:
        """Write atomically with a sha256 sidecar; ``keep_always`` exempts it from pruning (a ``.keep`` marker)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        with interrupts_deferred():  # Ctrl-C mid-save: finish this checkpoint, then stop (smalti/interrupts.py)
            with atomic_writer(path) as handle:
                writer = _HashingWriter(handle)
                torch.save(payload, writer)  # type: ignore[arg-type]  # a binary raw stream, not typed as IO[bytes]
            self._publish(name, f"{writer.digest.hexdigest()}  {name}", keep_always)
        return path

    def commit(self, temporary: Path, name: str, keep_always: bool = False) -> Path:
        """Put a sharded checkpoint every rank has finished writing into place, then move ``latest``."""
        path = self.directory / name
        with interrupts_deferred():
            if path.is_dir():  # trained to this batch before, from an older checkpoint: replaced, as a file would be
                shutil.rmtree(path)
            temporary.rename(path)
            self._publish(name, f"{checkpoint_sha256(path)}  {name}/SHA256SUMS", keep_always)
        return path

    def _publish(self, name: str, sidecar: str, keep_always: bool) -> None:
        """After the checkpoint itself: its sha256 sidecar, its ``.keep`` marker if asked, ``latest``, pruning."""
        atomic_write_bytes(self.directory / f"{name}.sha256", f"{sidecar}\n".encode())
        if keep_always:
            atomic_write_bytes(self.directory / f"{name}.keep", b"")
        atomic_write_bytes(self.directory / LATEST, f"{name}\n".encode())
        self._prune()

    def _prune(self) -> None:
        found = [path for path in self.all() if not path.with_name(path.name + ".keep").exists()]
        for path in found[: max(0, len(found) - self.keep)]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def _order(path: Path) -> tuple[int, int]:
    match = CHECKPOINT_NAME.match(path.name)
    assert match is not None
    return int(match.group(2)), int(match.group(1))


def load_payload(location: str | Path, tensors: bool = True) -> Payload:
    """A training checkpoint, typed: ``load_checkpoint`` (hash-checked, format-checked, unable to run code), then
    every field of the payload checked (``smalti.payload.read_payload``): the reader the loop, deletion,
    lineage, generation and the report share."""
    return read_payload(load_checkpoint(location, tensors), str(location))


def load_checkpoint(location: str | Path, tensors: bool = True) -> dict[str, Any]:
    """Load a checkpoint from a local path or any fsspec URL (``s3://``, ``http://``, ``file://``).

    Local checkpoints written by Smalti are checked against their sha256
    first, so a flipped byte is reported instead of silently loaded. A sharded
    checkpoint (a local folder) gives the same payload with whole tensors, or
    without ``model``/``optimizer`` when ``tensors`` is false (an FSDP2 run
    loads its shards itself).
    """
    location = str(location)
    is_local = "://" not in location
    if is_local and Path(location).is_dir():
        from smalti import sharded_checkpoint

        try:
            payload = (sharded_checkpoint.consolidated if tensors else sharded_checkpoint.read_meta)(Path(location))
        except CheckpointError:
            raise
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointCorrupt(f"{location}: checkpoint is corrupt or truncated ({reason})") from None
        problem = formats.format_problem(payload.get("format"), formats.CHECKPOINT, location)
        if problem:
            raise CheckpointError(problem)
        return payload
    try:
        if is_local:
            data = Path(location).read_bytes()
        else:
            with fsspec.open(location, "rb") as handle:
                data = handle.read()
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{location}: checkpoint not found") from None
    except ImportError as error:
        raise CheckpointError(
            f"{location}: {error} (s3:// and http(s):// need the remote extra: pip install 'smalti[remote]')"
        ) from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{location}: cannot read checkpoint ({error})") from None
    if is_local:
        expected = expected_digest(Path(location))
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointCorrupt(
                f"{location}: checkpoint is corrupt (sha256 differs from {Path(location).name}.sha256)"
            )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged archive
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointCorrupt(f"{location}: checkpoint is corrupt or truncated ({reason})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{location}: not a Smalti checkpoint (no format identifier)")
    problem = formats.format_problem(payload.get("format"), formats.CHECKPOINT, location)
    if problem:
        raise CheckpointError(problem)
    return payload


def checkpoint_sha256(path: Path) -> str:
    """The hash a checkpoint's sidecar holds: the file's, or a sharded checkpoint's ``SHA256SUMS``'s (which
    hashes every file in the folder)."""
    return file_sha256(path / "SHA256SUMS" if path.is_dir() else path)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A layout-independent hash of model weights: names, dtypes, shapes and bytes, in name order.

    Signed into the ledger's tree head with every checkpoint, it ties a model file, and a fine-tune's
    starting point, to the evidence.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def load_weights(model: torch.nn.Module, weights: dict[str, Any], where: str | Path) -> None:
    """Put checkpointed weights into the model the recipe builds, or say in one line why they do not fit.

    They do not when the run was trained from Python with a model of its own (``Trainer(model=...)``):
    the command line can only rebuild what a recipe describes.
    """
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(
            f"{where}: its weights do not fit the model the recipe describes (a run trained from Python with "
            f"its own model= must be loaded there): {detail[:300]}"
        ) from None
