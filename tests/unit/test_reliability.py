"""Reliability model: priors, censored Weibull fits converging to the truth, survival maths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dgpt.reliability import (
    DEVICE_CLASS_PRIORS,
    Session,
    WeibullParams,
    fit,
    fit_many,
    pad_histories,
    prior_for,
    stay_probability,
)
from dgpt.reliability.model import PRIOR_SOURCES

HOUR = 3600.0


def _history(true: WeibullParams, n: int, seed: int) -> list[tuple[float, bool]]:
    """n sessions from ``true``, with independent censoring of ~20% (still-running sessions)."""
    rng = np.random.default_rng(seed)
    durations = true.scale_s * rng.weibull(true.shape, n)
    censor_at = rng.exponential(true.scale_s * 8, n)
    return [(min(d, c), bool(d <= c)) for d, c in zip(durations, censor_at, strict=True)]


def _churn_profiles() -> dict | None:
    for folder in Path(__file__).resolve().parents:
        path = folder / "shared" / "data" / "churn-profiles.json"
        if path.is_file():
            return json.loads(path.read_text())
    shipped = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "churn-profiles.json"
    return json.loads(shipped.read_text()) if shipped.is_file() else None


def test_priors_match_the_churn_profiles() -> None:
    data = _churn_profiles()
    if data is None:
        pytest.skip("churn-profiles.json not found")
    for cls, source in PRIOR_SOURCES.items():
        up = data["profiles"][source]["up"]
        assert DEVICE_CLASS_PRIORS[cls].shape == pytest.approx(up["shape"])
        assert DEVICE_CLASS_PRIORS[cls].scale_s == pytest.approx(up["scale"] * HOUR)


def test_no_history_gives_the_prior() -> None:
    r = fit([], "desktop")
    assert r.params == DEVICE_CLASS_PRIORS["desktop"]
    assert r.sessions == 0
    assert prior_for("toaster") == DEVICE_CLASS_PRIORS["unknown"]
    assert prior_for(None) == DEVICE_CLASS_PRIORS["unknown"]


def test_prior_dominates_a_single_session() -> None:
    prior = DEVICE_CLASS_PRIORS["desktop"]
    one = fit([(60.0, True)], "desktop")  # one crash after a minute
    u, t = 5 * HOUR, 4 * HOUR
    # Moves toward "unreliable" but stays far closer to the prior than a one-minute MLE.
    assert one.p_stay(u, t) < prior.p_stay(u, t)
    assert one.p_stay(u, t) > 0.5 * prior.p_stay(u, t)


@pytest.mark.parametrize(
    "true",
    [
        WeibullParams(0.55, 35.3 * HOUR),
        WeibullParams(0.85, 2.04 * HOUR),
        WeibullParams(1.5, 6 * HOUR),
    ],
)
def test_estimate_converges_to_true_conditional_survival(true: WeibullParams) -> None:
    u, t = 3 * HOUR, 4 * HOUR
    target = true.p_stay(u, t)
    errors = []
    for n in (5, 50, 2000):
        # Start from a deliberately wrong prior so convergence is the data's doing.
        r = fit(_history(true, n, seed=n), "unknown" if true.shape < 0.7 else "server")
        errors.append(abs(r.p_stay(u, t) - target))
    assert errors[-1] < 0.03
    assert errors[-1] <= errors[0] + 0.01
    big = fit(_history(true, 2000, seed=1), "laptop")
    assert big.shape == pytest.approx(true.shape, rel=0.1)
    assert big.scale_s == pytest.approx(true.scale_s, rel=0.15)


def test_fit_many_matches_fit_and_handles_padding() -> None:
    true = WeibullParams(0.6, 10 * HOUR)
    histories = [_history(true, n, seed=n) for n in (0, 1, 7, 30)]
    durations, ended, valid = pad_histories(histories)
    priors = [DEVICE_CLASS_PRIORS["laptop"]] * len(histories)
    shape, scale = fit_many(
        durations,
        ended,
        valid,
        np.array([p.shape for p in priors]),
        np.array([p.scale_s for p in priors]),
    )
    for i, h in enumerate(histories):
        one = fit(h, "laptop")
        assert shape[i] == pytest.approx(one.shape, rel=1e-9)
        assert scale[i] == pytest.approx(one.scale_s, rel=1e-9)
    assert shape[0] == pytest.approx(DEVICE_CLASS_PRIORS["laptop"].shape, rel=0.02)


def test_survival_maths() -> None:
    p = WeibullParams(0.5, HOUR)
    assert p.p_stay(0, 0) == 1.0
    assert p.p_stay(0, HOUR) == pytest.approx(math.exp(-1))
    assert p.p_stay(2 * HOUR, HOUR) == pytest.approx(p.survival(3 * HOUR) / p.survival(2 * HOUR))
    # Shape < 1: the longer a donor has been up, the likelier it stays.
    assert p.p_stay(10 * HOUR, HOUR) > p.p_stay(0.1 * HOUR, HOUR)
    v = stay_probability(np.array([0.5, 2.0]), np.array([HOUR, HOUR]), np.array([0.0, 0.0]), HOUR)
    assert v == pytest.approx([math.exp(-1), math.exp(-1)])
    assert p.mean_s() == pytest.approx(2 * HOUR)  # Gamma(3) = 2


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        fit([(-1.0, True)])
    with pytest.raises(ValueError, match="duration_s"):
        fit([Session(float("nan"), True)])
    with pytest.raises(ValueError, match="shape"):
        WeibullParams(0.0, 1.0)
    with pytest.raises(ValueError, match="scale_s"):
        WeibullParams(1.0, -5.0)
    with pytest.raises(ValueError, match="prior_weight"):
        fit([(1.0, True)], prior_weight=0)


def test_fit_many_is_fast_for_a_big_fleet() -> None:
    rng = np.random.default_rng(0)
    n, m = 20_000, 16
    durations = rng.weibull(0.6, (n, m)) * 10 * HOUR
    valid = rng.random((n, m)) < 0.6
    import time

    t0 = time.perf_counter()
    shape, scale = fit_many(
        durations, np.ones((n, m), bool), valid, np.full(n, 0.64), np.full(n, 10.86 * HOUR)
    )
    assert time.perf_counter() - t0 < 5.0
    assert np.all(np.isfinite(shape)) and np.all(scale > 0)
