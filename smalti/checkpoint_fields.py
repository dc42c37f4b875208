"""A local training checkpoint's plain fields, read without torch: what the audit report and the service show.

``torch.save`` writes a zip whose ``data.pkl`` pickles the payload, its tensors as references to storages kept
beside it. This reader checks the file against its sha256 sidecar exactly as ``smalti.checkpoint`` does, then
unpickles ``data.pkl`` with an unpickler that builds nothing but plain Python values: every tensor, storage,
dtype or array becomes an ``Opaque`` placeholder, and any other global refuses the file. No code from the file
runs, torch is never imported, and no storage is read, so a report of a multi-gigabyte run costs the size of
its pickle, not of its weights.

Sharded (FSDP2) checkpoints are folders; their ``meta.pt`` is read the same way after every file is checked
against ``SHA256SUMS``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from smalti.errors import CheckpointCorrupt, CheckpointError
from smalti.io import file_sha256
from smalti.payload import Payload, read_payload

LATEST = "latest"  # the file in a run's checkpoint folder naming its latest checkpoint
CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)\.(pt|dcp)$")
SUMS = "SHA256SUMS"  # a sharded checkpoint's digests of its files
META = "meta.pt"  # a sharded checkpoint's non-tensor part
MAX_PICKLE = 64 << 20  # bytes of data.pkl this reader unpickles (the plain fields are kilobytes)
_PLAIN = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(module, kind.__name__): kind for module in ("builtins", "__builtin__") for kind in (set, frozenset)},
}
_OPAQUE_MODULES = ("torch", "numpy", "_codecs")  # tensors, storages, dtypes, RNG arrays


class Opaque:
    """Stands for a value this reader does not rebuild (a tensor, a storage, an array, a dtype)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "Opaque()"


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if module.split(".")[0] in _OPAQUE_MODULES:
            return Opaque
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which no Smalti checkpoint holds")

    def persistent_load(self, pid: Any) -> Any:
        return Opaque()


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``directory/latest`` names (None without one); a name that is not a checkpoint there is
    refused, so the pointer can never lead outside the folder."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = Path(directory) / name
    if not CHECKPOINT_NAME.match(name) or not path.exists():
        raise CheckpointError(f"{pointer}: points at '{name}', which is not a checkpoint in {directory}")
    return path


def expected_digest(path: Path) -> str | None:
    """The sha256 that ``path``'s sidecar (``NAME.sha256``) records, or None without one."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return None
    words = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not words:
        raise CheckpointCorrupt(f"{sidecar}: empty (it should hold the checkpoint's sha256)")
    return words[0]


def verify_sharded(path: Path) -> None:
    """Every file of a sharded checkpoint against its ``SHA256SUMS`` (itself against its sidecar, if any)."""
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


def plain_fields(data: bytes, where: str) -> Any:
    """The object ``torch.save`` pickled into ``data`` (a zip), tensors as ``Opaque``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointCorrupt(f"{where}: checkpoint is corrupt (not one data.pkl in its archive)")
            if pickles[0].file_size > MAX_PICKLE:
                raise CheckpointError(f"{where}: its data.pkl is {pickles[0].file_size} bytes, over {MAX_PICKLE}")
            pickled = archive.read(pickles[0])
        return _PlainUnpickler(io.BytesIO(pickled)).load()
    except CheckpointError:
        raise
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RecursionError,
        MemoryError,
    ) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointCorrupt(f"{where}: checkpoint is corrupt or not Smalti's ({reason})") from None


def read_fields(location: Path) -> Payload:
    """The typed payload of a local checkpoint (a file or a sharded folder), ``model`` and ``optimizer`` holding
    ``Opaque`` placeholders: every field checked as ``smalti.payload.read_payload`` checks it."""
    location = Path(location)
    try:
        if location.is_dir():
            verify_sharded(location)
            data, where = (location / META).read_bytes(), str(location)
        else:
            data, where = location.read_bytes(), str(location)
            expected = expected_digest(location)
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                raise CheckpointCorrupt(
                    f"{location}: checkpoint is corrupt (sha256 differs from {location.name}.sha256)"
                )
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{location}: checkpoint not found") from None
    except OSError as error:
        raise CheckpointError(f"{location}: cannot read checkpoint ({error})") from None
    return read_payload(plain_fields(data, where), where)
