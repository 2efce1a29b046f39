"""The fabric core on a real local fabric: `dgpt up --donors 3`, one raylet per donor.

One fabric serves the whole module; tests that take a donor out bring it back, so the
order of tests does not matter for the others.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from dgpt.config import Settings
from dgpt.donor.agent import state_files
from dgpt.head import fabric
from dgpt.head.paths import head_paths
from dgpt.head.process import shell_env
from dgpt.processes import kill_at_once, read_json, tree
from dgpt.sdk.models import SessionView
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DGPT = [sys.executable, "-m", "dgpt.cli.main"]


def _cli(settings: Settings, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DGPT_HOME": str(settings.home)}
    return subprocess.run([*DGPT, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def _ray_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **shell_env(settings)}


def _donors(settings: Settings) -> dict[str, dict]:
    """name -> donor, from `dgpt status --json` (what a user sees)."""
    out = _cli(settings, "status", "--json")
    assert out.returncode == 0, out.stderr
    return {d["name"]: d for d in json.loads(out.stdout)["donors"]}


def _ray_nodes(settings: Settings) -> list[dict]:
    """Ray's own node table, read by a separate driver with the fabric's token."""
    code = (
        "import json, ray\n"
        "ray.init(logging_level='ERROR', log_to_driver=False)\n"
        "print('NODES ' + json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'labels': n.get('Labels', {}),"
        " 'resources': n['Resources']} for n in ray.nodes()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_ray_env(settings), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # Ray may print its own lines (autoscaler events) to a driver's stdout: find ours.
    line = next(x for x in out.stdout.splitlines() if x.startswith("NODES "))
    return json.loads(line[len("NODES "):])


def _last_session(settings: Settings, name: str) -> SessionView:
    donor = _donors(settings)[name]
    return SessionView.model_validate({"session_id": 0, **donor["sessions"][-1]})


def _agent_pid(settings: Settings, name: str) -> int:
    return int((read_json(state_files(settings.home / "donors" / name)["pid"]) or {})["pid"])


def _active_again(settings: Settings, name: str, donor_id: str, sessions_before: int) -> None:
    def back() -> bool:
        d = _donors(settings)[name]
        return d["state"] == "active" and d["node_id"] and d["sessions_total"] == sessions_before + 1
    wait_for(back, 180, f"{name} active again with a new session")
    again = _donors(settings)[name]
    assert again["donor_id"] == donor_id, "a returning donor keeps its donor_id"
    assert again["sessions"][-1]["ended_as"] is None


def _death_reason(settings: Settings, node_id: str) -> str:
    code = (
        "import sys\n"
        "from dgpt.head.ray_adapter import RayAdapter\n"
        f"nodes = {{n.node_id: n for n in RayAdapter('{shell_env(settings)['RAY_ADDRESS']}').nodes()}}\n"
        f"n = nodes.get('{node_id}')\n"
        "print('REASON ' + ('ALIVE' if n is None or n.alive else n.death_reason))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_ray_env(settings), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return next(x for x in out.stdout.splitlines() if x.startswith("REASON "))[len("REASON "):]


# ---------------------------------------------------------------------- joining


def test_three_donors_make_four_ray_nodes_with_labels_and_caps(local_fabric: Settings) -> None:
    nodes = [n for n in _ray_nodes(local_fabric) if n["alive"]]
    assert len(nodes) == 4
    heads = [n for n in nodes if n["labels"].get("dgpt.io/role") == "head"]
    assert len(heads) == 1 and heads[0]["resources"].get("CPU", 0) == 0, "the head runs no user work"
    donors = _donors(local_fabric)
    specs = {s.name: s for s in fabric.donor_specs(3)}
    by_id = {n["labels"].get("dgpt.io/donor-id"): n for n in nodes}
    for name, d in donors.items():
        node = by_id[d["donor_id"]]
        spec = specs[name]
        assert node["id"] == d["node_id"]
        assert node["labels"]["dgpt.io/role"] == "donor"
        assert node["labels"]["dgpt.io/device-class"] == spec.device_class
        assert node["labels"]["dgpt.io/owner"] == spec.owner
        assert node["labels"]["dgpt.io/gpu"] == "none"
        granted = {k: v for k, v in node["resources"].items()
                   if not k.startswith("node:") and k != "object_store_memory"}
        assert granted == {"CPU": spec.cpus, "memory": spec.memory_gb * 2**30, "donor": 1.0}


def test_status_json_names_the_head_and_every_donor(local_fabric: Settings) -> None:
    out = _cli(local_fabric, "status", "--json")
    data = json.loads(out.stdout)
    head = data["head"]
    assert head["ray_address"] == f"127.0.0.1:{local_fabric.ray_port}"
    assert head["dashboard_url"] == f"http://127.0.0.1:{local_fabric.dashboard_port}"
    assert head["api_url"] == f"http://127.0.0.1:{local_fabric.api_port}/api/v1"
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        assert key in head["env"]
    assert head["env"]["RAY_AUTH_MODE"] == "token"
    assert len(data["donors"]) == 3
    for d in data["donors"]:
        assert {"donor_id", "state", "device_class", "owner", "node_id", "resources", "labels", "sessions"} <= set(d)
        assert d["state"] == "active"
        assert {"started_at", "ended_at", "ended_as"} <= set(d["sessions"][-1])

    exports = _cli(local_fabric, "env").stdout
    assert f"export RAY_AUTH_TOKEN_PATH={head_paths(local_fabric.home)['ray_token']}" in exports


def test_ray_job_submit_runs_tasks_on_every_donor(local_fabric: Settings, tmp_path: Path) -> None:
    env = _ray_env(local_fabric)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    out = subprocess.run(
        [ray_bin, "job", "submit", "--entrypoint-num-cpus", "0", "--",
         "python", "-m", "dgpt.cli.demo_job", "--tasks", "12", "--seconds", "0.5"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result_line = next(line for line in out.stdout.splitlines() if line.startswith("DGPT_RESULT "))
    per_donor = json.loads(result_line.split(" ", 1)[1])["per_donor"]
    donor_ids = {d["donor_id"] for d in _donors(local_fabric).values()}
    assert set(per_donor) == donor_ids, f"tasks ran on {per_donor}, donors are {donor_ids}"


# ---------------------------------------------------------------------- API edges


def test_api_refuses_bad_requests_and_stores_nothing(local_fabric: Settings) -> None:
    api = local_fabric.api_url
    key = head_paths(local_fabric.home)["api_key"].read_text().strip()
    auth = {"Authorization": f"Bearer {key}"}
    before = httpx.get(f"{api}/donors", headers=auth).json()
    body = {
        "name": "intruder", "device_class": "laptop", "owner": "mallory",
        "profile": {"cpus": 2, "memory_bytes": 2**31, "cpu_gflops": 1.0},
        "caps": {"cpus": 1, "memory_bytes": 2**30},
    }
    assert httpx.post(f"{api}/donors", json=body).status_code == 401
    r = httpx.post(f"{api}/donors", json=body, headers={"Authorization": "Bearer dgpt_join_forged"})
    assert r.status_code == 401 and "join token" in r.json()["message"]

    bad = {**body, "caps": {"cpus": "many", "memory_bytes": 2**30}}
    r = httpx.post(f"{api}/donors", json=bad, headers={"Authorization": "Bearer x"})
    assert r.status_code == 422 and "caps.cpus" in r.json()["message"]
    r = httpx.post(f"{api}/donors", json={k: v for k, v in body.items() if k != "owner"})
    assert r.status_code == 422 and "owner" in r.json()["message"]
    r = httpx.post(f"{api}/donors", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"][0]["field"] == "body"

    assert httpx.get(f"{api}/donors/d-unknown", headers=auth).status_code == 404
    # Unknown donors and wrong secrets answer alike: donor ids cannot be enumerated.
    unknown = httpx.post(f"{api}/donors/d-unknown/heartbeat", json={"state": "standby"},
                         headers={"Authorization": "Bearer s"})
    known = httpx.post(f"{api}/donors/{before[0]['donor_id']}/heartbeat", json={"state": "standby"},
                       headers={"Authorization": "Bearer s"})
    assert unknown.status_code == known.status_code == 401 and unknown.json() == known.json()

    assert httpx.get(f"{api}/jobs").status_code == 401
    assert httpx.post(f"{api}/jobs", json={"entrypoint": "echo hi"}).status_code == 401
    assert httpx.get(f"{api}/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(f"{api}/jobs", json={"entrypoint": ""}, headers=auth)
    assert r.status_code == 422 and "entrypoint" in r.json()["message"]

    after = httpx.get(f"{api}/donors", headers=auth).json()
    assert [d["donor_id"] for d in after] == [d["donor_id"] for d in before], "a refused request stored nothing"
    schema = httpx.get(f"http://127.0.0.1:{local_fabric.api_port}/api/openapi.json").json()
    assert "/api/v1/donors" in schema["paths"]


def test_jobs_through_the_rest_api(local_fabric: Settings) -> None:
    from dgpt.sdk.client import Client

    key = head_paths(local_fabric.home)["api_key"].read_text().strip()
    with Client(local_fabric.local_head_url, key) as client:
        job = client.submit_job("python -c \"print('hello from dgpt')\"")
        done = wait_for(lambda: client.job(job.job_id).status in ("SUCCEEDED", "FAILED") and client.job(job.job_id),
                        120, "the job to finish")
        assert done.status == "SUCCEEDED"
        assert "hello from dgpt" in client.job_logs(job.job_id)
        assert any(j.job_id == job.job_id for j in client.jobs())


def test_ray_refuses_a_driver_without_the_token(local_fabric: Settings) -> None:
    env = {**_ray_env(local_fabric), "RAY_AUTH_TOKEN": "0" * 64}
    env.pop("RAY_AUTH_TOKEN_PATH")
    code = "import ray; ray.init(logging_level='ERROR'); print('CONNECTED')"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
        connected = "CONNECTED" in out.stdout
    except subprocess.TimeoutExpired:
        connected = False
    assert not connected, "Ray token auth must refuse a wrong token"


# ---------------------------------------------------------------------- leaving


def test_pause_drains_through_drainnode_and_resume_rejoins(local_fabric: Settings) -> None:
    before = _donors(local_fabric)["donor-1"]
    out = _cli(local_fabric, "donor", "pause", "--donor-id", "donor-1")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: _last_session(local_fabric, "donor-1").ended_as, 60, "donor-1's session to end")
    assert _last_session(local_fabric, "donor-1").ended_as == "drained"
    assert "leaving (paused)" in _death_reason(local_fabric, before["node_id"]), "drained through DrainNode"
    assert _donors(local_fabric)["donor-1"]["state"] == "standby"

    assert _cli(local_fabric, "donor", "resume", "--donor-id", "donor-1").returncode == 0
    _active_again(local_fabric, "donor-1", before["donor_id"], before["sessions_total"])


def test_leave_drains_and_a_rejoining_donor_keeps_its_id(local_fabric: Settings) -> None:
    before = _donors(local_fabric)["donor-2"]
    out = _cli(local_fabric, "donor", "leave", "--donor-id", "donor-2")
    assert out.returncode == 0, out.stderr
    assert _last_session(local_fabric, "donor-2").ended_as == "drained"
    assert "leaving (leave)" in _death_reason(local_fabric, before["node_id"])

    fabric.restart_donor(local_fabric, "donor-2")
    _active_again(local_fabric, "donor-2", before["donor_id"], before["sessions_total"])


def test_sigterm_drains(local_fabric: Settings) -> None:
    before = _donors(local_fabric)["donor-3"]
    pid = _agent_pid(local_fabric, "donor-3")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             90, "the agent to exit after SIGTERM")
    wait_for(lambda: _last_session(local_fabric, "donor-3").ended_as, 30, "donor-3's session to end")
    assert _last_session(local_fabric, "donor-3").ended_as == "drained"
    assert "leaving (sigterm)" in _death_reason(local_fabric, before["node_id"])

    fabric.restart_donor(local_fabric, "donor-3")
    _active_again(local_fabric, "donor-3", before["donor_id"], before["sessions_total"])


def test_sigkilled_agent_and_raylet_end_lost(local_fabric: Settings) -> None:
    before = _donors(local_fabric)["donor-1"]
    procs = tree(_agent_pid(local_fabric, "donor-1"))
    assert any(p.name() == "raylet" for p in procs)
    kill_at_once(procs)  # agent, `ray start`, raylet and its workers: no chance to drain
    timeout = local_fabric.heartbeat_timeout_s + 3 * local_fabric.monitor_interval_s + 5
    wait_for(lambda: _last_session(local_fabric, "donor-1").ended_as, timeout, "donor-1's session to end")
    assert _last_session(local_fabric, "donor-1").ended_as == "lost"

    fabric.restart_donor(local_fabric, "donor-1")
    _active_again(local_fabric, "donor-1", before["donor_id"], before["sessions_total"])


# ---------------------------------------------------------------------- restarts


def _control_plane_procs(settings: Settings) -> list[psutil.Process]:
    """This fabric's control-plane process(es): children of its head's supervisor."""
    pid = int((read_json(head_paths(settings.home)["pid"]) or {})["pid"])
    out = []
    for proc in psutil.Process(pid).children():
        try:
            if "dgpt.head.control_plane" in proc.cmdline():
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


HEAD_PROBE = """
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

home = sys.argv[1]
ray.init(log_to_driver=False)
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Labels"].get("dgpt.io/role") == "head")

@ray.remote(num_cpus=0)
def probe(home):
    out = {"uid": os.getuid(), "listing": sorted(os.listdir(home)) if os.path.isdir(home) else None}
    for rel in ("head/api_key", "head/registry.sqlite", "head/tls/key.pem", "head/storage/secret"):
        try:
            open(os.path.join(home, rel), "rb").read(1)
            out[rel] = "read"
        except OSError as exc:
            out[rel] = type(exc).__name__
    out["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return out

print("PROBE " + json.dumps(ray.get(probe.options(
    scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote(home), timeout=120)))
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make test installs it as root)")
def test_ray_work_pinned_to_the_head_cannot_read_its_secrets(local_fabric: Settings, tmp_path: Path) -> None:
    # What any Ray token holder (an active donor, a job) can do: a zero-CPU task pinned to the head.
    script = tmp_path / "probe.py"
    script.write_text(HEAD_PROBE)
    out = subprocess.run([sys.executable, str(script), str(local_fabric.home)], env=_ray_env(local_fabric),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seen = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("PROBE ")).split(" ", 1)[1])
    paths = head_paths(local_fabric.home)
    for rel in ("head/api_key", "head/registry.sqlite"):
        assert (local_fabric.home / rel).is_file(), f"{rel} exists on the head"
        assert seen[rel] in ("FileNotFoundError", "PermissionError"), f"Ray work on the head read {rel}: {seen}"
    if os.geteuid() == 0:
        assert seen["uid"] != 0, "Ray work on a root head runs as another user"
    # Its own PID namespace: the sandbox's init is PID 1, and the head's other processes
    # (the supervisor, the control plane, every donor here) are not there to trace.
    assert 1 in seen["processes"] and len(seen["processes"]) < len(psutil.pids()) - 5, seen["processes"]
    assert paths["dir"].stat().st_mode & 0o077 == 0, "$DGPT_HOME/head is its user's only"


def test_killing_the_control_plane_loses_no_record(local_fabric: Settings) -> None:
    from dgpt.sdk.client import Client

    key = head_paths(local_fabric.home)["api_key"].read_text().strip()
    client = Client(local_fabric.local_head_url, key)
    client.create_token("join", "survives restarts")
    donors_before = {d.donor_id: d for d in client.donors()}
    tokens_before = {t.token_id for t in client.tokens()}
    victims = _control_plane_procs(local_fabric)
    assert len(victims) == 1, "the control-plane actor"
    for proc in victims:
        proc.kill()

    def restarted() -> bool:
        new = _control_plane_procs(local_fabric)
        return len(new) == 1 and not {p.pid for p in new} & {p.pid for p in victims} and client.health()
    wait_for(restarted, 120, "the registry and the control plane to restart")

    donors_after = {d.donor_id: d for d in client.donors()}
    assert set(donors_after) == set(donors_before)
    for donor_id, before in donors_before.items():
        after = donors_after[donor_id]
        assert [s.started_at for s in after.sessions][: len(before.sessions)] == [s.started_at for s in before.sessions]
    assert {t.token_id for t in client.tokens()} == tokens_before

    def heartbeats_resumed() -> bool:
        now = {d.donor_id: d for d in client.donors()}
        return all((now[i].last_heartbeat_at or 0) > (donors_before[i].last_heartbeat_at or 0) + 2
                   and now[i].state == "active" for i in now)
    wait_for(heartbeats_resumed, 60, "every donor to heartbeat through the restart and stay active")
    client.close()


def test_a_second_fabric_runs_side_by_side(local_fabric: Settings) -> None:
    from tests.integration.conftest import fabric_settings

    other = fabric_settings(Path(tempfile.mkdtemp(prefix="dgpt-it2-")))
    assert {other.ray_port, other.http_port}.isdisjoint({local_fabric.ray_port, local_fabric.http_port})
    try:
        fabric.up(other, 0, timeout_s=240)
        for settings in (local_fabric, other):
            assert httpx.get(f"{settings.api_url}/health", timeout=10).json() == {"status": "ok"}
        assert _cli(other, "status", "--json").returncode == 0
        assert json.loads(_cli(other, "status", "--json").stdout)["donors"] == []
    finally:
        fabric.down(other)
    assert not httpx.get(f"{local_fabric.api_url}/health", timeout=10).is_error, "the first fabric is untouched"
    assert len(_donors(local_fabric)) == 3


# ---------------------------------------------------------------------- the owner comes back


def test_a_cpu_hog_on_the_donors_host_makes_it_drain(local_fabric: Settings) -> None:
    """The load detector (DGPT_IDLE_LOAD_THRESHOLD's meaning): the owner's own CPU use drains the donor."""
    name = "donor-1"
    assert _cli(local_fabric, "donor", "leave", "--donor-id", name).returncode == 0
    fabric.restart_donor(local_fabric, name, load_threshold="0.5")
    wait_for(lambda: _donors(local_fabric)[name]["state"] == "active", 180, f"{name} active with its detector on")
    before = _donors(local_fabric)[name]
    # The owner starts work: one busy process per core (not Ray's, not dgpt's).
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(psutil.cpu_count() or 1)]
    try:
        wait_for(lambda: _donors(local_fabric)[name]["sessions_total"] == before["sessions_total"]
                 and _last_session(local_fabric, name).ended_as, 90, f"{name} to drain for its owner")
        session = _last_session(local_fabric, name)
        assert (session.ended_as, session.end_reason) == ("drained", "owner-active")
        assert _donors(local_fabric)[name]["owner_active"]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    wait_for(lambda: _donors(local_fabric)[name]["state"] == "active", 180, f"{name} back once the owner is idle")
    assert _cli(local_fabric, "donor", "leave", "--donor-id", name).returncode == 0
    fabric.restart_donor(local_fabric, name, load_threshold="off")
    wait_for(lambda: _donors(local_fabric)[name]["state"] == "active", 180, f"{name} back with its detector off")


def test_a_raylet_that_joins_without_a_session_is_flagged_and_drained(local_fabric: Settings, tmp_path: Path) -> None:
    # Anyone holding the Ray token can start a raylet against the GCS; this one poses as a
    # donor (role label) with no donor id and no session from the head.
    from dgpt.head.process import head_addresses
    from dgpt.processes import free_port, stop_tree

    gcs = head_addresses(local_fabric)["ray_address"]
    ports = [free_port() for _ in range(7)]
    argv = [str(Path(sys.executable).with_name("ray")), "start", "--block", f"--address={gcs}", "--num-cpus=1",
            "--labels=dgpt.io/role=donor", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-grpc-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
            f"--min-worker-port={ports[6]}", f"--max-worker-port={ports[6] + 20}", "--disable-usage-stats",
            f"--temp-dir={tempfile.mkdtemp(prefix='dgpt-rogue-')}"]
    log = (tmp_path / "rogue.log").open("w")
    rogue = subprocess.Popen(argv, env=_ray_env(local_fabric), stdout=log, stderr=subprocess.STDOUT)
    try:
        def flagged() -> list:
            with fabric.api_client(local_fabric) as c:
                return [r for r in c.cluster().rogue_nodes if "no dgpt.io/donor-id label" in r.reason]

        (view,) = wait_for(flagged, 120, "the head to flag the raylet it never granted")
        assert view.drain_requested and view.address
        out = _cli(local_fabric, "status")
        assert f"Ray node {view.node_id[:8]}" in out.stdout and "not as granted" in out.stdout
        # Ray itself drains it: no new work lands there.
        code = ("from dgpt.head.ray_adapter import RayAdapter\n"
                f"print('STATUS', {{u.node_id: u.status for u in RayAdapter({gcs!r}).usage_and_demand()[0]}}"
                f".get({view.node_id!r}))\n")

        def draining() -> bool:
            got = subprocess.run([sys.executable, "-c", code], env=_ray_env(local_fabric), capture_output=True,
                                 text=True, timeout=60)
            return any(x in got.stdout for x in ("STATUS DRAINING", "STATUS DEAD", "STATUS None"))

        wait_for(draining, 60, "Ray to drain the rogue node")
        assert view.node_id not in {d["node_id"] for d in _donors(local_fabric).values()}, "no donor took it"
    finally:
        stop_tree(rogue.pid, grace_s=15)
        log.close()
