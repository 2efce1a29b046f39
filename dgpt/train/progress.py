"""A run's progress log (attempts, steps, checkpoints, drains) and the goodput computed from it.

Rank 0 of every attempt appends events to a small actor on the driver's node, named after
the run, fire-and-forget (one message per step costs well under a millisecond). Events
are plain dicts, so a script without dgpt can log to it with ``record.remote({...})``:

    {"ev": "attempt", "t", "attempt", "world_size", "resume_step"}   a worker group started
    {"ev": "worker", "t", "attempt", "rank", "donor_id"}              where each rank runs
    {"ev": "step", "t", "attempt", "step"}                            steps completed so far
    {"ev": "checkpoint", "t", "attempt", "step", "kind", "write_s"}   a committed checkpoint
    {"ev": "drain", "t", "attempt", "step", "deadline_ms"}            a drain was noticed
    {"ev": "done", "t", "attempt", "step"}                            the run finished

:func:`summarize` (pure) turns them into what the benchmark and the demo report: per
interruption the steps lost (computed, then redone because the run resumed from an
earlier step) and the recovery time (last step before to first step after), and for the
run its goodput, useful steps per second of wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PROGRESS_NAMESPACE = "dgpt"


def progress_name(run_name: str) -> str:
    """The progress actor's name for a run."""
    return f"train-progress:{run_name}"


class TrainProgress:
    """The event log actor (plain class; ``open_progress`` makes it an actor)."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def ping(self) -> str:
        return "ok"

    def record(self, event: Mapping[str, Any]) -> None:
        self._events.append({"t": time.time(), **event})

    def events(self) -> list[dict[str, Any]]:
        return list(self._events)


# Drivers' progress actors, by run name: a named actor without a handle left is destroyed,
# and this one must outlive every attempt of the run.
_opened: dict[str, Any] = {}


def _home_node() -> tuple[str, bool]:
    """(node, whether it is the head): the head's node (no donor's departure takes it
    away), else this driver's."""
    import ray

    from dgpt import contract

    for node in ray.nodes():
        if node.get("Alive") and (node.get("Labels") or {}).get(contract.LABEL_ROLE) == contract.ROLE_HEAD:
            return str(node["NodeID"]), True
    return str(ray.get_runtime_context().get_node_id()), False


def open_progress(run_name: str) -> Any:
    """Create (or find) the run's progress actor on the head (this driver's node without one):
    a donor that leaves must not take the run's record with it. It lives as long as the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node, on_head = _home_node()
    # Hard on the head (a soft affinity let Ray place it on a donor, which then vanished).
    actor: Any = ray.remote(TrainProgress).options(  # type: ignore[attr-defined]
        name=progress_name(run_name), namespace=PROGRESS_NAMESPACE, get_if_exists=True, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=not on_head),
    ).remote()
    ray.get(actor.ping.remote(), timeout=60)
    _opened[run_name] = actor
    return actor


def find_progress(run_name: str) -> Any | None:
    """The run's progress actor, or None when no driver opened one."""
    import ray

    try:
        return ray.get_actor(progress_name(run_name), namespace=PROGRESS_NAMESPACE)
    except ValueError:
        return None


def read_progress(run_name: str) -> list[dict[str, Any]]:
    """Every event the run logged so far (empty when it has no progress actor)."""
    import ray

    actor = find_progress(run_name)
    return [] if actor is None else list(ray.get(actor.events.remote(), timeout=60))


# ---------------------------------------------------------------- metrics (pure)


@dataclass(frozen=True)
class Interruption:
    """One attempt ending before the run did, and what it cost."""

    attempt: str
    cause: str  # "drain" when the attempt noticed a drain, else "failure" (vanish, resize, crash)
    ended_at: float
    last_step: int
    resumed_from: int
    lost_steps: int
    recovery_s: float
    world_size_before: int
    world_size_after: int
    drain_noticed_at: float | None = None
    jit_step: int | None = None
    #: Last step before to the next attempt's start (its workers up, restored): the rest of
    #: ``recovery_s`` is that attempt's first step.
    restart_s: float = 0.0


@dataclass(frozen=True)
class RunSummary:
    """A run's progress, summed up."""

    attempts: int
    interruptions: Sequence[Interruption]
    started_at: float
    finished_at: float | None
    final_step: int
    computed_steps: int
    lost_steps: int
    checkpoints: Mapping[str, int]

    @property
    def wall_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else self.started_at
        return max(0.0, end - self.started_at)

    @property
    def steps_per_s(self) -> float:
        """Goodput: steps that count toward the result, per second of wall time."""
        return self.final_step / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class _Attempt:
    attempt_id: str
    started_at: float
    world_size: int
    resume_step: int
    steps: list[tuple[float, int]]
    drain: dict[str, Any] | None = None
    jit_step: int | None = None
    last_t: float = 0.0


def summarize(events: Iterable[Mapping[str, Any]]) -> RunSummary:
    """The run's attempts, interruptions and goodput from its events (any order)."""
    ordered = sorted(events, key=lambda e: float(e.get("t", 0.0)))
    attempts: dict[str, _Attempt] = {}
    finished_at: float | None = None
    final_step = 0
    checkpoints: dict[str, int] = {}
    for e in ordered:
        kind, t, aid = e.get("ev"), float(e.get("t", 0.0)), str(e.get("attempt", ""))
        if kind == "attempt":
            attempts[aid] = _Attempt(aid, t, int(e.get("world_size", 0)), int(e.get("resume_step", 0)), [], last_t=t)
            continue
        a = attempts.get(aid)
        if a is None:
            continue
        a.last_t = max(a.last_t, t)
        if kind == "step":
            a.steps.append((t, int(e["step"])))
        elif kind == "drain" and a.drain is None:
            a.drain = dict(e)
        elif kind == "checkpoint":
            checkpoints[str(e.get("kind", "periodic"))] = checkpoints.get(str(e.get("kind", "periodic")), 0) + 1
            if e.get("kind") == "jit":
                a.jit_step = int(e["step"])
        elif kind == "done":
            finished_at, final_step = t, int(e.get("step", 0))
    runs = sorted(attempts.values(), key=lambda a: a.started_at)
    interruptions = []
    for cur, nxt in zip(runs, runs[1:], strict=False):
        last = max((s for _, s in cur.steps), default=cur.resume_step)
        last_t = max((t for t, _ in cur.steps), default=cur.started_at)
        first_next = min((t for t, _ in nxt.steps), default=nxt.last_t)
        interruptions.append(Interruption(
            attempt=cur.attempt_id, cause="drain" if cur.drain else "failure", ended_at=cur.last_t,
            last_step=last, resumed_from=nxt.resume_step, lost_steps=max(0, last - nxt.resume_step),
            recovery_s=max(0.0, first_next - last_t), world_size_before=cur.world_size,
            world_size_after=nxt.world_size, drain_noticed_at=float(cur.drain["t"]) if cur.drain else None,
            jit_step=cur.jit_step, restart_s=max(0.0, nxt.started_at - last_t),
        ))
    computed = sum(len({s for _, s in a.steps}) for a in runs)
    if finished_at is None and runs:
        final_step = max((s for a in runs for _, s in a.steps), default=0)
    return RunSummary(
        attempts=len(runs), interruptions=tuple(interruptions),
        started_at=runs[0].started_at if runs else 0.0, finished_at=finished_at, final_step=final_step,
        computed_steps=computed, lost_steps=sum(i.lost_steps for i in interruptions), checkpoints=checkpoints,
    )
