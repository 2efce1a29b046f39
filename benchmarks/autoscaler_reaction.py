"""Live autoscaler benchmark: time from a step in demand to work running on a newly started node.

    python -m benchmarks.autoscaler_reaction [--trials N] [--quick]

Side by side in one run, on this machine:

- **dgpt**: `dgpt up --donors N --min-active 0` (every donor in standby, each its own agent,
  long-polling the head); a driver starts one 1-CPU actor per step; dgpt's autoscaler
  activates a standby donor, the head answers its held heartbeat at once, its agent starts
  its raylet (a warm `ray start`, Ray already imported), and the actor runs there.
- **Ray**: Ray's own autoscaler (v2) with the fake multi-node provider, which starts local
  1-CPU raylets (`ray.cluster_utils.AutoscalingCluster` does this, but calls `ray stop`,
  which would kill every Ray process on the host; this benchmark starts and stops its
  cluster by pid instead). Same actor.

Three pairings, each side with the same information (Ray's pending demand):
- defaults: dgpt's autoscaler loop (1 s) against Ray's (5 s);
- equal at 1 s: Ray's loop set to dgpt's (AUTOSCALER_UPDATE_INTERVAL_S=1);
- equal at 5 s: dgpt's loop set to Ray's (DGPT_AUTOSCALER_INTERVAL_S=5);
- equal at 1 s, unprotected: as "equal at 1 s", but dgpt's donors without their cgroup caps
  and sandbox (DGPT_ENFORCE_CAPS=off, DGPT_SANDBOX=off), as the baseline's raylets run: a
  donor capped at one CPU starts its raylet and first worker on that one CPU.

Each step starts one more 1-CPU actor while every node is busy, and measures submit -> its
first method running on the new node. Writes ``benchmarks/results/autoscaler_reaction.json``.
Each side runs in its own process, so neither's Ray settings leak into the other.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The fake provider's id for the head node (ray.autoscaler._private.fake_multi_node).
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "autoscaler_reaction.json"
# Ray's autoscaler loop by default (AUTOSCALER_UPDATE_INTERVAL_S), and dgpt's (DGPT_AUTOSCALER_INTERVAL_S).
RAY_DEFAULT_INTERVAL_S = 5.0
DGPT_DEFAULT_INTERVAL_S = 1.0
# Long enough that neither side scales down during the run.
IDLE_S = 600.0


def _step(trials: int, nodes_alive: Any) -> list[float]:
    """``trials`` steps of demand on the connected cluster; returns reaction seconds.

    Each step starts an actor that holds one CPU, with every node already busy, so each step
    needs one more node; the actors stay until the end, so no node is taken away meanwhile.
    """
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def started_at(self) -> float:
            return time.time()

    held = []
    out = []
    for i in range(trials):
        t0 = time.time()
        held.append(Holder.remote())
        began = ray.get(held[-1].started_at.remote(), timeout=300)
        out.append(round(began - t0, 3))
        print(f"  step {i + 1}/{trials}: {out[-1]:.2f}s (nodes with work: {nodes_alive()})", file=sys.stderr, flush=True)
    return out


def run_dgpt(trials: int, interval_s: float, protected: bool = True) -> dict[str, Any]:
    from dgpt.head import fabric
    from dgpt.head.paths import head_paths
    from dgpt.head.process import shell_env
    from dgpt.sdk.client import Client

    home = Path(tempfile.mkdtemp(prefix="dgpt-bench-as-"))
    # dgpt's defaults (5 s heartbeats; standby donors long-poll) but the loop under test.
    protection = {} if protected else {"enforce_caps": "off", "sandbox": "off"}
    settings = fabric.private_settings(home, autoscaler_interval_s=interval_s, idle_timeout_s=IDLE_S,
                                       drain_deadline_s=10.0, monitor_interval_s=1.0, **protection)
    try:
        # One CPU per donor, like the baseline's workers: each step needs one more node.
        specs = [fabric.DonorSpec(f"donor-{i + 1}", "desktop", f"owner-{i + 1}", 1.0, 1.0) for i in range(trials)]
        fabric.up(settings, trials, min_active=0, specs=specs)
        env = shell_env(settings)
        # Ray reads its auth settings when first imported.
        os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        import ray

        client = Client(settings.local_head_url, head_paths(home)["api_key"].read_text().strip())

        def active() -> int:
            return sum(1 for d in client.donors() if d.state == "active")

        ray.init(address=env["RAY_ADDRESS"], logging_level="ERROR", _node_ip_address="127.0.0.1")
        reactions = _step(trials, active)
        ray.shutdown()
        return {"reaction_s": reactions, "heartbeat_interval_s": settings.heartbeat_interval_s,
                "autoscaler_interval_s": settings.autoscaler_interval_s, "warm_start": True,
                "enforce_caps": settings.enforce_caps, "sandbox": settings.sandbox}
    finally:
        fabric.down(settings)


def _ray_config(gcs: str, workers: int) -> dict[str, Any]:
    return {
        "cluster_name": "bench",
        "max_workers": workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_S / 60,
        "provider": {
            # The fake multi-node provider, loaded as an external module: its defaults file is
            # not shipped in Ray's wheel, so every field is given here.
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "foreground_node_launch": True,
            # Autoscaler v2 tells nodes apart by cloud instance id, as AutoscalingCluster(
            # autoscaler_v2=True) sets it up; v1 matches by IP, which local nodes share.
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "donor": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": workers},
        },
        "head_node_type": "ray.head.default",
        "head_node": {}, "worker_nodes": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def _stop_cluster(marker: str) -> None:
    """Stop every process of the baseline cluster: each carries its temp dir in its command line."""
    import psutil

    from dgpt.processes import stop_tree

    procs = [p for p in psutil.process_iter(["cmdline"])
             if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        stop_tree(p.pid, grace_s=10)


def run_ray(trials: int, interval_s: float) -> dict[str, Any]:
    from dgpt.processes import free_port

    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    cfg = temp / "autoscaler.json"
    cfg.write_text(json.dumps(_ray_config(f"127.0.0.1:{port}", trials)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env["AUTOSCALER_UPDATE_INTERVAL_S"] = f"{interval_s:g}"
    env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    import ray  # after the auth settings: Ray reads them when first imported

    ray_bin = str(Path(sys.executable).with_name("ray"))
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=0", f"--temp-dir={temp}", f"--autoscaling-config={cfg}",
                        "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                        f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR", _node_ip_address="127.0.0.1")

        def workers() -> int:
            return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)

        reactions = _step(trials, workers)
        ray.shutdown()
        return {"reaction_s": reactions, "autoscaler": "v2", "autoscaler_update_interval_s": interval_s}
    finally:
        _stop_cluster(str(temp))


def _summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 3), "mean_s": round(statistics.fmean(values), 3),
            "min_s": min(values), "max_s": max(values)}


#: (name, dgpt's loop, Ray's loop, dgpt's donors protected): what each pairing compares.
PAIRINGS = (
    ("defaults", DGPT_DEFAULT_INTERVAL_S, RAY_DEFAULT_INTERVAL_S, True),
    ("equal_1s", DGPT_DEFAULT_INTERVAL_S, DGPT_DEFAULT_INTERVAL_S, True),
    ("equal_5s", RAY_DEFAULT_INTERVAL_S, RAY_DEFAULT_INTERVAL_S, True),
    ("equal_1s_unprotected", DGPT_DEFAULT_INTERVAL_S, DGPT_DEFAULT_INTERVAL_S, False),
)


def _run_side(side: str, trials: int, interval_s: float, protected: bool = True) -> dict[str, Any]:
    what = "" if protected else ", donors unprotected"
    print(f"{side} (loop {interval_s:g} s{what}): {trials} demand steps", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.autoscaler_reaction", "--side", side,
                           "--trials", str(trials), "--interval", str(interval_s),
                           *(() if protected else ("--unprotected",))], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"the {side} side failed (exit {proc.returncode}); see the output above")
    out: dict[str, Any] = json.loads(line[len("RESULT "):])
    out.update(_summary(out["reaction_s"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="demand steps per side (default 5)")
    parser.add_argument("--quick", action="store_true", help="3 trials per side, the defaults pairing only")
    parser.add_argument("--side", choices=("dgpt", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--unprotected", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    trials = 3 if args.quick else args.trials
    if trials < 1:
        parser.error("--trials must be >= 1")
    if args.side:
        interval = args.interval or (DGPT_DEFAULT_INTERVAL_S if args.side == "dgpt" else RAY_DEFAULT_INTERVAL_S)
        result = run_dgpt(trials, interval, not args.unprotected) if args.side == "dgpt" else run_ray(trials, interval)
        print("RESULT " + json.dumps(result), flush=True)
        return

    runs: dict[tuple[str, float, bool], dict[str, Any]] = {}
    pairings: dict[str, Any] = {}
    for name, dgpt_loop, ray_loop, protected in PAIRINGS[:1] if args.quick else PAIRINGS:
        for side, loop, prot in (("dgpt", dgpt_loop, protected), ("ray", ray_loop, True)):
            if (side, loop, prot) not in runs:
                runs[(side, loop, prot)] = _run_side(side, trials, loop, prot)
        d, r = runs[("dgpt", dgpt_loop, protected)], runs[("ray", ray_loop, True)]
        pairings[name] = {"dgpt_loop_s": dgpt_loop, "ray_loop_s": ray_loop, "dgpt_donors_protected": protected,
                          "dgpt_median_s": d["median_s"], "ray_median_s": r["median_s"],
                          "ratio_median": round(d["median_s"] / r["median_s"], 3)}
    result = {
        "benchmark": "autoscaler_reaction",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trials": trials,
        "what": "seconds from starting a 1-CPU actor with no node free to its first method running on a new node",
        "runs": {f"{side}@{loop:g}s" + ("" if prot else "-unprotected"): v for (side, loop, prot), v in runs.items()},
        "pairings": pairings,
        "target": "ratio <= 0.5 at equal loop intervals",
        "target_met": {k: v["ratio_median"] <= 0.5 for k, v in pairings.items() if k.startswith("equal")},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(pairings, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
