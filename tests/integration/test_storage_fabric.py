"""The storage tier on a real local fabric: real donor agents serve pieces, the head keeps the metadata.

One fabric for the module: a head and five donor agents (each its own owner, 2 GiB of disk
offered, a piece server on its own port), two of them active in Ray, three standby. Files
go in and out through the CLI and the SDK (REST), and through ``DonorFileSystem()`` in Ray
tasks (the control-plane actor). Donors are killed whole (agent, `ray start`, raylet and
workers SIGKILLed), leave gracefully (`dgpt donor leave`), and the control-plane actor is
killed; no committed file is lost.

Run under the host-wide lock: ``flock /tmp/dgpt-fabric.lock pytest tests/integration/test_storage_fabric.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dgpt.config import Settings
from dgpt.head.fabric import api_client
from dgpt.head.paths import head_paths
from dgpt.head.process import shell_env
from dgpt.sdk.client import Client
from tests.integration.conftest import fabric_settings, wait_for
from tests.integration.test_fabric import _control_plane_procs

N_DONORS = 5
ACTIVE = 2
MIB = 2**20


@pytest.fixture(scope="module")
def fabric(ray_test_env: None) -> Iterator[Settings]:
    from dgpt.head import fabric as fab

    home = Path(tempfile.mkdtemp(prefix="dgpt-st-"))
    # Repairs and state changes within seconds; a donor silent 20 s has its pieces written off.
    # No sandbox: the pipeline's baseline on local files needs a folder every donor reads and
    # writes, which the sandbox hides by design (dgpt:// itself goes over the network).
    settings = fabric_settings(home, storage_repair_interval_s=2.0, storage_lost_after_s=20.0,
                               storage_gc_grace_s=0.0, standby_heartbeat_interval_s=5.0, sandbox="off")
    try:
        fab.up(settings, N_DONORS, timeout_s=300, min_active=ACTIVE)
        yield settings
    finally:
        fab.down(settings)


def _client(settings: Settings) -> Client:
    return api_client(settings)


def _cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DGPT_HOME": str(settings.home), "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-m", "dgpt.cli.main", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def _names(settings: Settings) -> dict[str, str]:
    """donor_id -> simulated donor name."""
    with _client(settings) as c:
        return {d.donor_id: d.name for d in c.donors()}


def _pieces_of(settings: Settings, path: str) -> dict[str, set[str]]:
    """donor name -> piece ids of ``path`` found on its disk (ids from the head's metadata)."""
    from dgpt.storage.metadata import MetadataStore

    with _client(settings) as c:
        file_id = next(f.file_id for f in c.storage_status().files if f.path == path)
    store = MetadataStore(head_paths(settings.home)["storage"] / "metadata.sqlite")
    try:
        ids = {p.piece_id for p in store.pieces(file_id)}
    finally:
        store.close()
    names = {}
    for donor_dir in (settings.home / "donors").iterdir():
        on_disk = {p.name for p in (donor_dir / "pieces" / "pieces").rglob("*") if p.is_file()}
        names[donor_dir.name] = on_disk & ids
    return names


def _kill_whole(settings: Settings, name: str) -> None:
    """SIGKILL the donor's agent, `ray start`, raylet and workers (a worker may exit on its own meanwhile)."""

    from dgpt.donor.agent import state_files
    from dgpt.processes import kill_at_once, read_json, tree

    pid = int((read_json(state_files(settings.home / "donors" / name)["pid"]) or {})["pid"])
    kill_at_once(tree(pid))


def _put(settings: Settings, tmp_path: Path, path: str, size: int) -> bytes:
    data = os.urandom(size)
    src = tmp_path / (path.replace("/", "_") + ".in")
    src.write_bytes(data)
    _cli(settings, "storage", "put", str(src), path)
    return data


def _get(settings: Settings, tmp_path: Path, path: str) -> bytes:
    dst = tmp_path / (path.replace("/", "_") + ".out")
    _cli(settings, "storage", "get", path, str(dst))
    return dst.read_bytes()


def test_every_donor_serves_the_tier_standby_or_active(fabric: Settings) -> None:
    with _client(fabric) as c:
        donors = {d.donor_id: d for d in c.donors()}
        wait_for(lambda: len(c.storage_status().donors) == N_DONORS, 60, "every donor in the storage tier")
        status = c.storage_status()
    assert sorted(d.state.value for d in donors.values()).count("active") == ACTIVE
    assert {d.donor_id for d in status.donors} == set(donors)
    assert all(d.state == "online" and d.capacity_bytes == 2 * 2**30 for d in status.donors)
    assert status.profile == "rs-2-of-4" and status.eligible_donors == N_DONORS
    standby = [d for d in status.donors if donors[d.donor_id].state.value == "standby"]
    assert standby, "some donors are standby"
    for d in standby:  # no raylet, yet its piece server answers
        assert donors[d.donor_id].node_id is None
        assert httpx.get(f"{d.url}/v1/health", timeout=5).status_code == 200


def test_a_client_without_a_capability_gets_nothing(fabric: Settings, tmp_path: Path) -> None:
    _put(fabric, tmp_path, "private/secret.bin", 200_000)
    with _client(fabric) as c:
        file_id = next(f.file_id for f in c.storage_status().files if f.path == "private/secret.bin")
    from dgpt.storage.metadata import MetadataStore

    store = MetadataStore(head_paths(fabric.home)["storage"] / "metadata.sqlite")
    try:
        pieces = store.pieces(file_id)
    finally:
        store.close()
    assert len({p.donor_id for p in pieces if p.segment == 0}) == 4
    for p in pieces:
        url = f"{p.url}/v1/pieces/{p.piece_id}"
        r = httpx.get(url, timeout=5)
        assert r.status_code == 401 and "capability" in r.json()["error"].lower()  # an error, no piece bytes
        assert httpx.get(url, headers={"Authorization": "Bearer forged.token"}, timeout=5).status_code in (401, 403)
    with Client(fabric.local_head_url, "dgpt_api_not-a-key-0000000000") as bad:
        with pytest.raises(Exception) as info:
            bad.storage_get("private/secret.bin")
    assert getattr(info.value, "status_code", None) == 401


def test_ray_data_pipeline_runs_across_donors_and_matches_local(fabric: Settings, tmp_path: Path) -> None:
    env = {**os.environ, **shell_env(fabric), "DGPT_HOME": str(fabric.home), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "dgpt.storage.pipeline", "--mb", "40", "--files", "8",
                          "--prefix", "it/pipeline", "--local-dir", str(tmp_path / "local")],
                         env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("DGPT_PIPELINE ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-5000:]
    report = json.loads(line.split(" ", 1)[1])
    (fabric.home / "pipeline-report.json").write_text(json.dumps(report, indent=2))  # kept with the fabric's logs
    assert report["matched"] is True and out.returncode == 0
    assert report["bytes"] >= 38 * 10**6
    donor_ids = set(_names(fabric))
    # The work ran on donors only (the head offers no CPU).
    assert set(report["donors"]) <= donor_ids, report
    assert sum(report["donors"].values()) == report["rows"]
    assert report["output"], "the results were written back to dgpt://"
    with _client(fabric) as c:
        listed = {e.path for e in c.storage_ls("it/pipeline/input")}
    assert len(listed) == 8


def test_the_ray_data_pipeline_spreads_over_the_active_donors(fabric: Settings) -> None:
    report = json.loads((fabric.home / "pipeline-report.json").read_text())  # from the test above
    assert len(report["donors"]) >= ACTIVE, report


def _train(settings: Settings, name: str, *args: str) -> dict:
    """examples/train_digits.py as a researcher's driver on this fabric; its result line."""
    script = Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"
    out = subprocess.run([sys.executable, str(script), "--name", name, "--events", "--workers", "1", "2",
                          "--channels", "8", "--hidden", "32", *args],
                         env={**os.environ, **shell_env(settings)}, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("DGPT_TRAIN_RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-5000:]
    return dict(json.loads(line.split(" ", 1)[1]))


def test_training_checkpoints_go_to_the_donor_tier_when_asked_and_resume_from_it(fabric: Settings) -> None:
    from dgpt.train.checkpoint import MANIFEST_NAME
    from dgpt.train.storage import RUNS_PATH, store_root

    with _client(fabric) as c:  # the whole tier up first, as a module run would have it
        wait_for(lambda: len(c.storage_status().donors) == N_DONORS, 60, "every donor in the storage tier")
    first = _train(fabric, "tiered", "--checkpoints", "donors", "--steps", "60", "--checkpoint-every", "30")
    assert first["ok"], first["error"]
    plan = first["plan"]
    assert plan["checkpoint_store"] == "donors"
    # The tier is small here (rs-2-of-4): forced onto it, the run is told so.
    assert any("donor storage tier, rs-2-of-4" in n and "survives only 2" in n for n in plan["notes"]), plan["notes"]
    with _client(fabric) as c:
        steps = [e.path for e in c.storage_ls(f"{RUNS_PATH}/tiered") if e.path.rsplit("/", 1)[-1].startswith("step-")]
        assert steps, "checkpoint folders on the donor tier"
        manifests = [e for s in steps for e in c.storage_ls(s) if e.path.endswith("/" + MANIFEST_NAME)]
        assert manifests and all(e.profile == "rs-2-of-4" for e in manifests), manifests
    assert not (store_root(fabric) / RUNS_PATH / "tiered").exists(), "nothing went to the head's disk"
    # The same name resumes from the donor tier's checkpoint.
    again = _train(fabric, "tiered", "--checkpoints", "donors", "--steps", "90", "--checkpoint-every", "30")
    assert again["ok"], again["error"]
    starts = [e["resume_step"] for e in again["events"] if e["ev"] == "attempt"]
    assert starts and starts[0] == 60, f"the rerun resumed from step {starts}, not the last checkpoint (60)"
    assert again["final_step"] == 90


def test_auto_keeps_checkpoints_on_the_head_while_the_tier_is_small(fabric: Settings) -> None:
    # The head's own choice, read as a driver gets it (through the control plane on the head).
    code = ("import json, ray\nray.init(logging_level='ERROR', log_to_driver=False)\n"
            "from dgpt.train.live import checkpoint_store\n"
            "print('OUT ' + json.dumps([vars(checkpoint_store(None)), vars(checkpoint_store('donors'))]))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **shell_env(fabric)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    auto, donors = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("OUT "))[4:])
    assert auto["store"] == "head" and "rs-2-of-4 survives only 2" in auto["reason"], auto
    assert donors["store"] == "donors"


def test_killing_the_control_plane_loses_no_committed_file(fabric: Settings, tmp_path: Path) -> None:
    data = _put(fabric, tmp_path, "durable/before-restart.bin", 3 * MIB)
    victims = _control_plane_procs(fabric)
    assert len(victims) == 1
    for proc in victims:
        proc.kill()
    with _client(fabric) as c:
        def back() -> bool:
            new = _control_plane_procs(fabric)
            return len(new) == 1 and new[0].pid != victims[0].pid and c.health()
        wait_for(back, 120, "the control plane to restart")
        status = wait_for(lambda: c.storage_status(), 60, "the storage tier after the restart")
    assert "durable/before-restart.bin" in {f.path for f in status.files}
    assert _get(fabric, tmp_path, "durable/before-restart.bin") == data
    assert _get(fabric, tmp_path, "private/secret.bin")  # and the older one


def test_a_donor_leaving_gracefully_has_its_pieces_moved_first(fabric: Settings, tmp_path: Path) -> None:
    data = _put(fabric, tmp_path, "moving/file.bin", 2 * MIB)
    with _client(fabric) as c:
        donors = {d.donor_id: d for d in c.donors()}
        by_name = {d.name: d for d in donors.values()}
        before = next(f for f in c.storage_status().files if f.path == "moving/file.bin")
    pieces = _pieces_of(fabric, "moving/file.bin")
    # A holder; standby if one is (the pipeline's demand may have activated every donor).
    holders_before = sorted((by_name[n].state.value != "standby", n) for n, ids in pieces.items() if ids)
    leaving = holders_before[0][1]
    _cli(fabric, "donor", "leave", "--donor-id", leaving, "--wait-s", "200")
    after = _pieces_of(fabric, "moving/file.bin")
    with _client(fabric) as c:
        status = c.storage_status()
    gone = next(d for d in status.donors if d.donor_id == by_name[leaving].donor_id)
    assert gone.state == "gone" and gone.pieces == 0
    f = next(f for f in status.files if f.path == "moving/file.bin")
    # Every piece was copied before the donor went: the file never lost a durable piece.
    assert f.min_durable == before.min_durable == f.n and f.state == "healthy"
    holders = {n for n, ids in after.items() if n != leaving and ids}
    assert sum(len(ids) for n, ids in after.items() if n != leaving) == sum(len(ids) for ids in pieces.values())
    assert len(holders) == 4
    assert _get(fabric, tmp_path, "moving/file.bin") == data


def test_sigkill_n_minus_k_donors_and_read_back_bit_identical(fabric: Settings, tmp_path: Path) -> None:
    data = _put(fabric, tmp_path, "chaos/file.bin", 4 * MIB + 77)
    pieces = _pieces_of(fabric, "chaos/file.bin")
    holders = sorted(n for n, ids in pieces.items() if ids)
    alive_holders = [n for n in holders if (fabric.home / "donors" / n / "agent.pid").exists()]
    assert len(alive_holders) == 4
    victims = alive_holders[:2]  # n - k = 2 of rs-2-of-4
    for name in victims:
        _kill_whole(fabric, name)
    got = _get(fabric, tmp_path, "chaos/file.bin")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    # The head sees them offline, then gone after storage_lost_after_s, and repairs nothing it cannot place.
    with _client(fabric) as c:
        wait_for(lambda: {d.state for d in c.storage_status().donors
                          if d.donor_id in {i for i, n in _names(fabric).items() if n in victims}} == {"gone"},
                 120, "the killed donors written off")
        assert _get(fabric, tmp_path, "chaos/file.bin") == data
