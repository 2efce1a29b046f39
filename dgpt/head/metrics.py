"""The control plane's Prometheus metrics, and the Ray nodes Prometheus scrapes beside them.

Served on their own port (``metrics_port``, ``DGPT_METRICS_PORT``) by a small HTTP server in
the control-plane process, apart from the API, so a scrape never waits behind heartbeats:

- ``GET /metrics``: the series below (Prometheus text format);
- ``GET /ray/targets``: every live Ray node's metrics export port, and the head's autoscaler
  and dashboard metrics ports, in Prometheus's HTTP service-discovery format, so one scrape
  config follows donors as they join and leave (``deployments/prometheus/prometheus.yml``).

Series (labels are closed sets, never a donor, node or job id, so their number is bounded
whatever the fleet's size):

==========================================  =========  ===================================
dgpt_donors{state}                          gauge      donors by lifecycle state
dgpt_sessions_ended_total{kind}             counter    sessions ended: drained | lost
dgpt_heartbeat_seconds                      histogram  heartbeat handling, hold excluded
dgpt_api_request_seconds{operation,code}    histogram  every API call, by operation, 2xx..5xx
dgpt_autoscaler_decisions_total{action,result}  counter  decisions applied: ok | refused
dgpt_placement_seconds{call}                histogram  fleet views served to placement/routers
dgpt_credit_issued_total                    counter    credit appended to the ledger
dgpt_credit_voided_total                    counter    credit taken back (failed verification)
dgpt_credit_ledger                          gauge      credit in the ledger, net of voids
dgpt_metered_resource_seconds_total{resource}  counter  cpu | gpu | memory_byte seconds metered
dgpt_verification_outcomes_total{outcome}   counter    agreed | disagreed | rerun | voided
dgpt_storage_durability_margin              gauge      NaN until the storage tier reports one
==========================================  =========  ===================================

Counters count from the control plane's start (Prometheus's ``rate`` handles restarts).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from autoscaler.actuator import Actuator, Applied, RegistryPort
from autoscaler.decisions import AutoscalerDecision
from dgpt.config import Settings, node_ports
from dgpt.contract import LABEL_DEVICE_CLASS, LABEL_ROLE, DonorState, SessionEnd
from dgpt.credit.unit import ResourceSeconds
from dgpt.exceptions import FabricError
from dgpt.head.api import HeldHeartbeats
from dgpt.head.ray_adapter import RayNode
from dgpt.sdk.models import SessionView

log = logging.getLogger("dgpt.metrics")

#: The control plane's calls that serve placement (``dgpt_placement_seconds{call}``).
PLACEMENT_CALLS = ("placement_view", "node_states")
#: Verification outcomes ``record_verification`` accepts (a closed set: a label value).
VERIFICATION_OUTCOMES = ("agreed", "disagreed", "rerun", "voided")
# Heartbeats are answered from memory: most take well under a millisecond; a slow one waits on
# the registry lock or a SQLite write.
_HEARTBEAT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_PLACEMENT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Seconds the current API request spent held (a standby heartbeat's long-poll), per request.
_held_s: ContextVar[list[float] | None] = ContextVar("dgpt_held_s", default=None)


class _Donors(Collector):
    """``dgpt_donors{state}`` read from the registry at scrape time (every state, 0 included)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("dgpt_donors", "Donors by lifecycle state.", labels=["state"])
        counts = self.counts()
        for state in DonorState:
            family.add_metric([state.value], float(counts.get(state.value, 0)))
        yield family


class HeadMetrics:
    """Every series of the control plane, in a registry of its own (not the process default:
    several control planes may live in one test process)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_Donors(counts))
        self.sessions_ended = Counter("dgpt_sessions_ended", "Donor sessions ended, by how.", ["kind"], registry=r)
        for kind in SessionEnd:
            self.sessions_ended.labels(kind.value)
        self.heartbeat_seconds = Histogram("dgpt_heartbeat_seconds", "Time to answer a donor heartbeat, long-poll "
                                           "hold excluded.", buckets=_HEARTBEAT_BUCKETS, registry=r)
        self.api_seconds = Histogram("dgpt_api_request_seconds", "Time to answer an API request (hold excluded), by "
                                     "operation and status class.", ["operation", "code"], registry=r)
        self.decisions = Counter("dgpt_autoscaler_decisions", "Autoscaler decisions applied, by action and result.",
                                 ["action", "result"], registry=r)
        self.placement_seconds = Histogram("dgpt_placement_seconds", "Time to serve a fleet view to placement "
                                           "(drivers) or routers.", ["call"], buckets=_PLACEMENT_BUCKETS, registry=r)
        # Every known label value from the start: a series exists (at 0) before its first event.
        for action in ("activate", "drain"):
            for result in ("ok", "refused"):
                self.decisions.labels(action, result)
        for call in PLACEMENT_CALLS:
            self.placement_seconds.labels(call)
        self.credit_issued = Counter("dgpt_credit_issued", "Credit appended to the ledger.", registry=r)
        self.credit_voided = Counter("dgpt_credit_voided", "Credit taken back (failed verification).", registry=r)
        self._ledger_total: Callable[[], float] = lambda: 0.0
        Gauge("dgpt_credit_ledger", "Credit in the ledger, net of voids.", registry=r).set_function(
            lambda: self._ledger_total())
        self.metered = Counter("dgpt_metered_resource_seconds", "Resource-seconds metered on donors' raylets.",
                               ["resource"], registry=r)
        for resource in ("cpu", "gpu", "memory_byte"):
            self.metered.labels(resource)
        self.verifications = Counter("dgpt_verification_outcomes", "Verified results, by outcome.", ["outcome"],
                                     registry=r)
        for outcome in VERIFICATION_OUTCOMES:
            self.verifications.labels(outcome)
        self._margin: Callable[[], float] = lambda: math.nan
        Gauge("dgpt_storage_durability_margin", "Pieces the storage tier can lose before data is lost, for the "
              "worst segment (NaN until the tier reports).", registry=r).set_function(lambda: self._margin())

    # ------------------------------------------------------------ hooks

    def session_ended(self, session: SessionView) -> None:
        if session.ended_as is not None:
            self.sessions_ended.labels(SessionEnd(session.ended_as).value).inc()

    def credit_changed(self, issued: float, voided: float) -> None:
        if issued > 0:
            self.credit_issued.inc(issued)
        if voided > 0:
            self.credit_voided.inc(voided)

    def ledger_total(self, fn: Callable[[], float]) -> None:
        self._ledger_total = fn

    def metered_used(self, used: ResourceSeconds) -> None:
        self.metered.labels("cpu").inc(used.cpu_s)
        self.metered.labels("gpu").inc(used.gpu_s)
        self.metered.labels("memory_byte").inc(used.memory_byte_s)

    def record_verification(self, outcome: str) -> None:
        """Count one verified result (``dgpt.verify`` reports them).

        Raises:
            ValueError: ``outcome`` is not one of ``VERIFICATION_OUTCOMES``.
        """
        if outcome not in VERIFICATION_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(VERIFICATION_OUTCOMES)}, got {outcome!r}")
        self.verifications.labels(outcome).inc()

    def durability_margin(self, fn: Callable[[], float]) -> None:
        """Where ``dgpt_storage_durability_margin`` reads from (the storage tier, once wired)."""
        self._margin = fn

    @contextmanager
    def placement_timer(self, call: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.placement_seconds.labels(call).observe(time.perf_counter() - start)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------ the API's timing

    def instrument(self, app: Any) -> Any:
        """``app`` wrapped so every request is timed by operation (hold excluded)."""
        return _Timed(app, self)


class _Timed:
    """ASGI wrapper: times each request by its route's operation id and status class."""

    def __init__(self, app: Any, metrics: HeadMetrics) -> None:
        self.app, self.metrics = app, metrics

    def __getattr__(self, name: str) -> Any:  # the app's own attributes (state, openapi) stay reachable
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        held = [0.0]
        token = _held_s.set(held)
        status = [500]

        async def tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            _held_s.reset(token)
            elapsed = max(0.0, time.perf_counter() - start - held[0])
            route = scope.get("route")
            operation = getattr(route, "operation_id", None) or "unmatched"
            self.metrics.api_seconds.labels(operation, f"{status[0] // 100}xx").observe(elapsed)
            if operation == "heartbeatDonor" and status[0] < 400:
                self.metrics.heartbeat_seconds.observe(elapsed)


class TimedHeld(HeldHeartbeats):
    """Held heartbeats whose hold time is subtracted from their request's time."""

    async def wait(self, donor_id: str, timeout_s: float) -> bool:
        start = time.perf_counter()
        try:
            return await super().wait(donor_id, timeout_s)
        finally:
            held = _held_s.get()
            if held is not None:
                held[0] += time.perf_counter() - start


class CountingActuator(Actuator):
    """The autoscaler's actuator, counting what it applied by action and result."""

    def __init__(self, metrics: HeadMetrics, registry: RegistryPort, drain_deadline_s: float) -> None:
        super().__init__(registry, drain_deadline_s)
        self.metrics = metrics

    def apply(self, decisions: tuple[AutoscalerDecision, ...], now_s: float) -> list[Applied]:
        applied = super().apply(decisions, now_s)
        for a in applied:
            self.metrics.decisions.labels(a.action, "ok" if a.ok else "refused").inc()
        return applied


# ---------------------------------------------------------------- Ray's metrics


def ray_targets(nodes: list[RayNode], settings: Settings) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery: each live node's Ray metrics, and the head's two more.

    Target labels are the node's role and device class (bounded); Ray's own series carry
    the node's address already.
    """
    groups: dict[tuple[str, str, str], list[str]] = {}
    for n in nodes:
        if not n.alive or n.metrics_export_port <= 0:
            continue
        role = n.labels.get(LABEL_ROLE, "head" if n.is_head else "unknown")
        key = ("node", role, n.labels.get(LABEL_DEVICE_CLASS, "none"))
        groups.setdefault(key, []).append(f"{n.node_ip}:{n.metrics_export_port}")
        if n.is_head:
            ports = node_ports(settings.ray_node_port_base)
            for component, name in (("autoscaler", "autoscaler metrics"), ("dashboard", "dashboard metrics")):
                groups.setdefault((component, role, "none"), []).append(f"{n.node_ip}:{ports[name]}")
    return [{"targets": sorted(targets),
             "labels": {"ray_component": component, "dgpt_role": role, "dgpt_device_class": device_class}}
            for (component, role, device_class), targets in sorted(groups.items())]


class MetricsServer:
    """``/metrics`` and ``/ray/targets`` on their own port, in a thread."""

    def __init__(self, metrics: HeadMetrics, settings: Settings, nodes: Callable[[], list[RayNode]]) -> None:
        self.metrics, self.settings, self.nodes = metrics, settings, nodes
        handler = self._handler()
        try:
            self._server = ThreadingHTTPServer((settings.http_host, settings.metrics_port), handler)
        except OSError as exc:
            raise FabricError(f"the control plane cannot serve metrics on {settings.http_host}:{settings.metrics_port}: "
                              f"{exc}", hint="pick a free port with DGPT_METRICS_PORT=...") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server protocol)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._answer(200, CONTENT_TYPE_LATEST, server.metrics.text())
                    elif path == "/ray/targets":
                        body = json.dumps(ray_targets(server.nodes(), server.settings)).encode()
                        self._answer(200, "application/json", body)
                    else:
                        self._answer(404, "text/plain; charset=utf-8",
                                     b"not found: GET /metrics (dgpt) or /ray/targets (Ray's nodes, HTTP SD)\n")
                except Exception as exc:  # a scrape must never take the server down
                    log.exception("metrics request %s failed", path)
                    self._answer(500, "text/plain; charset=utf-8", f"metrics failed: {type(exc).__name__}\n".encode())

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not logged
                pass

        return Handler
