"""RFC 6962 Merkle trees against Certificate Transparency's published test vectors."""

import hashlib
import random

import pytest

from smalti.trust import merkle

# The CT reference leaves and the published tree heads for sizes 0..8 (RFC 6962 test vectors,
# as used by google/certificate-transparency and transparency-dev/merkle).
LEAVES = [bytes.fromhex(h) for h in
          ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = [  # (1-based leaf, tree size, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CONSISTENCY = [  # (first size, second size, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
HASHES = [merkle.leaf_hash(leaf) for leaf in LEAVES]


def reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, transcribed literally (recursive, on raw leaf data)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + reference_mth(leaves[:k]) + reference_mth(leaves[k:])).digest()


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1:]


def test_published_roots_for_every_size():
    for size, expected in enumerate(ROOTS):
        assert merkle.root(HASHES[:size]).hex() == expected


@pytest.mark.parametrize("size", range(0, 70))
def test_root_agrees_with_the_literal_rfc_definition(size):
    leaves = [bytes([i % 256, i // 256]) * (i % 3) for i in range(size)]
    assert merkle.root([merkle.leaf_hash(x) for x in leaves]) == reference_mth(leaves)


@pytest.mark.parametrize("leaf, size, proof", INCLUSION)
def test_published_inclusion_proofs(leaf, size, proof):
    expected = [bytes.fromhex(p) for p in proof]
    assert merkle.inclusion_proof(leaf - 1, HASHES[:size]) == expected
    assert merkle.verify_inclusion(leaf - 1, size, HASHES[leaf - 1], expected, bytes.fromhex(ROOTS[size]))


@pytest.mark.parametrize("first, second, proof", CONSISTENCY)
def test_published_consistency_proofs(first, second, proof):
    expected = [bytes.fromhex(p) for p in proof]
    assert merkle.consistency_proof(first, HASHES[:second]) == expected
    assert merkle.verify_consistency(first, second, expected, bytes.fromhex(ROOTS[first]), bytes.fromhex(ROOTS[second]))


def _tree(size):
    return [merkle.leaf_hash(f"entry {i}".encode()) for i in range(size)]


@pytest.mark.parametrize("size", range(1, 65))
def test_every_leaf_verifies_and_any_flipped_byte_fails(size):
    leaves = _tree(size)
    top = merkle.root(leaves)
    for index in range(size):
        proof = merkle.inclusion_proof(index, leaves)
        assert merkle.verify_inclusion(index, size, leaves[index], proof, top)
        assert not merkle.verify_inclusion(index, size, _flip(leaves[index], index % 32), proof, top)
        assert not merkle.verify_inclusion(index, size, leaves[index], proof, _flip(top, 5))
        for p in range(len(proof)):
            broken = list(proof)
            broken[p] = _flip(broken[p], (p * 7) % 32)
            assert not merkle.verify_inclusion(index, size, leaves[index], broken, top)
        if size > 1:
            assert not merkle.verify_inclusion((index + 1) % size, size, leaves[index], proof, top)
            assert not merkle.verify_inclusion(index, size, leaves[index], proof[:-1], top) or not proof
            assert not merkle.verify_inclusion(index, size, leaves[index], proof + [top], top)
        assert not merkle.verify_inclusion(index, size * 2, leaves[index], proof, top)


@pytest.mark.parametrize("second", range(1, 41))
def test_consistency_between_all_prefixes(second):
    leaves = _tree(second)
    second_root = merkle.root(leaves)
    for first in range(1, second + 1):
        first_root = merkle.root(leaves[:first])
        proof = merkle.consistency_proof(first, leaves)
        assert merkle.verify_consistency(first, second, proof, first_root, second_root)
        if first < second:
            assert not merkle.verify_consistency(first, second, proof, _flip(first_root, 0), second_root)
            assert not merkle.verify_consistency(first, second, proof, first_root, _flip(second_root, 31))
            for p in range(len(proof)):
                broken = list(proof)
                broken[p] = _flip(broken[p], 3)
                assert not merkle.verify_consistency(first, second, broken, first_root, second_root)
            assert not merkle.verify_consistency(first, second, proof[:-1], first_root, second_root)
            assert not merkle.verify_consistency(first, second, proof + [second_root], first_root, second_root)


def test_out_of_range_inputs():
    with pytest.raises(IndexError):
        merkle.inclusion_proof(3, HASHES[:3])
    with pytest.raises(ValueError):
        merkle.consistency_proof(0, HASHES)
    assert not merkle.verify_inclusion(0, 0, HASHES[0], [], bytes.fromhex(ROOTS[0]))
    assert not merkle.verify_consistency(2, 1, [], HASHES[0], HASHES[0])


@pytest.mark.parametrize("size", range(0, 70))
def test_frontier_roots_equal_the_tree_roots_at_every_size(size):
    leaves = _tree(size)
    frontier = merkle.Frontier()
    for n, leaf in enumerate(leaves, 1):
        frontier.append(leaf)
        assert frontier.size == n and frontier.root() == merkle.root(leaves[:n])
    assert frontier.root() == merkle.root(leaves)


@pytest.mark.parametrize("seed", range(20))
def test_frontier_extend_builds_the_same_tree_as_appending_one_by_one(seed):
    """Verification extends the tree a run at a time; any cut of the leaves into runs gives the same roots."""
    rng = random.Random(seed)
    leaves = _tree(rng.randrange(1, 300))
    one_by_one, in_runs = merkle.Frontier(), merkle.Frontier()
    for leaf in leaves:
        one_by_one.append(leaf)
    position = 0
    while position < len(leaves):
        run = rng.randrange(1, 70)
        in_runs.extend(leaves[position:position + run])
        position = min(len(leaves), position + run)
        assert in_runs.size == position and in_runs.root() == merkle.root(leaves[:position])
    assert in_runs.root() == one_by_one.root() and in_runs.size == one_by_one.size


@pytest.mark.parametrize("span", [1, 2, 8, 64])
def test_spans_built_apart_and_grafted_give_the_trees_roots(span):
    """Parallel verification: workers build the trees of aligned spans, the parent grafts them and roots at any
    size inside a span come from the tree so far plus the span's subtrees up to there."""
    leaves = _tree(5 * span + span // 2 + 1)
    joined = merkle.Frontier()
    for start in range(0, len(leaves), span):
        part = merkle.Frontier()
        for n, leaf in enumerate(leaves[start:start + span], start + 1):
            part.append(leaf)
            assert joined.grafted(part.subtrees).root() == merkle.root(leaves[:n])
        joined = joined.grafted(part.subtrees)
        assert joined.size == min(start + span, len(leaves))
    assert joined.root() == merkle.root(leaves) and joined.subtrees == _appended(leaves).subtrees


def _appended(leaves: list[bytes]) -> merkle.Frontier:
    frontier = merkle.Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier


@pytest.mark.parametrize("at, leaves", [(1, 2), (2, 3), (4, 5), (6, 4), (12, 8)])
def test_a_span_that_does_not_start_where_its_tree_may_is_refused(at, leaves):
    tree, span = _appended(_tree(at)), _appended(_tree(leaves))
    with pytest.raises(ValueError, match=f"a span of {leaves} leaves cannot be grafted at size {at}"):
        tree.grafted(span.subtrees)
