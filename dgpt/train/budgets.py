"""Failure budgets sized for donors: how many interruptions a training run may recover from.

Ray Train keeps two budgets (``FailureConfig``): ``max_preemption_failures`` for workers
whose node was drained with reason PREEMPTION (a donor's owner came back, `dgpt donor
pause`/`leave`), and ``max_failures`` for everything else (a donor that vanished, a crash).
On donors both kinds are expected, not exceptional, so dgpt sizes them from the donors'
reliability instead of Ray's defaults (0 failures: the first vanished donor ends the run).

Model. While a worker runs on a donor, that donor leaves at its Weibull hazard; a leaving
donor is replaced by one like it. Departures over the horizon are then a Poisson process
whose mean is the summed cumulative hazard of the workers' donors::

    lam = sum_i -log P(donor i stays horizon | its uptime)

A share ``lost_fraction`` of departures are vanishes (no drain), estimated from the
fleet's recorded sessions (``ended_as='lost'`` among all ended sessions) with a Beta prior.
Each budget is the 99th percentile of its Poisson count: a run exhausts a budget for
churn alone in at most 1% of runs under the model. ``max_failures`` also keeps a small
allowance for real errors (a bug repeats on every attempt, so it must not retry forever).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Percentile of the departure count each budget covers (see the module docstring).
BUDGET_QUANTILE = 0.99
#: Retries left for errors that are not churn: one transient error (a flaky filesystem)
#: twice, and a genuine bug fails the run on its third attempt instead of looping.
ERROR_ALLOWANCE = 2
#: Beta prior of the vanish share, as pseudo-sessions: 1 lost out of 4 ended. Donors
#: mostly leave through their agent (drained); crashes, lost networks and kills are rarer.
PRIOR_LOST = 1.0
PRIOR_ENDED = 4.0
# P(stay) is floored so one hopeless donor does not make the budget infinite.
_MIN_P_STAY = 1e-6


@dataclass(frozen=True)
class FailureBudgets:
    """Ray Train's two retry budgets and the expectations they were sized from."""

    max_failures: int
    max_preemption_failures: int
    expected_drains: float
    expected_vanishes: float
    lost_fraction: float

    def describe(self) -> str:
        return (f"expected over the horizon: {self.expected_drains:.2f} drains, {self.expected_vanishes:.2f} vanished "
                f"donors (vanish share {self.lost_fraction:.0%}); budgets: max_preemption_failures="
                f"{self.max_preemption_failures}, max_failures={self.max_failures}")


def poisson_quantile(mean: float, q: float = BUDGET_QUANTILE) -> int:
    """The smallest k with P(N <= k) >= q for N ~ Poisson(mean).

    Raises:
        ValueError: ``mean`` is negative or not finite, or ``q`` is not in (0, 1).
    """
    if not (math.isfinite(mean) and mean >= 0):
        raise ValueError(f"Poisson mean must be a finite number >= 0, got {mean!r}")
    if not 0 < q < 1:
        raise ValueError(f"quantile must be in (0, 1), got {q!r}")
    if mean == 0:
        return 0
    if mean > 500:  # normal approximation; exact terms underflow
        return math.ceil(mean + 2.5758 * math.sqrt(mean))
    term = math.exp(-mean)
    total, k = term, 0
    while total < q:
        k += 1
        term *= mean / k
        total += term
    return k


def lost_fraction(lost: int, ended: int) -> float:
    """Share of departures that were vanishes: ``lost`` of ``ended`` sessions, with the prior.

    Raises:
        ValueError: negative counts, or more lost than ended.
    """
    if not 0 <= lost <= ended:
        raise ValueError(f"need 0 <= lost <= ended, got lost={lost}, ended={ended}")
    return (lost + PRIOR_LOST) / (ended + PRIOR_ENDED)


def failure_budgets(p_stay: Sequence[float], vanish_share: float) -> FailureBudgets:
    """Budgets for a run whose workers sit on donors with these P(stay the horizon).

    Args:
        p_stay: for each worker's donor, P(it stays the job's horizon | its uptime).
        vanish_share: share of departures without a drain (:func:`lost_fraction`).

    Raises:
        ValueError: a probability outside [0, 1] or a share outside [0, 1].
    """
    for p in p_stay:
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"P(stay) must be in [0, 1], got {p!r}")
    if not 0.0 <= vanish_share <= 1.0:
        raise ValueError(f"vanish share must be in [0, 1], got {vanish_share!r}")
    lam = sum(-math.log(max(p, _MIN_P_STAY)) for p in p_stay)
    drains, vanishes = lam * (1.0 - vanish_share), lam * vanish_share
    return FailureBudgets(
        # At least one of each: a single surprise must never end a run on donors.
        max_failures=max(1, poisson_quantile(vanishes)) + ERROR_ALLOWANCE,
        max_preemption_failures=max(1, poisson_quantile(drains)),
        expected_drains=drains,
        expected_vanishes=vanishes,
        lost_fraction=vanish_share,
    )
