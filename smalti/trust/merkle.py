"""RFC 6962 (Certificate Transparency) Merkle trees, on bytes.

    leaf hash  = SHA-256(0x00 || leaf data)
    node hash  = SHA-256(0x01 || left || right)
    empty tree = SHA-256("")

The tree over n leaves splits at k, the largest power of two smaller than n
(RFC 6962 section 2.1), so proofs made here verify with any CT tooling and
vice versa. Proof verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

_LEAF, _NODE = b"\x00", b"\x01"


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of the leaves, computed level by level.

    Pairing neighbours and carrying an unpaired last node up unchanged builds
    exactly RFC 6962's left-balanced tree, without recursion.
    """
    if not leaf_hashes:
        return hashlib.sha256(b"").digest()
    level, sha256 = list(leaf_hashes), hashlib.sha256
    while len(level) > 1:
        paired = [sha256(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class Frontier:
    """A growing tree kept as its perfect subtrees, so appending and taking the root are O(log n).

    The trainer appends one leaf per step and signs roots at checkpoints;
    ``smalti ledger verify`` checks every signed tree head in one pass over
    the entries instead of rebuilding the tree for each.
    """

    def __init__(self) -> None:
        self.size = 0
        self._subtrees: list[tuple[int, bytes]] = []  # (leaves, hash), sizes strictly decreasing

    def append(self, leaf: bytes) -> None:
        self._push(1, leaf)

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Append many leaves: the same tree as appending them one by one, built a level at a time.

        The run is cut into the largest perfect subtrees that start where the tree ends (a subtree of
        2**k leaves must start at a multiple of 2**k), each hashed by :func:`root` a level at a time,
        which is what lets verification keep up with hashing the entries themselves.
        """
        position, end = 0, len(leaves)
        while position < end:
            size = self.size & -self.size or 1 << (end - position).bit_length()
            while size > end - position:
                size >>= 1
            self._push(size, root(leaves[position : position + size]))
            position += size

    @property
    def subtrees(self) -> list[tuple[int, bytes]]:
        """The perfect subtrees (leaf count, hash), largest first: all a tree needs to grow or give its root."""
        return list(self._subtrees)

    def grafted(self, subtrees: Sequence[tuple[int, bytes]]) -> Frontier:
        """This tree followed by the leaves another frontier holds as ``subtrees``, as a new frontier.

        What lets several processes build one tree: a worker builds the tree of its own span of
        leaves, and the spans join here without rehashing a leaf. The span must start where a tree
        of its size may start (this size a multiple of the smallest power of two holding it), so its
        subtrees are the very subtrees appending its leaves one by one would make.
        """
        added = sum(size for size, _ in subtrees)
        if added and self.size % (1 << (added - 1).bit_length()):
            raise ValueError(f"a span of {added} leaves cannot be grafted at size {self.size}")
        joined = Frontier()
        joined.size, joined._subtrees = self.size, list(self._subtrees)
        for size, node in subtrees:
            joined._push(size, node)
        return joined

    def _push(self, size: int, node: bytes) -> None:
        self.size += size
        while self._subtrees and self._subtrees[-1][0] == size:
            left = self._subtrees.pop()[1]
            size, node = size * 2, node_hash(left, node)
        self._subtrees.append((size, node))

    def root(self) -> bytes:
        """RFC 6962's root: the perfect subtrees folded from the right (each split is a power of two)."""
        if not self._subtrees:
            return hashlib.sha256(b"").digest()
        node = self._subtrees[-1][1]
        for _, left in reversed(self._subtrees[:-1]):
            node = node_hash(left, node)
        return node


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The audit path PATH(index, D[n]) of RFC 6962 section 2.1.1."""
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise IndexError(f"leaf {index} outside a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return inclusion_proof(index, leaf_hashes[:k]) + [root(leaf_hashes[k:])]
    return inclusion_proof(index - k, leaf_hashes[k:]) + [root(leaf_hashes[:k])]


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """Whether ``proof`` shows the leaf hash ``leaf`` at ``index`` of a tree of ``size`` with ``expected_root``."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def consistency_proof(first: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(first, D[n]) of RFC 6962 section 2.1.2: the first ``first`` leaves are a prefix."""
    n = len(leaf_hashes)
    if not 0 < first <= n:
        raise ValueError(f"consistency proof needs 0 < first ({first}) <= size ({n})")
    return _subproof(first, leaf_hashes, True)


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return _subproof(m, leaves[:k], complete) + [root(leaves[k:])]
    return _subproof(m - k, leaves[k:], False) + [root(leaves[:k])]


def verify_consistency(first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes) -> bool:
    """Whether ``proof`` shows the tree of ``first`` leaves is a prefix of the tree of ``second``."""
    if first < 1 or first > second:
        return False
    if first == second:
        return len(proof) == 0 and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:  # first is a power of two: its root is the first node of the path
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


class Tree:
    """Every complete, aligned subtree's hash over a fixed list of leaves (about 2n hashes), so that the root
    of any prefix, and inclusion and consistency proofs for any size up to n, cost O(log^2 n) hashes instead
    of rehashing the leaves: what a service answering many proofs over one signed tree keeps."""

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        self.levels: list[list[bytes]] = [list(leaf_hashes)]
        sha256 = hashlib.sha256
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            self.levels.append([sha256(_NODE + below[i] + below[i + 1]).digest() for i in range(0, len(below) - 1, 2)])

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def __len__(self) -> int:
        return sum(len(level) for level in self.levels)

    def root(self, start: int = 0, stop: int | None = None) -> bytes:
        """MTH(D[start:stop]) for a range the RFC's recursion visits (``start`` aligned to the range's split)."""
        stop = self.size if stop is None else stop
        n = stop - start
        if n <= 0:
            return hashlib.sha256(b"").digest()
        height = n.bit_length() - 1
        if n == 1 << height and start % n == 0:
            return self.levels[height][start >> height]
        k = _split(n)
        return node_hash(self.root(start, start + k), self.root(start + k, stop))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[size]), as :func:`inclusion_proof` gives it."""
        size = self.size if size is None else size
        if not 0 <= index < size <= self.size:
            raise IndexError(f"leaf {index} outside a tree of {size}")
        path: list[bytes] = []
        start, stop = 0, size
        while stop - start > 1:
            k = _split(stop - start)
            if index < start + k:
                path.append(self.root(start + k, stop))
                stop = start + k
            else:
                path.append(self.root(start, start + k))
                start += k
        return path[::-1]

    def consistency_proof(self, first: int, size: int | None = None) -> list[bytes]:
        """PROOF(first, D[size]), as :func:`consistency_proof` gives it."""
        size = self.size if size is None else size
        if not 0 < first <= size <= self.size:
            raise ValueError(f"consistency proof needs 0 < first ({first}) <= size ({size}) <= {self.size}")
        path: list[bytes] = []
        start, stop, m, complete = 0, size, first, True
        while m != stop - start:
            k = _split(stop - start)
            if m <= k:
                path.append(self.root(start + k, stop))
                stop = start + k
            else:
                path.append(self.root(start, start + k))
                start, m, complete = start + k, m - k, False
        if not complete:
            path.append(self.root(start, stop))
        return path[::-1]
