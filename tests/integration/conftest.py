"""Integration fixtures: a real local fabric (`dgpt up`) with its own DGPT_HOME and free ports.

Ray's health checks are relaxed here (not in dgpt's defaults): on a 2-core test machine a
busy raylet can miss a few checks without being dead. Donor timings are shortened so drains
and losses are seen in seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dgpt.config import Settings

# Tolerant of a loaded machine: 10 missed checks of 3 s before Ray declares a node dead.
RAY_TEST_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "3000",
    "RAY_health_check_timeout_ms": "10000",
    "RAY_health_check_failure_threshold": "10",
}

FAST_DONOR_TIMINGS = {
    "heartbeat_interval_s": 1.0,
    "heartbeat_timeout_s": 12.0,
    "drain_deadline_s": 15.0,
    "monitor_interval_s": 1.0,
    # A donor its owner took back (test_fabric's CPU hog) donates again after 10 s of calm.
    "idle_calm_s": 10.0,
}


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Poll until ``condition()`` is truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the system under test may be mid-restart
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}" +
                         (f" (last error: {last_error})" if last_error else ""))


def fabric_settings(home: Path, **extra: Any) -> Settings:
    """Settings for a test fabric: a temp home, free ports, fast donor timings."""
    from dgpt.head.fabric import private_settings

    return private_settings(home, **{**FAST_DONOR_TIMINGS, **extra})


_WATCHED_ENV = ("RAY_", "DGPT_")


@pytest.fixture(scope="module", autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each module leaves the process environment as it found it (Ray and dgpt variables).

    Code under test may set them in-process (Ray reads its auth settings from the
    environment); a leak would change what later modules, unit tests among them, connect
    to. The variables are put back, and the leak is reported as a warning naming them."""
    import ray  # noqa: F401 - importing Ray sets RAY_CLIENT_MODE=0 itself: not the module's leak

    before = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED_ENV)}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED_ENV)}
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for key in changed:
            if key in before:
                os.environ[key] = before[key]
            else:
                os.environ.pop(key, None)
        import warnings

        warnings.warn(f"this module left {', '.join(changed)} changed in the environment; put back", stacklevel=1)


@pytest.fixture(scope="module")
def ray_test_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_TEST_ENV.items():
            mp.setenv(key, value)
        for key in [k for k in os.environ if k.startswith("DGPT_")] + ["RAY_ADDRESS"]:
            mp.delenv(key, raising=False)
        yield


@pytest.fixture(scope="module")
def local_fabric(ray_test_env: None) -> Iterator[Settings]:
    """`dgpt up --donors 3` for the whole module; `dgpt down` after it, leaving no process."""
    from dgpt.head import fabric

    # Short path: Ray's Unix sockets live under a folder derived from it.
    home = Path(tempfile.mkdtemp(prefix="dgpt-it-"))
    settings = fabric_settings(home)
    try:
        fabric.up(settings, 3, timeout_s=300)
        yield settings
    finally:
        fabric.down(settings)
