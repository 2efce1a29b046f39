"""Recent average credit (RAC): credits per day, exponentially weighted, one-week half-life.

    RAC(t) = sum_i c_i * k * exp(-k (t - t_i)) * 86400,   k = ln 2 / half_life_s

where entry ``i`` granted ``c_i`` credits at ``t_i``. A donor earning a steady ``r`` credits per
day has a RAC that tends to ``r``; one that stops sees it halve every week. It is BOINC's
``update_average`` in closed form: the state is one value and the time it holds at, so adding
an entry and reading at any later time are O(1), and the order of additions does not matter
(an entry older than the state, such as a void of an old interval, is decayed to the state's
time before it is added).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dgpt.credit.unit import SECONDS_PER_DAY

#: BOINC's half-life of recent average credit: one week.
HALF_LIFE_S = 7 * SECONDS_PER_DAY


@dataclass(frozen=True)
class Rac:
    """Recent average credit ``value`` (credits per day) as of time ``at``."""

    value: float = 0.0
    at: float = 0.0


def _k(half_life_s: float) -> float:
    return math.log(2.0) / half_life_s


def read(rac: Rac, now: float, half_life_s: float = HALF_LIFE_S) -> float:
    """The RAC at ``now`` (never earlier than the state's time: a later read decays it)."""
    if now <= rac.at:
        return rac.value
    return rac.value * math.exp(-_k(half_life_s) * (now - rac.at))


def add(rac: Rac, credit: float, at: float, half_life_s: float = HALF_LIFE_S) -> Rac:
    """The state after ``credit`` granted at ``at`` (negative for a void of an entry granted then)."""
    k = _k(half_life_s)
    impulse = credit * k * SECONDS_PER_DAY
    if at >= rac.at:
        return Rac(read(rac, at, half_life_s) + impulse, at)
    return Rac(rac.value + impulse * math.exp(-k * (rac.at - at)), rac.at)
