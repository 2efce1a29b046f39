"""dgpt's DonorAwareRouter vs Serve's default router, side by side on one local fabric.

    python -m benchmarks.serve_router [--quick] [--out benchmarks/results/serve_router.json]

One run, one fabric (`dgpt up --donors 3` in a temp DGPT_HOME on free ports, always torn
down by pid). The digits app is deployed twice at once, identical but for the router
(``bench-default``: Serve's power-of-two-choices; ``bench-dgpt``: DonorAwareRouter), three
replicas each, one per donor. Measurement rounds alternate between the two so a shared,
noisy machine drifts the same for both.

1. floor: the same model behind a plain uvicorn app (``benchmarks.digits_floor``), no Ray.
2. homogeneous: identical replicas; closed-loop clients; throughput and latency.
3. heterogeneous: the replica on one donor adds a fixed delay to every request (a slow donor
   on purpose; the delay holds no CPU); p99 latency.
4. drain: ``deployments/digits.yaml`` under steady load; `dgpt donor pause` of a donor that
   holds a replica; every request is counted.
5. kill: SIGKILL of a whole donor that holds a replica (agent, raylet, workers at once, as a
   power cut), under load; failed requests (and whether each was in flight at the kill),
   the time until a request succeeds again, and the time until the app is back at full
   capacity (a replacement replica RUNNING on a live donor).

Writes ``homogeneous.throughput_ratio`` (dgpt / default), ``heterogeneous.p99_ratio``
(dgpt / default), ``drain.failed_requests``, ``drain.requests``, ``kill.failed_requests``,
``kill.recovery_s`` and the raw figures behind them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

RESULTS = Path(__file__).resolve().parent / "results" / "serve_router.json"
DIGITS_YAML = Path(__file__).resolve().parents[1] / "deployments" / "digits.yaml"
DEFAULT_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
DGPT_ROUTER = "dgpt.serve.router:DonorAwareRouter"
# A slow donor: 300 ms on a request that takes a few ms elsewhere, like a device on a slow,
# far-away link. It is well above the p99 that CPU contention alone gives on a loaded 2-core
# host (~150 ms), so the tail measures routing, not the host. The delay is a sleep: it does
# not steal the host's cores.
SLOW_DELAY_MS = 300.0
# Clients at once. Throughput: enough to saturate the head's proxy. Tail latency: fewer, so
# the proxy's own queueing does not hide where requests went.
THROUGHPUT_CONCURRENCY = 8
LATENCY_CONCURRENCY = 4
# Ray health checks tolerant of a loaded 2-core host (as in tests/integration/conftest.py).
RAY_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "3000",
    "RAY_health_check_timeout_ms": "10000",
    "RAY_health_check_failure_threshold": "10",
}
# The heartbeat timeout stays above drain deadline + raylet stop grace: a draining agent does not
# heartbeat until its raylet has stopped, and must not be taken for lost meanwhile.
FAST_DONOR_TIMINGS = {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 60.0, "drain_deadline_s": 20.0,
                      "monitor_interval_s": 1.0}


def _say(msg: str) -> None:
    print(f"[serve_router {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _wait(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the fabric may be mid-change
            last = exc
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f" ({last})" if last else ""))


# ----------------------------------------------------------------------------- configs


def bench_config(node_ids_slow: list[str], slow_delay_ms: float, replicas: int) -> dict[str, Any]:
    """Two copies of the digits app, fixed replica count, differing only in their router."""
    base = json.loads(json.dumps(__import__("yaml").safe_load(DIGITS_YAML.read_text())))
    template = base["applications"][0]
    apps = []
    for name, router in (("bench-default", DEFAULT_ROUTER), ("bench-dgpt", DGPT_ROUTER)):
        app = copy.deepcopy(template)
        app.update(name=name, route_prefix=f"/{name}", import_path="deployments.digits.app:build_app",
                   args={"slow_node_ids": node_ids_slow, "slow_delay_ms": slow_delay_ms})
        (dep,) = app["deployments"]
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = replicas  # fixed: autoscaling would make the two apps differ
        rr = dep["request_router_config"]
        rr["request_router_class"] = router
        if router == DEFAULT_ROUTER:
            rr.pop("request_router_kwargs", None)
        apps.append(app)
    return {"applications": apps}


# ----------------------------------------------------------------------------- measuring


def _bodies() -> tuple[list[dict[str, Any]], list[int]]:
    from dgpt.cli.demo_serve import held_out_digits

    images, labels = held_out_digits()
    return [{"pixels": x} for x in images], labels


def measure(url: str, bodies: list[dict[str, Any]], duration_s: float, concurrency: int,
            warmup: int = 0) -> tuple[dict[str, Any], list[Any], float]:
    """Closed-loop load on ``url`` for ``duration_s``: (summary, samples, measured seconds)."""
    from dgpt.serve.loadgen import LoadLoop, summarize

    if warmup:
        LoadLoop(url, bodies, concurrency=concurrency, max_requests=warmup).start().wait(120)
    loop = LoadLoop(url, bodies, concurrency=concurrency).start()
    started = time.monotonic()
    time.sleep(duration_s)  # the measurement window itself, not synchronisation
    samples = loop.stop()
    elapsed = time.monotonic() - started
    return summarize(samples, elapsed), samples, elapsed


def alternate(urls: dict[str, str], bodies: list[dict[str, Any]], rounds: int, round_s: float,
              concurrency: int) -> dict[str, Any]:
    """Rounds alternating between the routers (ABBA...); per-router figures over all rounds.

    Throughput is every successful request over the summed measurement time; percentiles
    are over every request of every round, so one noisy round weighs what its requests weigh.
    """
    from dgpt.serve.loadgen import summarize

    rounds_out: dict[str, list[dict[str, Any]]] = {k: [] for k in urls}
    pooled: dict[str, list[Any]] = {k: [] for k in urls}
    seconds: dict[str, float] = {k: 0.0 for k in urls}
    for r in range(rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for key in order:
            fig, samples, elapsed = measure(urls[key], bodies, round_s, concurrency, warmup=concurrency * 10)
            rounds_out[key].append(fig)
            pooled[key] += samples
            seconds[key] += elapsed
            _say(f"  round {r + 1}/{rounds} {key}: {fig['throughput_rps']:.0f} rps, p50 {fig['p50_ms']:.1f} ms, "
                 f"p99 {fig['p99_ms']:.1f} ms, failed {fig['failed_requests']}")
    out: dict[str, Any] = {}
    for key in urls:
        out[key] = {**summarize(pooled[key], seconds[key]), "rounds": rounds_out[key]}
    return out


# ----------------------------------------------------------------------------- fabric steps


def _donor_nodes(settings: Any) -> dict[str, str]:
    from dgpt.head.fabric import api_client

    with api_client(settings) as client:
        return {d.name: d.node_id for d in client.donors() if d.node_id and d.state == "active"}


def _app_healthy(settings: Any, name: str, replicas: int, avoid_node: str | None = None) -> bool:
    from dgpt.serve import deploy as sd

    app = sd.status(settings).app(name)
    if app is None or app.status != "RUNNING":
        return False
    running = [r for d in app.deployments for r in d.replicas if r.state == "RUNNING"]
    live = set(_donor_nodes(settings).values())
    return (len(running) >= replicas and all(r.node_id in live for r in running)
            and all(r.node_id != avoid_node for r in running))


def _replica_donor(settings: Any, name: str) -> tuple[str, str]:
    """(donor name, node id) of one RUNNING replica of app ``name``."""
    from dgpt.serve import deploy as sd

    app = sd.status(settings).app(name)
    assert app is not None
    nodes = _donor_nodes(settings)
    held = sorted((r.donor, r.node_id) for d in app.deployments for r in d.replicas
                  if r.state == "RUNNING" and r.node_id in nodes.values())
    return held[0][0], str(held[0][1])


def floor_step(bodies: list[dict[str, Any]], duration_s: float, concurrency: int) -> dict[str, Any]:
    from dgpt.processes import free_port, stop_tree

    port = free_port()
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    proc = subprocess.Popen([uvicorn, "benchmarks.digits_floor:app", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/predict"
        _wait(lambda: httpx.post(url, json=bodies[0], timeout=5).status_code == 200, 120, "the uvicorn floor app")
        return measure(url, bodies, duration_s, concurrency, warmup=concurrency * 10)[0]
    finally:
        stop_tree(proc.pid, grace_s=10)


def drain_step(settings: Any, bodies: list[dict[str, Any]], labels: list[int], concurrency: int) -> dict[str, Any]:
    from dgpt.donor.agent import find_state_dir, state_files
    from dgpt.head.fabric import api_client
    from dgpt.serve.loadgen import LoadLoop, summarize

    victim, node = _replica_donor(settings, "digits")
    with api_client(settings) as client:
        sessions_before = len(next(d for d in client.donors() if d.name == victim).sessions)
    loop = LoadLoop(f"{settings.serve_url}/digits/predict", bodies, concurrency=concurrency,
                    timeout_s=60).start()
    started = time.monotonic()
    try:
        _wait(lambda: loop.count() >= 100, 60, "load before the drain")
        paused_at = time.monotonic()
        state_files(find_state_dir(settings.home, victim))["paused"].write_text(str(time.time()))
        _say(f"  paused {victim} (holds a replica); drain deadline {settings.drain_deadline_s:g}s")

        def drained() -> bool:
            with api_client(settings) as client:
                d = next(d for d in client.donors() if d.name == victim)
            return len(d.sessions) == sessions_before and d.sessions[-1].ended_as == "drained"
        _wait(drained, settings.drain_deadline_s + 90, f"{victim} to drain")
        drained_s = time.monotonic() - paused_at
        _wait(lambda: _app_healthy(settings, "digits", 2, avoid_node=node), 240, "a replacement replica")
        replaced_s = time.monotonic() - paused_at
        after = loop.count()
        _wait(lambda: loop.count() >= after + 100, 60, "load after the drain")
    finally:
        samples = loop.stop()
        state_files(find_state_dir(settings.home, victim))["paused"].unlink(missing_ok=True)
    fig = summarize(samples, time.monotonic() - started)
    return {"donor": victim, "requests": fig["requests"], "failed_requests": fig["failed_requests"],
            "drained_after_s": round(drained_s, 2), "full_capacity_after_s": round(replaced_s, 2),
            "p50_ms": fig["p50_ms"], "p99_ms": fig["p99_ms"],
            "errors": sorted({s.error or str(s.status) for s in samples if not s.ok})[:5]}


def kill_step(settings: Any, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    from dgpt.donor.agent import find_state_dir, state_files
    from dgpt.processes import kill_at_once, read_json, tree
    from dgpt.serve.loadgen import LoadLoop, summarize

    victim, node = _replica_donor(settings, "digits")
    agent_pid = int((read_json(state_files(find_state_dir(settings.home, victim))["pid"]) or {})["pid"])
    procs = tree(agent_pid)  # the agent, `ray start`, the raylet and every worker
    if not [p for p in procs if p.name() == "raylet"]:
        raise RuntimeError(f"no raylet under {victim}'s agent (pid {agent_pid})")
    loop = LoadLoop(f"{settings.serve_url}/digits/predict", bodies, concurrency=concurrency,
                    timeout_s=60).start()
    started = time.monotonic()
    try:
        _wait(lambda: loop.count() >= 100, 60, "load before the kill")
        killed_at = time.monotonic()
        kill_at_once(procs)  # all at once, as a power cut
        killed_done = time.monotonic()
        psutil.wait_procs(procs, timeout=10)
        _say(f"  SIGKILLed all {len(procs)} processes of {victim} (agent pid {agent_pid})")
        _wait(lambda: any(s.ok and s.started_s > killed_at for s in loop.snapshot()), 120,
              "a successful request after the kill")
        answered_s = time.monotonic() - killed_at
        _wait(lambda: _app_healthy(settings, "digits", 2, avoid_node=node), 300, "full capacity after the kill")
        recovery_s = time.monotonic() - killed_at
        after = loop.count()
        _wait(lambda: loop.count() >= after + 100, 60, "load after recovery")
    finally:
        samples = loop.stop()
    fig = summarize(samples, time.monotonic() - started)
    failed = [s for s in samples if not s.ok]
    in_flight = [s for s in samples if s.started_s <= killed_done and s.started_s + s.latency_s >= killed_at]
    return {"donor": victim, "how": "SIGKILL of the whole donor (agent, raylet, workers) at once",
            "processes_killed": len(procs), "requests": fig["requests"], "failed_requests": fig["failed_requests"],
            "in_flight_at_kill": len(in_flight),
            "failed_not_in_flight": sum(1 for s in failed if s not in in_flight),
            "failed_after_recovery": sum(1 for s in failed if s.started_s > killed_at + recovery_s),
            "answered_again_s": round(answered_s, 2), "recovery_s": round(recovery_s, 2),
            "errors": sorted({s.error or str(s.status) for s in failed})[:5]}


# ----------------------------------------------------------------------------- main


def run(quick: bool, out: Path) -> dict[str, Any]:
    os.environ.update(RAY_ENV)
    for key in [k for k in os.environ if k.startswith("DGPT_")] + ["RAY_ADDRESS"]:
        os.environ.pop(key, None)
    from dgpt.head import fabric
    from dgpt.serve import deploy as sd

    rounds, round_s, floor_s = (2, 8.0, 8.0) if quick else (4, 20.0, 20.0)
    concurrency = THROUGHPUT_CONCURRENCY
    home = Path(tempfile.mkdtemp(prefix="dgpt-bench-"))
    settings = fabric.private_settings(home, **FAST_DONOR_TIMINGS)
    bodies, labels = _bodies()
    result: dict[str, Any] = {
        "meta": {"quick": quick, "concurrency": concurrency, "rounds": rounds, "round_s": round_s,
                 "donors": 3, "host_cpus": psutil.cpu_count(), "python": platform.python_version(),
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "routers": {"default": DEFAULT_ROUTER, "dgpt": DGPT_ROUTER}},
    }
    _say("floor: the digits model behind plain uvicorn, no Ray")
    result["floor"] = floor_step(bodies, floor_s, concurrency)
    _say(f"  floor: {result['floor']['throughput_rps']:.0f} rps, p50 {result['floor']['p50_ms']:.1f} ms")
    try:
        _say(f"dgpt up --donors 3 (DGPT_HOME={home})")
        fabric.up(settings, 3, timeout_s=400)
        urls = {"default": f"{settings.serve_url}/bench-default/predict",
                "dgpt": f"{settings.serve_url}/bench-dgpt/predict"}

        _say("homogeneous: two copies of the app, three identical replicas each")
        names = sd.deploy_config(settings, bench_config([], 0.0, 3), "bench")
        sd.wait_running(settings, names, timeout_s=400)
        homo = alternate(urls, bodies, rounds, round_s, concurrency)
        homo["throughput_ratio"] = round(homo["dgpt"]["throughput_rps"] / homo["default"]["throughput_rps"], 3)
        homo["p99_ratio"] = round(homo["dgpt"]["p99_ms"] / homo["default"]["p99_ms"], 3)
        homo["concurrency"] = concurrency
        result["homogeneous"] = homo
        _say(f"  throughput ratio dgpt/default: {homo['throughput_ratio']}")

        slow_donor = "donor-3"
        slow_node = _donor_nodes(settings)[slow_donor]
        _say(f"heterogeneous: the replica on {slow_donor} adds {SLOW_DELAY_MS:g} ms to every request")
        names = sd.deploy_config(settings, bench_config([slow_node], SLOW_DELAY_MS, 3), "bench")
        _wait(lambda: all(_app_healthy(settings, n, 3) for n in names), 400, "the slowed apps")
        hetero = alternate(urls, bodies, rounds, round_s, LATENCY_CONCURRENCY)
        hetero["p99_ratio"] = round(hetero["dgpt"]["p99_ms"] / hetero["default"]["p99_ms"], 3)
        hetero["throughput_ratio"] = round(hetero["dgpt"]["throughput_rps"] / hetero["default"]["throughput_rps"], 3)
        hetero["slow_donor"] = slow_donor
        hetero["slow_delay_ms"] = SLOW_DELAY_MS
        hetero["concurrency"] = LATENCY_CONCURRENCY
        result["heterogeneous"] = hetero
        _say(f"  p99 ratio dgpt/default: {hetero['p99_ratio']}")

        _say("drain: deployments/digits.yaml under load, `dgpt donor pause` of a donor with a replica")
        for name in ("bench-default", "bench-dgpt"):
            sd.delete(settings, name)
            sd.wait_deleted(settings, name)
        names = sd.deploy(settings, DIGITS_YAML)
        sd.wait_running(settings, names, timeout_s=400)
        _wait(lambda: _app_healthy(settings, "digits", 2), 240, "digits with two replicas")
        result["drain"] = drain_step(settings, bodies, labels, LATENCY_CONCURRENCY)
        _say(f"  drain: {result['drain']['failed_requests']} of {result['drain']['requests']} requests failed")

        _wait(lambda: len(_donor_nodes(settings)) == 3, 240, "the paused donor back")
        _wait(lambda: _app_healthy(settings, "digits", 2), 240, "digits with two replicas")
        _say("kill: SIGKILL of a whole donor under load")
        result["kill"] = kill_step(settings, bodies, LATENCY_CONCURRENCY)
        _say(f"  kill: {result['kill']['failed_requests']} of {result['kill']['requests']} failed; "
             f"answering again after {result['kill']['answered_again_s']}s, full capacity after "
             f"{result['kill']['recovery_s']}s")
    finally:
        _say("dgpt down")
        fabric.down(settings)
        result["meta"]["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        _say(f"wrote {out}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Shorter rounds (about 10 minutes on 2 cores).")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Where to write the JSON results.")
    args = parser.parse_args()
    res = run(args.quick, args.out)
    for key, path in (("homogeneous.throughput_ratio", ("homogeneous", "throughput_ratio")),
                      ("heterogeneous.p99_ratio", ("heterogeneous", "p99_ratio")),
                      ("drain.failed_requests", ("drain", "failed_requests")),
                      ("drain.requests", ("drain", "requests")),
                      ("kill.failed_requests", ("kill", "failed_requests")),
                      ("kill.recovery_s", ("kill", "recovery_s"))):
        value: Any = res
        for part in path:
            value = value.get(part, {}) if isinstance(value, dict) else None
        print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
