"""A donor's piece store on a real folder: verified atomic puts, reads, audits, capacity."""

from __future__ import annotations

import os

import pytest

from dgpt.exceptions import InvalidRequest, NotFound, PieceCorrupt, StoreFull
from dgpt.storage import merkle
from dgpt.storage.piece_store import PieceStore, stored_bytes

LEAF = 256


def piece(size: int = 1000) -> tuple[str, bytes]:
    data = os.urandom(size)
    return merkle.piece_id(data, LEAF), data


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_get_range_leaves_delete(tmp_path):
    store = PieceStore(tmp_path, 10**6)
    pid, data = piece()
    assert store.put(pid, [data[:10], data[10:]], len(data), LEAF) is True
    assert store.put(pid, [data], len(data), LEAF) is False  # idempotent
    assert store.get(pid) == data
    assert store.get(pid, 100, 300) == data[100:300]
    assert store.get(pid, 900, 5000) == data[900:]
    piece_bytes, leaf_bytes, blob = store.leaf_hashes(pid)
    assert (piece_bytes, leaf_bytes) == (1000, LEAF)
    assert blob == b"".join(merkle.leaf_hashes(data, LEAF))
    assert store.stats().used_bytes == stored_bytes(1000, LEAF) == os.path.getsize(tmp_path / "pieces" / pid[:2] / pid)
    assert store.list() == [(pid, stored_bytes(1000, LEAF))]
    assert store.delete(pid) is True and store.delete(pid) is False
    with pytest.raises(NotFound):
        store.get(pid)
    assert store.stats().used_bytes == 0


def test_a_body_that_does_not_match_its_id_leaves_nothing(tmp_path):
    store = PieceStore(tmp_path, 10**6)
    pid, data = piece()
    bad = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(PieceCorrupt, match="not the claimed"):
        store.put(pid, [bad], len(bad), LEAF)
    with pytest.raises(InvalidRequest, match="piece body has 999 bytes"):
        store.put(pid, [data[:999]], 1000, LEAF)
    with pytest.raises(InvalidRequest, match="longer than"):
        store.put(pid, [data, b"x"], 1000, LEAF)
    with pytest.raises(InvalidRequest, match="64 lower-case hex"):
        store.put("../../etc/passwd", [data], 1000, LEAF)
    assert files_under(tmp_path) == []
    assert store.stats().used_bytes == 0


def test_capacity_is_enforced(tmp_path):
    pid, data = piece(1000)
    need = stored_bytes(1000, LEAF)
    store = PieceStore(tmp_path, 2 * need + 10)
    store.put(pid, [data], 1000, LEAF)
    pid2, data2 = piece(1000)
    store.put(pid2, [data2], 1000, LEAF)
    pid3, data3 = piece(1000)
    with pytest.raises(StoreFull, match=f"needs {need} bytes, 10 of"):
        store.put(pid3, [data3], 1000, LEAF)
    assert not store.has(pid3) and store.stats().pieces == 2
    store.delete(pid)
    assert store.put(pid3, [data3], 1000, LEAF)


def test_restart_finds_pieces_and_drops_interrupted_puts(tmp_path):
    store = PieceStore(tmp_path, 10**6)
    pid, data = piece()
    store.put(pid, [data], 1000, LEAF)
    (tmp_path / "tmp" / "half-written").write_bytes(b"xx")  # a put a crash interrupted
    again = PieceStore(tmp_path, 10**6)
    assert again.get(pid) == data
    assert again.stats().used_bytes == store.stats().used_bytes
    assert not (tmp_path / "tmp" / "half-written").exists()


def test_a_failing_writer_leaves_no_file(tmp_path):
    store = PieceStore(tmp_path, 10**6)
    pid, data = piece()

    def chunks():
        yield data[:500]
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put(pid, chunks(), 1000, LEAF)
    assert files_under(tmp_path) == []
    assert store.stats().used_bytes == 0


def test_audit_answers_a_leaf_and_its_path(tmp_path):
    store = PieceStore(tmp_path, 10**6)
    pid, data = piece(1000)
    store.put(pid, [data], 1000, LEAF)
    for i in range(merkle.leaf_count(1000, LEAF)):
        proof = store.audit(pid, i, "nonce-123")
        assert proof.nonce == "nonce-123"
        assert merkle.verify_leaf(pid, 1000, LEAF, i, proof.leaf, proof.path)
    with pytest.raises(InvalidRequest, match="outside 0..3"):
        store.audit(pid, 4, "nonce-123")
    # Rot on disk: the proof no longer verifies.
    path = tmp_path / "pieces" / pid[:2] / pid
    raw = bytearray(path.read_bytes())
    raw[LEAF + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    proof = store.audit(pid, 1, "nonce-123")
    assert not merkle.verify_leaf(pid, 1000, LEAF, 1, proof.leaf, proof.path)
