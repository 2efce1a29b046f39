"""The metadata service on a real SQLite file: two-phase writes, namespace, garbage, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dgpt.exceptions import InvalidRequest, NotEnoughDonors, NotFound, StorageError, WriteConflict
from dgpt.storage.codec import codec_for
from dgpt.storage.crypto import StripeCipher
from dgpt.storage.metadata import MetadataStore, check_invariant_used_bytes
from dgpt.storage.models import DonorSpec, PieceSpec, ProfileSpec, StoredPiece
from dgpt.storage.segment import seal_segment
from dgpt.storage.service import StorageOptions, StorageService

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def make_service(path: Path, clock, donors: int = 8, profile=(2, 4, 3), secret: bytes | None = None) -> StorageService:
    options = StorageOptions(profile=ProfileSpec(k=profile[0], n=profile[1], repair_at=profile[2]),
                             segment_bytes=3000, stripe_plain_bytes=1000, gc_grace_s=100, write_ttl_s=500)
    svc = StorageService(MetadataStore(path), secret or b"s" * 32, options, clock=clock)
    for i in range(donors):
        svc.register_donor(DonorSpec(donor_id=f"d{i}", owner=f"o{i}", url=f"local://d{i}", capacity_bytes=10**7))
    return svc


@pytest.fixture
def svc(tmp_path, clock):
    return make_service(tmp_path / "meta.sqlite", clock)


def write(svc: StorageService, path: str, size: int, commit: bool = True, overwrite: bool = True):
    """Plan a write and place its segments (no uploads: metadata only); commit unless told not to."""
    plan = svc.begin_write(path, overwrite=overwrite)
    profile = plan.profile.profile()
    codec = codec_for(profile.k, profile.n)
    cipher = StripeCipher(plan.file_key, plan.file_id)
    data = os.urandom(size)
    stored = []
    for seg, start in enumerate(range(0, size, plan.segment_bytes)):
        sealed = seal_segment(cipher, codec, seg, data[start : start + plan.segment_bytes], plan.stripe_plain_bytes)
        specs = [PieceSpec(index=i, piece_id=pid, piece_bytes=sealed.layout.piece_bytes,
                           leaf_bytes=sealed.layout.leaf_bytes) for i, pid in enumerate(sealed.piece_ids)]
        placement = svc.place_segment(plan.write_id, seg, sealed.layout.plain_bytes, specs)
        stored += [StoredPiece(segment=seg, index=t.index, donor_id=t.donor_id) for t in placement.targets]
    if commit:
        return plan, svc.commit_write(plan.write_id, size, stored)
    return plan, stored


def test_a_write_is_invisible_until_commit(svc):
    plan, stored = write(svc, "data/a.bin", 7000, commit=False)
    with pytest.raises(NotFound):
        svc.info("data/a.bin")
    assert [e.path for e in svc.ls("")] == []
    entry = svc.commit_write(plan.write_id, 7000, stored)
    assert entry.size == 7000 and entry.profile == "rs-2-of-4"
    assert svc.info("data").type == "directory"
    assert [e.path for e in svc.ls("data")] == ["data/a.bin"]
    layout = svc.open_read("data/a.bin")
    assert [s.plain_bytes for s in layout.segments] == [3000, 3000, 1000]
    assert [s.offset for s in layout.segments] == [0, 3000, 6000]
    with pytest.raises(WriteConflict, match="already committed"):
        svc.commit_write(plan.write_id, 7000, stored)
    check_invariant_used_bytes(svc.store)


def test_each_segment_puts_at_most_one_piece_per_donor_and_owner(tmp_path, clock):
    svc = make_service(tmp_path / "m.sqlite", clock, donors=0)
    for i in range(12):  # 12 donors, 5 owners
        svc.register_donor(DonorSpec(donor_id=f"d{i}", owner=f"o{i % 5}", url=f"local://d{i}", capacity_bytes=10**7))
    write(svc, "f", 9000)
    file_id = svc.info("f").file_id
    for seg in range(3):
        rows = svc.store.pieces(file_id, seg)
        assert len(rows) == 4
        assert len({r.donor_id for r in rows}) == 4 and len({r.owner for r in rows}) == 4


def test_commit_checks_what_the_client_claims(svc):
    plan, stored = write(svc, "f", 4000, commit=False)
    with pytest.raises(InvalidRequest, match="segments hold 4000 bytes"):
        svc.commit_write(plan.write_id, 3999, stored)
    with pytest.raises(InvalidRequest, match="was not placed on donor"):
        svc.commit_write(plan.write_id, 4000, [*stored[:-1], StoredPiece(segment=1, index=3, donor_id="elsewhere")])
    too_few = [s for s in stored if not (s.segment == 1 and s.index >= 2)]  # 2 of 4 < repair_at + 1
    with pytest.raises(InvalidRequest, match="fewer than 4 stored pieces"):
        svc.commit_write(plan.write_id, 4000, too_few)
    with pytest.raises(NotFound):
        svc.info("f")
    assert svc.commit_write(plan.write_id, 4000, stored).size == 4000


def test_bad_placement_requests_are_refused(svc):
    plan = svc.begin_write("f")
    spec = dict(piece_id="a" * 64, piece_bytes=1, leaf_bytes=1)
    with pytest.raises(InvalidRequest, match="do not match"):
        svc.place_segment(plan.write_id, 0, 100, [PieceSpec(index=0, **spec)])
    with pytest.raises(InvalidRequest, match="distinct indexes"):
        svc.place_segment(plan.write_id, 0, 100, [PieceSpec(index=4, **spec)])
    with pytest.raises(InvalidRequest, match="plain_bytes must be"):
        svc.place_segment(plan.write_id, 0, 3001, [PieceSpec(index=0, **spec)])
    with pytest.raises(InvalidRequest, match="'..' component"):
        svc.begin_write("a/../b")


def test_abort_and_expiry_leave_collectable_garbage(svc, clock):
    plan, _ = write(svc, "gone-soon", 5000, commit=False)
    reserved = svc.store.charged_bytes()
    assert sum(reserved.values()) > 0
    svc.abort_write(plan.write_id)
    assert svc.store.garbage_count() == 8  # 2 segments x 4 pieces
    with pytest.raises(WriteConflict, match="unknown, aborted or expired"):
        svc.commit_write(plan.write_id, 5000, [])
    plan2, stored2 = write(svc, "stale", 2000, commit=False)
    clock.now += 501
    assert svc.expire() == (1, 0)
    with pytest.raises(WriteConflict):
        svc.commit_write(plan2.write_id, 2000, stored2)
    assert svc.store.garbage_count() == 12
    # The aborted write's 8 pieces are past the grace period; the expired write's 4 are not yet.
    assert sum(len(b.piece_ids) for b in svc.delete_batches()) == 8
    clock.now += 101
    batches = svc.delete_batches()
    assert sum(len(b.piece_ids) for b in batches) == 12
    svc.forget_garbage([(b.donor_id, p) for b in batches for p in b.piece_ids])
    assert all(d.used_bytes == 0 for d in svc.donors())
    check_invariant_used_bytes(svc.store)


def test_overwrite_replaces_atomically_and_keeps_old_pieces_for_the_grace_period(svc, clock):
    _, first = write(svc, "f", 1000)
    old_pieces = {p.piece_id for p in svc.store.pieces(first.file_id)}
    plan, stored = write(svc, "f", 2000, commit=False)
    assert svc.info("f").file_id == first.file_id  # still the old version
    second = svc.commit_write(plan.write_id, 2000, stored)
    assert svc.info("f").file_id == second.file_id and svc.info("f").size == 2000
    garbage = {g.piece_id for g in svc.store.garbage(clock.now + 1)}
    assert garbage == old_pieces
    with pytest.raises(WriteConflict, match="already exists"):
        svc.begin_write("f", overwrite=False)
    check_invariant_used_bytes(svc.store)


def test_namespace_operations(svc):
    svc.mkdir("a/b/c")
    assert svc.info("a/b").type == "directory"
    with pytest.raises(WriteConflict, match="already exists"):
        svc.mkdir("a/b")
    svc.mkdir("a/b", exist_ok=True)
    with pytest.raises(NotFound, match="parent directory"):
        svc.mkdir("x/y", parents=False)
    write(svc, "a/b/file", 100)
    assert [(e.path, e.type) for e in svc.ls("a/b")] == [("a/b/c", "directory"), ("a/b/file", "file")]
    assert [e.path for e in svc.ls("a/b/file")] == ["a/b/file"]
    with pytest.raises(WriteConflict, match="not empty"):
        svc.rmdir("a/b")
    with pytest.raises(WriteConflict, match="is a directory"):
        svc.begin_write("a/b/c")
    with pytest.raises(WriteConflict, match="is a file"):
        svc.begin_write("a/b/file/deeper")
    with pytest.raises(WriteConflict, match="is a file"):
        svc.mkdir("a/b/file")
    moved = svc.rename("a/b/file", "z/file2")
    assert moved.path == "z/file2" and svc.info("z").type == "directory"
    with pytest.raises(NotFound):
        svc.info("a/b/file")
    svc.rmdir("a/b/c")
    assert [e.path for e in svc.find("")] == ["z/file2"]
    svc.delete("z/file2")
    with pytest.raises(NotFound):
        svc.delete("z/file2")
    with pytest.raises(NotFound):
        svc.ls("nothing/here")


def test_too_few_donors_is_a_clear_error(tmp_path, clock):
    svc = StorageService(MetadataStore(tmp_path / "m.sqlite"), b"s" * 32, clock=clock)
    for i in range(2):
        svc.register_donor(DonorSpec(donor_id=f"d{i}", owner="same", url=f"local://d{i}", capacity_bytes=10**7))
    with pytest.raises(NotEnoughDonors, match="at least 3 donors of distinct owners"):
        svc.begin_write("f")


def test_a_restarted_head_must_bring_the_same_secret(tmp_path, clock):
    path = tmp_path / "m.sqlite"
    make_service(path, clock, secret=b"a" * 32).store.close()
    with pytest.raises(StorageError, match="does not match"):
        make_service(path, clock, secret=b"b" * 32)


def test_donor_states_decide_what_counts(svc):
    _, entry = write(svc, "f", 1000)
    (counts,) = svc.segment_counts()
    assert (counts.durable, counts.readable) == (4, 4)
    donors = [p.donor_id for p in svc.store.pieces(entry.file_id)]
    svc.set_donor_state(donors[0], "offline")
    svc.set_donor_state(donors[1], "gone")
    (counts,) = svc.segment_counts()
    assert (counts.durable, counts.readable) == (3, 2)
    grant = svc.grant_read(entry.file_id, [0])[0]
    assert {p.donor_id for p in grant.pieces} == set(donors[2:])
    assert donors[0] not in {c.donor_id for c in svc.candidates()}


# ------------------------------------------------------------------ crash safety

CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.unit.test_storage_metadata import make_service, write
    svc = make_service(Path({path!r}), time.time)
    i = 0
    while True:
        plan, stored = write(svc, f"f/{{i}}", 2500 + i, commit=False)
        print("begun", i, flush=True)
        entry = svc.commit_write(plan.write_id, 2500 + i, stored)
        print("committed", i, entry.file_id, flush=True)
        i += 1
        if i == {stop_at}:
            write(svc, "half-written", 9000, commit=False)
            print("half", flush=True)
            time.sleep(60)
    """
)


def run_child(path: Path, stop_at: int, kill_after_line: str | None = None):
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(path), stop_at=stop_at)],
                            stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if kill_after_line and line.startswith(kill_after_line):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return lines


def test_sigkill_mid_write_loses_no_committed_file(tmp_path, clock):
    path = tmp_path / "meta.sqlite"
    lines = run_child(path, stop_at=5, kill_after_line="half")
    committed = {int(line.split()[1]): line.split()[2] for line in lines if line.startswith("committed")}
    assert sorted(committed) == [0, 1, 2, 3, 4]
    svc = make_service(path, clock)
    for i, file_id in committed.items():
        entry = svc.info(f"f/{i}")
        assert (entry.file_id, entry.size) == (file_id, 2500 + i)
        assert len(svc.store.pieces(file_id)) == 4 * len(svc.store.segments(file_id))
    with pytest.raises(NotFound):
        svc.info("half-written")
    assert [e.path for e in svc.find("")] == [f"f/{i}" for i in sorted(committed, key=str)]
    # The half-written file's pieces are collected once its write expires.
    clock.now = time.time() + 10_000
    assert svc.expire() == (1, 0)
    assert svc.store.garbage_count() == 12
    check_invariant_used_bytes(svc.store)


def test_sigkill_during_a_stream_of_commits(tmp_path, clock):
    path = tmp_path / "meta.sqlite"
    # Killed as soon as the 8th write says it is about to commit: mid-commit, or just before.
    lines = run_child(path, stop_at=10_000, kill_after_line="begun 7")
    committed = {int(line.split()[1]): line.split()[2] for line in lines if line.startswith("committed")}
    begun = {int(line.split()[1]) for line in lines if line.startswith("begun")}
    assert sorted(committed) == list(range(7)), lines[-5:]
    svc = make_service(path, clock)
    present = {int(e.path.split("/")[1]): e for e in svc.find("f")}
    for i, file_id in committed.items():
        assert present[i].file_id == file_id and present[i].size == 2500 + i
    # A commit the kill interrupted is either all there or not there at all.
    for i in set(present) - set(committed):
        assert i in begun and i == max(begun)
        assert len(svc.store.pieces(present[i].file_id)) == 4
    check_invariant_used_bytes(svc.store)
