"""Training goodput under donor churn, on a live local fabric: dgpt vs stock Ray Train, side by side.

    python -m benchmarks.train_churn [--quick] [--seed S]

One fabric (`dgpt up --donors 4`, one raylet per donor) runs the same digits CNN job (same
seed, data, steps, global batch, 3 workers of one CPU, one per donor, a periodic checkpoint
every K steps) under each condition in turn:

- ``no_churn``: dgpt's example (``examples/train_digits.py``), no donor leaves;
- ``dgpt_drain``: dgpt's example; donors leave by draining (their owner comes back: the
  agent asks for DrainNode with reason PREEMPTION and a deadline) and return later;
- ``stock_drain``: the plain Ray Train example (``examples/train_digits_plain.py``: fixed
  ``num_workers=3``, one per node, periodic checkpoints only, no drain handling) under the
  very same churn schedule;
- ``dgpt_vanish``: dgpt's example; donors vanish without warning (agent, raylet and workers
  SIGKILLed) and their agents are started again later;
- ``stock_no_churn`` (full runs only): the plain example without churn, to show what dgpt's
  per-step drain check costs.

Churn: each donor follows alternating up/down sessions drawn from the Failure Trace Archive
Weibull fits in ``churn-profiles.json`` (``default_mix``), hours scaled to seconds so the
fleet loses about one donor per ``--loss-every-s`` of training; at most two donors are away
at once. The schedule is a pure function of the seed and is replayed, relative to each run's
first training step, for every churn condition.

Measured per condition, from the run's progress log: goodput (useful samples per second,
first step to last), work lost per donor loss (steps computed then redone), recovery time
per event (last step before to first step after), and the held-out accuracy. Writes
``benchmarks/results/train_churn.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "train_churn.json"
DGPT_EXAMPLE = REPO_ROOT / "examples" / "train_digits.py"
PLAIN_EXAMPLE = REPO_ROOT / "examples" / "train_digits_plain.py"
N_DONORS = 4
WORKERS = 3
#: At most this many donors away at once: a run always keeps a worker somewhere.
MAX_AWAY = 2
#: No churn during the first seconds of training: every run gets its worker group going.
WARMUP_S = 10.0
#: Shortest up or down session, seconds (see ``_weibull``).
MIN_SESSION_S = 5.0
#: Held-out accuracy differences below this are noise: a different number of workers
#: changes the order of float sums in the gradient all-reduce (3.6 of 360 test images).
ACCURACY_NOISE = 0.01
#: Failure budgets for every run: the churn here is scaled ~100x beyond what the fleet's
#: records predict, so budgets sized from them (dgpt's default) would end the runs.
BUDGET = 50


@dataclass(frozen=True)
class ChurnEvent:
    """At ``t_s`` seconds after a run's first step, ``donor`` leaves or returns."""

    t_s: float
    donor: str
    action: str  # leave | return
    profile: str


def _weibull(rng: np.random.Generator, shape: float, scale_h: float, seconds_per_hour: float) -> float:
    # A raylet takes seconds to start or stop here: shorter sessions cannot happen on this fabric.
    return max(MIN_SESSION_S, float(scale_h * rng.weibull(shape)) * seconds_per_hour)


def churn_schedule(profiles: Mapping[str, Any], donors: Sequence[str], seed: int, loss_every_s: float,
                   horizon_s: float) -> tuple[list[ChurnEvent], float, dict[str, str]]:
    """Leave/return events for ``donors`` over ``horizon_s`` (pure).

    Each donor gets a profile from ``default_mix``; its sessions alternate up/down with the
    profile's Weibull fits (hours). Hours become seconds at the rate that makes the fleet's
    expected departures one per ``loss_every_s``. Leaves that would put more than
    ``MAX_AWAY`` donors away at once are dropped, with the return that belonged to them.

    Returns:
        The events sorted by time, the seconds per trace hour, and each donor's profile.
    """
    rng = np.random.default_rng(seed)
    mix = profiles["default_mix"]
    names = sorted(mix)
    weights = np.array([mix[n] for n in names], dtype=float)
    assigned = {d: names[int(rng.choice(len(names), p=weights / weights.sum()))] for d in donors}
    cycle_h = {d: profiles["profiles"][p]["mean_up_h"] + profiles["profiles"][p]["mean_down_h"]
               for d, p in assigned.items()}
    # The fleet departs sum(1/cycle) times per trace hour; one departure per loss_every_s seconds.
    seconds_per_hour = loss_every_s * sum(1.0 / c for c in cycle_h.values())
    raw: list[tuple[float, float, str]] = []  # (leave, return, donor)
    for d, p in assigned.items():
        prof = profiles["profiles"][p]
        up, down = prof["up"], prof["down"]
        t = WARMUP_S + _weibull(rng, up["shape"], up["scale"], seconds_per_hour)
        while t < horizon_s:
            back = t + _weibull(rng, down["shape"], down["scale"], seconds_per_hour)
            raw.append((t, back, d))
            t = back + _weibull(rng, up["shape"], up["scale"], seconds_per_hour)
    kept: list[tuple[float, float, str]] = []
    for leave, back, d in sorted(raw):
        away = [k for k in kept if k[0] <= leave < k[1]]
        if len(away) < MAX_AWAY and not any(k[2] == d for k in away):
            kept.append((leave, back, d))
    events = [ChurnEvent(round(leave, 2), d, "leave", assigned[d]) for leave, _, d in kept]
    events += [ChurnEvent(round(back, 2), d, "return", assigned[d]) for _, back, d in kept if back < horizon_s]
    return sorted(events, key=lambda e: (e.t_s, e.action)), seconds_per_hour, assigned


# ---------------------------------------------------------------- one condition on the fabric


class Fabric:
    """The benchmark's local fabric and the churn actions on its donors."""

    def __init__(self, quick: bool) -> None:
        from dgpt.head import fabric

        self.fabric = fabric
        home = Path(tempfile.mkdtemp(prefix="dgpt-bench-train-"))
        # The stock script's storage_path: a folder every donor's sandbox lets the work write
        # (DGPT_SANDBOX_SHARED), as a shared mount would be on separate machines.
        self.shared = Path(tempfile.mkdtemp(prefix="dgpt-bench-train-shared-"))
        self.shared.chmod(0o777)  # a root agent's work runs as nobody
        # Fast donor timings, as the integration tests use: drains and losses are seen in seconds.
        self.settings = fabric.private_settings(home, heartbeat_interval_s=1.0, heartbeat_timeout_s=12.0,
                                                drain_deadline_s=15.0, monitor_interval_s=1.0,
                                                sandbox_shared=str(self.shared))
        self.specs = [fabric.DonorSpec(f"donor-{i + 1}", "desktop", f"owner-{i + 1}", 1.0, 1.5)
                      for i in range(N_DONORS)]
        self.away: dict[str, str] = {}

    def up(self) -> None:
        from dgpt.head.process import shell_env

        # Ray's processes on the donors must import this checkout; drivers need the fabric's exports.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        os.environ.update({"RAY_health_check_period_ms": "3000", "RAY_health_check_timeout_ms": "10000",
                           "RAY_health_check_failure_threshold": "10", "RAY_USAGE_STATS_ENABLED": "0"})
        self.fabric.up(self.settings, N_DONORS, specs=self.specs, timeout_s=300)
        os.environ.update(shell_env(self.settings))

    def down(self) -> None:
        self.fabric.down(self.settings)

    def _files(self, donor: str) -> dict[str, Path]:
        from dgpt.donor.agent import state_files

        return state_files(self.settings.home / "donors" / donor)

    def leave(self, donor: str, how: str) -> None:
        from dgpt.processes import kill_at_once, read_json, tree

        if how == "drain":
            self._files(donor)["paused"].write_text(str(time.time()))
        else:
            pid = int((read_json(self._files(donor)["pid"]) or {"pid": 0})["pid"])
            kill_at_once(tree(pid) if pid else [])
        self.away[donor] = how

    def back(self, donor: str) -> None:
        import psutil

        from dgpt.processes import read_json

        how = self.away.pop(donor, None)
        if how == "drain":
            self._files(donor)["paused"].unlink(missing_ok=True)
        elif how == "vanish":
            entry = next(d for d in read_json(self.settings.home / "fabric.json")["donors"] if d["name"] == donor)
            deadline = time.monotonic() + 30
            while psutil.pid_exists(int(entry["pid"])) and time.monotonic() < deadline:
                time.sleep(0.2)
            self.fabric.restart_donor(self.settings, donor)

    def restore(self, timeout_s: float = 240) -> None:
        for donor in list(self.away):
            self.back(donor)
        deadline = time.monotonic() + timeout_s
        with self.fabric.api_client(self.settings) as client:
            while time.monotonic() < deadline:
                donors = client.donors()
                if sum(1 for d in donors if d.state == "active" and d.node_id) == N_DONORS:
                    return
                time.sleep(1.0)
        raise SystemExit("donors did not all come back between conditions; see the fabric logs")


def _first_step_time(progress: Any, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> float:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        events = ray.get(progress.events.remote())
        steps = [e["t"] for e in events if e["ev"] == "step"]
        if steps:
            return min(steps)
        time.sleep(0.5)
    raise SystemExit(f"the run never took a step (driver exit {proc.poll()})")


def run_condition(fab: Fabric, name: str, *, plain: bool, churn: str | None, schedule: Sequence[ChurnEvent],
                  steps: int, every: int, channels: int, hidden: int, seed: int) -> dict[str, Any]:
    """Run one condition to completion; its metrics."""
    import ray

    from dgpt.train.progress import open_progress, progress_name, summarize

    run = f"{name}-{int(time.time())}"
    progress = open_progress(run)
    common = ["--name", run, "--steps", str(steps), "--checkpoint-every", str(every), "--channels", str(channels),
              "--hidden", str(hidden), "--seed", str(seed), "--max-failures", str(BUDGET)]
    if plain:
        storage = fab.shared / "plain-results"
        # Ray Train's controller (on the head, unsandboxed) makes the run's folder; the
        # workers (the sandbox's user) write checkpoints into it.
        (storage / run).mkdir(parents=True)
        for folder in (storage, storage / run):
            folder.chmod(0o777)
        argv = [str(PLAIN_EXAMPLE), *common, "--workers", str(WORKERS), "--progress-name", progress_name(run),
                "--storage-path", str(storage)]
        marker = "PLAIN_TRAIN_RESULT "
    else:
        argv = [str(DGPT_EXAMPLE), *common, "--workers", "1", str(WORKERS), "--max-preemption-failures",
                str(BUDGET), "--horizon-s", "600"]
        marker = "DGPT_TRAIN_RESULT "
    log = fab.settings.home / "logs" / f"bench-{run}.log"
    print(f"  {name}: starting ({'plain Ray Train' if plain else 'dgpt'}, churn={churn or 'none'})",
          file=sys.stderr, flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                                cwd=fab.settings.home)
    applied: list[dict[str, Any]] = []
    t0 = _first_step_time(progress, proc)
    if churn is not None:
        pending = list(schedule)
        while proc.poll() is None and pending:
            now = time.time() - t0
            while pending and pending[0].t_s <= now:
                ev = pending.pop(0)
                if ev.action == "leave" and ev.donor not in fab.away:
                    fab.leave(ev.donor, churn)
                elif ev.action == "return" and ev.donor in fab.away:
                    # A restart waits for the killed agent to be gone: do not hold the loop.
                    threading.Thread(target=fab.back, args=(ev.donor,), daemon=True).start()
                else:
                    continue
                applied.append({"t_s": round(time.time() - t0, 2), "donor": ev.donor, "action": ev.action})
                print(f"    t={applied[-1]['t_s']:6.1f}s {ev.donor} {ev.action}s ({churn})", file=sys.stderr,
                      flush=True)
            time.sleep(0.2)
    proc.wait(timeout=3600)
    text = log.read_text(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith(marker)), None)
    if line is None:
        raise SystemExit(f"{name}: the driver exited {proc.returncode} without a result; see {log}")
    result = json.loads(line[len(marker):])
    events = ray.get(progress.events.remote())
    ray.kill(progress)
    summary = summarize(events)
    return _metrics(name, result, summary, applied, t0)


def _metrics(name: str, result: dict[str, Any], summary: Any, applied: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    from deployments.digits.workload import GLOBAL_BATCH

    span = (summary.finished_at or t0) - t0
    losses = [a for a in applied if a["action"] == "leave"]
    rows = []
    for i in summary.interruptions:
        at = i.ended_at - t0
        # The churn event just before the interruption caused it (a leave, or a return: a resize).
        cause = max((a for a in applied if a["t_s"] <= at + 0.5), key=lambda a: a["t_s"], default=None)
        rows.append({"at_s": round(at, 1), "caused_by": f"{cause['donor']} {cause['action']}" if cause else "?",
                     "kind": "loss" if cause and cause["action"] == "leave" else "resize",
                     "detected_as": i.cause, "lost_steps": i.lost_steps, "recovery_s": round(i.recovery_s, 2),
                     "restart_s": round(i.restart_s, 2),
                     "world_size": [i.world_size_before, i.world_size_after]})
    loss_rows = [r for r in rows if r["kind"] == "loss"]
    return {
        "condition": name,
        "ok": result["ok"], "error": result.get("error"),
        "accuracy": (result.get("return") or {}).get("accuracy"),
        "steps": summary.final_step,
        "train_span_s": round(span, 2),
        "driver_wall_s": result["wall_s"],
        "goodput_samples_per_s": round(summary.final_step * GLOBAL_BATCH / span, 1) if span > 0 else 0.0,
        "goodput_steps_per_s": round(summary.final_step / span, 3) if span > 0 else 0.0,
        "computed_steps": summary.computed_steps,
        "lost_steps": summary.lost_steps,
        "attempts": summary.attempts,
        "checkpoints": dict(summary.checkpoints),
        "churn_events": applied,
        "donor_losses": len(losses),
        "interruptions": rows,
        "lost_steps_per_loss": [r["lost_steps"] for r in loss_rows],
        "recovery_s_per_event": [r["recovery_s"] for r in rows],
        "mean_lost_steps_per_loss": round(float(np.mean([r["lost_steps"] for r in loss_rows])), 2) if loss_rows else 0.0,
        "mean_recovery_s": round(float(np.mean([r["recovery_s"] for r in rows])), 2) if rows else 0.0,
    }


def _target(value: float | None, op: str, bound: float) -> dict[str, Any]:
    met = value is not None and (value >= bound if op == ">=" else value <= bound)
    return {"value": None if value is None else round(value, 3), "target": f"{op} {bound:g}", "met": bool(met)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, no stock no-churn reference")
    parser.add_argument("--seed", type=int, default=7, help="churn schedule and training seed (default 7)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 2400, quick 900)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="periodic checkpoint interval K, steps")
    parser.add_argument("--loss-every-s", type=float, default=None,
                        help="seconds of training per expected donor loss (default 60, quick 30)")
    args = parser.parse_args()
    steps = args.steps or (900 if args.quick else 2400)
    loss_every_s = args.loss_every_s or (30.0 if args.quick else 60.0)
    channels, hidden, seed = 64, 256, 20240501

    from benchmarks.fleet_sim import find_churn_profiles

    profiles_path = find_churn_profiles()
    profiles = json.loads(profiles_path.read_text())
    fab = Fabric(args.quick)
    donors = [s.name for s in fab.specs]
    # Long enough for the slowest condition: the schedule is cut at each run's end anyway.
    schedule, sph, assigned = churn_schedule(profiles, donors, args.seed, loss_every_s, horizon_s=3600.0)
    started = time.monotonic()
    print(f"fabric: head + {N_DONORS} donors; churn {profiles_path} scaled to {sph:.1f} s per trace hour",
          file=sys.stderr, flush=True)
    fab.up()
    import ray

    ray.init(logging_level="ERROR", log_to_driver=False)
    conditions = [("no_churn", False, None), ("dgpt_drain", False, "drain"), ("stock_drain", True, "drain"),
                  ("dgpt_vanish", False, "vanish")]
    if not args.quick:
        conditions.append(("stock_no_churn", True, None))
    runs: dict[str, dict[str, Any]] = {}
    try:
        for name, plain, churn in conditions:
            fab.restore()
            runs[name] = run_condition(fab, name, plain=plain, churn=churn, schedule=schedule, steps=steps,
                                       every=args.checkpoint_every, channels=channels, hidden=hidden, seed=seed)
            r = runs[name]
            print(f"  {name}: {r['goodput_samples_per_s']} samples/s over {r['train_span_s']}s, "
                  f"{r['donor_losses']} donor losses, lost {r['lost_steps_per_loss']} steps, "
                  f"recovery {r['recovery_s_per_event']} s, accuracy {r['accuracy']}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        fab.down()

    base, drain, stock, vanish = (runs[k] for k in ("no_churn", "dgpt_drain", "stock_drain", "dgpt_vanish"))

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        return a["goodput_samples_per_s"] / b["goodput_samples_per_s"] if b["goodput_samples_per_s"] else None

    drain_losses = [r for r in drain["interruptions"] if r["kind"] == "loss"]
    vanish_losses = [r for r in vanish["interruptions"] if r["kind"] == "loss"]
    targets = {
        "drain_goodput_vs_no_churn": _target(ratio(drain, base), ">=", 0.85),
        "drain_goodput_vs_stock_ray_train": _target(ratio(drain, stock), ">=", 1.5),
        "max_steps_lost_per_graceful_drain": _target(max((r["lost_steps"] for r in drain_losses), default=0), "<=", 1),
        "max_steps_lost_per_vanished_donor": _target(
            max((r["lost_steps"] for r in vanish_losses), default=0), "<=", args.checkpoint_every),
        "drain_accuracy_delta_vs_no_churn": _target(
            abs((drain["accuracy"] or 0) - (base["accuracy"] or 0)), "<=", ACCURACY_NOISE),
        "vanish_accuracy_delta_vs_no_churn": _target(
            abs((vanish["accuracy"] or 0) - (base["accuracy"] or 0)), "<=", ACCURACY_NOISE),
    }
    result = {
        "benchmark": "train_churn",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count()},
        "job": {"model": f"DigitsCNN(channels={channels}, hidden={hidden})", "steps": steps,
                "global_batch": 96, "workers": WORKERS, "checkpoint_every_steps": args.checkpoint_every,
                "seed": seed, "donors": N_DONORS, "failure_budgets": BUDGET},
        "churn": {"profiles": str(profiles_path), "seed": args.seed, "loss_every_s": loss_every_s,
                  "seconds_per_trace_hour": round(sph, 3), "donor_profiles": assigned, "max_away": MAX_AWAY,
                  "schedule": [asdict(e) for e in schedule if e.t_s < 600]},
        "runs": runs,
        "ratios": {"dgpt_drain_vs_no_churn": ratio(drain, base), "dgpt_drain_vs_stock_drain": ratio(drain, stock),
                   "dgpt_vanish_vs_no_churn": ratio(vanish, base),
                   **({"stock_no_churn_vs_no_churn": ratio(runs["stock_no_churn"], base)}
                      if "stock_no_churn" in runs else {})},
        "targets": targets,
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({"ratios": result["ratios"], "targets": targets}, indent=2, default=float))
    missed = [k for k, v in targets.items() if not v["met"]]
    print(f"wrote {RESULTS}; targets missed: {', '.join(missed) or 'none'}")
    if not all(math.isfinite(v or 0.0) for v in result["ratios"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
