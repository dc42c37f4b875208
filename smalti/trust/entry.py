"""How one ledger entry is laid out as bytes, and its signed tree heads.

An entry is a fixed 44-byte header followed by a canonical JSON body::

    b"TSL2" | index (u64, big-endian) | previous entry's leaf hash (32 bytes) | body

The header makes the chain checkable without parsing the body. The body is
``json.dumps`` with sorted keys, no spaces and no NaN, so the same content
always gives the same bytes and the same leaf hash.

**Packed tables.** A step entry is mostly numbers: per layer six statistics,
per class and layer a norm and a share, every K steps an entropy matrix.
Written as decimal JSON they made an entry ~5.5 kB and verification spent
most of its time hashing digits. They are stored instead as
``{"f32": base64 of little-endian float32, "shape": [rows, columns]}``
(float32 is what the device measured; decimal added only noise digits), one
NaN bit pattern for "undefined" (a relative update of a zero-norm layer, a
cosine without a previous update), which cuts an entry by half. Any base64
and IEEE-754 tool reads them; :func:`decode_entry` turns them back into the
plain lists every reader uses (``layers``: ``[updated, update_norm,
relative_update|null, cosine|null, parameter_norm, gradient_norm]`` per layer;
``contributions``: ``{signature: [[layer, norm, share], ...]}`` for the layers with a positive norm
(stored dense, zeros elsewhere); ``entropy``:
``[classes][layers]``), with non-finite numbers as the strings ``"nan"``,
``"inf"``, ``"-inf"`` so exports stay valid JSON. Other floats are JSON
numbers rounded to float32 precision (9 significant digits).

Entries written by format 1 (``b"TSL1"``, every number in decimal) are still
read and verified.

Entry 0 describes the run (kind ``run``: layers, classes, fingerprints, the
update-share rule); every later entry is one optimizer step (kind ``step``).
"""

from __future__ import annotations

import base64
import dataclasses
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from smalti import formats

MAGIC = b"TSL2"
LEGACY_MAGIC = b"TSL1"  # format 1: the same body with every number in decimal
MAGICS = (MAGIC, LEGACY_MAGIC)
HEADER = struct.Struct(">4sQ32s")
HEADER_SIZE = HEADER.size  # 44
ZERO_HASH = bytes(32)
MAX_EXPERTS = 4096  # experts per layer a run entry may declare (the largest models have a few hundred)
NULLABLE_LAYER_COLUMNS = (2, 3)  # relative update and cosine: undefined when a norm they divide by is 0


class EntryFormatError(ValueError):
    """Bytes that are not a ledger entry."""


def _number(value: float) -> float | str:
    """A float as JSON can hold it: itself if finite (inf - inf and nan - nan are nan), else a string."""
    if value - value == 0.0:
        return value
    return "nan" if value != value else ("inf" if value > 0 else "-inf")


def _canonical_float(value: float) -> float | str:
    return float(f"{value:.9g}") if value - value == 0.0 else _number(value)


def _canonical_value(value: Any) -> Any:
    # Exact type checks first: this runs for every value written.
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
    """The JSON layer alone: sorted keys, no spaces, floats to 9 digits, non-finite as strings."""
    return json.dumps(_canonical_value(body), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# ------------------------------------------------------------------ packed tables


def _float32(value: Any) -> float:
    """A logical number as the float32 table stores it: null is NaN, "nan"/"inf"/"-inf" are themselves."""
    return math.nan if value is None else float(value)


def _pack_matrix(rows: list[list[Any]]) -> dict[str, Any]:
    return _pack([[_float32(v) for v in row] for row in rows], len(rows[0]) if rows else 0)


def _pack(rows: list[list[float]] | np.ndarray, columns: int) -> dict[str, Any]:
    table = np.array(rows, dtype="<f4").reshape(len(rows), columns)
    table[np.isnan(table)] = np.nan  # one NaN bit pattern, so equal content gives equal bytes
    return {"f32": base64.b64encode(table.tobytes()).decode("ascii"), "shape": [len(rows), columns]}


def _unpack(packed: Any, field: str) -> np.ndarray:
    if (
        type(packed) is not dict
        or packed.keys() != {"f32", "shape"}
        or type(packed["f32"]) is not str
        or type(packed["shape"]) is not list
        or len(packed["shape"]) != 2
        or any(type(n) is not int or n < 0 for n in packed["shape"])
    ):
        raise EntryFormatError(f"{field}: not a packed float32 table")
    try:
        raw = base64.b64decode(packed["f32"], validate=True)
    except (binascii.Error, ValueError):
        raise EntryFormatError(f"{field}: not base64") from None
    rows, columns = packed["shape"]
    if len(raw) != 4 * rows * columns:
        raise EntryFormatError(f"{field}: {len(raw)} bytes do not hold a {rows} x {columns} float32 table")
    return np.frombuffer(raw, dtype="<f4").reshape(rows, columns).astype(np.float64)


def _logical_rows(table: np.ndarray, nullable: tuple[int, ...] = ()) -> list[list[Any]]:
    """Plain lists; only the few non-finite cells are visited one by one (null where nullable and NaN)."""
    rows = table.tolist()
    for r, c in zip(*np.nonzero(~np.isfinite(table))):
        value = rows[r][c]
        rows[r][c] = None if c in nullable and value != value else _number(value)
    return rows


def _pack_cells(cells: list[list[Any]]) -> dict[str, Any]:
    """A signature's cells as a dense (norm, share) table over layers 0..last; a layer it did not touch has
    norm 0 and is not a cell (the writer lists exactly the layers with a positive norm)."""
    rows = [[0.0, 0.0] for _ in range(1 + max((int(cell[0]) for cell in cells), default=-1))]
    for layer, norm, share in cells:
        rows[int(layer)] = [_float32(norm), _float32(share)]
    return _pack(rows, 2)


def pack_body(body: dict[str, Any]) -> dict[str, Any]:
    """A step entry's numeric tables as packed float32; other entries unchanged."""
    if body.get("kind") != "step":
        return body
    packed = dict(body)
    if "layers" in body:
        packed["layers"] = _pack_matrix(body["layers"])
    if "contributions" in body:
        packed["contributions"] = {signature: _pack_cells(cells) for signature, cells in body["contributions"].items()}
    if "entropy" in body:
        packed["entropy"] = _pack_matrix(body["entropy"])
    return packed


def unpack_body(stored: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`pack_body`: plain lists, null where a nullable statistic is NaN."""
    if stored.get("kind") != "step":
        return stored
    body = dict(stored)
    if "layers" in stored:
        table = _unpack(stored["layers"], "layers")
        layers = _logical_rows(table, NULLABLE_LAYER_COLUMNS)
        if table.shape[1]:
            if not np.isin(table[:, 0], (0.0, 1.0)).all():
                raise EntryFormatError("layers: the updated flag must be 0 or 1")
            for row in layers:
                row[0] = int(row[0])
        body["layers"] = layers
    if "contributions" in stored:
        if type(stored["contributions"]) is not dict:
            raise EntryFormatError("contributions: not a table per signature")
        contributions = {}
        for signature, packed in stored["contributions"].items():
            table = _unpack(packed, f"contributions[{signature}]")
            if table.size and table.shape[1] != 2:
                raise EntryFormatError(f"contributions[{signature}]: not a (norm, share) table")
            positive = (table[:, 0] > 0).tolist() if table.size else []
            contributions[signature] = [
                [layer, norm, share]
                for layer, ((norm, share), kept) in enumerate(zip(_logical_rows(table), positive))
                if kept
            ]
        body["contributions"] = contributions
    if "entropy" in stored:
        body["entropy"] = _logical_rows(_unpack(stored["entropy"], "entropy"))
    return body


# ------------------------------------------------------------------ entries


def encode_entry(index: int, previous_leaf: bytes, body: dict[str, Any]) -> bytes:
    return encode_packed_entry(index, previous_leaf, pack_body(body))


def pack_table(table: np.ndarray) -> dict[str, Any]:
    """A [rows, columns] float table packed as :func:`pack_body` packs the same numbers given as lists (NaN
    for null): what the trainer writes, straight from its arrays."""
    return _pack(table, table.shape[1])


def encode_packed_entry(index: int, previous_leaf: bytes, packed: dict[str, Any]) -> bytes:
    """:func:`encode_entry` of a body whose tables are already packed (:func:`pack_table`), or that has none
    (a run entry): the same bytes, without a round trip of every number through Python lists (``verify
    --deep`` checks they are the same)."""
    return HEADER.pack(MAGIC, index, previous_leaf) + canonical_json(packed)


@dataclass(frozen=True)
class Entry:
    index: int
    previous_leaf: bytes
    body: dict[str, Any]


def decode_header(data: bytes) -> tuple[int, bytes]:
    if len(data) < HEADER_SIZE or data[:4] not in MAGICS:
        raise EntryFormatError("not a ledger entry (bad header)")
    _, index, previous = HEADER.unpack_from(data)
    return index, previous


def decode_entry(data: bytes, canonical: bool = True) -> Entry:
    """The entry in ``data``; ``canonical=False`` skips re-encoding the body to check it is the one
    spelling of its content (half the cost), for readers of a ledger that was just verified."""
    try:
        return _decode_entry(data, canonical)
    except RecursionError:
        raise EntryFormatError("body is nested too deeply") from None


def _decode_entry(data: bytes, canonical: bool) -> Entry:
    index, previous = decode_header(data)
    try:
        stored = json.loads(data[HEADER_SIZE:])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EntryFormatError(f"body is not JSON ({error.msg if hasattr(error, 'msg') else error})") from None
    if not isinstance(stored, dict) or stored.get("kind") not in ("run", "step"):
        raise EntryFormatError("body is not a run or step entry")
    legacy = data[:4] == LEGACY_MAGIC
    body = stored if legacy else unpack_body(stored)
    if canonical and canonical_json(body if legacy else pack_body(body)) != data[HEADER_SIZE:]:
        raise EntryFormatError("body is not in canonical form")
    check_types(body)
    return Entry(index, previous, body)


# ------------------------------------------------------------------ field types
#
# A signed entry is only as trustworthy as its signer, and the party being audited holds the trainer key: an
# entry can say anything its signer chose. So every field a reader shows or computes with has its type checked
# here, once, where entries are decoded; a loss that is a string of HTML is refused as malformed, not rendered.

_NON_FINITE = ("nan", "inf", "-inf")


def _is_int(value: Any) -> bool:
    """A count or an index, as the trainer writes them: a non-negative integer a float64 (and a browser) holds
    exactly, so no reader overflows on a step of 2**70."""
    return type(value) is int and 0 <= value < 2**53


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) or value in _NON_FINITE


def _require(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise EntryFormatError(f"{field}: expected {expected}")


def _strings(value: Any) -> bool:
    return type(value) is list and all(type(v) is str for v in value)


def _ints(value: Any) -> bool:
    return type(value) is list and all(type(v) is int and 0 <= v < 2**53 for v in value)


def _optional_str_map(value: Any) -> bool:
    return type(value) is dict and all(v is None or type(v) is str for v in value.values())


def check_types(body: dict[str, Any]) -> None:
    """Raise :class:`EntryFormatError` naming the first field whose type is not what Smalti writes."""
    if body["kind"] == "run":
        _check_run(body)
    else:
        _check_step(body)


def _check_run(body: dict[str, Any]) -> None:
    """Fields are checked where present (readers that need one, such as the audit service, require it)."""
    if "classes" in body:
        _require(_strings(body["classes"]), "classes", "a list of class names")
    layers = body.get("layers", [])
    _require(
        type(layers) is list
        and all(
            type(layer) is dict and type(layer.get("name")) is str and _strings(layer.get("parameters"))
            for layer in layers
        ),
        "layers",
        "a list of {name, parameters}",
    )
    for field in ("contribution_rule", "update_share_rule", "trainer_key", "recipe_fingerprint"):
        if field in body:
            _require(type(body[field]) is str, field, "a string")
    if "fingerprints" in body:
        _require(_optional_str_map(body["fingerprints"]), "fingerprints", "a map of names to digests")
    routing = body.get("routing")
    if routing is not None:
        _require(
            type(routing) is list
            and all(
                type(phase) is dict
                and _is_int(phase.get("start_batch"))
                and _strings(phase.get("layers"))
                and len(phase["layers"]) == len(body.get("classes", []))
                and all(len(row) == len(layers) and set(row) <= {"0", "1", "p"} for row in phase["layers"])
                for phase in routing
            ),
            "routing",
            "per phase a start batch and one 0/1/p string per class",
        )
    parent = body.get("parent")
    if parent is not None:
        _require(
            type(parent) is dict
            and type(parent.get("run_dir")) is str
            and type(parent.get("head")) is dict
            and type(parent.get("kind", "replay")) is str
            and all(
                type(parent.get(f)) in (str, type(None))
                for f in ("trainer_key", "forgotten", "mode", "start_weights_sha256")
            )
            and type(parent.get("fork_step")) in (int, type(None)),
            "parent",
            "a link {kind, run_dir, head, trainer_key, ...}",
        )
    experts = body.get("experts")
    if experts is not None:
        _require(
            type(experts) is dict
            and _strings(experts.get("layers"))
            and _is_int(experts.get("count"))
            and 0 < experts["count"] <= MAX_EXPERTS,  # a reader allocates a row of this length per layer
            "experts",
            f"{{layers, count}} with 1 to {MAX_EXPERTS} experts",
        )
    entropy = body.get("entropy")
    if entropy is not None:
        _require(
            type(entropy) is dict
            and _strings(entropy.get("layers"))
            and _strings(entropy.get("classes"))
            and _is_int(entropy.get("every", 0)),
            "entropy",
            "{every, layers, classes, ...}",
        )


def _check_step(body: dict[str, Any]) -> None:
    _require(_is_int(body.get("step")), "step", "an integer")
    if "loss" in body:
        _require(_is_number(body["loss"]), "loss", "a number")
    if "time" in body:
        _require(
            type(body["time"]) is dict and all(_is_int(v) for v in body["time"].values()),
            "time",
            "a map of counters (batch, epoch, sample, ...) to integers",
        )
    if "skipped" in body:
        _require(type(body["skipped"]) is bool, "skipped", "true or false")
    examples = body.get("examples", {})
    _require(
        type(examples) is dict and all(_ints(ids) for ids in examples.values()),
        "examples",
        "a map of class signatures to example indices",
    )
    _require(_ints(body.get("dropped", [])), "dropped", "a list of example indices")
    counts = body.get("counts", {})
    _require(
        type(counts) is dict and all(_is_int(n) for n in counts.values()), "counts", "a map of classes to integers"
    )
    if "fingerprints" in body:
        _require(_optional_str_map(body["fingerprints"]), "fingerprints", "a map of names to digests")
    contributions = body.get("contributions", {})
    _require(
        type(contributions) is dict
        and all(
            type(cells) is list
            and all(
                type(cell) is list
                and len(cell) == 3
                and _is_int(cell[0])
                and _is_number(cell[1])
                and _is_number(cell[2])
                for cell in cells
            )
            for cells in contributions.values()
        ),
        "contributions",
        "per signature a list of [layer, norm, share]",
    )
    if "expert_tokens" in body:
        tokens = body["expert_tokens"]
        _require(
            type(tokens) is dict
            and all(
                type(table) is list and all(type(row) is list and all(_is_int(n) for n in row) for row in table)
                for table in tokens.values()
            ),
            "expert_tokens",
            "per class a table of token counts (layers x experts)",
        )
    for field in ("layers", "entropy"):
        if field in body:
            _require(
                type(body[field]) is list
                and all(type(row) is list and all(v is None or _is_number(v) for v in row) for row in body[field]),
                field,
                "a table of numbers",
            )


@dataclass(frozen=True)
class TreeHead:
    """A signed statement: the ledger's first ``size`` entries have Merkle root ``root``.

    ``final`` marks the head written when training finished; a ledger whose
    last head is not final was cut short (a crash, or someone truncating it).
    ``weights`` (heads signed with a checkpoint) is the sha256 of the model's
    weights at that point (``smalti.checkpoint.weights_sha256``): what binds a
    model file to the ledger, and a fine-tune's starting point to its parent.

    The signed message is a C2SP checkpoint (``smalti.trust.note``):
    the ledger's ``origin`` (its log name, unique per run), size, root and
    Smalti's extension lines; the signature is the Ed25519 note signature of
    the key named ``origin``, so Go's note package, witnesses and tlog clients
    check it as they check any transparency log's.
    """

    size: int
    root: bytes
    timestamp: str
    final: bool
    key_id: str = ""
    signature: bytes = b""
    weights: str = ""
    origin: str = ""

    @classmethod
    def signed(
        cls, key: Any, origin: str, size: int, root: bytes, final: bool, weights: str = "", timestamp: str | None = None
    ) -> "TreeHead":
        """A head signed now by ``key`` (a ``SigningKey``)."""
        import datetime as _dt

        stamp = timestamp or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        unsigned = cls(size=size, root=root, timestamp=stamp, final=final, weights=weights, origin=origin)
        return dataclasses.replace(unsigned, key_id=key.public.key_id, signature=key.sign(unsigned.message()))

    def message(self) -> bytes:
        from smalti.trust.note import checkpoint_text

        extensions = [
            f"smalti-format {formats.TREE_HEAD}",
            f"smalti-time {self.timestamp}",
            f"smalti-final {'true' if self.final else 'false'}",
        ]
        if self.weights:
            extensions.append(f"smalti-weights {self.weights}")
        return checkpoint_text(self.origin, self.size, self.root, extensions).encode()

    def note(self, public: bytes) -> str:
        """The head as a C2SP signed note (``public``: the raw Ed25519 key that signed it)."""
        from smalti.trust.note import signature_line

        return self.message().decode() + "\n" + signature_line(self.origin, public, self.signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": self.root.hex(),
            "timestamp": self.timestamp,
            "final": self.final,
            "key_id": self.key_id,
            "signature": self.signature.hex(),
            "weights": self.weights,
            "origin": self.origin,
            "message": self.message().decode(),
        }

    @staticmethod
    def states_itself(head: dict[str, Any]) -> bool:
        """Whether a head's JSON says in its signed message what its fields say (size, root, time, flag,
        weights): the fields are only a reading aid, the message is what is signed."""
        from smalti.trust.note import Checkpoint, NoteError

        try:
            checkpoint = Checkpoint.parse(head["message"])
            return (
                checkpoint.origin == head["origin"]
                and checkpoint.size == head["size"]
                and checkpoint.root.hex() == head["root"]
                and checkpoint.extension("time") == head["timestamp"]
                and checkpoint.extension("final") == ("true" if head["final"] else "false")
                and (checkpoint.extension("weights") or "") == (head.get("weights") or "")
                and checkpoint.extension("format") == formats.TREE_HEAD
            )
        except (KeyError, TypeError, NoteError):
            return False
