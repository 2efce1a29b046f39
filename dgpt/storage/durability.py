"""Durability, availability and repair traffic of a profile: a renewal-model calculator.

One segment, ``n`` pieces on donors of distinct owners; each piece's donor leaves for good
at rate ``lambda = 1 / lifetime_s`` (independently) and is online with probability
``online``. A segment's life is a cycle:

1. **decay**: from ``n`` durable pieces down to ``repair_at``: a pure death process, mean
   ``sum_{i = repair_at + 1}^{n} 1 / (i lambda)``;
2. **repair window** of ``repair_s`` (noticing the loss, a long silence, plus rebuilding),
   plus the wait until ``k`` of the ``repair_at`` pieces are online at once, which a repair
   needs: ``a = P(Binomial(repair_at, online) >= k)``, each online session (``session_s``)
   a fresh try, so ``wait = session_s (1 - a) / a``. Each remaining piece is lost within
   the window with probability ``q = 1 - exp(-lambda window)``; the data is lost if more
   than ``repair_at - k`` of them go: ``P_cycle = P(Binomial(repair_at, q) > repair_at - k)``;
   otherwise the repair restores all ``n``. (The wait is why a repair threshold close to k
   fails with donors that are often offline: 29-of-80 repairing at 35 finds 29 of 35
   online only ~5% of the time at 70% online.)

Then ``loss rate = P_cycle / cycle length``, ``durability = exp(-year * loss rate)`` and
``nines = -log10(1 - durability)``. Read availability is the time-weighted mean over the
cycle of ``P(Binomial(i, online) >= k)``; repair traffic is what each cycle moves (read k
pieces, write the missing ones) per user byte, times cycles per year.

Why a fixed window and not an exponential repair time: a repair is bounded (a timeout plus
a transfer), and the memoryless tail of an exponential would dominate wide codes' loss
(it puts a 1% chance on a window five times too long). The Monte Carlo simulation in
``benchmarks/durability.py`` runs the live placement and repair code against donors with
sessions and detection by silence, and checks these numbers where losses are frequent
enough to count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dgpt.storage.codec import Profile

YEAR_S = 365.25 * 86_400.0
DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Churn:
    """How donors behave: how long they stay, how often they are online, how fast repair is."""

    lifetime_s: float = 30 * DAY_S
    online: float = 0.7
    repair_s: float = DAY_S
    session_s: float = 12 * 3600.0

    def __post_init__(self) -> None:
        if not self.lifetime_s > 0:
            raise ValueError(f"lifetime_s must be positive, got {self.lifetime_s}")
        if not 0 < self.online <= 1:
            raise ValueError(f"online must be in (0, 1], got {self.online}")
        if not self.repair_s > 0:
            raise ValueError(f"repair_s must be positive, got {self.repair_s}")


@dataclass(frozen=True, slots=True)
class DurabilityEstimate:
    """What the calculator says about one profile under one churn."""

    profile: Profile
    annual_loss: float
    nines: float
    availability: float
    availability_nines: float
    repairs_per_year: float
    repair_traffic_per_year: float  # stored bytes moved per user byte per year


def binom_tail(n: int, p: float, at_least: int) -> float:
    """P(Binomial(n, p) >= at_least), summed from the small side for accuracy."""
    if at_least <= 0:
        return 1.0
    if at_least > n:
        return 0.0
    return float(math.fsum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(at_least, n + 1)))


def nines(failure: float) -> float:
    """-log10 of a failure probability (``inf`` for zero)."""
    return float("inf") if failure <= 0 else -math.log10(failure)


def estimate(profile: Profile, churn: Churn) -> DurabilityEstimate:
    """Durability, availability and repair traffic of ``profile`` under ``churn``."""
    k, n, r = profile.k, profile.n, profile.repair_at
    lam = 1.0 / churn.lifetime_s
    ready = binom_tail(r, churn.online, k)
    window = churn.repair_s + (churn.session_s * (1 - ready) / ready if ready > 0 else math.inf)
    decay = {i: 1.0 / (i * lam) for i in range(r + 1, n + 1)}  # mean time spent at i
    if math.isinf(window):  # k pieces are never online together: repair never runs
        return DurabilityEstimate(profile, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    cycle_s = sum(decay.values()) + window
    q = -math.expm1(-lam * window)
    p_cycle = binom_tail(r, q, r - k + 1)
    loss_rate = p_cycle / cycle_s
    annual_loss = -math.expm1(-YEAR_S * loss_rate)
    # Availability: the decay states by their time, the window at its expected piece count.
    in_window = max(k, round(r * (1 - q / 2)))
    avail = (sum(t * binom_tail(i, churn.online, k) for i, t in decay.items())
             + window * binom_tail(in_window, churn.online, k)) / cycle_s
    cycles_per_year = YEAR_S / cycle_s
    written = n - r + r * q  # the pieces lost before and during the window
    return DurabilityEstimate(
        profile=profile,
        annual_loss=annual_loss,
        nines=nines(annual_loss),
        availability=avail,
        availability_nines=nines(1.0 - avail),
        repairs_per_year=cycles_per_year,
        repair_traffic_per_year=cycles_per_year * (k + written) / k,
    )


def replication(copies: int) -> Profile:
    """``copies``-way replication as a profile (1-of-copies, repair at the first loss)."""
    return Profile(1, copies, copies - 1)
