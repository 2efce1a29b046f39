"""Control plane at fleet scale: dgpt's head against today's path, side by side in one run.

    python -m benchmarks.control_plane [--quick] [--out benchmarks/results/control_plane.json]

Both heads run here, one after the other, with the same settings:

- **new**: this tree's head: one control-plane actor holding the fleet in memory, its REST
  API on its own uvicorn server and port (``DGPT_API_PORT``).
- **baseline** ("today's path"): the tree at commit ``BASELINE_COMMIT`` (the last one before
  the control-plane rework), unpacked with ``git archive`` into a temporary folder and run
  with ``PYTHONPATH`` pointing there: its API is a Ray Serve app behind the inference proxy
  (``DGPT_HTTP_PORT``), calling a registry actor per request, writing SQLite on every
  heartbeat and listing every donor for each placement snapshot and autoscaler tick.

For each head:

1. registration: ``R`` protocol-level donors register over HTTP (``POST /api/v1/donors`` with
   a join token) from 64 concurrent keep-alive clients, against a fresh head;
2. the head is stopped, its SQLite file seeded to the first fleet size (``active`` donors with
   an open session and a Ray node id, the rest standby, ended sessions for every fourth donor
   so reliability fits have work), the head restarted (timed), and measured; then the same
   for the second fleet size;
3. heartbeats: closed loops of 64 and 256 clients, each donor sending what it would
   (``{"state": "active"}`` or ``{"state": "standby"}``, no ``wait_s``), active and standby in
   the proportion the fleet needs them at its intervals;
4. the same loops while a digits replica on the head serves 16 closed-loop inference clients;
5. placement snapshot and autoscaler collect+decide timings, from a Ray driver;
6. ``GET /api/v1/donors``: pages of 500 (new), the full list (baseline);
7. headroom: the best heartbeat throughput divided by the rate the fleet needs.

Load generators run in their own processes (raw asyncio HTTP/1.1 with keep-alive), so they
do not share this process's GIL. The benchmark takes ``/tmp/dgpt-fabric.lock`` (``--lock``)
only while a head runs, and stops every process it started by pid. Writes
``benchmarks/results/control_plane.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "control_plane.json"
DIGITS_YAML = REPO_ROOT / "deployments" / "digits.yaml"
#: Today's path: the last commit before the control-plane rework.
BASELINE_COMMIT = "6cc3c32"
LOCK_PATH = "/tmp/dgpt-fabric.lock"

#: The heartbeat interval of both heads (the default), and a heartbeat timeout long enough
#: that no seeded donor times out during the run (they are not all heartbeated at the rate
#: the fleet would need: the point is to find that rate's ceiling).
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TIMEOUT_S = 3600.0
#: Long enough that neither autoscaler drains a seeded donor during the run.
IDLE_TIMEOUT_S = 3600.0
REGISTER_CONCURRENCY = 64
HEARTBEAT_CONCURRENCY = (64, 256)
INFERENCE_CONCURRENCY = 16
#: A request slower than this counts as failed (a donor agent would retry).
REQUEST_TIMEOUT_S = 10.0
#: Requests in the first second of a loop open connections and warm caches: not measured.
WARMUP_S = 1.0
PAGE_LIMIT = 500
PAGE_CALLS = 20
SECRET_SALT = "dgpt-bench-control-plane"
GIB = 2**30

# Targets (DESIGN's control-plane rules, in numbers).
TARGET_HEADROOM = 1.0
TARGET_HEARTBEAT_P99_MS = 100.0
TARGET_SNAPSHOT_P99_MS = 50.0

# Seeded donors: three device classes of different size, so fits and placement see a mix.
_CLASSES = (("laptop", 4, 8, 20.0, 2.0, 4), ("desktop", 8, 16, 60.0, 4.0, 8), ("server", 16, 64, 150.0, 8.0, 32))


def _say(msg: str) -> None:
    print(f"[control_plane {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ pure parts


def donor_id(i: int) -> str:
    """The id of seeded donor ``i`` (deterministic, so load generators can compute it)."""
    return f"bench-{i:06d}"


def donor_secret(donor: str) -> str:
    """The secret of a seeded donor (deterministic; its sha256 is stored as ``secret_hash``)."""
    return hashlib.sha256(f"{SECRET_SALT}:{donor}".encode()).hexdigest()[:40]


def node_id_of(donor: str) -> str:
    """A Ray-node-id-shaped (56 hex) id for an active seeded donor; no such node runs."""
    return hashlib.sha256(f"node:{donor}".encode()).hexdigest()[:56]


def needed_beats_per_s(active: int, standby: int, heartbeat_interval_s: float, standby_interval_s: float) -> float:
    """Heartbeats per second a fleet sends at its intervals: active donors every
    ``heartbeat_interval_s``, standby ones every ``standby_interval_s``."""
    if heartbeat_interval_s <= 0 or standby_interval_s <= 0:
        raise ValueError(f"intervals must be > 0, got {heartbeat_interval_s} and {standby_interval_s}")
    return active / heartbeat_interval_s + standby / standby_interval_s


def active_fraction(active: int, standby: int, heartbeat_interval_s: float, standby_interval_s: float) -> float:
    """The share of the fleet's heartbeats that active donors send."""
    needed = needed_beats_per_s(active, standby, heartbeat_interval_s, standby_interval_s)
    return (active / heartbeat_interval_s) / needed if needed > 0 else 0.0


def headroom(capacity_rps: float, needed_rps: float) -> float | None:
    """Sustained heartbeat capacity over the rate the fleet needs (>= 1: the head keeps up)."""
    if needed_rps <= 0:
        return None
    return round(capacity_rps / needed_rps, 3)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (``q`` in [0, 1]); None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(values_s: list[float]) -> dict[str, Any]:
    """n, p50, p99, max (milliseconds) of durations in seconds."""
    s = sorted(values_s)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {"n": len(s), "p50_ms": ms(percentile(s, 0.5)), "p99_ms": ms(percentile(s, 0.99)),
            "max_ms": ms(s[-1] if s else None)}


def _profile(i: int) -> tuple[str, str, str]:
    cls, cpus, mem_gb, gflops, cap_cpus, cap_mem_gb = _CLASSES[i % len(_CLASSES)]
    profile = {"cpus": cpus, "memory_bytes": mem_gb * GIB, "gpus": [], "cpu_gflops": gflops, "gpu_gflops": 0.0,
               "disk_free_bytes": 0, "platform": "bench", "hostname": f"host-{i}"}
    caps = {"cpus": cap_cpus, "memory_bytes": cap_mem_gb * GIB, "gpus": 0, "disk_bytes": 0}
    return cls, json.dumps(profile), json.dumps(caps)


def seed_fleet(db_path: Path, start: int, stop: int, active: int, now: float) -> dict[str, int]:
    """Insert seeded donors ``start..stop-1`` into a head's SQLite file (its schema must exist).

    Donors with index < ``active`` are active (state and target ``active``, a node id, an
    open session that began up to an hour ago); the others standby. Every fourth donor gets
    two ended sessions (every eighth one of them ``lost``), so reliability fits have data.
    The columns are those both heads' ``donors`` and ``sessions`` tables share.

    Returns:
        The rows inserted: {"donors", "active", "sessions"}.
    Raises:
        ValueError: a bad range.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"seed range {start}..{stop} is invalid")
    donors: list[tuple[Any, ...]] = []
    sessions: list[tuple[Any, ...]] = []
    n_active = 0
    for i in range(start, stop):
        d = donor_id(i)
        cls, profile, caps = _profile(i)
        is_active = i < active
        n_active += is_active
        labels = json.dumps({"bench": "control-plane"})
        donors.append((d, hashlib.sha256(donor_secret(d).encode()).hexdigest(), d, cls, f"owner-{i % 5000}", profile,
                       caps, labels, "active" if is_active else "standby", "active" if is_active else "standby",
                       node_id_of(d) if is_active else None, 0, None, None, now - 86400 * 30 + i * 0.001, now, None))
        if i % 4 == 0:
            for k in (2, 1):
                began = now - 86400 * k - (i % 3600)
                lost = i % 8 == 0 and k == 1
                sessions.append((d, node_id_of(f"{d}:{k}"), began, began + 3600 * (1 + i % 5),
                                 "lost" if lost else "drained", "Ray node died" if lost else "drained"))
        if is_active:
            sessions.append((d, node_id_of(d), now - 600 - (i % 3000), None, None, None))
    db = sqlite3.connect(str(db_path), timeout=60)
    try:
        with db:
            db.executemany(
                """INSERT INTO donors(donor_id, secret_hash, name, device_class, owner, profile_json, caps_json,
                       labels_json, state, target, node_id, owner_active, drain_reason, drain_deadline_at,
                       registered_at, last_heartbeat_at, token_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                donors)
            db.executemany("""INSERT INTO sessions(donor_id, node_id, started_at, ended_at, ended_as, end_reason)
                              VALUES (?,?,?,?,?,?)""", sessions)
    finally:
        db.close()
    return {"donors": len(donors), "active": n_active, "sessions": len(sessions)}


def fleet_counts(db_path: Path) -> dict[str, int]:
    """Donors by state in a head's SQLite file."""
    db = sqlite3.connect(str(db_path), timeout=60)
    try:
        return {s: n for s, n in db.execute("SELECT state, COUNT(*) FROM donors GROUP BY state")}
    finally:
        db.close()


def evaluate_targets(result: dict[str, Any], big: str) -> list[dict[str, Any]]:
    """The three targets, each with the value measured on the new head and met/missed."""
    fleet = result.get("heads", {}).get("new", {}).get("fleets", {}).get(big, {})

    def target(what: str, goal: str, value: float | None, ok: Callable[[float], bool]) -> dict[str, Any]:
        return {"what": what, "target": goal, "value": value,
                "met": None if value is None else bool(ok(value)),
                "status": "not measured" if value is None else ("met" if ok(value) else "missed")}

    # At the rate the fleet sends (paced): a saturating closed loop's p99 is its queue
    # (Little's law: clients / throughput), whatever the head does.
    loaded_p99 = fleet.get("heartbeat_paced_with_inference", {}).get("p99_ms")
    snap = [fleet.get("placement", {}).get("placement_view_ms", {}).get("p99_ms"),
            fleet.get("placement", {}).get("driver_placement_view", {}).get("p99_ms")]
    snap_p99 = max((v for v in snap if v is not None), default=None)
    # Ticks while the fleet heartbeats at its needed rate (with and without inference, worst);
    # the closed loops saturate the control plane on purpose, and their ticks wait with it
    # (reported apart as the whole run's p99).
    paced = [fleet.get(k, {}).get("p99_ms") for k in ("autoscaler_paced", "autoscaler_paced_with_inference")]
    tick_p99 = max((v for v in paced if v is not None), default=None)
    return [
        target(f"heartbeat headroom at {big} registered donors", f">= {TARGET_HEADROOM}", fleet.get("headroom"),
               lambda v: v >= TARGET_HEADROOM),
        target("heartbeat p99 while the inference endpoint is loaded (paced at the needed rate)",
               f"< {TARGET_HEARTBEAT_P99_MS} ms",
               loaded_p99, lambda v: v < TARGET_HEARTBEAT_P99_MS),
        target(f"placement snapshot p99 at {big} (in the actor and through Ray, worst)", f"< {TARGET_SNAPSHOT_P99_MS} ms",
               snap_p99, lambda v: v < TARGET_SNAPSHOT_P99_MS),
        target(f"autoscaler tick (collect + decide) p99 at {big}, heartbeats at the needed rate (with and without "
               "inference, worst)", f"< {TARGET_SNAPSHOT_P99_MS} ms", tick_p99,
               lambda v: v < TARGET_SNAPSHOT_P99_MS),
    ]


def ratios(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """new / baseline for each fleet size's headline figures (None where one side is missing)."""

    def ratio(a: Any, b: Any) -> float | None:
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
            return None
        return round(a / b, 3)

    def get(d: dict[str, Any], *path: str) -> Any:
        for p in path:
            d = d.get(p, {}) if isinstance(d, dict) else {}
        return d if not isinstance(d, dict) or d else None

    out: dict[str, Any] = {"registration_rps": ratio(get(new, "registration", "throughput_rps"),
                                                     get(old, "registration", "throughput_rps"))}
    for size in sorted(set(new.get("fleets", {})) & set(old.get("fleets", {})), key=int):
        n, o = new["fleets"][size], old["fleets"][size]
        row: dict[str, Any] = {"restart_s": ratio(n.get("restart_s"), o.get("restart_s")),
                               "heartbeat_capacity_rps": ratio(n.get("heartbeat_capacity_rps"),
                                                               o.get("heartbeat_capacity_rps")),
                               "headroom": ratio(n.get("headroom"), o.get("headroom"))}
        for c in map(str, HEARTBEAT_CONCURRENCY):
            for kind in ("heartbeat", "heartbeat_with_inference"):
                row[f"{kind}_{c}_rps"] = ratio(get(n, kind, c, "throughput_rps"), get(o, kind, c, "throughput_rps"))
                row[f"{kind}_{c}_p99"] = ratio(get(n, kind, c, "p99_ms"), get(o, kind, c, "p99_ms"))
        for kind in ("heartbeat_paced", "heartbeat_paced_with_inference"):
            row[f"{kind}_p99"] = ratio(get(n, kind, "p99_ms"), get(o, kind, "p99_ms"))
        row["placement_snapshot_p99"] = ratio(get(n, "placement", "driver_placement_view", "p99_ms"),
                                              get(o, "placement", "driver_placement_view", "p99_ms"))
        row["autoscaler_collect_decide_p99"] = ratio(get(n, "autoscaler", "tick_p99_ms"),
                                                     get(o, "autoscaler", "tick_p99_ms"))
        row["donors_list_p50"] = ratio(get(n, "donors_list", "p50_ms"), get(o, "donors_list", "p50_ms"))
        out[size] = row
    return out


# ============================================================================ load generator


def _register_body(i: int) -> bytes:
    cls, profile, caps = _profile(i)
    return json.dumps({"name": f"reg-{i}", "device_class": cls, "owner": f"reg-owner-{i % 1000}",
                       "profile": json.loads(profile), "caps": json.loads(caps)}).encode()


def _request(host: str, port: int, path: str, body: bytes, auth: str | None) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    if auth:
        head += f"Authorization: Bearer {auth}\r\n"
    return head.encode() + b"\r\n" + body


def _get_request(host: str, port: int, path: str, auth: str | None) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if auth:
        head += f"Authorization: Bearer {auth}\r\n"
    return (head + "\r\n").encode()


def request_maker(spec: dict[str, Any]) -> Callable[[], bytes]:
    """What each request of a load spec is (see :func:`run_load`), one call per request."""
    host, port, prefix = spec["host"], int(spec["port"]), spec.get("prefix", "/api/v1")
    n = [0]
    mode = spec["mode"]
    if mode == "register":
        def register() -> bytes:
            i = n[0]
            n[0] += 1
            return _request(host, port, f"{prefix}/donors", _register_body(i), spec["join_token"])
        return register
    if mode == "post":
        fixed = _request(host, port, spec["path"], json.dumps(spec["body"]).encode(), spec.get("auth"))
        return lambda: fixed
    if mode == "get":
        fixed = _get_request(host, port, spec["path"], spec.get("auth"))
        return lambda: fixed
    if mode != "heartbeat":
        raise ValueError(f"load mode must be register, heartbeat, post or get, got {mode!r}")
    a0, a1 = spec["active"]
    s0, s1 = spec["standby"]
    p = float(spec["active_fraction"]) if a1 > a0 else 0.0
    if s1 <= s0:
        p = 1.0
    if a1 <= a0 and s1 <= s0:
        raise ValueError("a heartbeat load needs active or standby donors")
    cursor = {"a": a0, "s": s0}
    bodies = {True: b'{"state":"active"}', False: b'{"state":"standby"}'}

    def heartbeat() -> bytes:
        k = n[0]
        n[0] += 1
        # Bresenham: exactly floor(k * p) of the first k requests are active donors'.
        is_active = math.floor((k + 1) * p) > math.floor(k * p)
        key, lo, hi = ("a", a0, a1) if is_active else ("s", s0, s1)
        i = cursor[key]
        cursor[key] = lo if i + 1 >= hi else i + 1
        d = donor_id(i)
        return _request(host, port, f"{prefix}/donors/{d}/heartbeat", bodies[is_active], donor_secret(d))

    return heartbeat


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; (status, whether the server closes the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip().lower()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers.get("connection") == "close"


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    make = request_maker(spec)
    host, port = spec["host"], int(spec["port"])
    concurrency = int(spec["concurrency"])
    duration_s = float(spec.get("duration_s", 10.0))
    warmup_s = float(spec.get("warmup_s", 0.0))
    max_requests = spec.get("max_requests")
    timeout_s = float(spec.get("timeout_s", REQUEST_TIMEOUT_S))
    expect = int(spec.get("expect", 200))
    samples: list[tuple[float, float, int]] = []  # (started, latency, status: 0 = no answer)
    errors: Counter[str] = Counter()
    # Paced (open loop): request k is due at began + k / rate, as donors send on their own
    # clocks; its latency counts from when it was due, so a head that falls behind pays for
    # the wait too (no coordinated omission). Unpaced: a closed loop, each client at once.
    rate = float(spec.get("rate_per_s") or 0.0)
    issued = [0]
    began = time.perf_counter()
    until = began + duration_s

    async def client() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.perf_counter() < until and (max_requests is None or issued[0] < max_requests):
            k = issued[0]
            issued[0] += 1
            if rate > 0:
                due = began + k / rate
                if due >= until:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            req = make()
            t0 = began + k / rate if rate > 0 else time.perf_counter()
            close = False
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
                reader, writer = conn
                writer.write(req)
                status, close = await asyncio.wait_for(_read_response(reader), timeout_s)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:
                status, close = 0, True
                errors[type(exc).__name__] += 1
            samples.append((t0, time.perf_counter() - t0, status))
            if close and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    ended = time.perf_counter()
    window_start = began + warmup_s
    window_end = ended if max_requests is not None else min(ended, until)
    window_s = max(1e-9, window_end - window_start)
    # Every request that finished after the warm-up (a slow head's late answers included);
    # throughput: the ok ones that finished inside the window.
    measured = [s for s in samples if s[0] + s[1] >= window_start]
    ok = [s for s in measured if s[2] == expect]
    done_ok = sum(1 for s in ok if s[0] + s[1] <= window_end)
    statuses = Counter(str(s[2]) for s in measured)
    extra: dict[str, Any] = {}
    if rate > 0:
        due = int(duration_s * rate)
        extra = {"offered_rps": rate, "due": due, "sent": min(issued[0], due),
                 "sent_fraction": round(min(issued[0], due) / max(1, due), 3)}
    out = {"concurrency": concurrency, **extra, "requests": len(measured), "ok": len(ok), "failed": len(measured) - len(ok),
           "window_s": round(window_s, 3), "throughput_rps": round(done_ok / window_s, 1),
           "statuses": dict(statuses), "errors": dict(errors)}
    # Latency of every measured request, failed ones up to their failure (a timeout counts in full).
    out.update({k: v for k, v in summarize_ms([s[1] for s in measured]).items() if k != "n"})
    return out


def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop HTTP load as ``spec`` says; returns its figures.

    ``spec``: mode (register | heartbeat | post | get), host, port, concurrency (clients, or
    the most requests in flight when paced), rate_per_s (paced; absent: closed loop),
    duration_s, warmup_s, max_requests (register), timeout_s, expect (the ok status);
    heartbeat: active and standby ([start, stop) seeded donor indices), active_fraction;
    register: join_token; post/get: path, body, auth.
    """
    try:
        import uvloop

        return uvloop.run(_load(spec))
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(_load(spec))


class LoadProcess:
    """A load generator in its own process (it does not share the benchmark's GIL)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--side", "load",
                                      "--spec", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                                     env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})

    def result(self, timeout_s: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {"error": f"load generator did not finish in {timeout_s:.0f}s"}
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if self.proc.returncode != 0 or line is None:
            return {"error": f"load generator exited {self.proc.returncode}"}
        return dict(json.loads(line[len("RESULT "):]))


def load(spec: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    wait = timeout_s or float(spec.get("duration_s", 10)) + 2 * float(spec.get("timeout_s", REQUEST_TIMEOUT_S)) + 30
    return LoadProcess(spec).result(wait)


# ============================================================================ Ray drivers


#: Snapshots a new driver takes before the timed ones: its first call sets up Ray's path to
#: the door, and a young driver's heap soon has its first full garbage collection (about 60
#: ms of the driver's own, whatever it allocates); both are reported apart.
SNAPSHOT_WARMUP_CALLS = 20


def _driver_new(gcs: str, samples: int) -> dict[str, Any]:
    """Timings from this tree's control-plane actor, as a driver calling dgpt.placement would."""
    import ray

    from dgpt import contract

    ray.init(address=gcs, namespace=contract.NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    cp = ray.get_actor(contract.REGISTRY_ACTOR, namespace=contract.NAMESPACE)
    fleet_view: list[float] = []
    placement_view: list[float] = []
    for _ in range(samples):
        t: Any = ray.get(cp.fleet_timings.remote(1), timeout=120)
        fleet_view.append(t["fleet_view_ms"] / 1000)
        placement_view.append(t["placement_view_ms"] / 1000)
    through_ray: list[float] = []
    active = 0
    for _ in range(SNAPSHOT_WARMUP_CALLS + 3 * samples):
        t0 = time.perf_counter()
        view: Any = ray.get(cp.placement_view.remote(), timeout=120)
        through_ray.append(time.perf_counter() - t0)
        active = len(view.active)
    warmup, through_ray = through_ray[:SNAPSHOT_WARMUP_CALLS], through_ray[SNAPSHOT_WARMUP_CALLS:]
    status: Any = ray.get(cp.autoscaler_status.remote(), timeout=60)
    ray.shutdown()
    slowest = sorted(range(len(through_ray)), key=lambda i: -through_ray[i])[:3]
    return {"placement": {"fleet_view_ms": summarize_ms(fleet_view), "placement_view_ms": summarize_ms(placement_view),
                          "driver_placement_view": {**summarize_ms(through_ray),
                                                    "slowest": [[i, round(through_ray[i] * 1000, 2)] for i in slowest],
                                                    "first_call_ms": round(warmup[0] * 1000, 2),
                                                    "warmup": summarize_ms(warmup)},
                          "active_in_view": active},
            "autoscaler": {"tick_p99_ms": status.get("tick_p99_ms"), "ticks": status.get("ticks"),
                           "errors": status.get("errors"), "last_tick": status.get("last_tick"),
                           "what": "the control plane's own collect + decide durations (its last <= 1000 ticks)"}}


def _driver_ticks(gcs: str, windows: dict[str, list[float]]) -> dict[str, Any]:
    """The control plane's autoscaler tick durations in each named wall-clock window."""
    import ray

    from dgpt import contract

    ray.init(address=gcs, namespace=contract.NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    cp = ray.get_actor(contract.REGISTRY_ACTOR, namespace=contract.NAMESPACE)
    out = {}
    for name, (start, end) in windows.items():
        ms: Any = ray.get(cp.autoscaler_ticks.remote(start, end), timeout=60)
        out[name] = {**summarize_ms([m / 1000 for m in ms]),
                     "what": "collect + decide of the ticks that started during the phase"}
    ray.shutdown()
    return out


def _driver_old(gcs: str, samples: int, budget_s: float, hb_timeout_s: float) -> dict[str, Any]:
    """Timings of the baseline tree: the registry actor's placement_snapshot, and the old
    autoscaler's collect + decide (list_donors + build_context + default_policy)."""
    import importlib

    import ray

    # The baseline tree's modules (autoscaler.collect exists only there).
    load_bounds = importlib.import_module("autoscaler.bounds").load_bounds
    build_context = importlib.import_module("autoscaler.collect").build_context
    default_policy = importlib.import_module("autoscaler.policies").default_policy
    RayAdapter = importlib.import_module("dgpt.head.ray_adapter").RayAdapter

    ray.init(address=gcs, namespace="dgpt", logging_level=logging.ERROR, log_to_driver=False)
    reg = ray.get_actor("registry", namespace="dgpt")

    def timed(what: str, call: Callable[[float], Any]) -> dict[str, Any]:
        values: list[float] = []
        notes: list[str] = []
        deadline = time.monotonic() + budget_s
        while len(values) < samples:
            left = deadline - time.monotonic()
            if left <= 0:
                notes.append(f"time budget of {budget_s:.0f}s spent")
                break
            t0 = time.perf_counter()
            try:
                extra = call(left)
            except ray.exceptions.GetTimeoutError:
                notes.append(f"a call did not answer within the {left:.0f}s left of the budget")
                break
            values.append(time.perf_counter() - t0)
            if extra:
                notes.append(extra)
        return {**summarize_ms(values), "what": what, "notes": sorted(set(notes))}

    def snapshot(left: float) -> str:
        snap: Any = ray.get(reg.placement_snapshot.remote(), timeout=max(1.0, left))
        # Only donors whose Ray node reports usage make it in (none of the seeded ones): its
        # cost is listing and fitting the whole fleet.
        return f"{len(getattr(snap, 'nodes', ()) or ())} nodes in a snapshot"

    placement = timed("ray.get(registry.placement_snapshot.remote()) from a driver", snapshot)
    adapter = RayAdapter(gcs)
    bounds = load_bounds(min_active=0, max_active=2000, idle_timeout_s=IDLE_TIMEOUT_S,
                         activation_lead_time_s=max(10.0, 4 * HEARTBEAT_INTERVAL_S),
                         min_lifetime_s=min(120.0, IDLE_TIMEOUT_S), scale_down_cooldown_s=min(60.0, IDLE_TIMEOUT_S / 2))

    def collect_decide(left: float) -> str:
        donors: list[Any] = ray.get(reg.list_donors.remote(), timeout=max(1.0, left))
        usage, demand = adapter.usage_and_demand()
        ctx = build_context(donors, usage, demand, bounds, time.time(), hb_timeout_s)
        default_policy(ctx, None)
        return f"{len(donors)} donors listed"

    autoscaler = timed("list_donors + build_context + default_policy, as the old autoscaler's tick", collect_decide)
    ray.shutdown()
    return {"placement": {"driver_placement_view": placement},
            "autoscaler": {"tick_p99_ms": autoscaler["p99_ms"], "collect_decide": autoscaler}}


# ============================================================================ heads


class Head:
    """One head (new or baseline tree) on private ports and its own DGPT_HOME, started by pid."""

    def __init__(self, kind: str, tree: Path, home: Path, settings: Any) -> None:
        self.kind, self.tree, self.home, self.settings = kind, tree, home, settings
        self.proc: subprocess.Popen[bytes] | None = None
        port = settings.api_port if kind == "new" else settings.http_port
        self.host = "127.0.0.1"
        self.port = int(port)
        self.api = f"http://{self.host}:{self.port}/api/v1"
        self.serve = f"http://{self.host}:{settings.http_port}"
        self.dashboard = f"http://{self.host}:{settings.dashboard_port}"
        self.gcs = f"{self.host}:{settings.ray_port}"
        self.db = home / "head" / "registry.sqlite"

    def env(self) -> dict[str, str]:
        from dgpt.head.process import settings_env

        env = {k: v for k, v in settings_env(self.settings).items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = str(self.tree)
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, timeout_s: float = 420.0) -> float:
        """Start the head's supervisor; seconds until its API answers."""
        import httpx

        log = self.home / "logs" / "head.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        info = self.home / "head" / "head.json"
        info.unlink(missing_ok=True)
        t0 = time.monotonic()
        with open(log, "ab") as out:
            # cwd: `python -m` puts it first on sys.path, so it must be the tree this head runs.
            self.proc = subprocess.Popen([sys.executable, "-m", "dgpt.head.process"], cwd=self.tree, env=self.env(),
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        (self.home / "head").mkdir(parents=True, exist_ok=True)
        (self.home / "head" / "head.pid").write_text(json.dumps({"pid": self.proc.pid}))
        while True:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-20:]
                raise RuntimeError(f"the {self.kind} head exited ({self.proc.returncode}):\n  " + "\n  ".join(tail))
            if info.is_file():
                try:
                    if httpx.get(f"{self.api}/health", timeout=5).status_code == 200:
                        return round(time.monotonic() - t0, 2)
                except httpx.HTTPError:
                    pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"the {self.kind} head did not answer {self.api}/health in {timeout_s:.0f}s; see {log}")
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to the supervisor (it stops its Ray processes), then any raylet left of it."""
        import psutil

        from dgpt.processes import stop_tree

        if self.proc is not None and self.proc.poll() is None:
            stop_tree(self.proc.pid, grace_s=60)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None
        marker = str(_ray_temp(self.home))
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                    stop_tree(p.pid, grace_s=10)

    @property
    def api_key(self) -> str:
        return (self.home / "head" / "api_key").read_text().strip()

    @property
    def ray_token_path(self) -> Path:
        return self.home / "head" / "ray_auth_token"

    def get(self, path: str, timeout_s: float = 60.0) -> Any:
        import httpx

        r = httpx.get(f"{self.api}{path}", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=timeout_s)
        r.raise_for_status()
        return r.json()

    def driver(self, args: list[str], timeout_s: float) -> dict[str, Any]:
        """Run a Ray driver of this head's tree (``--side driver-*``); its RESULT."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DGPT_") and k != "RAY_ADDRESS"}
        env.update({"PYTHONPATH": str(self.tree), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path), "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--gcs", self.gcs],
                                  cwd=self.tree, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"the driver did not finish in {timeout_s:.0f}s"}
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            return {"error": f"driver exited {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}"}
        return dict(json.loads(line[len("RESULT "):]))


def _ray_temp(home: Path) -> Path:
    # Both trees name the head's Ray temp folder this way (dgpt.head.paths.ray_temp_dir).
    return Path("/tmp") / f"dgpt-{hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:10]}"


#: A side holds the fabric lock across its head restarts (seeding between them takes
#: seconds), but lets go between fleet sizes once it has held it this long, so other users
#: of the machine get a turn (at most ~15 minutes at a time: the baseline's largest fleet
#: alone takes ~12).
LOCK_TURN_S = 3 * 60.0


class FabricLock:
    """The host-wide fabric lock (one Ray cluster at a time), held while heads run."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file: Any = None
        self._since = 0.0

    def acquire(self) -> None:
        if not self.path or self._file is not None:
            return
        import fcntl

        self._file = open(self.path, "a")  # noqa: SIM115 - held across calls
        t0 = time.monotonic()
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._since = time.monotonic()
        if self._since - t0 > 1:
            _say(f"  (waited {self._since - t0:.0f}s for {self.path})")

    def release(self) -> None:
        if self._file is None:
            return
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def turn(self) -> None:
        """Between fleet sizes: let others in if this side has held the lock a while."""
        if self._file is not None and time.monotonic() - self._since > LOCK_TURN_S:
            self.release()


@contextlib.contextmanager
def running(head: Head, lock: FabricLock) -> Iterator[float]:
    """The head, started under the lock; yields its start time; always stopped."""
    lock.acquire()
    try:
        yield head.start()
    finally:
        head.stop()


def baseline_tree(commit: str, into: Path) -> tuple[Path | None, str | None, str]:
    """``git archive`` of the baseline commit into ``into``: (tree, full commit, problem)."""
    try:
        full = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        into.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", full], cwd=REPO_ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        return into, full, ""
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, None, f"git or commit {commit} unavailable: {exc}"


def digits_config(settings: Any) -> dict[str, Any]:
    """deployments/digits.yaml with one replica that fits on the head: no CPU, no donor selector."""
    import yaml

    config = yaml.safe_load(DIGITS_YAML.read_text())
    app = config["applications"][0]
    (dep,) = app["deployments"]
    dep.pop("autoscaling_config", None)
    dep.pop("max_replicas_per_node", None)
    dep["num_replicas"] = 1
    dep["ray_actor_options"] = {"num_cpus": 0}
    return {"http_options": {"host": settings.http_host, "port": settings.http_port}, "proxy_location": "HeadOnly",
            "applications": [app]}


def deploy_digits(head: Head, timeout_s: float = 300.0) -> float:
    """PUT the digits variant through the dashboard's Serve REST API; seconds until RUNNING."""
    import httpx

    headers = {"Authorization": f"Bearer {head.ray_token_path.read_text().strip()}"}
    t0 = time.monotonic()
    r = httpx.put(f"{head.dashboard}/api/serve/applications/", json=digits_config(head.settings), headers=headers,
                  timeout=120)
    r.raise_for_status()
    status = "?"
    while time.monotonic() - t0 < timeout_s:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            apps = httpx.get(f"{head.dashboard}/api/serve/applications/", headers=headers, timeout=30).json()
            status = apps.get("applications", {}).get("digits", {}).get("status", "?")
            if status == "RUNNING":
                return round(time.monotonic() - t0, 1)
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                break
        time.sleep(1)
    raise RuntimeError(f"digits did not reach RUNNING in {timeout_s:.0f}s (status {status})")


def _digits_body() -> dict[str, Any]:
    # One 8x8 image of a '0' (pixel values 0..16), as the endpoint's clients send.
    rows = ["..####..", ".#....#.", "#......#", "#......#", "#......#", "#......#", ".#....#.", "..####.."]
    return {"pixels": [16 if c == "#" else 0 for row in rows for c in row]}


# ============================================================================ the run


class Plan:
    """The sizes of one run."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.register = 500 if quick else 2000
        self.fleets = (2000, 10_000) if quick else (10_000, 100_000)
        self.active = 200 if quick else 2000
        self.loop_s = 4.0 if quick else 10.0
        self.samples = 30 if quick else 100
        self.old_samples = 3 if quick else 5
        self.old_budget_s = 60.0 if quick else 120.0
        self.old_list_calls = 2 if quick else 3


def _heartbeat_spec(head: Head, plan: Plan, seeded: range, fraction: float, concurrency: int,
                    rate_per_s: float | None = None) -> dict[str, Any]:
    return {"mode": "heartbeat", "host": head.host, "port": head.port, "concurrency": concurrency,
            "duration_s": plan.loop_s + WARMUP_S, "warmup_s": WARMUP_S, "timeout_s": REQUEST_TIMEOUT_S,
            "active": [seeded.start, seeded.start + plan.active], "standby": [seeded.start + plan.active, seeded.stop],
            "active_fraction": fraction, "rate_per_s": rate_per_s}


#: In-flight cap of the paced loop (the needed rate): real donors each send on their own.
PACED_IN_FLIGHT = 256


def _say_loop(head: Head, size: int, what: str, fig: dict[str, Any]) -> None:
    _say(f"  {head.kind} @ {size}: {what}: {fig.get('throughput_rps')} /s, p50 {fig.get('p50_ms')} ms, "
         f"p99 {fig.get('p99_ms')} ms, failed {fig.get('failed')} {fig.get('error') or ''}")


def _donor_pages(head: Head, plan: Plan, size: int) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {head.api_key}"}
    values: list[float] = []
    notes: list[str] = []
    if head.kind == "new":
        after = None
        with httpx.Client(timeout=60, headers=headers) as c:
            for _ in range(PAGE_CALLS):
                t0 = time.perf_counter()
                r = c.get(f"{head.api}/donors", params={"limit": PAGE_LIMIT, **({"after": after} if after else {})})
                values.append(time.perf_counter() - t0)
                r.raise_for_status()
                after = r.headers.get("X-Next-Cursor")  # None after the last page: start again
        return {**summarize_ms(values), "what": f"GET /donors?limit={PAGE_LIMIT}, following X-Next-Cursor"}
    # The baseline has no pages: every call lists every donor.
    budget_s = 300.0 if size >= 50_000 else 120.0
    deadline = time.monotonic() + budget_s
    listed = 0
    with httpx.Client(headers=headers) as c:
        for _ in range(plan.old_list_calls):
            left = deadline - time.monotonic()
            if left <= 5:
                notes.append(f"time budget of {budget_s:.0f}s spent")
                break
            t0 = time.perf_counter()
            try:
                r = c.get(f"{head.api}/donors", timeout=left)
                r.raise_for_status()
                listed = len(r.json())
            except httpx.HTTPError as exc:
                notes.append(f"a call failed after {time.perf_counter() - t0:.0f}s: {type(exc).__name__}")
                break
            values.append(time.perf_counter() - t0)
    return {**summarize_ms(values), "what": "GET /donors (the whole fleet in one answer)", "donors_listed": listed,
            "notes": notes}


def _lost(head: Head, before: dict[str, int], after: dict[str, int], changes: list[dict[str, Any]]) -> dict[str, Any]:
    lost = [c for c in changes if any(w in str(c.get("what", "")) for w in ("lost", "gone"))]
    return {"donors_by_state_before": before, "donors_by_state_after": after, "unchanged": before == after,
            "lost_or_gone_changes": lost[:10], "none_lost": not lost and after.get("gone", 0) == before.get("gone", 0)}


def measure_fleet(head: Head, plan: Plan, size: int, seeded: range, out: dict[str, Any]) -> None:
    """Every figure of one head at one fleet size (the head runs), into ``out`` as measured,
    so a step that fails late keeps the figures before it."""
    cluster = head.get("/cluster", timeout_s=300)
    counts = dict(cluster.get("donors_by_state", {}))
    out["donors_by_state"] = counts
    registered = sum(counts.values())
    active = counts.get("active", 0)
    standby = registered - active - counts.get("gone", 0)
    if head.kind == "new":
        si = float(cluster.get("autoscaler", {}).get("standby_heartbeat_interval_s") or HEARTBEAT_INTERVAL_S)
    else:
        si = HEARTBEAT_INTERVAL_S  # the baseline gave every donor heartbeat_interval_s
    needed = needed_beats_per_s(active, standby, HEARTBEAT_INTERVAL_S, si)
    fraction = active_fraction(active, standby, HEARTBEAT_INTERVAL_S, si)
    out.update({"registered": registered, "active": active, "standby": standby, "standby_interval_s": si,
                "needed_beats_per_s": round(needed, 1), "active_share_of_beats": round(fraction, 4)})
    _say(f"  {head.kind} @ {size}: {registered} donors ({active} active), standby interval {si:g}s, "
         f"needs {needed:.0f} beats/s ({fraction:.0%} from active donors)")

    out["heartbeat"] = {}
    for c in HEARTBEAT_CONCURRENCY:
        out["heartbeat"][str(c)] = fig = load(_heartbeat_spec(head, plan, seeded, fraction, c))
        _say_loop(head, size, f"heartbeats, closed loop x{c}", fig)
    paced_at = time.time()
    out["heartbeat_paced"] = fig = load(_heartbeat_spec(head, plan, seeded, fraction, PACED_IN_FLIGHT, needed))
    windows = {"autoscaler_paced": (paced_at, time.time())}
    _say_loop(head, size, f"heartbeats paced at the needed {needed:.0f}/s", fig)
    capacity = max((f.get("throughput_rps") or 0.0) for f in out["heartbeat"].values())
    out["heartbeat_capacity_rps"] = capacity
    out["headroom"] = headroom(capacity, needed)
    _say(f"  {head.kind} @ {size}: headroom {out['headroom']} (capacity {capacity:.0f}/s over {needed:.0f}/s needed)")

    _say(f"  {head.kind} @ {size}: placement and autoscaler timings from a Ray driver")
    if head.kind == "new":
        drv = head.driver(["--side", "driver-new", "--samples", str(plan.samples)], timeout_s=600)
    else:
        drv = head.driver(["--side", "driver-old", "--samples", str(plan.old_samples), "--budget-s",
                           str(plan.old_budget_s)], timeout_s=2 * plan.old_budget_s + 240)
    out["placement"] = drv.get("placement", {"error": drv.get("error")})
    out["autoscaler"] = drv.get("autoscaler", {"error": drv.get("error")})
    _say(f"  {head.kind} @ {size}: snapshot through Ray p99 "
         f"{out['placement'].get('driver_placement_view', {}).get('p99_ms')} ms, autoscaler tick p99 "
         f"{out['autoscaler'].get('tick_p99_ms')} ms {drv.get('error') or ''}")

    out["donors_list"] = _donor_pages(head, plan, size)
    _say(f"  {head.kind} @ {size}: GET /donors p50 {out['donors_list'].get('p50_ms')} ms "
         f"(n={out['donors_list'].get('n')})")

    _say(f"  {head.kind} @ {size}: deploying digits on the head")
    try:
        out["digits_deploy_s"] = deploy_digits(head)
    except Exception as exc:  # the heartbeat figures without load still stand
        out["digits_deploy_error"] = str(exc)
        _say(f"  {head.kind} @ {size}: digits failed: {exc}")
        return
    before = dict(cluster.get("donors_by_state", {}))
    infer_s = (len(HEARTBEAT_CONCURRENCY) + 1) * (plan.loop_s + WARMUP_S + 4) + 6
    infer = LoadProcess({"mode": "post", "host": head.host, "port": int(head.settings.http_port),
                         "path": "/digits/predict", "body": _digits_body(), "concurrency": INFERENCE_CONCURRENCY,
                         "duration_s": infer_s, "warmup_s": 3.0, "timeout_s": 30.0})
    time.sleep(3)  # inference at full load before the first heartbeat loop
    out["heartbeat_with_inference"] = {}
    paced_at = time.time()
    out["heartbeat_paced_with_inference"] = fig = load(
        _heartbeat_spec(head, plan, seeded, fraction, PACED_IN_FLIGHT, needed))
    windows["autoscaler_paced_with_inference"] = (paced_at, time.time())
    _say_loop(head, size, f"heartbeats paced at {needed:.0f}/s + inference", fig)
    for c in HEARTBEAT_CONCURRENCY:
        out["heartbeat_with_inference"][str(c)] = fig = load(_heartbeat_spec(head, plan, seeded, fraction, c))
        _say_loop(head, size, f"heartbeats, closed loop x{c} + inference", fig)
    out["inference"] = infer.result(infer_s + 120)
    _say(f"  {head.kind} @ {size}: inference {out['inference'].get('throughput_rps')} req/s, "
         f"p99 {out['inference'].get('p99_ms')} ms, failed {out['inference'].get('failed')}")
    if head.kind == "new":  # the baseline's /cluster may not answer under this load at all
        cluster = head.get("/cluster")
        # The control plane's tick p99 again, over the ticks of the whole phase.
        out["autoscaler_at_end"] = {k: cluster.get("autoscaler", {}).get(k) for k in ("tick_p99_ms", "ticks", "errors")}
        out["lost_check"] = _lost(head, before, dict(cluster.get("donors_by_state", {})),
                                  list(cluster.get("autoscaler", {}).get("donor_changes", [])))
        # The ticks while the fleet heartbeats at its needed rate, without and with inference.
        ticks = head.driver(["--side", "driver-ticks", "--spec", json.dumps(windows)], timeout_s=300)
        for name in windows:
            out[name] = ticks.get(name, {"error": ticks.get("error")})
        _say(f"  {head.kind} @ {size}: autoscaler tick p99 at the needed heartbeat rate "
             f"{out['autoscaler_paced'].get('p99_ms')} ms, with inference "
             f"{out['autoscaler_paced_with_inference'].get('p99_ms')} ms")


def run_side(kind: str, tree: Path, plan: Plan, lock: FabricLock, out: dict[str, Any],
             save: Callable[[], None] = lambda: None) -> None:
    """Registration, then each fleet size, on one head of ``tree``, into ``out``; ``save``
    after each step (a long run interrupted keeps what it measured)."""
    from dgpt.head.fabric import private_settings

    home = Path(tempfile.mkdtemp(prefix=f"dgpt-bench-cp-{kind}-"))
    settings = private_settings(home, heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                                heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, idle_timeout_s=IDLE_TIMEOUT_S)
    head = Head(kind, tree, home, settings)
    out.update({"home": str(home), "api": head.api, "fleets": {}})
    _say(f"{kind}: starting a fresh head ({head.api})")
    with running(head, lock) as started_s:
        out["start_empty_s"] = started_s
        import httpx

        r = httpx.post(f"{head.api}/tokens", json={"kind": "join", "label": "bench"},
                       headers={"Authorization": f"Bearer {head.api_key}"}, timeout=60)
        r.raise_for_status()
        token = r.json()["token"]
        _say(f"{kind}: registering {plan.register} donors over HTTP, {REGISTER_CONCURRENCY} clients")
        reg = load({"mode": "register", "host": head.host, "port": head.port, "concurrency": REGISTER_CONCURRENCY,
                    "duration_s": 900, "max_requests": plan.register, "join_token": token, "expect": 201,
                    "timeout_s": 30.0}, timeout_s=1000)
        out["registration"] = reg
        save()
        _say(f"{kind}: {reg.get('ok')} registered at {reg.get('throughput_rps')} /s, p50 {reg.get('p50_ms')} ms, "
             f"p99 {reg.get('p99_ms')} ms, failed {reg.get('failed')}")
    seeded_upto = 0
    for size in plan.fleets:
        want = size - plan.register - seeded_upto
        t0 = time.monotonic()
        lock.turn()
        rows = seed_fleet(head.db, seeded_upto, seeded_upto + want, plan.active, time.time())
        seeded_upto += want
        _say(f"{kind}: seeded {rows['donors']} donors ({rows['sessions']} sessions) in {time.monotonic() - t0:.1f}s; "
             f"fleet {fleet_counts(head.db)}; restarting")
        fig: dict[str, Any] = {"seeded_rows": rows}
        try:
            with running(head, lock) as restart_s:
                _say(f"{kind} @ {size}: head up in {restart_s:.1f}s")
                fig["restart_s"] = restart_s
                measure_fleet(head, plan, size, range(0, seeded_upto), fig)
        except Exception as exc:
            _say(f"{kind} @ {size}: failed: {type(exc).__name__}: {exc}")
            fig["error"] = f"{type(exc).__name__}: {exc}"
        out["fleets"][str(size)] = fig
        save()
    lock.release()
    shutil.rmtree(_ray_temp(home), ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def _table(result: dict[str, Any]) -> str:
    heads = result["heads"]
    lines = [f"{'figure':44s} {'new':>14s} {'baseline':>14s} {'new/base':>9s}"]

    def get(d: Any, *path: str) -> Any:
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d

    def row(label: str, *path: str) -> None:
        a, b = get(heads.get("new"), *path), get(heads.get("baseline"), *path)
        r = f"{a / b:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
        lines.append(f"{label:44s} {str(a if a is not None else '-'):>14s} {str(b if b is not None else '-'):>14s} {r:>9s}")

    row("registration /s", "registration", "throughput_rps")
    row("registration p99 ms", "registration", "p99_ms")
    for size in map(str, result["params"]["fleets"]):
        lines.append(f"-- {size} registered donors")
        row("  restart s", "fleets", size, "restart_s")
        for c in map(str, HEARTBEAT_CONCURRENCY):
            row(f"  heartbeats x{c} /s", "fleets", size, "heartbeat", c, "throughput_rps")
            row(f"  heartbeats x{c} p99 ms", "fleets", size, "heartbeat", c, "p99_ms")
            row(f"  heartbeats x{c} + inference p99 ms", "fleets", size, "heartbeat_with_inference", c, "p99_ms")
        row("  heartbeats paced (needed rate) p99 ms", "fleets", size, "heartbeat_paced", "p99_ms")
        row("  paced + inference p99 ms", "fleets", size, "heartbeat_paced_with_inference", "p99_ms")
        row("  paced + inference failed", "fleets", size, "heartbeat_paced_with_inference", "failed")
        row("  inference /s (during heartbeats)", "fleets", size, "inference", "throughput_rps")
        row("  needed beats /s", "fleets", size, "needed_beats_per_s")
        row("  headroom", "fleets", size, "headroom")
        row("  snapshot via Ray p99 ms", "fleets", size, "placement", "driver_placement_view", "p99_ms")
        row("  autoscaler collect+decide p99 ms (whole run)", "fleets", size, "autoscaler", "tick_p99_ms")
        row("  ... at the needed beat rate", "fleets", size, "autoscaler_paced", "p99_ms")
        row("  ... at the needed rate + inference", "fleets", size, "autoscaler_paced_with_inference", "p99_ms")
        row("  GET /donors p50 ms", "fleets", size, "donors_list", "p50_ms")
    for t in result.get("targets", []):
        lines.append(f"target: {t['what']} {t['target']}: {t['value']} -> {t['status']}")
    return "\n".join(lines)


def run(plan: Plan, out: Path, lock: str | None, sides: tuple[str, ...] = ("new", "baseline")) -> dict[str, Any]:
    for key in [k for k in os.environ if k.startswith("DGPT_")] + ["RAY_ADDRESS"]:
        os.environ.pop(key, None)
    import psutil

    result: dict[str, Any] = {
        "benchmark": "control_plane",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {"quick": plan.quick, "register": plan.register, "register_concurrency": REGISTER_CONCURRENCY,
                   "fleets": list(plan.fleets), "active": plan.active, "heartbeat_concurrency": list(HEARTBEAT_CONCURRENCY),
                   "loop_s": plan.loop_s, "warmup_s": WARMUP_S, "request_timeout_s": REQUEST_TIMEOUT_S,
                   "inference_concurrency": INFERENCE_CONCURRENCY, "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                   "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "idle_timeout_s": IDLE_TIMEOUT_S,
                   "heartbeat_timeout_note": "long enough that no seeded donor times out during the run",
                   "latency_note": "percentiles over every measured request; a failed one counts up to its failure",
                   "host_cpus": psutil.cpu_count(), "python": platform.python_version()},
        "complete": False,
        "heads": {},
    }
    held = FabricLock(lock)
    big = str(plan.fleets[-1])

    def save() -> None:
        result["ratios_new_over_baseline"] = ratios(result["heads"].get("new", {}),
                                                    result["heads"].get("baseline", {}))
        result["targets"] = evaluate_targets(result, big)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="dgpt-bench-baseline-") as tmp:
        tree, commit, problem = baseline_tree(BASELINE_COMMIT, Path(tmp) / "tree")
        result["baseline"] = {"commit": commit or BASELINE_COMMIT, "available": tree is not None, "problem": problem,
                              "what": "the head at the last commit before the control-plane rework: API as a Serve "
                                      "app behind the inference proxy, a registry actor call per request, SQLite "
                                      "written on every heartbeat, unpaginated donor lists"}
        for side in sides:
            if side == "baseline" and tree is None:
                _say(f"baseline missing: {problem}")
                continue
            result["heads"][side] = {}
            try:
                run_side(side, REPO_ROOT if side == "new" else tree, plan, held,  # type: ignore[arg-type]
                         result["heads"][side], save)
            except Exception as exc:
                _say(f"{side}: failed: {exc}")
                result["heads"][side]["error"] = str(exc)
            finally:
                held.release()
    result["complete"] = True
    save()
    print(_table(result))
    _say(f"wrote {out}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 registrations, fleets of 2k and 10k, 4 s loops")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    parser.add_argument("--lock", default=LOCK_PATH, help="lock file held while a head runs ('' for none)")
    parser.add_argument("--only", choices=("new", "baseline"), help="run one head only")
    parser.add_argument("--side", choices=("load", "driver-new", "driver-old", "driver-ticks"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--gcs", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "load":
        print("RESULT " + json.dumps(run_load(json.loads(args.spec))), flush=True)
        return
    if args.side == "driver-new":
        print("RESULT " + json.dumps(_driver_new(args.gcs, args.samples)), flush=True)
        return
    if args.side == "driver-ticks":
        print("RESULT " + json.dumps(_driver_ticks(args.gcs, json.loads(args.spec))), flush=True)
        return
    if args.side == "driver-old":
        print("RESULT " + json.dumps(_driver_old(args.gcs, args.samples, args.budget_s, HEARTBEAT_TIMEOUT_S)),
              flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the head
    run(Plan(args.quick), args.out, args.lock or None, (args.only,) if args.only else ("new", "baseline"))


if __name__ == "__main__":
    main()
