"""A small closed-loop HTTP load generator for Serve endpoints: every request is counted.

Used by `dgpt demo`, the Serve integration tests and ``benchmarks.serve_router``. Each
worker thread sends one request at a time and records it (start, latency, status, error),
so "failed requests" is an exact count, never an estimate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["LoadLoop", "Sample", "percentile", "summarize"]


@dataclass(frozen=True)
class Sample:
    """One request: when it started (monotonic), how long it took, and how it ended."""

    started_s: float
    latency_s: float
    status: int  # HTTP status; 0 when no answer came back (connection error, timeout)
    error: str | None = None
    answer: Any = None  # what ``check`` returned for a 200 answer

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize(samples: Sequence[Sample], duration_s: float | None = None) -> dict[str, Any]:
    """Counts, throughput and latency percentiles (ms) of successful requests."""
    ok = [s for s in samples if s.ok]
    latencies_ms = [s.latency_s * 1000.0 for s in ok]
    if duration_s is None and samples:
        duration_s = max(s.started_s + s.latency_s for s in samples) - min(s.started_s for s in samples)
    return {
        "requests": len(samples),
        "failed_requests": len(samples) - len(ok),
        "duration_s": round(duration_s or 0.0, 3),
        "throughput_rps": round(len(ok) / duration_s, 2) if duration_s else 0.0,
        "p50_ms": round(percentile(latencies_ms, 50), 2),
        "p90_ms": round(percentile(latencies_ms, 90), 2),
        "p99_ms": round(percentile(latencies_ms, 99), 2),
        "mean_ms": round(sum(latencies_ms) / len(latencies_ms), 2) if latencies_ms else float("nan"),
    }


@dataclass
class LoadLoop:
    """``concurrency`` threads POSTing ``bodies`` (round robin) to ``url`` until stopped.

    ``max_requests`` bounds the total; ``check(response_json, body_index)`` turns a 200
    answer into what ``Sample.answer`` keeps (and may raise to count it as failed).
    """

    url: str
    bodies: Sequence[Any]
    concurrency: int = 4
    max_requests: int | None = None
    timeout_s: float = 30.0
    check: Callable[[Any, int], Any] | None = None
    samples: list[Sample] = field(default_factory=list, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False, repr=False)
    _next: int = field(default=0, init=False, repr=False)

    def start(self) -> LoadLoop:
        """Start the worker threads; returns self."""
        for i in range(self.concurrency):
            t = threading.Thread(target=self._work, name=f"loadgen-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, join_timeout_s: float = 60.0) -> list[Sample]:
        """Stop sending, wait for requests in flight; returns every sample, in start order."""
        self._stop.set()
        for t in self._threads:
            t.join(join_timeout_s)
        return self.snapshot()

    def wait(self, timeout_s: float) -> bool:
        """Wait for ``max_requests`` to be sent and answered; False at the timeout."""
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def snapshot(self) -> list[Sample]:
        """The samples so far, in start order."""
        with self._lock:
            return sorted(self.samples, key=lambda s: s.started_s)

    def count(self) -> int:
        with self._lock:
            return len(self.samples)

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.max_requests is not None and self._next >= self.max_requests):
                return None
            index = self._next
            self._next += 1
            return index

    def _work(self) -> None:
        # One connection per thread, kept alive: what a steady client does.
        with httpx.Client(timeout=self.timeout_s) as client:
            while (index := self._take()) is not None:
                body_index = index % len(self.bodies)
                started = time.monotonic()
                status, error, answer = 0, None, None
                try:
                    resp = client.post(self.url, json=self.bodies[body_index])
                    status = resp.status_code
                    if status == 200:
                        answer = self.check(resp.json(), body_index) if self.check else None
                    else:
                        error = resp.text[:300]
                except Exception as exc:  # every failure is a counted sample, never a lost one
                    error = f"{type(exc).__name__}: {exc}"[:300]
                sample = Sample(started, time.monotonic() - started, status, error, answer)
                with self._lock:
                    self.samples.append(sample)
