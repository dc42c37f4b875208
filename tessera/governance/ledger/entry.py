"""How one ledger entry is laid out as bytes, and its signed tree heads.

An entry is a fixed 44-byte header followed by a canonical JSON body::

    b"TSL1" | index (u64, big-endian) | previous entry's leaf hash (32 bytes) | body

The header makes the chain checkable without parsing JSON (``tessera ledger
verify`` reads 100k+ entries a second); the body is ``json.dumps`` with
sorted keys, no spaces and no NaN (non-finite floats are written as the
strings ``"nan"``, ``"inf"``, ``"-inf"``), so the same content always gives
the same bytes and the same leaf hash. Floats are rounded to float32
precision (9 significant digits): the statistics are float32 on the device,
more digits would only record noise.

Entry 0 describes the run (kind ``run``: layers, classes, fingerprints, the
update-share rule); every later entry is one optimizer step (kind ``step``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"TSL1"
HEADER = struct.Struct(">4sQ32s")
HEADER_SIZE = HEADER.size  # 44
ZERO_HASH = bytes(32)
HEAD_VERSION = "tessera-ledger-tree-head/1"


class EntryFormatError(ValueError):
    """Bytes that are not a ledger entry."""


def _canonical_float(value: float) -> float | str:
    if value - value == 0.0:  # finite (inf - inf and nan - nan are nan)
        return float(f"{value:.9g}")
    return "nan" if value != value else ("inf" if value > 0 else "-inf")


def _canonical_value(value: Any) -> Any:
    # Exact type checks first: entries are mostly lists of floats, and this runs for every number written.
    kind = type(value)
    if kind is float:
        return _canonical_float(value)
    if kind is list or kind is tuple:
        return [_canonical_float(v) if type(v) is float else _canonical_value(v) for v in value]
    if kind is dict:
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, float):
        return _canonical_float(float(value))
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    return value


def canonical_json(body: dict[str, Any]) -> bytes:
    return json.dumps(_canonical_value(body), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_entry(index: int, previous_leaf: bytes, body: dict[str, Any]) -> bytes:
    return HEADER.pack(MAGIC, index, previous_leaf) + canonical_json(body)


@dataclass(frozen=True)
class Entry:
    index: int
    previous_leaf: bytes
    body: dict[str, Any]


def decode_header(data: bytes) -> tuple[int, bytes]:
    if len(data) < HEADER_SIZE or data[:4] != MAGIC:
        raise EntryFormatError("not a ledger entry (bad header)")
    _, index, previous = HEADER.unpack_from(data)
    return index, previous


def decode_entry(data: bytes) -> Entry:
    index, previous = decode_header(data)
    try:
        body = json.loads(data[HEADER_SIZE:])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EntryFormatError(f"body is not JSON ({error.msg if hasattr(error, 'msg') else error})") from None
    if not isinstance(body, dict) or body.get("kind") not in ("run", "step"):
        raise EntryFormatError("body is not a run or step entry")
    if canonical_json(body) != data[HEADER_SIZE:]:
        raise EntryFormatError("body is not in canonical form")
    return Entry(index, previous, body)


@dataclass(frozen=True)
class TreeHead:
    """A signed statement: the ledger's first ``size`` entries have Merkle root ``root``.

    ``final`` marks the head written when training finished; a ledger whose
    last head is not final was cut short (a crash, or someone truncating it).
    The signed message is the canonical JSON of ``message_fields``, so any
    Ed25519 tool can check it.
    """

    size: int
    root: bytes
    timestamp: str
    final: bool
    key_id: str = ""
    signature: bytes = b""

    def message(self) -> bytes:
        fields = {"final": self.final, "root": self.root.hex(), "size": self.size, "timestamp": self.timestamp,
                  "version": HEAD_VERSION}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root.hex(), "timestamp": self.timestamp, "final": self.final,
                "key_id": self.key_id, "signature": self.signature.hex(), "message": self.message().decode()}
