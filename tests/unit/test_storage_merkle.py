"""Piece ids (BLAKE3 Merkle roots) and one-leaf proofs."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from dgpt.storage import merkle


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.integers(min_value=1, max_value=400), st.data())
def test_every_leaf_proves_against_the_id(data, leaf_bytes, draw):
    pid = merkle.piece_id(data, leaf_bytes)
    hashes = merkle.leaf_hashes(data, leaf_bytes)
    count = merkle.leaf_count(len(data), leaf_bytes)
    assert len(hashes) == count
    i = draw.draw(st.integers(min_value=0, max_value=count - 1))
    leaf = data[i * leaf_bytes : (i + 1) * leaf_bytes]
    path = merkle.proof(hashes, i)
    assert merkle.verify_leaf(pid, len(data), leaf_bytes, i, leaf, path)
    # Any change to the leaf, its index, or the path is caught.
    flipped = bytes([leaf[0] ^ 1]) + leaf[1:]
    assert not merkle.verify_leaf(pid, len(data), leaf_bytes, i, flipped, path)
    other = (i + 1) % count
    if count > 1 and hashes[other] != hashes[i]:  # identical leaves genuinely sit at both places
        assert not merkle.verify_leaf(pid, len(data), leaf_bytes, other, leaf, path)
    if count > 1:
        assert not merkle.verify_leaf(pid, len(data), leaf_bytes, i, leaf, path[:-1])
        bad_path = [bytes(32)] + list(path[1:])
        assert not merkle.verify_leaf(pid, len(data), leaf_bytes, i, leaf, bad_path)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=5000), st.integers(min_value=1, max_value=700),
       st.lists(st.integers(min_value=1, max_value=900), min_size=1, max_size=20))
def test_hasher_is_independent_of_chunking(data, leaf_bytes, cuts):
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(data[pos : pos + c])
        pos += c
    chunks.append(data[pos:])
    pid, hashes = merkle.hash_chunks(chunks, leaf_bytes)
    assert pid == merkle.piece_id(data, leaf_bytes)
    assert hashes == merkle.leaf_hashes(data, leaf_bytes)


def test_id_binds_length_and_leaf_size():
    data = os.urandom(1000)
    assert merkle.piece_id(data, 100) != merkle.piece_id(data, 200)
    assert merkle.piece_id(data, 100) != merkle.piece_id(data[:999], 100)
    assert merkle.piece_id(data, 1000) == merkle.piece_id(data, 1000)
    assert merkle.is_piece_id(merkle.piece_id(data, 100))
    assert not merkle.is_piece_id("ABC")


def test_leaf_is_not_an_inner_node():
    """Domain separation: a piece made of two leaf hashes does not share the root of its parent."""
    a, b = os.urandom(32), os.urandom(32)
    leaves = [merkle.leaf_hash(a), merkle.leaf_hash(b)]
    forged = leaves[0] + leaves[1]
    assert merkle.root(leaves) != merkle.root([merkle.leaf_hash(forged)])
