"""The storage tier on real piece-server processes: lost donors, rot on disk, repair, graceful leave.

No Ray here: each donor is a ``python -m dgpt.storage.piece_server`` process with its own
folder, port and key; the metadata service runs in the test process over a SQLite file.
"""

from __future__ import annotations

import os
import random

import httpx
import pytest

from dgpt.exceptions import DataUnavailable, NotFound
from dgpt.storage.codec import Profile
from dgpt.storage.metadata import check_invariant_used_bytes
from dgpt.storage.repair import Auditor, Repairer, collect_garbage, endangered
from tests.integration.storage_cluster import StorageCluster, start_cluster

# Small test fabrics get small profiles, which warn on every write; the warning is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:profile rs-:UserWarning")

DONORS = 8  # eligible owners 8 -> the default profile is rs-2-of-6, repair at 4


@pytest.fixture
def cluster(tmp_path):
    """A cluster of its own, for tests that kill donors or take them away."""
    c = start_cluster(tmp_path, DONORS)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One cluster for the tests that leave every donor running (each uses its own files)."""
    c = start_cluster(tmp_path_factory.mktemp("shared"), DONORS)
    yield c
    c.stop()


def test_profile_follows_the_fleet(shared):
    cluster = shared
    assert cluster.service.choose_profile() == Profile(2, 6, 4)
    for d in list(cluster.servers)[:4]:
        cluster.service.set_donor_state(d, "offline")
    with pytest.warns(UserWarning, match="survives only 2 lost donor"):
        assert cluster.service.choose_profile() == Profile(2, 4, 3)
    for d in list(cluster.servers)[:4]:
        cluster.service.set_donor_state(d, "online")


def test_read_back_after_sigkill_of_n_minus_k_holders(cluster):
    client = cluster.client()
    data = os.urandom(700_000)  # 3 segments of 256 KiB, 4 stripes each
    entry = client.write_bytes("runs/a.bin", data)
    assert entry.profile == "rs-2-of-6"
    file_id = entry.file_id
    holders_seg0 = sorted({p.donor_id for p in cluster.service.store.pieces(file_id, 0)})
    victims = holders_seg0[:4]  # n - k of the processes holding segment 0, including data pieces
    for d in victims:
        cluster.servers[d].kill()
        assert not cluster.servers[d].alive()
    # The head has not noticed anything: reads find out for themselves.
    fresh = cluster.client()
    assert fresh.read_bytes("runs/a.bin") == data
    assert fresh.stats.failed >= 1  # it did try dead donors and moved on
    assert fresh.read_bytes("runs/a.bin", 300_000, 300_123) == data[300_000:300_123]
    assert fresh.read_bytes("runs/a.bin", 699_990) == data[699_990:]
    # One more loss in segment 0 is one too many: a clear error, not garbage.
    survivors = sorted({p.donor_id for p in cluster.service.store.pieces(file_id, 0)} - set(victims))
    cluster.servers[survivors[0]].kill()
    with pytest.raises(DataUnavailable, match="only 1 of the 2 pieces"):
        cluster.client().read_bytes("runs/a.bin", 0, 10)


def test_repair_after_donors_are_declared_gone(cluster):
    client = cluster.client()
    data = os.urandom(500_000)
    entry = client.write_bytes("r.bin", data)
    victims = cluster.holders("r.bin")[:3]
    for d in victims:
        cluster.servers[d].kill()
        cluster.service.set_donor_state(d, "gone")  # what the head does after a long silence
    due = endangered(cluster.service.segment_counts())
    assert due and all(c.durable <= 4 for c in due)
    alive_before = {c.segment: c.durable for c in due}
    outcomes = Repairer(cluster.service, client).run_once()
    assert {(o.file_id, o.segment) for o in outcomes} == {(c.file_id, c.segment) for c in due}
    assert endangered(cluster.service.segment_counts()) == []
    for o in outcomes:
        # 5 donors are left: each repaired segment ends with one piece on every one of them.
        assert len(o.rebuilt) == 5 - alive_before[o.segment] and not set(o.moved_to) & set(victims)
        rows = cluster.service.store.pieces(entry.file_id, o.segment)
        live = [r for r in rows if r.donor_state != "gone"]
        assert len(live) == 5 and len({r.owner for r in live}) == 5
    assert cluster.client().read_bytes("r.bin") == data
    check_invariant_used_bytes(cluster.service.store)


def test_corrupt_piece_is_detected_read_around_and_repaired(shared):
    cluster = shared
    client = cluster.client()
    data = os.urandom(200_000)  # one segment
    entry = client.write_bytes("c.bin", data)
    (row,) = [p for p in cluster.service.store.pieces(entry.file_id, 0) if p.index == 0]  # a data piece: always read
    path = cluster.piece_file(row.donor_id, row.piece_id)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x55
    path.write_bytes(bytes(raw))
    # No hedged extra read: with one, the two good pieces can win the race and the rotten one
    # is never looked at.
    reader = cluster.client(extra_reads=lambda k: 0)
    assert reader.read_bytes("c.bin") == data
    assert reader.stats.corrupt == 1
    (bad,) = [p for p in cluster.service.store.pieces(entry.file_id, 0) if p.index == 0]
    assert bad.state == "bad"  # the reader reported it
    (outcome,) = Repairer(cluster.service, client).run_once()
    assert outcome.rebuilt == (0,) and outcome.moved_to[0] != row.donor_id
    (fixed,) = [p for p in cluster.service.store.pieces(entry.file_id, 0) if p.index == 0]
    assert fixed.state == "stored" and fixed.piece_id == row.piece_id and fixed.donor_id != row.donor_id
    assert cluster.piece_file(fixed.donor_id, fixed.piece_id).exists()
    # The rotten copy is garbage now, and the collector deletes it from the donor's disk.
    assert collect_garbage(cluster.service, client).deleted >= 1
    assert not path.exists()
    again = cluster.client()
    assert again.read_bytes("c.bin") == data and again.stats.corrupt == 0
    check_invariant_used_bytes(cluster.service.store)


def test_audit_catches_rot_and_a_missing_piece(shared):
    cluster = shared
    client = cluster.client()
    client.write_bytes("audit.bin", os.urandom(300_000))
    file_id = cluster.service.info("audit.bin").file_id
    rows = cluster.service.store.pieces(file_id)
    rotten, missing = rows[0], rows[7]
    for leaf_offset in range(0, rotten.stored_bytes - 4096, 4096):  # rot every leaf: any challenge fails
        path = cluster.piece_file(rotten.donor_id, rotten.piece_id)
        raw = bytearray(path.read_bytes())
        raw[leaf_offset] ^= 1
        path.write_bytes(bytes(raw))
    # A piece deleted behind the store's back (a disk swap, a cleanup tool).
    cluster.piece_file(missing.donor_id, missing.piece_id).unlink()
    recorded = []

    class Sink:
        def record(self, result):
            recorded.append(result)

    results = Auditor(cluster.service, client, sink=Sink(), rng=random.Random(7)).run_once(count=10_000)
    by_piece = {r.piece_id: r for r in results}
    assert {p.piece_id for p in rows} <= set(by_piece)  # every piece of the cluster was challenged
    assert by_piece[rotten.piece_id].outcome == "failed" and "does not match" in by_piece[rotten.piece_id].reason
    assert by_piece[missing.piece_id].outcome == "failed"
    assert {r.piece_id for r in results if r.outcome != "passed"} == {rotten.piece_id, missing.piece_id}
    assert recorded == results
    views = {d.donor_id: d for d in cluster.service.donors()}
    assert views[rotten.donor_id].audits_failed >= 1 and views[missing.donor_id].audits_failed >= 1
    states = {(p.segment, p.index): p.state for p in cluster.service.store.pieces(file_id)}
    assert states[(rotten.segment, rotten.index)] == "bad" and states[(missing.segment, missing.index)] == "bad"
    Repairer(cluster.service, client).run_once()
    assert all(p.state == "stored" for p in cluster.service.store.pieces(file_id))
    assert all(r.outcome == "passed" for r in Auditor(cluster.service, client).run_once(count=100))


def test_graceful_leave_moves_pieces_first(cluster):
    client = cluster.client()
    files = {f"leave/{i}": os.urandom(150_000 + i * 50_000) for i in range(3)}
    for path, data in files.items():
        client.write_bytes(path, data)
    leaver = max(cluster.servers, key=lambda d: len(cluster.service.pieces_on(d)))
    moving = len(cluster.service.pieces_on(leaver))
    assert moving > 0
    before = {(c.file_id, c.segment): c.durable for c in cluster.service.segment_counts()}
    seen = []

    def check(outcome):
        for c in cluster.service.segment_counts():
            # Never a durable piece less than before, never down to the repair threshold.
            assert c.durable >= before[(c.file_id, c.segment)] and c.durable > c.profile.repair_at, c
        seen.append(outcome)

    outcomes = Repairer(cluster.service, client).drain_donor(leaver, on_moved=check)
    assert len(outcomes) == len(seen) == moving
    assert cluster.service.store.donor_state(leaver) == "gone"
    assert cluster.service.pieces_on(leaver) == []
    cluster.servers[leaver].kill()  # now it may vanish: nothing depends on it
    reader = cluster.client()
    for path, data in files.items():
        assert reader.read_bytes(path) == data
    assert reader.stats.failed == 0


def test_a_process_server_gives_nothing_without_a_capability(shared):
    cluster = shared
    client = cluster.client()
    entry = client.write_bytes("secret.bin", b"x" * 5000)
    row = cluster.service.store.pieces(entry.file_id, 0)[0]
    url = cluster.servers[row.donor_id].url
    with httpx.Client() as http:
        assert http.get(f"{url}/v1/pieces/{row.piece_id}").status_code == 401
        assert http.delete(f"{url}/v1/pieces/{row.piece_id}").status_code == 401
        # A capability for another donor is useless here.
        other = next(d for d in cluster.servers if d != row.donor_id)
        from dgpt.storage.capability import Op

        foreign = cluster.service.admin_capability(other, [Op.GET, Op.DELETE], [row.piece_id])
        headers = {"Authorization": f"Bearer {foreign}"}
        assert http.get(f"{url}/v1/pieces/{row.piece_id}", headers=headers).status_code == 401
        assert http.delete(f"{url}/v1/pieces/{row.piece_id}", headers=headers).status_code == 401
    assert cluster.piece_file(row.donor_id, row.piece_id).exists()
    assert client.read_bytes("secret.bin") == b"x" * 5000


def test_a_failed_write_leaves_no_file_and_its_pieces_are_collected(shared: StorageCluster):
    cluster = shared
    client = cluster.client()
    before = {(g.donor_id, g.piece_id) for g in cluster.service.store.garbage(float("inf"), 10_000)}

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with client.writer("broken.bin") as w:
            w.write(os.urandom(600_000))  # two full segments sealed, at least the first uploaded
            raise Boom()
    with pytest.raises(NotFound):
        cluster.service.info("broken.bin")  # nothing visible
    orphans = {(g.donor_id, g.piece_id) for g in cluster.service.store.garbage(float("inf"), 10_000)} - before
    assert len(orphans) >= 6
    uploaded = [o for o in orphans if cluster.piece_file(*o).exists()]
    assert uploaded  # they did reach the donors' disks
    outcome = collect_garbage(cluster.service, client)
    assert outcome.deleted >= len(orphans) and outcome.unreachable == 0
    assert not [o for o in orphans if cluster.piece_file(*o).exists()]
    check_invariant_used_bytes(cluster.service.store)
