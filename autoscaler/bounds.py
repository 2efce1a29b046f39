"""The autoscaler's bounds and pacing: cluster size limits, cooldowns, hysteresis, churn hedge.

A pydantic model so an operator's bad value fails loudly, naming the field;
:func:`load_bounds` turns that into dgpt's :class:`~dgpt.exceptions.ConfigError`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dgpt.exceptions import ConfigError


class AutoscalerBounds(BaseModel):
    """Limits and pacing of :func:`autoscaler.policies.default_policy`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_active: int = Field(0, ge=0, description="Donors kept active even with no demand.")
    # Ray's tested envelope is a few thousand nodes; the fleet may be far larger.
    max_active: int = Field(2000, ge=1, le=100_000, description="Most donors active at once.")
    activation_lead_time_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="Time from ActivateDonor to a raylet taking work: heartbeat + `ray start`.",
    )
    idle_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="Idle time before a donor may be drained."
    )
    scale_up_cooldown_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Pause between scale-ups; 0 is safe because in-flight activations count as capacity.",
    )
    scale_down_cooldown_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="Pause after any scale-up or drain before the next drain.",
    )
    min_lifetime_s: float = Field(
        120.0, ge=0, le=86_400, description="A donor activated less than this ago is never drained."
    )
    hedge_z: float = Field(
        1.0,
        ge=0,
        le=5,
        description="Churn hedge = expected CPU lost over the lead time + hedge_z standard deviations.",
    )
    hedge_min_cpus: float = Field(
        1.0,
        ge=0,
        le=1_000_000,
        description="A hedge below this many CPUs is ignored: a whole donor for a sliver of risk is waste.",
    )
    drain_margin: float = Field(
        0.25,
        ge=0,
        le=10,
        description="Hysteresis: drain only while spare CPU stays above hedge * (1 + drain_margin).",
    )
    reliability_horizon_s: float = Field(
        3600.0, gt=0, le=7 * 86_400, description="Horizon over which donors are ranked by P(stay)."
    )
    max_activations_per_tick: int = Field(100, ge=1, le=10_000)
    max_drains_per_tick: int = Field(10, ge=1, le=10_000)

    @model_validator(mode="after")
    def _check_sizes(self) -> AutoscalerBounds:
        if self.min_active > self.max_active:
            raise ValueError(
                f"min_active ({self.min_active}) must not exceed max_active ({self.max_active})"
            )
        return self


def load_bounds(**values: Any) -> AutoscalerBounds:
    """Validate autoscaler bounds.

    Raises:
        ConfigError: a value is invalid; the message names each offending field and value.
    """
    try:
        return AutoscalerBounds(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if field:
                problems.append(f"{field}={values.get(field, err.get('input'))!r}: {err['msg']}")
            else:  # a rule across fields; its message names them
                problems.append(str(err["msg"]).removeprefix("Value error, "))
        raise ConfigError(
            "invalid autoscaler bounds: " + "; ".join(problems),
            hint="fix the value; every field and its limits are in autoscaler/bounds.py",
        ) from None
