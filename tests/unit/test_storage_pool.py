"""The segment pool (worker processes over shared memory) gives byte-for-byte the inline results."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from dgpt.storage import crypto, merkle
from dgpt.storage.codec import codec_for
from dgpt.storage.crypto import StripeCipher
from dgpt.storage.pool import SegmentPool
from dgpt.storage.segment import open_stripes, seal_segment

STRIPE = 64 * 1024


@pytest.fixture(scope="module")
def pool():
    p = SegmentPool(workers=2, slots=2, slot_bytes=64 << 20)
    assert p.usable(1)
    yield p
    workers = [w.proc.pid for w in p._workers]
    p.close()
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_seal_and_open_match_the_inline_path(pool):
    key, file_id = crypto.new_file_key(), "file-pool"
    data = os.urandom(5 * 1024 * 1024 + 12345)
    codec = codec_for(4, 12)
    inline = seal_segment(StripeCipher(key, file_id), codec, 7, data, STRIPE)
    pooled = pool.seal(key, file_id, 4, 12, 7, memoryview(data), STRIPE)
    try:
        assert pooled.sealed.piece_ids == inline.piece_ids
        for i in range(12):
            piece = bytes(pooled.sealed.pieces[i][0])
            assert piece == inline.piece(i)
            assert merkle.piece_id(piece, inline.layout.leaf_bytes) == inline.piece_ids[i]
    finally:
        pooled.release()
    layout = inline.layout
    for survivors in ([0, 1, 2, 3], [4, 7, 9, 11], [1, 5, 8, 10]):
        for stripes in (range(layout.stripes), range(3, 9)):
            lo, hi = layout.piece_span(stripes)
            pieces = {i: inline.piece(i)[lo:hi] for i in survivors}
            views, slot = pool.open(key, file_id, layout, 7, stripes, pieces)
            try:
                got = b"".join(views)
            finally:
                slot.release()
            want = b"".join(open_stripes(StripeCipher(key, file_id), codec, layout, 7, stripes, pieces))
            assert got == want == data[stripes.start * STRIPE : stripes.start * STRIPE + len(want)]


def test_slots_leave_nothing_in_shared_memory(pool):
    assert not [p for p in Path("/dev/shm").glob("dgpt-slot-*")] if Path("/dev/shm").is_dir() else True


def test_work_too_big_for_a_slot_is_refused(pool):
    assert not pool.usable(pool.slot_bytes + 1)


def test_the_data_path_uses_the_pool_for_big_segments(pool, tmp_path):
    from dgpt.exceptions import PieceServerUnreachable
    from dgpt.storage.datapath import StorageClient
    from dgpt.storage.metadata import MetadataStore
    from dgpt.storage.models import DonorSpec, ProfileSpec
    from dgpt.storage.piece_server import PieceService
    from dgpt.storage.piece_store import PieceStore
    from dgpt.storage.service import StorageOptions, StorageService
    from dgpt.storage.transport import LocalTransport

    svc = StorageService(MetadataStore(tmp_path / "m.sqlite"), crypto.new_secret(),
                         StorageOptions(profile=ProfileSpec(k=4, n=12, repair_at=7)))
    transport = LocalTransport()
    for i in range(14):
        url = f"local://d{i}"
        transport.services[url] = PieceService(PieceStore(tmp_path / f"d{i}", 1 << 30, fsync=False), f"d{i}",
                                               svc.donor_key(f"d{i}"))
        svc.register_donor(DonorSpec(donor_id=f"d{i}", owner=f"o{i}", url=url, capacity_bytes=1 << 30))
    data = os.urandom(13 * 1024 * 1024)  # one 13 MiB segment: over the pool's threshold
    taken_before = len(pool._available)
    entry = StorageClient(svc, transport, pool=pool).write_bytes("big.bin", data)
    assert len(pool._available) == taken_before  # every slot came back
    # Worst case: the data pieces are gone, so every stripe is decoded from parity.
    lost = {p.piece_id for p in svc.store.pieces(entry.file_id) if p.index < 8}

    class Lossy(LocalTransport):
        def get(self, url, piece_id, capability, start=0, end=None):
            if piece_id in lost:
                raise PieceServerUnreachable("gone")
            return super().get(url, piece_id, capability, start, end)

    reader = StorageClient(svc, Lossy(transport.services), pool=pool)
    assert reader.read_bytes("big.bin") == data
    assert reader.read_bytes("big.bin", 5_000_000, 5_000_100) == data[5_000_000:5_000_100]
    assert reader.stats.decoded >= 1 and reader.stats.systematic == 0
    assert StorageClient(svc, transport, pool=None).read_bytes("big.bin") == data  # inline agrees
    assert len(pool._available) == taken_before
