"""The entry encoding: packed float32 tables that decode to the plain lists readers use, and only one byte
string per content (a leaf hash must not depend on how a writer happened to spell the same numbers)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from smalti.trust.entry import (HEADER, HEADER_SIZE, LEGACY_MAGIC, ZERO_HASH, EntryFormatError,
                                             canonical_json, decode_entry, encode_entry, encode_packed_entry,
                                             pack_table)

HAMLET, TEMPEST = "gutenberg/tragedy/hamlet", "gutenberg/comedy/tempest"


def _step(**overrides):
    body = {
        "kind": "step", "step": 7, "time": {"batch": 7, "epoch": 0}, "loss": 2.5, "skipped": False,
        "examples": {HAMLET: [3, 9], TEMPEST: [4]}, "dropped": [], "counts": {HAMLET: 2, TEMPEST: 1},
        "layers": [[1, 0.5, 0.001, None, 12.0, 0.75], [0, 0.0, 0.0, None, 3.0, 0.0], [1, 0.25, None, -0.5, 0.0, 1.5]],
        "contributions": {HAMLET: [[0, 0.5, 0.625], [2, 1.25, 1.0]], TEMPEST: [[0, 0.25, 0.375]]},
        "entropy": [[0.5, 0.75, 1.0], [0.25, 0.125, 0.0625]],
    }
    body.update(overrides)
    return body


def _stored(data: bytes) -> dict:
    return json.loads(data[HEADER_SIZE:])


def _restore(data: bytes, stored: dict) -> bytes:
    return data[:HEADER_SIZE] + json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()


def test_step_entries_round_trip_through_packed_tables():
    body = _step()
    data = encode_entry(3, ZERO_HASH, body)
    stored = _stored(data)
    assert set(stored["layers"]) == {"f32", "shape"} and stored["layers"]["shape"] == [3, 6]
    table = np.frombuffer(base64.b64decode(stored["layers"]["f32"]), "<f4").reshape(3, 6)  # any tool reads it
    assert table[0, 4] == 12.0 and math.isnan(table[0, 3])
    decoded = decode_entry(data)
    assert decoded.index == 3 and decoded.previous_leaf == ZERO_HASH
    got = decoded.body
    for key in ("kind", "step", "time", "loss", "skipped", "examples", "dropped", "counts"):
        assert got[key] == body[key]
    for row, expected in zip(got["layers"], body["layers"]):
        assert type(row[0]) is int and row[0] == expected[0]
        assert [v is None for v in row] == [v is None for v in expected]
        assert [v for v in row[1:] if v is not None] == pytest.approx([v for v in expected[1:] if v is not None],
                                                                       rel=1e-7)
    assert got["contributions"] == body["contributions"]  # these values are exact in float32
    assert got["entropy"] == body["entropy"]
    assert encode_entry(3, ZERO_HASH, got) == data  # the decoded body is the same entry


def test_tables_packed_from_arrays_are_the_bytes_of_the_lists():
    """The trainer packs its arrays directly; the entry must be byte for byte the one the lists give (NaN for
    null, a signature's table cut after the last layer it reached, an empty one for none), or its leaf hash
    would depend on the writer."""
    body = _step(layers=[[1, 0.1, 1 / 3, None, 12.0, 0.7], [0, 0.0, None, None, 3.0, 0.0]],
                 contributions={HAMLET: [[0, 0.1, 2 / 3], [2, 1e-3, 1 / 3]], TEMPEST: [[1, 0.2, 1.0]], "none": []},
                 entropy=[[0.1, 0.2], [0.3, float("nan")]])
    packed = dict(body)
    packed["layers"] = pack_table(np.array([[1, 0.1, 1 / 3, np.nan, 12.0, 0.7], [0, 0.0, np.nan, np.nan, 3.0, 0.0]]))
    packed["contributions"] = {HAMLET: pack_table(np.array([[0.1, 2 / 3], [0.0, 0.0], [1e-3, 1 / 3]])),
                               TEMPEST: pack_table(np.array([[0.0, 0.0], [0.2, 1.0]])),
                               "none": pack_table(np.zeros((0, 2)))}
    packed["entropy"] = pack_table(np.array([[0.1, 0.2], [0.3, np.nan]]))
    assert encode_packed_entry(5, ZERO_HASH, packed) == encode_entry(5, ZERO_HASH, body)
    packed["contributions"][TEMPEST] = pack_table(np.array([[0.0, 0.0], [0.2, 1.0], [0.0, 0.0]]))  # not cut
    assert encode_packed_entry(5, ZERO_HASH, packed) != encode_entry(5, ZERO_HASH, body)


def test_non_finite_numbers_decode_to_strings_and_undefined_ones_to_null():
    body = _step(layers=[[1, float("nan"), None, float("inf"), float("-inf"), 1.0]],
                 contributions={HAMLET: [[0, float("inf"), float("nan")]]}, entropy=[[float("nan"), 1.0]])
    got = decode_entry(encode_entry(1, ZERO_HASH, body)).body
    assert got["layers"] == [[1, "nan", None, "inf", "-inf", 1.0]]
    assert got["contributions"] == {HAMLET: [[0, "inf", "nan"]]}
    assert got["entropy"] == [["nan", 1.0]]
    json.dumps(got, allow_nan=False)  # exports stay valid JSON


def test_packing_halves_the_entry():
    rng = np.random.default_rng(0)
    layers = [[1] + rng.random(5).tolist() for _ in range(27)]
    cells = {c: [[j, *rng.random(2).tolist()] for j in range(27)] for c in (HAMLET, TEMPEST, "x/y")}
    body = _step(layers=layers, contributions=cells)
    del body["entropy"]
    packed = len(encode_entry(1, ZERO_HASH, body))
    decimal = len(HEADER.pack(LEGACY_MAGIC, 1, ZERO_HASH) + canonical_json(body))
    assert packed < 0.6 * decimal, (packed, decimal)


def _tamper_layers(stored: dict, change) -> dict:
    table = np.frombuffer(base64.b64decode(stored["layers"]["f32"]), "<u4").copy()
    change(table)
    stored["layers"]["f32"] = base64.b64encode(table.tobytes()).decode()
    return stored


@pytest.mark.parametrize("tamper, message", [
    (lambda s: _tamper_layers(s, lambda t: t.__setitem__(3, 0x7FC00001)), "canonical"),  # another NaN
    (lambda s: _tamper_layers(s, lambda t: t.__setitem__(3, 0xFFC00000)), "canonical"),  # a negative NaN
    (lambda s: _tamper_layers(s, lambda t: t.__setitem__(0, 0x3F000000)), "updated flag"),  # updated = 0.5
    (lambda s: {**s, "layers": {**s["layers"], "f32": s["layers"]["f32"][:-4] + "!!!!"}}, "not base64"),
    (lambda s: {**s, "layers": {**s["layers"], "shape": [3, 5]}}, "do not hold a 3 x 5"),
    (lambda s: {**s, "layers": {**s["layers"], "extra": 1}}, "not a packed float32 table"),
    (lambda s: {**s, "layers": [[1, 0.5]]}, "not a packed float32 table"),
    (lambda s: {**s, "contributions": {HAMLET: {"shape": [1, 2], "f32": base64.b64encode(
        np.array([[0.0, 0.5]], "<f4").tobytes()).decode()}}}, "canonical"),  # a share without a norm
    (lambda s: {**s, "contributions": {HAMLET: {"shape": [1, 3], "f32": base64.b64encode(
        np.zeros((1, 3), "<f4").tobytes()).decode()}}}, r"not a \(norm, share\) table"),
])
def test_a_table_spelled_another_way_is_not_an_entry(tamper, message):
    data = encode_entry(1, ZERO_HASH, _step())
    with pytest.raises(EntryFormatError, match=message):
        decode_entry(_restore(data, tamper(_stored(data))))


def test_format_1_entries_decode_as_before():
    body = _step()
    old = HEADER.pack(LEGACY_MAGIC, 1, ZERO_HASH) + canonical_json(body)
    assert decode_entry(old).body == json.loads(canonical_json(body))
    with pytest.raises(EntryFormatError, match="canonical"):
        decode_entry(old.replace(b'"loss":2.5', b'"loss":2.50'))
    with pytest.raises(EntryFormatError, match="bad header"):
        decode_entry(b"TSL9" + old[4:])


@pytest.mark.parametrize("chunk", [1 << 16, 32], ids=["whole", "chunked"])
@pytest.mark.parametrize("seed", range(5))
def test_layer_gram_matrices_equal_float64_dot_products(seed, chunk):
    """FlatLayout.gram gives every per-layer norm and dot product the recorder records, in one pass; with
    ``chunk`` 32 large layers are summed in pieces (503 elements, a prime, cannot be: it is summed whole)."""
    import torch

    from smalti.governance.ledger.layout import FlatLayout

    rng = np.random.default_rng(seed)
    numels = rng.choice([0, 3, 8, 64, 500, 503], size=12).tolist()
    n_layers = 5
    layer_of = rng.integers(-1, n_layers, size=12)  # -1: a parameter no layer owns (not laid out)
    layout = FlatLayout(numels, layer_of, n_layers, chunk=chunk)
    rows = torch.randn(4, layout.size, generator=torch.Generator().manual_seed(seed))
    rows[2, : layout.size // 3] = 0.0  # a signature that never reached some layers: exactly zero there
    gram = layout.gram(rows)
    assert gram.shape == (n_layers, 4, 4)
    for layer, (a, b) in enumerate(layout.layer_spans):
        block = rows[:, a:b].double()
        assert b - a == sum(n for n, owner in zip(numels, layer_of) if owner == layer)
        assert torch.allclose(gram[layer].double(), block @ block.T, rtol=1e-5, atol=1e-4)
        if b > a and not rows[2, a:b].any():
            assert gram[layer, 2, 2] == 0.0 and (gram[layer, 2] == 0.0).all()


def test_chunk_lengths_divide_the_layer():
    from smalti.governance.ledger.layout import chunk_length

    assert chunk_length(768 * 3072 + 3072) == 49216 and (768 * 3072 + 3072) % 49216 == 0
    assert chunk_length(1536) == 1536  # short enough to sum whole
    assert chunk_length(1 << 20) == 1 << 16
    assert chunk_length(1_000_003) == 1_000_003  # a prime: no divisor, summed whole
    assert chunk_length(500, longest=32) == 25 and chunk_length(503, longest=32) == 503
