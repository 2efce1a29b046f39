"""The control-plane actor on the head: the registry, the donor API server, the monitor, the autoscaler.

One detached, restartable Ray actor, pinned to the head node by node identity, hosts
everything that reads the live fleet, so none of it pays a Ray call or a copy of the fleet
per request:

- the registry (``dgpt.head.registry``) with its SQLite file;
- the REST API (``dgpt.head.api``) on its own uvicorn server and port, in a thread;
- the monitor thread: Ray's node table and heartbeat silence, every ``monitor_interval_s``;
- the autoscaler thread: ``autoscaler.loop.AutoscalerLoop`` every ``autoscaler_interval_s``,
  with Ray's demand from the adapter and the registry's fleet view.

Each loop survives any single tick's exception (logged with its traceback). Killing the
process loses no record: Ray restarts the actor, which reloads the SQLite file and binds
the same port again; donors keep heartbeating through the gap.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from autoscaler.actuator import Actuator
from autoscaler.bounds import AutoscalerBounds, load_bounds
from autoscaler.context import AutoscalerContext
from autoscaler.loop import AutoscalerLoop
from dgpt.config import Settings
from dgpt.exceptions import FabricError
from dgpt.fleet import FleetView
from dgpt.head.paths import head_paths

log = logging.getLogger("dgpt.control_plane")


def autoscaler_bounds(settings: Settings) -> AutoscalerBounds:
    """The autoscaler's bounds and pacing for these settings."""
    return load_bounds(
        min_active=settings.min_active_donors,
        max_active=settings.max_active_donors,
        idle_timeout_s=settings.idle_timeout_s,
        # Heartbeat (held standby heartbeats answer at once) + `ray start` + joining.
        activation_lead_time_s=max(10.0, 4 * settings.heartbeat_interval_s),
        min_lifetime_s=min(120.0, settings.idle_timeout_s),
        scale_down_cooldown_s=min(60.0, settings.idle_timeout_s / 2),
    )


def _raise_open_file_limit() -> None:
    # Every held heartbeat is a socket: allow as many as the hard limit permits.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            pass


def _loop_forever(name: str, interval_s: Callable[[], float], tick: Callable[[], Any], stop: threading.Event) -> None:
    while not stop.wait(interval_s()):
        try:
            tick()
        except Exception:
            log.error("%s tick failed:\n%s", name, traceback.format_exc())


class _Services:
    """What the API needs of Ray besides the registry."""

    def __init__(self, settings: Settings, gcs: str, autoscaler_status: Callable[[], dict[str, Any]]) -> None:
        self.settings = settings
        self.ray_address = gcs
        self.dashboard_url = f"http://{settings.node_ip or '127.0.0.1'}:{settings.dashboard_port}"
        self.autoscaler_status = autoscaler_status
        self._jobs: Any = None

    def cluster_resources(self) -> tuple[dict[str, float], dict[str, float]]:
        import ray

        return ray.cluster_resources(), ray.available_resources()

    def jobs(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        if self._jobs is None:
            self._jobs = JobSubmissionClient(f"http://127.0.0.1:{self.settings.dashboard_port}")
        return self._jobs


class ControlPlane:
    """The Ray actor (see the module docstring). Its methods serve Ray callers: routers,
    drivers placing work, the CLI's status; donors and apps use the HTTP API."""

    def __init__(self, settings_json: str) -> None:
        import os

        import uvicorn

        from dgpt.head.api import build_app
        from dgpt.head.ray_adapter import RayAdapter
        from dgpt.head.registry import Registry
        from dgpt.head.store import RegistryStore

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        settings = Settings.model_validate_json(settings_json)
        self.settings = settings
        _raise_open_file_limit()
        try:
            # Heartbeats must not wait behind the inference proxy on a busy head.
            os.nice(-5)
        except OSError:
            pass
        gcs = f"{settings.node_ip or '127.0.0.1'}:{settings.ray_port}"
        paths = head_paths(settings.home)
        self.adapter = RayAdapter(gcs)
        self.adapter.announce_autoscaler()
        store = RegistryStore(paths["db"])
        if paths["api_key"].is_file():
            store.ensure_token("api", paths["api_key"].read_text().strip(), "head bootstrap key", time.time())
        self.registry = Registry(settings, store, self.adapter, gcs, paths["ray_token"])
        self.bounds = autoscaler_bounds(settings)
        self.autoscaler = AutoscalerLoop(self._collect, Actuator(self.registry, settings.drain_deadline_s))
        self._stop = threading.Event()

        app = build_app(self.registry, _Services(settings, gcs, lambda: self.autoscaler.status(self.bounds)))
        config = uvicorn.Config(app, host=settings.http_host, port=settings.api_port, loop="uvloop", http="httptools",
                                log_level="warning", access_log=False, backlog=4096, timeout_keep_alive=75)
        self._server = uvicorn.Server(config)
        self._api = threading.Thread(target=self._server.run, name="api", daemon=True)
        self._api.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._api.is_alive() or time.monotonic() > deadline:
                raise FabricError(f"the control plane could not serve on {settings.http_host}:{settings.api_port}",
                                  hint="is DGPT_API_PORT free? see the head's Ray logs (worker-*.err)")
            time.sleep(0.05)
        for name, interval, tick in (
            ("monitor", lambda: self.settings.monitor_interval_s, self.registry.tick),
            ("autoscaler", lambda: self.settings.autoscaler_interval_s, self.autoscaler.safe_tick),
        ):
            threading.Thread(target=_loop_forever, args=(name, interval, tick, self._stop), name=name,
                             daemon=True).start()
        log.info("control plane serving on %s:%d", settings.http_host, settings.api_port)

    def _collect(self) -> AutoscalerContext:
        usage, demand = self.adapter.usage_and_demand()
        self.registry.update_usage(usage)
        return AutoscalerContext(self.bounds, demand, self.registry.fleet_view())

    # ------------------------------------------------------------ Ray callers

    def ping(self) -> str:
        return "ok"

    def node_states(self) -> dict[str, dict[str, Any]]:
        """node_id -> {donor_id, state, reliability, reachable}: what Serve's routers rank by."""
        return self.registry.node_states()

    def placement_view(self) -> FleetView:
        """The active donors, for ``dgpt.placement.options`` in drivers (no standby columns)."""
        view = self.registry.fleet_view()
        return FleetView(now_s=view.now_s, active=view.active)

    def autoscaler_status(self) -> dict[str, Any]:
        return self.autoscaler.status(self.bounds)

    def fleet_timings(self, n: int = 20) -> dict[str, float]:
        """Milliseconds one fleet view and one placement view take now (benchmarks)."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.registry.fleet_view()
        t1 = time.perf_counter()
        for _ in range(n):
            self.placement_view()
        t2 = time.perf_counter()
        return {"fleet_view_ms": (t1 - t0) * 1000 / n, "placement_view_ms": (t2 - t1) * 1000 / n}
