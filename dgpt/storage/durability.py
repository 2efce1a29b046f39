"""Durability, availability and repair traffic of a profile: a renewal-model calculator.

One segment, ``n`` pieces on donors of distinct owners; each piece's donor leaves for good
at rate ``lambda = 1 / lifetime_s`` (independently) and is online with probability
``online``. A segment's life is a cycle:

1. **decay**: from ``n`` durable pieces down to ``repair_at``: a pure death process, mean
   ``sum_{i = repair_at + 1}^{n} 1 / (i lambda)``;
2. **detection and transfer**, a fixed ``repair_s`` (the head notices the loss after a long
   silence; rebuilding takes a while): each of the ``repair_at`` pieces is lost within it
   with probability ``q = 1 - exp(-lambda repair_s)``, so ``j = repair_at - Binomial(q)``
   remain;
3. **waiting for k online pieces**, which a repair needs. With ``i`` durable pieces, k of
   them are online at once with probability ``a_i = P(Binomial(i, online) >= k)``. Who is
   online reshuffles on the time scale ``tau = session_s (1 - online)`` (the correlation
   time of a donor alternating online sessions of ``session_s`` and offline ones), so the
   repair starts at rate ``rho_i = a_i / ((1 - a_i) tau)`` while pieces keep leaving at
   ``i lambda``. The data is lost if they reach ``k - 1`` first:
   ``P_loss(j) = prod_{i=k}^{j} i lambda / (i lambda + rho_i)``.

``P_cycle = E_j[P_loss(j)]`` (``P_loss = 1`` for ``j < k``); ``loss rate = P_cycle / cycle``,
``durability = exp(-year * loss rate)``, ``nines = -log10(1 - durability)``. Read availability
is the time-weighted mean over the cycle of ``P(Binomial(i, online) >= k)``; repair traffic
is what each cycle moves (read k pieces, write the missing ones) per user byte.

Step 3 is why a threshold close to k fails with donors that are often offline: the fewer
pieces are left, the rarer k of them are online together, and a segment that misses its
repair spirals down (29-of-80 repairing at 35 finds 29 of 35 online ~5% of the time at 70%
online). Why a fixed window in step 2 and not an exponential one: a repair is bounded, and
an exponential's tail would dominate wide codes' loss. The Monte Carlo simulation in
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
    decay = {i: 1.0 / (i * lam) for i in range(r + 1, n + 1)}  # mean time spent at i
    q = -math.expm1(-lam * churn.repair_s)
    p_loss = _loss_while_waiting(k, r, lam, churn)
    p_cycle = math.fsum(math.comb(r, x) * q**x * (1 - q) ** (r - x) * p_loss[r - x] for x in range(r + 1))
    wait_s = math.fsum(math.comb(r, x) * q**x * (1 - q) ** (r - x) * _mean_wait(r - x, k, churn)
                       for x in range(r - k + 1))
    window = churn.repair_s + wait_s
    cycle_s = sum(decay.values()) + window
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


def _start_rate(i: int, k: int, churn: Churn) -> float:
    """Rate at which a repair of a segment with ``i`` durable pieces finds k of them online."""
    a = binom_tail(i, churn.online, k)
    if a >= 1.0 or churn.online >= 1.0:
        return math.inf
    return a / ((1.0 - a) * churn.session_s * (1.0 - churn.online))


def _mean_wait(i: int, k: int, churn: Churn) -> float:
    rate = _start_rate(i, k, churn)
    return 0.0 if math.isinf(rate) else (math.inf if rate == 0 else 1.0 / rate)


def _loss_while_waiting(k: int, r: int, lam: float, churn: Churn) -> list[float]:
    """``P_loss[j]``: the data is lost before a repair starts, from ``j`` durable pieces."""
    out = [1.0] * (r + 1)
    p = 1.0
    for i in range(k, r + 1):
        rate = _start_rate(i, k, churn)
        p *= 0.0 if math.isinf(rate) else (i * lam) / (i * lam + rate)
        out[i] = p
    return out


def replication(copies: int) -> Profile:
    """``copies``-way replication as a profile (1-of-copies, repair at the first loss)."""
    return Profile(1, copies, copies - 1)
