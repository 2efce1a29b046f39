"""The autoscaler loop: collect, decide, apply, record.

Like Serve's autoscaling state manager, the loop keeps the policy state between ticks and
hands it back to the pure policy each time; a tick that raises is logged with its traceback
and the loop goes on. Collecting and applying are injected, so the loop knows neither Ray
nor the head: the head runs it next to its registry (``dgpt.head.control_plane``), and a
restart starts from a fresh policy state, which is safe (cooldowns restart, nothing is lost).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from autoscaler.actuator import Actuator, Applied
from autoscaler.bounds import AutoscalerBounds
from autoscaler.context import AutoscalerContext
from autoscaler.decisions import AutoscalerDecision
from autoscaler.policies import PolicyState, default_policy

log = logging.getLogger("dgpt.autoscaler")

Policy = Callable[[AutoscalerContext, PolicyState | None], tuple[tuple[AutoscalerDecision, ...], PolicyState]]


class AutoscalerLoop:
    """One autoscaler: ``tick()`` is one collect -> decide -> apply -> record cycle."""

    def __init__(self, collect: Callable[[], AutoscalerContext], actuator: Actuator,
                 policy: Policy = default_policy, clock: Callable[[], float] = time.time,
                 history: int = 50) -> None:
        self.collect = collect
        self.actuator = actuator
        self.policy = policy
        self.clock = clock
        self.state: PolicyState | None = None
        self.recent: deque[Applied] = deque(maxlen=history)
        self.ticks = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_summary: dict[str, Any] = {}
        # Seconds each recent tick took to collect and decide (applying waits on Ray), and
        # when (the clock's time) each started.
        self.durations_s: deque[float] = deque(maxlen=1000)
        self.started_at: deque[float] = deque(maxlen=1000)

    def tick(self) -> list[Applied]:
        at, started = self.clock(), time.perf_counter()
        ctx = self.collect()
        decisions, self.state = self.policy(ctx, self.state)
        self.durations_s.append(time.perf_counter() - started)
        self.started_at.append(at)
        applied = self.actuator.apply(decisions, self.clock())
        self.recent.extend(applied)
        self.ticks += 1
        fleet = ctx.fleet
        self.last_summary = {
            "at": ctx.now_s,
            "pending": len(ctx.demand.pending),
            "pending_gangs": len(ctx.demand.gangs),
            "constraints": len(ctx.demand.constraints),
            "active": len(fleet.active),
            "activating": len(fleet.activating),
            "standby": len(fleet.standby),
        }
        return applied

    def safe_tick(self) -> None:
        """A tick that never raises: a failure is logged with its traceback and counted."""
        try:
            self.tick()
        except Exception:
            self.errors += 1
            self.last_error = traceback.format_exc(limit=5)
            log.error("autoscaler tick failed:\n%s", traceback.format_exc())

    def durations_between(self, start: float, end: float) -> list[float]:
        """Seconds (collect + decide) of the recent ticks that started in ``[start, end]``."""
        return [d for at, d in zip(self.started_at, self.durations_s, strict=False) if start <= at <= end]

    def status(self, bounds: AutoscalerBounds) -> dict[str, Any]:
        durations = sorted(self.durations_s)
        p99 = durations[min(len(durations) - 1, int(0.99 * len(durations)))] if durations else None
        return {
            "bounds": bounds.model_dump(),
            "ticks": self.ticks,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_tick": self.last_summary,
            "tick_p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
            "recent": [asdict(a) for a in self.recent],
        }
