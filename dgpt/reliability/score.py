"""The one donor score: how much a donor is worth for work of a given horizon.

    score = reliability_weight * log P(stay horizon | up u) + speed_weight * log(gflops / REFERENCE_GFLOPS)

Both terms are logs, so a score is additive over a gang's members and scale-free in
speed: with the default weights a donor twice as fast is worth as much as one whose
P(stay) is ~30% lower (``exp(-0.5 * ln 2) ~ 0.7``). Placement adds its own terms (free
capacity, load) to this score; the autoscaler ranks standby donors and scale-down
candidates by it; nothing else scores donors.
"""

from __future__ import annotations

import numpy as np

from dgpt.reliability.model import FloatArray, log_stay_probability

#: Mean CPU GFLOPS of the BOINC fleet (Anderson 2020): speeds are scored relative to it.
REFERENCE_GFLOPS = 16.5
#: Weight of log(speed) against log P(stay) (see the module docstring).
DEFAULT_SPEED_WEIGHT = 0.5


def donor_score(
    shape: FloatArray | float,
    scale_s: FloatArray | float,
    up_s: FloatArray | float,
    horizon_s: FloatArray | float,
    gflops: FloatArray | float,
    *,
    reliability_weight: float = 1.0,
    speed_weight: float = DEFAULT_SPEED_WEIGHT,
) -> FloatArray:
    """Vectorised donor score (see the module docstring); arguments broadcast."""
    score = reliability_weight * log_stay_probability(shape, scale_s, up_s, horizon_s)
    if speed_weight:
        score = score + speed_weight * np.log(np.maximum(gflops, 1e-3) / REFERENCE_GFLOPS)
    return np.asarray(score, dtype=np.float64)
