"""The control plane on the head: the registry, the donor API server, the monitor, the autoscaler.

One process of the head's own user (``python -m dgpt.head.control_plane``, started and
restarted by the head's supervisor), a Ray driver outside Ray's workers, hosts everything
that reads the live fleet, so none of it pays a Ray call or a copy of the fleet per request,
and no Ray work on the head can read its files or its memory (``dgpt.head.isolation``):

- the registry (``dgpt.head.registry``) with its SQLite file;
- the overlay coordinator (``dgpt.overlay.coordinator``), when ``overlay_enabled``;
- the REST API (``dgpt.head.api``) on its own uvicorn server and port, in a thread;
- the monitor thread: Ray's node table and heartbeat silence, every ``monitor_interval_s``;
- the autoscaler thread: ``autoscaler.loop.AutoscalerLoop`` every ``autoscaler_interval_s``,
  with Ray's demand from the adapter and the registry's fleet view; each tick's node usage is
  also metered into the credit ledger (``dgpt.head.metering``);
- the Prometheus metrics server (``dgpt.head.metrics``) on ``metrics_port``, in a thread.
- the storage tier's metadata service (``dgpt.head.storage_tier``) and its upkeep thread
  (donor states from the registry, repair, audits, garbage) every ``storage_repair_interval_s``;
  Ray callers reach the service through :meth:`ControlPlane.storage_call`.

Ray callers reach :class:`ControlPlane`'s methods through the actor named ``REGISTRY_ACTOR``,
a door that forwards them over a Unix socket (``dgpt.head.control_link``).

It runs at a raised CPU priority (``control_plane_nice``, where the head may raise one), so
Serve replicas and jobs that saturate the head's CPUs delay neither heartbeats nor ticks.

Each loop survives any single tick's exception (logged with its traceback). Killing the
process loses no record: the supervisor starts it again, which reloads the SQLite file and
binds the same ports again; donors keep heartbeating through the gap.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from autoscaler.bounds import AutoscalerBounds, load_bounds
from autoscaler.context import AutoscalerContext
from autoscaler.loop import AutoscalerLoop
from dgpt.config import Settings
from dgpt.exceptions import FabricError, InvalidRequest, NotEnoughDonors, NotFound
from dgpt.fleet import FleetView
from dgpt.head.paths import head_paths
from dgpt.processes import raise_priority
from dgpt.tls import head_fingerprint, tls_files
from dgpt.verify.trust import DonorOutcome

log = logging.getLogger("dgpt.control_plane")

#: How often what Serve runs is recorded (re-applied after a head restart).
SERVE_RECORD_S = 5.0


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
        # Join tokens carry it, so donors pin the API's certificate (dgpt.tls).
        self.tls_fingerprint = head_fingerprint(settings)
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


#: A collection of the oldest generation longer than this is logged.
SLOW_GC_S = 0.1


def _freeze_loaded_heap() -> None:
    """Keep what the control plane loaded at start (the fleet: millions of objects at 100k
    donors) out of Python's cyclic garbage collector.

    A full collection walks every tracked object; over the loaded fleet that stops every
    thread, heartbeats included, for a second or more at a time. The fleet's records live
    until the process ends, so the collector has nothing to find in them: ``gc.freeze``
    moves them to the permanent generation, and later collections walk only what came
    after. Collections that still take long are logged.
    """
    gc.collect()
    gc.freeze()
    started: list[float] = []

    def watch(phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started and (took := time.perf_counter() - started[0]) > SLOW_GC_S:
            log.warning("a full garbage collection took %.2f s (%d objects frozen)", took, gc.get_freeze_count())

    gc.callbacks.append(watch)
    log.info("garbage collection: %d objects loaded at start frozen", gc.get_freeze_count())


class ControlPlane:
    """The control plane (see the module docstring). Its public methods serve Ray callers
    through the door (``dgpt.head.control_link.METHODS``): routers, drivers placing work, the
    CLI's status; donors and apps use the HTTP API."""

    def __init__(self, settings_json: str) -> None:
        import uvicorn

        from dgpt.credit.book import CreditBook
        from dgpt.head.api import build_app
        from dgpt.head.metering import Metering
        from dgpt.head.metrics import CountingActuator, HeadMetrics, MetricsServer, TimedHeld
        from dgpt.head.ray_adapter import RayAdapter
        from dgpt.head.registry import Registry
        from dgpt.head.store import RegistryStore, read_ledger
        from dgpt.verify.trust import TrustBook

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # the dashboard, every few seconds
        settings = Settings.model_validate_json(settings_json)
        self.settings = settings
        _raise_open_file_limit()
        gcs = f"{settings.node_ip or '127.0.0.1'}:{settings.ray_port}"
        paths = head_paths(settings.home)
        self.adapter = RayAdapter(gcs)
        self.adapter.announce_autoscaler()
        store = RegistryStore(paths["db"])
        if paths["api_key"].is_file():
            store.ensure_token("api", paths["api_key"].read_text().strip(), "head bootstrap key", time.time())
        overlay = None
        if settings.overlay_enabled:
            from dgpt.overlay.coordinator import OverlayCoordinator

            # The supervisor brought the interface up; the coordinator restores its peers.
            overlay = OverlayCoordinator.open(settings, paths["overlay_db"])
        self.registry = Registry(settings, store, self.adapter, gcs, paths["ray_token"], overlay=overlay)
        self.metrics = HeadMetrics(self.registry.counts)
        self.registry.on_session_end = self.metrics.session_ended
        # A void holds while a metered interval open at its time may still close (credit_interval_s
        # at most, plus the ticks that close it).
        self.credit = CreditBook(store, lambda: read_ledger(paths["db"]), on_change=self.metrics.credit_changed,
                                 hold_s=2 * settings.credit_interval_s + 10 * settings.autoscaler_interval_s)
        # Verification trust per donor (dgpt.verify), in the registry's own SQLite file.
        self.trust = TrustBook(paths["db"])
        self.registry.trust_scores = self.trust.scores
        self.registry.trust_record = lambda donor_id: (r.as_dict() if (r := self.trust.summary(donor_id)) else None)
        self.metrics.ledger_total(self.credit.total_issued)
        self.metering = Metering(self.registry, self.credit, settings.credit_interval_s, settings.autoscaler_interval_s,
                                 on_metered=self.metrics.metered_used)
        self.bounds = autoscaler_bounds(settings)
        self.autoscaler = AutoscalerLoop(self._collect, CountingActuator(self.metrics, self.registry,
                                                                         settings.drain_deadline_s))
        self._stop = threading.Event()
        self._metrics_server = MetricsServer(self.metrics, settings, self.adapter.nodes).start()

        from dgpt.head.storage_tier import HeadStorage

        self.storage = HeadStorage(settings, paths["storage"])
        app = self.metrics.instrument(build_app(
            self.registry, _Services(settings, gcs, lambda: self.autoscaler.status(self.bounds)), held=TimedHeld(),
            credit=self.credit, storage=self.storage))
        tls = tls_files(settings)
        config = uvicorn.Config(app, host=settings.http_host, port=settings.api_port, loop="uvloop", http="httptools",
                                log_level="warning", access_log=False, backlog=4096, timeout_keep_alive=75,
                                ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None)
        self._server = uvicorn.Server(config)
        self._api = threading.Thread(target=self._server.run, name="api", daemon=True)
        self._api.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._api.is_alive() or time.monotonic() > deadline:
                raise FabricError(f"the control plane could not serve on {settings.http_host}:{settings.api_port}",
                                  hint="is DGPT_API_PORT free? see the head's logs/control-plane.log")
            time.sleep(0.05)
        self._serve_recorded: list[dict[str, Any]] | None = None
        for name, interval, tick in (
            ("monitor", lambda: self.settings.monitor_interval_s, self.registry.tick),
            ("autoscaler", lambda: self.settings.autoscaler_interval_s, self._autoscale),
            ("serve-record", lambda: SERVE_RECORD_S, self._record_serve),
            ("storage-upkeep", lambda: self.settings.storage_repair_interval_s, self._storage_upkeep),
        ):
            threading.Thread(target=_loop_forever, args=(name, interval, tick, self._stop), name=name,
                             daemon=True).start()
        _freeze_loaded_heap()
        log.info("control plane serving on %s:%d", settings.http_host, settings.api_port)

    def stop(self) -> None:
        """Stop the loops and the API; what was metered since the last ledger row is written."""
        self._stop.set()
        self._server.should_exit = True
        self.metering.close()

    def _record_serve(self) -> None:
        """Record what Serve runs from config files, so a restarted head re-applies it."""
        from dgpt.head.dashboard import Dashboard, deployed_apps

        apps = deployed_apps(Dashboard.of(self.settings).serve_details())
        # An empty Serve replaces the record only once this loop has seen apps go: a head
        # that just started (or failed to re-apply) must not erase what it should restore.
        if apps != self._serve_recorded and (apps or self._serve_recorded):
            self.registry.store.save_serve_apps(apps, time.time())
        self._serve_recorded = apps

    def _storage_upkeep(self) -> None:
        """Donor states and reliability from the registry, then repair, audits and garbage.

        Only the donors the tier knows are read: the whole fleet's views, every interval, held
        the registry's lock for seconds at 100k donors and starved heartbeats.
        """
        self.storage.sync(self.registry.donor_views(self.storage.donor_ids()))
        self.storage.upkeep()

    def _autoscale(self) -> None:
        """One autoscaler tick, then the credit metering of the usage it read: decisions are
        not held up by accounting."""
        self.autoscaler.safe_tick()
        self.metering.take_offered()

    def _collect(self) -> AutoscalerContext:
        usage, demand = self.adapter.usage_and_demand()
        self.registry.update_usage(usage)
        self.metering.offer(usage)  # integrated once the tick has decided and applied (_autoscale)
        return AutoscalerContext(self.bounds, demand, self.registry.fleet_view())

    # ------------------------------------------------------------ Ray callers

    def ping(self) -> str:
        return "ok"

    def node_states(self) -> dict[str, dict[str, Any]]:
        """node_id -> {donor_id, state, reliability, reachable}: what Serve's routers rank by."""
        with self.metrics.placement_timer("node_states"):
            return self.registry.node_states()

    def placement_view(self) -> FleetView:
        """The active donors, for ``dgpt.placement.options`` in drivers (no standby columns)."""
        with self.metrics.placement_timer("placement_view"):
            view = self.registry.fleet_view()
            return FleetView(now_s=view.now_s, active=view.active, spare_owners=view.best_spare_owners())

    def void_credit(self, donor_id: str, start_at: float, end_at: float, reason: str) -> dict[str, Any]:
        """Take back the credit of a donor's work in ``[start_at, end_at]`` (its result failed verification)."""
        return self.credit.void(donor_id, start_at, end_at, reason).model_dump()

    def trust_records(self, donor_ids: list[str]) -> dict[str, Any]:
        """Donors' verification records (``dgpt.verify.trust.TrustBook.records``)."""
        return self.trust.records(donor_ids)

    def record_trust(self, outcomes: list[DonorOutcome]) -> list[Any]:
        """Fold verification outcomes into the donors' trust (``TrustBook.record``).

        Any Ray token holder can call this, so outcomes naming donors this head does not
        know are refused whole: nothing is recorded for them.
        """
        if not all(isinstance(o, DonorOutcome) for o in outcomes):
            raise InvalidRequest("record_trust takes dgpt.verify.trust.DonorOutcome values", 422)
        unknown = {o.donor_id for o in outcomes} - self.registry.known_donors({o.donor_id for o in outcomes})
        if unknown:
            raise NotFound(f"no donors {', '.join(sorted(unknown))}: their outcomes were not recorded", 404)
        return self.trust.record(outcomes)

    def record_verification(self, outcome: str) -> None:
        """Count a verified result in ``dgpt_verification_outcomes_total`` (see dgpt.head.metrics)."""
        self.metrics.record_verification(outcome)

    def report_durability_margin(self, margin: float) -> None:
        """The storage tier's durability margin, for ``dgpt_storage_durability_margin``."""
        self.metrics.durability_margin(lambda: margin)

    def training_fleet(self) -> tuple[FleetView, int, int]:
        """The whole fleet (active, activating, standby) and the fleet's (lost, ended) session
        counts: what ``dgpt.train`` plans a run on. Called once per run, so paging through
        every donor for the counts is affordable."""
        lost = ended = 0
        cursor: str | None = None
        while True:
            page, cursor, _ = self.registry.list_donors(after=cursor, limit=1000, max_sessions=0)
            for d in page:
                lost += d.sessions_lost
                ended += d.sessions_total - (1 if d.node_id else 0)
            if cursor is None:
                break
        return self.registry.fleet_view(), lost, max(ended, lost)

    def checkpoint_tier(self) -> tuple[str, str | None, str | None]:
        """The head's ``train_checkpoints`` setting and the donor tier's state for a write now:
        the profile it would get and its durability warning, or None and why it cannot take
        one. ``dgpt.train`` picks a run's checkpoint store from them (choose_checkpoint_store)."""
        try:
            profile = self.storage.service.choose_profile()
        except NotEnoughDonors as exc:
            return self.settings.train_checkpoints, None, exc.message
        return self.settings.train_checkpoints, profile.name, profile.warning

    def storage_call(self, method: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
        """One metadata call of the storage tier (``dgpt.storage.rpc``): ``("ok", answer)`` or
        ``("error", exception)``. ``DonorFileSystem()`` in Ray tasks and drivers comes here."""
        return self.storage.call_as_value(method, kwargs)

    def autoscaler_status(self) -> dict[str, Any]:
        return self.autoscaler.status(self.bounds)

    def autoscaler_ticks(self, start: float, end: float) -> list[float]:
        """Milliseconds (collect + decide) of the recent autoscaler ticks that started between
        ``start`` and ``end`` (wall clock; benchmarks time a phase with it)."""
        return [round(d * 1000, 3) for d in self.autoscaler.durations_between(start, end)]

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


def run(settings: Settings, owner: tuple[int, int] | None = None) -> int:
    """The control-plane process: join Ray as a driver, serve until SIGTERM/SIGINT.

    ``owner`` (uid, gid) is the user Ray work runs as on the head, the only one besides this
    process's that may connect to the door's socket.
    """
    import ray

    from dgpt import contract
    from dgpt.head.control_link import LinkServer, link_path

    # First, before any thread starts: Linux keeps a nice value per thread, and new threads inherit it.
    _, said = raise_priority(settings.control_plane_nice)
    print(f"control plane: {said}", flush=True)
    stop = threading.Event()
    gcs = f"{settings.node_ip or '127.0.0.1'}:{settings.ray_port}"
    ray.init(address=gcs, namespace=contract.NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    # ray.init() installed its own SIGTERM handler (a bare sys.exit): ours, for a clean stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    plane = ControlPlane(settings.model_dump_json())
    server = LinkServer(plane, link_path(settings.home), owner).start()
    print(f"control plane ready (pid {os.getpid()})", flush=True)
    stop.wait()
    server.shutdown()
    plane.stop()
    return 0


if __name__ == "__main__":
    # The supervisor hands the settings over stdin (they may name secrets' places, never in argv).
    _owner = sys.argv[sys.argv.index("--owner") + 1] if "--owner" in sys.argv else ""
    sys.exit(run(Settings.model_validate_json(sys.stdin.read()),
                 tuple(int(x) for x in _owner.split(":")) if _owner else None))  # type: ignore[arg-type]
