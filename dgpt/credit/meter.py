"""Metering: the resource-seconds each donor's raylet ran work, from Ray's own accounting.

Ray's GCS keeps, per node, its total and available logical resources (what the raylet
reports to the autoscaler state: ``get_cluster_resource_state``). ``total - available`` is
what tasks and actors hold there now: the CPUs, GPUs and memory Ray granted them on that
node. The control plane samples it every autoscaler tick and :func:`step` integrates it per
donor session, holding each sample until the next (a zero-order hold):

    resource_s += used(t_i) * (t_{i+1} - t_i)

Sampling error, per allocation (one task or actor holding ``r`` of a resource for ``D``
seconds, sampled every ``dt``): it is counted ``r * n * dt`` where ``n`` is the number of
samples that fall inside it, so ``|metered - r * D| < r * dt``, and the error averages to zero
over allocations whose start is not locked to the sampling clock. A gap between samples over
``max_gap_s`` (the GCS did not answer, the control plane restarted) is not metered at all:
credit is given for work seen, never guessed. A node that dies between two samples is held
until the next one (at most ``dt`` too much).

What Ray accounts is what work *reserved*, not what it burned: a task that asks for 1 CPU
and sleeps holds 1 CPU; an actor holds what it asked for while it lives (0 CPU by default
once placed); memory counts only when tasks ask for it (``memory=``). That is the accounting
every Ray scheduler decision is made on, and the donor cannot inflate it (the head reads it
from the GCS, not from the donor).

Meter state is plain data handed in and back, like the autoscaler's policy state; the ledger
receives closed :class:`Interval` s, at most one per session per ``interval_s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from dgpt.credit.unit import ResourceSeconds, Weights


@dataclass(frozen=True)
class Running:
    """A donor session whose raylet runs on ``node_id`` now, with the weights it earns at."""

    node_id: str
    donor_id: str
    session_id: int
    weights: Weights


@dataclass(frozen=True)
class Used:
    """What work holds on a node at one sample: CPUs, GPUs, memory bytes."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: float = 0.0

    @staticmethod
    def of(total: Mapping[str, float], available: Mapping[str, float]) -> Used:
        """From a node's total and available resources (Ray's names: CPU, GPU, memory).

        Ray's resource maps omit a resource whose amount is 0: one in ``total`` but absent from
        ``available`` is wholly held.
        """
        def held(name: str) -> float:
            return max(0.0, float(total.get(name, 0.0)) - float(available.get(name, 0.0)))
        return Used(held("CPU"), held("GPU"), held("memory"))

    def over(self, seconds: float) -> ResourceSeconds:
        return ResourceSeconds(self.cpus * seconds, self.gpus * seconds, self.memory_bytes * seconds)


@dataclass(frozen=True)
class Interval:
    """Metered work of one donor session from ``start_at`` to ``end_at``: a ledger entry to be."""

    donor_id: str
    session_id: int
    node_id: str
    start_at: float
    end_at: float
    used: ResourceSeconds
    weights: Weights


class _Open(NamedTuple):  # a tuple: built for every running donor every tick
    running: Running
    start_at: float
    last_at: float
    last: Used
    used: ResourceSeconds = ResourceSeconds()


@dataclass(frozen=True)
class MeterState:
    """Open intervals by node id (handed to :func:`step` and back)."""

    open: Mapping[str, _Open] = field(default_factory=dict)


def _close(o: _Open, at: float) -> Interval | None:
    if o.used.empty:
        return None  # nothing ran: no entry (the ledger stays one row per unit of work)
    r = o.running
    return Interval(r.donor_id, r.session_id, r.node_id, o.start_at, at, o.used, r.weights)


def step(state: MeterState, now: float, running: Mapping[str, Running], used: Mapping[str, Used], *,
         interval_s: float, max_gap_s: float) -> tuple[MeterState, list[Interval]]:
    """Integrate one sample taken at ``now``.

    Args:
        state: the state the previous step returned (``MeterState()`` at first).
        running: node id -> the donor session running there now.
        used: node id -> what work holds there now (a running node missing here holds nothing).
        interval_s: an open interval closes once it is this long (the ledger's granularity).
        max_gap_s: a gap between two samples longer than this is not metered.

    Returns:
        (the new state, the intervals that closed: full ones, and those of sessions that ended).
    """
    closed: list[Interval] = []
    out: dict[str, _Open] = {}
    idle = Used()
    # Called every autoscaler tick over every running donor: an idle hold adds nothing.
    for node_id, o in state.open.items():
        dt = now - o.last_at
        acc = o.used + o.last.over(dt) if 0 < dt <= max_gap_s and o.last != idle else o.used
        r, still = o.running, running.get(node_id)
        if still is None or (still is not r and (still.donor_id, still.session_id, still.weights) != (
                r.donor_id, r.session_id, r.weights)):
            # The session ended (or its donor was re-profiled): its interval closes; a new one opens below.
            if (done := _close(_Open(r, o.start_at, o.last_at, o.last, acc), now if dt > 0 else o.last_at)) is not None:
                closed.append(done)
            continue
        current = used.get(node_id, idle)
        o = _Open(still, o.start_at, max(now, o.last_at), current, acc)
        if now - o.start_at >= interval_s:
            if (done := _close(o, now)) is not None:
                closed.append(done)
            o = _Open(still, now, now, current)
        out[node_id] = o
    for node_id, r in running.items():
        if node_id not in out:  # a session that started (or a node first seen) since the last sample
            out[node_id] = _Open(r, now, now, used.get(node_id, Used()))
    return MeterState(out), closed


def flush(state: MeterState, now: float, *, max_gap_s: float) -> tuple[MeterState, list[Interval]]:
    """Close every open interval at ``now`` (the control plane stops): nothing metered is dropped."""
    return step(state, now, {}, {}, interval_s=float("inf"), max_gap_s=max_gap_s)
