"""The frozen world the autoscaler policy sees in one tick: the bounds, demand and the fleet.

The head builds an :class:`AutoscalerContext` from Ray's pending demand and the registry's
fleet view (``dgpt.fleet.FleetView``: active donors, donors already activating, standby
donors as columns), passes it to a pure policy, and applies the decisions it gets back.
Nothing here talks to Ray or the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoscaler.bounds import AutoscalerBounds
from dgpt.fleet import FleetView
from dgpt.resources import Demand


@dataclass(frozen=True)
class AutoscalerContext:
    """Everything one tick of the autoscaler policy decides on.

    Args:
        bounds: size limits and pacing.
        demand: what Ray cannot place now (pending tasks and actors, placement groups,
            standing ``request_resources()`` bundles).
        fleet: the fleet at this instant; its clock is the policy's clock.
    """

    bounds: AutoscalerBounds
    demand: Demand
    fleet: FleetView

    @property
    def now_s(self) -> float:
        return self.fleet.now_s
