"""Segments: seal (encrypt + erasure-code + hash) and open, whole or by stripe range."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgpt.exceptions import StorageError
from dgpt.storage import crypto, merkle
from dgpt.storage.codec import codec_for
from dgpt.storage.crypto import StripeCipher
from dgpt.storage.segment import SegmentLayout, open_stripes, rebuild_pieces, seal_segment

STRIPE = 1000  # small stripes keep the examples fast; the arithmetic is the same


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([(2, 3), (2, 6), (4, 12), (16, 48)]), st.integers(min_value=1, max_value=7 * STRIPE),
       st.data())
def test_seal_and_open_any_range(kn, size, draw):
    k, n = kn
    codec = codec_for(k, n)
    cipher = StripeCipher(crypto.new_file_key(), "f1")
    data = os.urandom(size)
    sealed = seal_segment(cipher, codec, 3, data, STRIPE)
    layout = sealed.layout
    assert layout.plain_bytes == size and len(sealed.pieces) == n
    for i in range(n):
        piece = sealed.piece(i)
        assert len(piece) == layout.piece_bytes
        assert merkle.piece_id(piece, layout.leaf_bytes) == sealed.piece_ids[i]
    start = draw.draw(st.integers(min_value=0, max_value=size - 1))
    end = draw.draw(st.integers(min_value=start + 1, max_value=size))
    stripes = layout.stripes_for(start, end)
    lo, hi = layout.piece_span(stripes)
    survivors = draw.draw(st.permutations(range(n)))[:k]
    pieces = {i: sealed.piece(i)[lo:hi] for i in survivors}
    plain = b"".join(open_stripes(cipher, codec, layout, 3, stripes, pieces))
    base = stripes.start * STRIPE
    assert plain[start - base : end - base] == data[start:end]


def test_stripes_are_bound_to_their_position_and_file():
    codec = codec_for(2, 3)
    key = crypto.new_file_key()
    data = os.urandom(3 * STRIPE)
    sealed = seal_segment(StripeCipher(key, "f1"), codec, 0, data, STRIPE)
    pieces = {i: sealed.piece(i) for i in range(2)}
    layout = sealed.layout
    # The right file, key and segment open it.
    assert b"".join(open_stripes(StripeCipher(key, "f1"), codec, layout, 0, range(3), pieces)) == data
    with pytest.raises(StorageError, match="fails authentication"):
        open_stripes(StripeCipher(key, "f1"), codec, layout, 1, range(3), pieces)  # another segment's nonces
    with pytest.raises(StorageError, match="fails authentication"):
        open_stripes(StripeCipher(key, "f2"), codec, layout, 0, range(3), pieces)  # another file
    with pytest.raises(StorageError, match="fails authentication"):
        open_stripes(StripeCipher(crypto.new_file_key(), "f1"), codec, layout, 0, range(3), pieces)
    # Stripe 1's bytes presented as stripe 0 fail: the nonce is positional.
    a0, a1 = layout.fragment_span(0)
    b0, b1 = layout.fragment_span(1)
    swapped = {i: p[b0:b1] + p[a1:b0] for i, p in pieces.items()}
    with pytest.raises(StorageError, match="fails authentication"):
        open_stripes(StripeCipher(key, "f1"), codec, layout, 0, range(1), swapped)


def test_rebuild_gives_the_same_pieces():
    codec = codec_for(4, 12)
    sealed = seal_segment(StripeCipher(crypto.new_file_key(), "f"), codec, 0, os.urandom(5 * STRIPE + 17), STRIPE)
    missing = [0, 3, 7, 8, 9, 10, 11, 1]
    have = {i: sealed.piece(i) for i in range(12) if i not in missing}
    rebuilt = rebuild_pieces(codec, sealed.layout, have, missing)
    assert {i: merkle.piece_id(p, sealed.layout.leaf_bytes) for i, p in rebuilt.items()} == \
        {i: sealed.piece_ids[i] for i in missing}


def test_layout_arithmetic():
    layout = SegmentLayout(4, 12, 10 * STRIPE + 1, STRIPE)
    assert layout.stripes == 11
    assert layout.stripe_plain(10) == 1
    assert layout.stripes_for(0, 1) == range(0, 1)
    assert layout.stripes_for(STRIPE - 1, STRIPE + 1) == range(0, 2)
    assert layout.stripes_for(10 * STRIPE, 10 * STRIPE + 1) == range(10, 11)
    assert layout.piece_span(range(0, 11)) == (0, layout.piece_bytes)
    assert layout.leaves == merkle.leaf_count(layout.piece_bytes, layout.leaf_bytes)
    with pytest.raises(ValueError, match="outside"):
        layout.stripes_for(0, 10 * STRIPE + 2)
    with pytest.raises(ValueError, match="plain_bytes"):
        SegmentLayout(4, 12, 0)


def test_file_keys_wrap_and_refuse_tampering():
    secret = crypto.new_secret()
    wrap = crypto.wrapping_key(secret)
    key = crypto.new_file_key()
    wrapped = crypto.wrap_file_key(wrap, key, "file-a")
    assert crypto.unwrap_file_key(wrap, wrapped, "file-a") == key
    with pytest.raises(StorageError, match="does not unwrap"):
        crypto.unwrap_file_key(wrap, wrapped, "file-b")
    with pytest.raises(StorageError, match="does not unwrap"):
        crypto.unwrap_file_key(crypto.wrapping_key(crypto.new_secret()), wrapped, "file-a")
    # Donor keys differ per donor and never equal the wrapping key.
    assert crypto.donor_storage_key(secret, "a") != crypto.donor_storage_key(secret, "b")
    assert crypto.donor_storage_key(secret, "wrap-v1") != wrap
    with pytest.raises(ValueError, match="at least 16 bytes"):
        crypto.donor_storage_key(b"short", "a")
