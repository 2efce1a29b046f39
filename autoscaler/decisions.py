"""What the autoscaler policy decides: plain, frozen decisions that one actuator applies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ActivateDonor:
    """Tell standby donor ``donor_id`` to join Ray; ``reason`` is shown in `GET /cluster`."""

    donor_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DrainDonor:
    """Drain active donor ``donor_id`` out of Ray (it returns to standby); ``reason`` says why."""

    donor_id: str
    reason: str


AutoscalerDecision = ActivateDonor | DrainDonor
