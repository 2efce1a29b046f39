"""Inference on a real local fabric (`dgpt up --donors 3`): deploy, predict, drain and kill donors.

The digits app is deployed with `dgpt serve deploy deployments/digits.yaml` onto the donors'
raylets; clients speak plain HTTP to the head's Serve proxy. Load loops count every request,
so "no request failed" is an exact statement. Tests that take a donor out bring it back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from dgpt.cli.demo_serve import held_out_digits
from dgpt.cli.serve import serve_app
from dgpt.config import Settings
from dgpt.donor.agent import state_files
from dgpt.exceptions import ConfigError, ServeError
from dgpt.head import fabric
from dgpt.head.process import shell_env
from dgpt.processes import alive, kill_at_once, read_json, tree
from dgpt.serve import deploy as serve_deploy
from dgpt.serve.loadgen import LoadLoop, Sample
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DIGITS_YAML = Path(__file__).resolve().parents[2] / "deployments" / "digits.yaml"
DGPT = [sys.executable, "-m", "dgpt.cli.main"]
# Load during drains and kills: a few closed-loop clients, as many as a 2-core host sustains.
CONCURRENCY = 4
# After a donor's raylet is SIGKILLed the endpoint must answer again within this; the
# replica on the other donor keeps serving, so it is short.
ANSWER_AGAIN_WITHIN_S = 30.0
# Full capacity (replacement replica RUNNING) after a kill: Ray must first declare the node
# dead (health checks: 10 x 3 s in tests), then Serve starts a replacement.
FULL_CAPACITY_WITHIN_S = 180.0


def _serve(settings: Settings, *args: str):  # type: ignore[no-untyped-def]
    """`dgpt serve ARGS --home HOME`, in process; typed errors come back as ``result.exception``."""
    return CliRunner().invoke(serve_app, [*args, "--home", str(settings.home)], catch_exceptions=True)


def _cli(settings: Settings, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DGPT_HOME": str(settings.home)}
    return subprocess.run([*DGPT, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def _donors(settings: Settings) -> dict[str, dict]:
    out = _cli(settings, "status", "--json")
    assert out.returncode == 0, out.stderr
    return {d["name"]: d for d in json.loads(out.stdout)["donors"]}


def _digits(settings: Settings) -> serve_deploy.AppStatus:
    app = serve_deploy.status(settings).app("digits")
    assert app is not None, "the digits app is not deployed"
    return app


def _running_replica_donors(settings: Settings) -> list[str]:
    return [r.donor for d in _digits(settings).deployments for r in d.replicas if r.state == "RUNNING"]


def _healthy(settings: Settings, avoid_node: str | None = None) -> bool:
    """digits RUNNING with two RUNNING replicas on two donors, none on node ``avoid_node``."""
    app = serve_deploy.status(settings).app("digits")
    if app is None or app.status != "RUNNING":
        return False
    running = [r for d in app.deployments for r in d.replicas if r.state == "RUNNING"]
    donors = [r.donor for r in running]
    names = set(_donors(settings))
    return (len(donors) >= 2 and len(set(donors)) == len(donors) and set(donors) <= names
            and all(r.node_id != avoid_node for r in running))


def _agent_pid(settings: Settings, name: str) -> int | None:
    info = read_json(state_files(settings.home / "donors" / name)["pid"]) or {}
    return int(info["pid"]) if info.get("pid") else None


def _restore(settings: Settings, name: str) -> None:
    """Bring a donor back to active (resume, or restart its agent) and the app to full health."""
    _cli(settings, "donor", "resume", "--donor-id", name)
    if not alive(_agent_pid(settings, name)):
        fabric.restart_donor(settings, name)
    wait_for(lambda: _donors(settings)[name]["state"] == "active" and _donors(settings)[name]["node_id"],
             240, f"{name} active again")
    wait_for(lambda: _healthy(settings), 180, "digits back to two RUNNING replicas")


@pytest.fixture(scope="module")
def digits(local_fabric: Settings) -> Iterator[str]:
    """`dgpt serve deploy deployments/digits.yaml`; yields the predict URL."""
    result = _serve(local_fabric, "deploy", str(DIGITS_YAML), "--timeout-s", "400")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "digits RUNNING" in result.output
    yield f"{local_fabric.serve_url}/digits/predict"


@pytest.fixture(scope="module")
def held_out() -> tuple[list[list[float]], list[int]]:
    return held_out_digits()


def _load(url: str, held_out: tuple[list[list[float]], list[int]], max_requests: int = 20_000) -> LoadLoop:
    images, labels = held_out

    def right(answer: dict, index: int) -> bool:
        return int(answer["predictions"][0]["digit"]) == labels[index]

    return LoadLoop(url, [{"pixels": x} for x in images], concurrency=CONCURRENCY,
                    max_requests=max_requests, timeout_s=60.0, check=right).start()


def _failures(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if not s.ok]


# ---------------------------------------------------------------------- dgpt serve, bad input


def test_serve_deploy_refuses_bad_input(local_fabric: Settings, tmp_path: Path) -> None:
    missing = _serve(local_fabric, "deploy", str(tmp_path / "nope.yaml"))
    assert isinstance(missing.exception, ConfigError)
    assert "nope.yaml does not exist" in missing.exception.message

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("applications:\n  - name: x\n    import_path: [unclosed\n")
    result = _serve(local_fabric, "deploy", str(bad_yaml))
    assert isinstance(result.exception, ConfigError)
    assert "not valid YAML at line" in result.exception.message

    not_serve = tmp_path / "compose.yaml"
    not_serve.write_text("services:\n  web:\n    image: nginx\n")
    result = _serve(local_fabric, "deploy", str(not_serve))
    assert isinstance(result.exception, ConfigError)
    assert "not a Serve config" in result.exception.message and "applications" in result.exception.message

    no_import = tmp_path / "noimport.yaml"
    no_import.write_text("applications:\n  - name: x\n    route_prefix: /x\n")
    result = _serve(local_fabric, "deploy", str(no_import))
    assert isinstance(result.exception, ConfigError)
    assert "import_path" in result.exception.message

    result = _serve(local_fabric, "delete", "no-such-app")
    assert isinstance(result.exception, ServeError) and "no Serve application 'no-such-app'" in result.exception.message
    # An application a researcher started from Python is not `dgpt serve delete`'s to remove.
    code = ("import ray\nfrom ray import serve\nray.init(logging_level='ERROR', log_to_driver=False)\n"
            "@serve.deployment(ray_actor_options={'num_cpus': 0})\nclass Echo:\n"
            "    def __call__(self, request):\n        return 'echo'\n"
            "serve.run(Echo.bind(), name='pyapp', route_prefix='/pyapp')\nprint('RESULT ok')\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **shell_env(local_fabric)},
                         capture_output=True, text=True, timeout=240)
    assert "RESULT ok" in out.stdout, out.stderr[-2000:]
    try:
        result = _serve(local_fabric, "delete", "pyapp")
        assert isinstance(result.exception, ServeError) and "serve.run" in result.exception.message
        assert serve_deploy.status(local_fabric).app("pyapp") is not None, "the Python app is untouched"
    finally:
        subprocess.run([sys.executable, "-c", "import ray\nfrom ray import serve\n"
                        "ray.init(logging_level='ERROR', log_to_driver=False)\nserve.delete('pyapp')\n"],
                       env={**os.environ, **shell_env(local_fabric)}, capture_output=True, timeout=120)


def test_a_failing_app_is_reported_with_serves_message(local_fabric: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications:\n  - name: broken\n    route_prefix: /broken\n"
                      "    import_path: deployments.no_such_module:app\n")
    result = _serve(local_fabric, "deploy", str(broken), "--timeout-s", "120")
    assert isinstance(result.exception, ServeError)
    assert "DEPLOY_FAILED" in result.exception.message and "no_such_module" in result.exception.message
    deleted = _serve(local_fabric, "delete", "broken")
    assert deleted.exit_code == 0, deleted.output
    assert serve_deploy.status(local_fabric).app("broken") is None


# ---------------------------------------------------------------------- deploy, status, predict


def test_deploy_status_and_a_real_prediction(local_fabric: Settings, digits: str,
                                             held_out: tuple[list[list[float]], list[int]]) -> None:
    images, labels = held_out
    out = _serve(local_fabric, "status", "--json")
    assert out.exit_code == 0, out.output
    apps = {a["name"]: a for a in json.loads(out.output)["applications"]}
    assert apps["digits"]["status"] == "RUNNING" and apps["digits"]["route_prefix"] == "/digits"
    assert apps["digits"]["from_config"]
    per_donor = apps["digits"]["replicas_per_donor"]
    assert sum(per_donor.values()) >= 2 and set(per_donor) <= set(_donors(local_fabric)), \
        f"replicas on donors only, at most one per donor: {per_donor}"
    assert all(n == 1 for n in per_donor.values())

    table = _serve(local_fabric, "status")
    assert table.exit_code == 0, table.output
    assert "digits" in table.output and "/digits" in table.output and "RUNNING" in table.output

    rows = {r["app"]: r for r in serve_deploy.endpoint_rows(local_fabric)}
    assert rows["digits"]["url"] == f"{local_fabric.serve_url}/digits"
    assert rows["digits"]["replicas"] == per_donor

    # What `curl -X POST $URL -d '{"pixels": [...]}'` does: a plain HTTP client, no SDK.
    for i in range(5):
        r = httpx.post(digits, content=json.dumps({"pixels": images[i]}),
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["digit"] == labels[i]
    r = httpx.post(digits, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "not valid JSON" in r.json()["message"]
    r = httpx.post(digits, json={"pixels": [1, 2, 3]}, timeout=30)
    assert r.status_code == 422 and "pixels has 3 values" in r.json()["message"]
    r = httpx.post(digits, json={"image": images[0]}, timeout=30)
    assert r.status_code == 422 and "pixels: field required" in r.json()["message"]


def test_redeploy_keeps_the_app_and_delete_removes_only_it(local_fabric: Settings, digits: str,
                                                         tmp_path: Path) -> None:
    second = tmp_path / "echo.yaml"
    config = json.loads(json.dumps(serve_deploy.load_config(DIGITS_YAML)))
    app = config["applications"][0]
    app.update(name="digits2", route_prefix="/digits2")
    app["deployments"][0]["autoscaling_config"]["min_replicas"] = 1
    second.write_text(json.dumps(config))  # JSON is YAML
    result = _serve(local_fabric, "deploy", str(second), "--timeout-s", "300")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    names = {a.name for a in serve_deploy.status(local_fabric).apps}
    assert {"digits", "digits2"} <= names, "deploying one file keeps the other apps"

    result = _serve(local_fabric, "delete", "digits2")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    names = {a.name for a in serve_deploy.status(local_fabric).apps}
    assert "digits2" not in names and "digits" in names
    assert httpx.post(digits, json={"pixels": [0] * 64}, timeout=30).status_code == 200



# ---------------------------------------------------------------------- heartbeats under load

#: Closed-loop clients that saturate the endpoint: far more than a 2-core host answers at
#: once, so the proxy, the replicas and the donors' raylets all compete for the CPUs.
SATURATING_CLIENTS = 48
SATURATE_S = 40.0


def test_heartbeats_keep_flowing_while_the_endpoint_is_saturated(
        local_fabric: Settings, digits: str, held_out: tuple[list[list[float]], list[int]]) -> None:
    with fabric.api_client(local_fabric) as client:
        before = {d.name: d for d in client.donors()}
    active = {n for n, d in before.items() if d.state == "active"}
    assert len(active) >= 2, f"the fabric has active donors to watch: {before}"
    images, _ = held_out
    load = LoadLoop(digits, [{"pixels": x} for x in images], concurrency=SATURATING_CLIENTS,
                    max_requests=200_000, timeout_s=120.0).start()
    worst: dict[str, float] = dict.fromkeys(active, 0.0)
    try:
        deadline = time.monotonic() + SATURATE_S
        with fabric.api_client(local_fabric) as client:
            while time.monotonic() < deadline:
                now = time.time()
                for d in client.donors():
                    if d.name in active and d.last_heartbeat_at is not None:
                        worst[d.name] = max(worst[d.name], now - d.last_heartbeat_at)
                time.sleep(0.5)
    finally:
        samples = load.stop()
    assert sum(s.ok for s in samples) > 0, "the endpoint answered under the load"
    with fabric.api_client(local_fabric) as client:
        after = {d.name: d for d in client.donors()}
    for name in active:
        assert after[name].state == "active", f"{name} stayed active under inference load: {after[name]}"
        assert len(after[name].sessions) == len(before[name].sessions), f"{name} lost no session"
        # The registry declares a donor lost only past heartbeat_timeout_s of silence.
        assert worst[name] < local_fabric.heartbeat_timeout_s, \
            f"{name} went {worst[name]:.1f} s without a heartbeat reaching the head under load"
# ---------------------------------------------------------------------- donors leaving


def test_draining_a_donor_with_a_replica_fails_no_request(local_fabric: Settings, digits: str,
                                                         held_out: tuple[list[list[float]], list[int]]) -> None:
    wait_for(lambda: _healthy(local_fabric), 180, "digits with two RUNNING replicas")
    victim = sorted(_running_replica_donors(local_fabric))[0]
    sessions_before = _donors(local_fabric)[victim]["sessions_total"]
    victim_node = _donors(local_fabric)[victim]["node_id"]
    loop = _load(digits, held_out)
    try:
        wait_for(lambda: loop.count() >= 50, 60, "load to get going")
        out = _cli(local_fabric, "donor", "pause", "--donor-id", victim)
        assert out.returncode == 0, out.stderr

        def drained() -> bool:
            donor = _donors(local_fabric)[victim]
            return donor["sessions_total"] == sessions_before and donor["sessions"][-1]["ended_as"] == "drained"
        wait_for(drained, local_fabric.drain_deadline_s + 60, f"{victim} to drain")
        wait_for(lambda: _healthy(local_fabric, avoid_node=victim_node), 180, "a replacement replica elsewhere")
        after = loop.count()
        wait_for(lambda: loop.count() >= after + 50, 60, "requests served after the drain")
    finally:
        samples = loop.stop()
        _restore(local_fabric, victim)
    failed = _failures(samples)
    assert len(samples) >= 150
    assert not failed, f"{len(failed)} of {len(samples)} requests failed during the drain: {failed[:3]}"
    right = sum(1 for s in samples if s.answer) / len(samples)
    assert right > 0.9, f"answers are real predictions: {right:.1%} right on held-out digits"


def test_killing_a_whole_donor_fails_only_requests_in_flight(
        local_fabric: Settings, digits: str, held_out: tuple[list[list[float]], list[int]]) -> None:
    wait_for(lambda: _healthy(local_fabric), 180, "digits with two RUNNING replicas")
    victim = sorted(_running_replica_donors(local_fabric))[-1]
    victim_node = _donors(local_fabric)[victim]["node_id"]
    pid = _agent_pid(local_fabric, victim)
    assert pid is not None
    procs = tree(pid)  # the agent, `ray start`, the raylet and every worker (the agent is their subreaper)
    assert [p for p in procs if p.name() == "raylet"], f"{victim}'s raylet among its agent's descendants"
    loop = _load(digits, held_out)
    try:
        wait_for(lambda: loop.count() >= 50, 60, "load to get going")
        killed_at = time.monotonic()
        kill_at_once(procs)  # all at once, as a power cut: nobody gets to say goodbye
        killed_done = time.monotonic()
        psutil.wait_procs(procs, timeout=10)
        # The endpoint answers again: a request sent after the kill succeeds.
        wait_for(lambda: any(s.ok and s.started_s > killed_done for s in loop.snapshot()),
                 ANSWER_AGAIN_WITHIN_S, "a request sent after the kill to succeed")
        wait_for(lambda: _healthy(local_fabric, avoid_node=victim_node), FULL_CAPACITY_WITHIN_S,
                 "a replacement replica on another donor (full capacity)")
        recovered_s = time.monotonic() - killed_at
        after = loop.count()
        wait_for(lambda: loop.count() >= after + 50, 60, "requests served after recovery")
    finally:
        samples = loop.stop()
        _restore(local_fabric, victim)
    failed = _failures(samples)
    print(f"whole-donor kill: {len(failed)} of {len(samples)} requests failed; full capacity after {recovered_s:.1f}s")
    # Only requests in flight at the kill may fail: begun before it ended, answered after it began.
    late = [f"+{s.started_s - killed_at:.2f}s for {s.latency_s:.2f}s: {s.status} {s.error}" for s in failed
            if not (s.started_s <= killed_done and s.started_s + s.latency_s >= killed_at)]
    assert not late, f"{len(late)} of {len(failed)} failed requests were not in flight at the kill: {late[:5]}"
    assert len(failed) <= CONCURRENCY, f"at most one request per client was in flight: {len(failed)} failed"
