"""The one place autoscaler decisions take effect: registry targets and Ray's DrainNode.

Activation goes through the registry: the donor's target becomes ``active`` and its next
heartbeat answer carries the Ray join arguments. A drain asks Ray's DrainNode (through the
registry, which owns the one adapter to Ray's private API) with reason IDLE_TERMINATION, which
Ray refuses for a node that became busy meanwhile: then the donor simply stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from autoscaler.decisions import ActivateDonor, AutoscalerDecision, DrainDonor

log = logging.getLogger("dgpt.autoscaler")


class RegistryPort(Protocol):
    """What the actuator needs of the registry (the actor, or a fake in tests)."""

    def set_target(self, donor_id: str, target: str) -> None: ...

    def drain_idle(self, donor_id: str, reason: str, deadline_s: float) -> tuple[bool, str]: ...


@dataclass(frozen=True)
class Applied:
    """A decision and what came of it, for `GET /cluster` and `dgpt status`."""

    at: float
    action: str  # activate | drain
    donor_id: str
    reason: str
    ok: bool
    result: str


class Actuator:
    """Applies decisions, one by one; a failing one is recorded and the rest still run."""

    def __init__(self, registry: RegistryPort, drain_deadline_s: float) -> None:
        self.registry = registry
        self.drain_deadline_s = drain_deadline_s

    def apply(self, decisions: tuple[AutoscalerDecision, ...], now_s: float) -> list[Applied]:
        out = []
        for d in decisions:
            try:
                if isinstance(d, ActivateDonor):
                    self.registry.set_target(d.donor_id, "active")
                    out.append(Applied(now_s, "activate", d.donor_id, d.reason, True, "target active"))
                elif isinstance(d, DrainDonor):
                    accepted, message = self.registry.drain_idle(d.donor_id, d.reason, self.drain_deadline_s)
                    out.append(Applied(now_s, "drain", d.donor_id, d.reason, accepted, message))
            except Exception as exc:  # one bad decision must not stop the others
                log.warning("applying %s failed: %s", d, exc)
                out.append(Applied(now_s, type(d).__name__, d.donor_id, d.reason, False, str(exc)[:300]))
        return out
