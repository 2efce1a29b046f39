"""The control plane's metering: Ray's per-node usage, sampled each autoscaler tick, into the ledger.

The autoscaler already reads the GCS's resource state every ``autoscaler_interval_s``
(``RayAdapter.usage_and_demand``); the same sample is handed here, so metering costs no
extra call into Ray. Each sample is integrated per donor session by the pure
``dgpt.credit.meter.step`` (its sampling error is stated there); intervals that close
(``credit_interval_s`` long, or their session ended) are appended to the ledger at once. Work
metered since the last closed interval is lost if the control plane is killed (at most
``credit_interval_s`` per donor); a clean stop closes every open interval first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from dgpt.credit.book import CreditBook
from dgpt.credit.meter import MeterState, Running, Used, flush, step
from dgpt.credit.unit import ResourceSeconds, weights_for
from dgpt.head.ray_adapter import NodeUsage
from dgpt.sdk.models import DeviceProfile

log = logging.getLogger("dgpt.metering")

#: A gap between two samples longer than this many sampling intervals (and never under
#: MIN_GAP_S) is not metered: the GCS did not answer, or the control plane was away.
MAX_GAP_INTERVALS = 10
MIN_GAP_S = 15.0


class SessionsPort(Protocol):
    """What metering needs of the registry: who runs where now."""

    def running_sessions(self) -> list[tuple[str, str, int, DeviceProfile]]: ...


class Metering:
    """Integrates samples of Ray's node usage into credit rows (thread-safe)."""

    def __init__(self, registry: SessionsPort, book: CreditBook, interval_s: float, sample_s: float,
                 clock: Callable[[], float] = time.time,
                 on_metered: Callable[[ResourceSeconds], None] | None = None) -> None:
        self.registry = registry
        self.book = book
        self.interval_s = interval_s
        self.max_gap_s = max(MIN_GAP_S, MAX_GAP_INTERVALS * sample_s)
        self.clock = clock
        self.on_metered = on_metered or (lambda used: None)
        self._state = MeterState()
        self._lock = threading.Lock()
        # node id -> (its Running, the profile it was built from): reused while the session
        # and profile stay, so a tick over thousands of running donors builds almost nothing.
        self._runs: dict[str, tuple[Running, DeviceProfile]] = {}
        self._latest: tuple[float, list[NodeUsage]] | None = None

    def _running(self) -> dict[str, Running]:
        runs, out = {}, {}
        for node, donor, session, profile in self.registry.running_sessions():
            known = self._runs.get(node)
            if known is None or known[1] is not profile or known[0].donor_id != donor or known[0].session_id != session:
                known = (Running(node, donor, session, weights_for(profile)), profile)
            runs[node] = known
            out[node] = known[0]
        self._runs = runs
        return out

    def sample(self, usage: Iterable[NodeUsage], at: float | None = None) -> list[dict[str, Any]]:
        """One sample of every node's usage, taken at ``at`` (default: now). Never raises: a
        failure is logged and the sample skipped."""
        try:
            now = self.clock() if at is None else at
            running = self._running()
            used = {u.node_id: Used.of(u.total, u.available) for u in usage if u.node_id in running}
            with self._lock:
                self._state, closed = step(self._state, now, running, used, interval_s=self.interval_s,
                                           max_gap_s=self.max_gap_s)
            return self._record(closed)
        except Exception:
            log.exception("metering sample failed")
            return []

    def offer(self, usage: list[NodeUsage]) -> None:
        """Keep a sample taken now for :meth:`take_offered` (the autoscaler's tick reads the
        sample, offers it, and decides and applies before the sample is integrated)."""
        with self._lock:
            self._latest = (self.clock(), usage)

    def take_offered(self) -> list[dict[str, Any]]:
        """Integrate the sample last offered, if any (at the time it was offered)."""
        with self._lock:
            latest, self._latest = self._latest, None
        return self.sample(latest[1], at=latest[0]) if latest is not None else []

    def close(self) -> list[dict[str, Any]]:
        """Close every open interval now (a clean stop): what was metered reaches the ledger."""
        with self._lock:
            self._state, closed = flush(self._state, self.clock(), max_gap_s=self.max_gap_s)
        return self._record(closed)

    def _record(self, closed: list[Any]) -> list[dict[str, Any]]:
        if not closed:
            return []
        stored = self.book.record(closed)
        for interval in closed:
            self.on_metered(interval.used)
        return stored
