"""Piece ids: a BLAKE3 Merkle root over a piece's fixed-size leaves, and proofs for one leaf.

A piece is cut into leaves of ``leaf_bytes`` (the last may be shorter). Then

    leaf hash   h_i = BLAKE3(0x00 || leaf_i)
    inner node      = BLAKE3(0x01 || left || right)     (an odd node out is carried up as is)
    piece id        = hex BLAKE3("dgpt-piece-v1" || u64 piece_bytes || u32 leaf_bytes || root)

The prefixes keep leaves, inner nodes and ids from ever colliding with one another, and the
id binds the length and leaf size, so a piece cannot be truncated or re-cut unnoticed. Any
one leaf is checked against the id with its sibling path (about log2(leaves) hashes): that
is what an audit asks a donor for, and what a range read checks.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import blake3

HASH_BYTES = 32
_LEAF = b"\x00"
_NODE = b"\x01"
_ID_DOMAIN = b"dgpt-piece-v1"
_ID_RE = re.compile(r"^[0-9a-f]{64}$")


def is_piece_id(text: str) -> bool:
    """True if ``text`` looks like a piece id (64 lower-case hex digits)."""
    return bool(_ID_RE.match(text))


def leaf_hash(leaf: bytes | bytearray | memoryview) -> bytes:
    h = blake3.blake3(_LEAF)
    h.update(leaf)
    return h.digest()


def _node(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(_NODE + left + right).digest()


def leaf_count(piece_bytes: int, leaf_bytes: int) -> int:
    """Number of leaves of a piece (an empty piece has one empty leaf)."""
    if leaf_bytes <= 0:
        raise ValueError(f"leaf_bytes must be positive, got {leaf_bytes}")
    return max(1, -(-piece_bytes // leaf_bytes))


def leaf_hashes(data: bytes | memoryview, leaf_bytes: int) -> list[bytes]:
    """The leaf hashes of a whole piece."""
    view = memoryview(data)
    count = leaf_count(len(view), leaf_bytes)
    return [leaf_hash(view[i * leaf_bytes : (i + 1) * leaf_bytes]) for i in range(count)]


def root(hashes: Sequence[bytes]) -> bytes:
    """The Merkle root of leaf hashes."""
    if not hashes:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = list(hashes)
    while len(level) > 1:
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def piece_id_from_root(tree_root: bytes, piece_bytes: int, leaf_bytes: int) -> str:
    return blake3.blake3(_ID_DOMAIN + struct.pack("<QI", piece_bytes, leaf_bytes) + tree_root).hexdigest()


def piece_id(data: bytes | memoryview, leaf_bytes: int) -> str:
    """The id of a whole piece."""
    return piece_id_from_root(root(leaf_hashes(data, leaf_bytes)), len(data), leaf_bytes)


def piece_id_from_hashes(hashes: Sequence[bytes], piece_bytes: int, leaf_bytes: int) -> str:
    return piece_id_from_root(root(hashes), piece_bytes, leaf_bytes)


class PieceHasher:
    """Builds a piece id from chunks that arrive in any sizes (a request body, fragments)."""

    def __init__(self, leaf_bytes: int) -> None:
        if leaf_bytes <= 0:
            raise ValueError(f"leaf_bytes must be positive, got {leaf_bytes}")
        self.leaf_bytes = leaf_bytes
        self.hashes: list[bytes] = []
        self.size = 0
        self._partial = bytearray()

    def update(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        self.size += len(view)
        if self._partial:
            take = min(len(view), self.leaf_bytes - len(self._partial))
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) == self.leaf_bytes:
                self.hashes.append(leaf_hash(self._partial))
                self._partial.clear()
        whole = len(view) - len(view) % self.leaf_bytes
        for start in range(0, whole, self.leaf_bytes):
            self.hashes.append(leaf_hash(view[start : start + self.leaf_bytes]))
        if whole < len(view):
            self._partial += view[whole:]

    def finish(self) -> tuple[str, list[bytes]]:
        """(piece id, leaf hashes)."""
        hashes = list(self.hashes)
        if self._partial or not hashes:
            hashes.append(leaf_hash(self._partial))
        return piece_id_from_hashes(hashes, self.size, self.leaf_bytes), hashes


def hash_chunks(chunks: Iterable[bytes | memoryview], leaf_bytes: int) -> tuple[str, list[bytes]]:
    """(piece id, leaf hashes) of a piece given as consecutive chunks."""
    hasher = PieceHasher(leaf_bytes)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.finish()


def proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes from leaf ``index`` up to the root (levels with no sibling are skipped)."""
    if not 0 <= index < len(hashes):
        raise IndexError(f"leaf {index} out of range 0..{len(hashes) - 1}")
    path: list[bytes] = []
    level = list(hashes)
    i = index
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        nxt = [_node(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
        i //= 2
    return path


def root_from_proof(leaf_digest: bytes, index: int, count: int, path: Sequence[bytes]) -> bytes:
    """Recompute the root from one leaf hash and its sibling path.

    Raises:
        ValueError: the path has the wrong length for ``index`` in a tree of ``count`` leaves.
    """
    if not 0 <= index < count:
        raise ValueError(f"leaf {index} out of range for {count} leaves")
    node = leaf_digest
    width = count
    i = index
    used = 0
    while width > 1:
        sibling = i ^ 1
        if sibling < width:
            if used >= len(path):
                raise ValueError("Merkle path too short")
            other = path[used]
            used += 1
            node = _node(node, other) if i % 2 == 0 else _node(other, node)
        width = (width + 1) // 2
        i //= 2
    if used != len(path):
        raise ValueError("Merkle path too long")
    return node


@dataclass(frozen=True, slots=True)
class LeafProof:
    """A donor's answer to an audit: one leaf, its sibling path, and the challenge's nonce."""

    piece_id: str
    leaf_index: int
    leaf: bytes
    path: tuple[bytes, ...]
    nonce: str


def verify_leaf(expected_piece_id: str, piece_bytes: int, leaf_bytes: int, leaf_index: int,
                leaf: bytes, path: Sequence[bytes]) -> bool:
    """True if ``leaf`` at ``leaf_index`` belongs to the piece ``expected_piece_id``."""
    count = leaf_count(piece_bytes, leaf_bytes)
    if not 0 <= leaf_index < count:
        return False
    expected_len = leaf_bytes if leaf_index < count - 1 else piece_bytes - leaf_bytes * (count - 1)
    if len(leaf) != expected_len:
        return False
    try:
        tree_root = root_from_proof(leaf_hash(leaf), leaf_index, count, path)
    except ValueError:
        return False
    return piece_id_from_root(tree_root, piece_bytes, leaf_bytes) == expected_piece_id
