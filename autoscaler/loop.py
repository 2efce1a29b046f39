"""The autoscaler loop: collect, decide, apply, record; and the restartable actor that runs it.

Like Serve's autoscaling state manager, the loop keeps the policy state between ticks and
hands it back to the pure policy each time; a tick that raises is logged with its traceback
and the loop goes on. The actor is detached, restartable and pinned to the head; a restart
starts from a fresh policy state, which is safe (cooldowns restart, nothing is lost).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from autoscaler.actuator import Actuator, Applied
from autoscaler.bounds import AutoscalerBounds, load_bounds
from autoscaler.context import AutoscalerContext
from autoscaler.decisions import AutoscalerDecision
from autoscaler.policies import PolicyState, default_policy

log = logging.getLogger("dgpt.autoscaler")

AUTOSCALER_NAME = "autoscaler"
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

    def tick(self) -> list[Applied]:
        ctx = self.collect()
        decisions, self.state = self.policy(ctx, self.state)
        applied = self.actuator.apply(decisions, self.clock())
        self.recent.extend(applied)
        self.ticks += 1
        self.last_summary = {
            "at": ctx.now_s,
            "pending": len(ctx.pending),
            "pending_gangs": len(ctx.pending_gangs),
            "active": len(ctx.active),
            "activating": len(ctx.activating),
            "standby": len(ctx.standby),
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

    def status(self, bounds: AutoscalerBounds) -> dict[str, Any]:
        return {
            "bounds": bounds.model_dump(),
            "ticks": self.ticks,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_tick": self.last_summary,
            "recent": [asdict(a) for a in self.recent],
        }


class AutoscalerActor:
    """The Ray actor on the head that runs :class:`AutoscalerLoop` every ``autoscaler_interval_s``."""

    def __init__(self, settings_json: str) -> None:
        import ray

        from autoscaler.collect import build_context
        from dgpt.config import Settings
        from dgpt.head.ray_adapter import RayAdapter
        from dgpt.head.registry import NAMESPACE, REGISTRY_NAME
        from dgpt.sdk.models import DonorView

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        settings = Settings.model_validate_json(settings_json)
        self.settings = settings
        self.bounds = load_bounds(
            min_active=settings.min_active_donors, max_active=settings.max_active_donors,
            idle_timeout_s=settings.idle_timeout_s,
            # On the embedded default a donor starts in seconds; on real networks it is slower.
            activation_lead_time_s=max(10.0, 4 * settings.heartbeat_interval_s),
            min_lifetime_s=min(120.0, settings.idle_timeout_s),
            scale_down_cooldown_s=min(60.0, settings.idle_timeout_s / 2),
        )
        gcs = f"{settings.node_ip}:{settings.ray_port}" if settings.node_ip else ray.get_runtime_context().gcs_address
        adapter = RayAdapter(gcs)
        adapter.announce_autoscaler()
        registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)

        class _Registry:
            def set_target(self, donor_id: str, target: str) -> None:
                ray.get(registry.set_target.remote(donor_id, target), timeout=30)

            def drain_idle(self, donor_id: str, reason: str, deadline_s: float) -> tuple[bool, str]:
                answer: Any = ray.get(registry.drain_idle.remote(donor_id, reason, deadline_s), timeout=60)
                return bool(answer[0]), str(answer[1])

        def collect() -> AutoscalerContext:
            donors: list[DonorView] = ray.get(registry.list_donors.remote(), timeout=30)
            usage, demand = adapter.usage_and_demand()
            return build_context(donors, usage, demand, self.bounds, time.time(), settings.heartbeat_timeout_s)

        self.loop = AutoscalerLoop(collect, Actuator(_Registry(), settings.drain_deadline_s))
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="autoscaler", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.autoscaler_interval_s):
            self.loop.safe_tick()

    def ping(self) -> str:
        return "ok"

    def status(self) -> dict[str, Any]:
        return self.loop.status(self.bounds)
