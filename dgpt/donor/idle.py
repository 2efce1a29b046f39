"""Idle detectors: is the donor's owner back? Each detector answers with a reason or None.

Detectors are small objects with injected readers (load, clock, file system), so unit tests
drive them with fakes. The agent asks all of them every poll; any reason means "owner active".
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from dgpt.config import parse_hours


class Detector(Protocol):
    def owner_active(self) -> str | None:
        """A reason the owner is active, or None when the device is idle."""


@dataclass
class SwitchDetector:
    """The user switch: `dgpt donor pause` creates the file, `resume` removes it."""

    path: Path

    def owner_active(self) -> str | None:
        return "paused by the owner" if self.path.exists() else None


@dataclass
class HoursDetector:
    """Only work inside an allowed window of local hours, e.g. '22-7' (may wrap midnight)."""

    window: str
    now: Callable[[], dt.datetime] = dt.datetime.now

    def __post_init__(self) -> None:
        self.start, self.end = parse_hours(self.window)

    def owner_active(self) -> str | None:
        hour = self.now().hour
        inside = self.start <= hour < self.end if self.start < self.end else hour >= self.start or hour < self.end
        return None if inside else f"outside allowed hours {self.window}"


# Names of Ray's own processes: their load is the donation, not the owner.
_RAY_NAMES = ("raylet", "gcs_server", "plasma_store", "dashboard", "ray::", "ray_", "default_worker", "runtime_env")


def non_ray_load_per_core(exclude_pids: Iterable[int] = ()) -> float:
    """CPU used by processes that are not Ray's or dgpt's, in cores per core (0..1+)."""
    excluded = set(exclude_pids)
    total = 0.0
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_percent"]):
        info = proc.info
        if info["pid"] in excluded:
            continue
        name = info.get("name") or ""
        cmd = " ".join(info.get("cmdline") or [])[:200]
        if any(n in name or n in cmd for n in _RAY_NAMES) or "dgpt" in cmd:
            continue
        total += info.get("cpu_percent") or 0.0
    return total / 100.0 / (psutil.cpu_count() or 1)


@dataclass
class LoadDetector:
    """The owner is back when non-Ray load stays above ``threshold`` for ``patience`` polls.

    Once back, the owner stays back until the load has stayed at or below the threshold for
    ``calm_s`` seconds: a person at the machine pauses between bursts, and a donor that
    rejoins in every pause would drain again a moment later (and lose its work each time).
    """

    threshold: float
    read_load: Callable[[], float] = non_ray_load_per_core
    patience: int = 3  # one busy poll is noise (a compile, an update check); three are a person
    calm_s: float = 60.0
    now: Callable[[], float] = time.monotonic
    _busy: int = 0
    _active_reason: str | None = None
    _calm_since: float | None = None
    last_load: float = 0.0

    def owner_active(self) -> str | None:
        self.last_load = self.read_load()
        busy = self.last_load > self.threshold
        self._busy = self._busy + 1 if busy else 0
        if self._busy >= self.patience:
            self._active_reason = f"owner load {self.last_load:.2f}/core above {self.threshold:g}"
            self._calm_since = None
        elif self._active_reason is not None and not busy:
            t = self.now()
            if self._calm_since is None:
                self._calm_since = t
            elif t - self._calm_since >= self.calm_s:
                self._active_reason = self._calm_since = None
        return self._active_reason


def first_reason(detectors: Iterable[Detector]) -> str | None:
    for detector in detectors:
        reason = detector.owner_active()
        if reason:
            return reason
    return None
