"""Weibull reliability model: a donor's session history -> P(it stays for the next T seconds).

Donor uptimes are heavy-tailed Weibull with shape k < 1 (Failure Trace Archive fits in
``shared/data/churn-profiles.json``): a donor that just came online is the most likely to
leave soon, and one that has been up for hours is likely to stay. So the answer depends on
how long the donor has already been up:

    P(stay T | up u) = S(u + T) / S(u),   S(t) = exp(-(t / scale) ** shape)

Each donor's (shape, scale) is a censored maximum-likelihood fit of its own sessions, with a
per-device-class prior mixed in as ``prior_weight`` pseudo-sessions (a maximum a posteriori
fit: with no history the fit *is* the prior, and each real session moves it a little more). Fits are vectorised over donors (:func:`fit_many`) so a registry or a
simulator can refit 100k donors in about a second; placement then only evaluates the
closed-form survival above.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dgpt.contract import NOT_DEPARTURES
from dgpt.wire import positional_pickle

FloatArray = npt.NDArray[np.float64]

_HOUR_S = 3600.0

#: How many sessions the device-class prior is worth. Three is enough to keep one odd
#: session (a crash after a minute) from condemning a donor, and few enough that ten real
#: sessions mostly speak for themselves.
DEFAULT_PRIOR_WEIGHT = 3.0

# Shapes searched by the profile likelihood. FTA fits span 0.33..0.85; the grid goes well
# beyond so that a regular (k > 1) or wildly irregular donor can still be expressed.
_SHAPE_GRID: FloatArray = np.exp(np.linspace(math.log(0.1), math.log(5.0), 97))
_LOG_SHAPE_GRID: FloatArray = np.log(_SHAPE_GRID)
#: Spread of the shape prior in log k, per pseudo-session: the FTA shapes span
#: 0.33..0.85 (a factor of ~2.6), so one prior session allows about a factor of 1.6.
_SHAPE_PRIOR_SIGMA = 0.5


@positional_pickle
@dataclass(frozen=True, slots=True)
class WeibullParams:
    """A Weibull distribution of session length: ``shape`` k and ``scale_s`` in seconds."""

    shape: float
    scale_s: float

    def __post_init__(self) -> None:
        if not (self.shape > 0 and math.isfinite(self.shape)):
            raise ValueError(f"Weibull shape must be a positive number, got {self.shape!r}")
        if not (self.scale_s > 0 and math.isfinite(self.scale_s)):
            raise ValueError(f"Weibull scale_s must be a positive number, got {self.scale_s!r}")

    def survival(self, t_s: float) -> float:
        """P(a session lasts longer than ``t_s`` seconds)."""
        return math.exp(-((max(t_s, 0.0) / self.scale_s) ** self.shape))

    def p_stay(self, up_s: float, horizon_s: float) -> float:
        """P(the donor stays ``horizon_s`` more seconds | it has been up ``up_s`` seconds)."""
        u = max(up_s, 0.0) / self.scale_s
        t = (max(up_s, 0.0) + max(horizon_s, 0.0)) / self.scale_s
        return math.exp(u**self.shape - t**self.shape)

    def mean_s(self) -> float:
        """Mean session length in seconds."""
        return self.scale_s * math.gamma(1.0 + 1.0 / self.shape)


#: Per-device-class priors, copied from shared/data/churn-profiles.json ("up" fits, hours).
#: Which trace stands for which class is a judgement call, noted on each line; a test checks
#: the numbers against the JSON file so they cannot drift apart silently.
DEVICE_CLASS_PRIORS: Mapping[str, WeibullParams] = {
    # Consumer machines sleep, move and reboot: the Skype06 consumer-p2p trace.
    "laptop": WeibullParams(0.64, 10.86 * _HOUR_S),
    # Office desktops left on overnight: the Microsoft99 office-desktop trace.
    "desktop": WeibullParams(0.55, 35.3 * _HOUR_S),
    # Gaming rigs are idle in short stretches between the owner's sessions: Nd07cpu.
    "gpu-rig": WeibullParams(0.45, 4.16 * _HOUR_S),
    # Always-on servers with rare, long outages: the PlanetLab trace.
    "server": WeibullParams(0.33, 19.35 * _HOUR_S),
    # Assume the worst until a donor has history: the Overnet03 high-churn trace.
    "unknown": WeibullParams(0.85, 2.04 * _HOUR_S),
}

#: Which churn-profile entry each device-class prior was taken from.
PRIOR_SOURCES: Mapping[str, str] = {
    "laptop": "consumer-p2p",
    "desktop": "office-desktop",
    "gpu-rig": "enterprise-desktop",
    "server": "planetlab",
    "unknown": "high-churn",
}


def prior_for(device_class: str | None) -> WeibullParams:
    """The prior for a device class; unknown classes get the pessimistic ``unknown`` prior."""
    return DEVICE_CLASS_PRIORS.get(device_class or "unknown", DEVICE_CLASS_PRIORS["unknown"])


@dataclass(frozen=True, slots=True)
class Session:
    """One recorded donor session: how long it lasted and whether it has ended.

    ``ended=False`` means the session is still running (right-censored): it tells us the
    donor lasted *at least* ``duration_s``.
    """

    duration_s: float
    ended: bool


SessionLike = Session | tuple[float, bool]


@dataclass(frozen=True, slots=True)
class DonorReliability:
    """A donor's fitted uptime distribution and how much of it came from its own history."""

    params: WeibullParams
    sessions: int
    device_class: str

    @property
    def shape(self) -> float:
        return self.params.shape

    @property
    def scale_s(self) -> float:
        return self.params.scale_s

    def p_stay(self, up_s: float, horizon_s: float) -> float:
        """P(the donor stays ``horizon_s`` more seconds | up for ``up_s`` seconds)."""
        return self.params.p_stay(up_s, horizon_s)


def stay_probability(
    shape: FloatArray | float,
    scale_s: FloatArray | float,
    up_s: FloatArray | float,
    horizon_s: FloatArray | float,
) -> FloatArray:
    """Vectorised ``P(stay horizon_s | up up_s)`` for arrays of Weibull parameters.

    All arguments broadcast against each other; negative ages or horizons count as zero.
    """
    u = np.maximum(up_s, 0.0)
    t = u + np.maximum(horizon_s, 0.0)
    return np.exp((u / scale_s) ** shape - (t / scale_s) ** shape)


def log_stay_probability(
    shape: FloatArray | float,
    scale_s: FloatArray | float,
    up_s: FloatArray | float,
    horizon_s: FloatArray | float,
) -> FloatArray:
    """``log P(stay horizon_s | up up_s)``: the cumulative hazard over the horizon, negated.

    Products of many stay probabilities (a gang) are sums of these, with no underflow.
    """
    u = np.maximum(up_s, 0.0)
    t = u + np.maximum(horizon_s, 0.0)
    return (u / scale_s) ** shape - (t / scale_s) ** shape


def _as_sessions(history: Iterable[SessionLike]) -> list[Session]:
    out: list[Session] = []
    for item in history:
        session = item if isinstance(item, Session) else Session(float(item[0]), bool(item[1]))
        if not (session.duration_s >= 0 and math.isfinite(session.duration_s)):
            raise ValueError(
                f"session duration_s must be a finite number >= 0, got {session.duration_s!r}"
            )
        out.append(session)
    return out


def fit(
    history: Iterable[SessionLike],
    device_class: str | None = "unknown",
    *,
    prior: WeibullParams | None = None,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
) -> DonorReliability:
    """Fit one donor's uptime distribution from its sessions and its device-class prior.

    Args:
        history: ``(duration_s, ended)`` pairs or :class:`Session` objects; a session that
            is still running has ``ended=False``.
        device_class: picks the prior from :data:`DEVICE_CLASS_PRIORS`.
        prior: overrides the device-class prior.
        prior_weight: how many sessions the prior is worth (> 0).

    Returns:
        The fitted parameters; with no history they equal the prior.

    Raises:
        ValueError: a duration is negative or not finite, or ``prior_weight`` <= 0.
    """
    sessions = _as_sessions(history)
    base = prior or prior_for(device_class)
    cls = device_class or "unknown"
    if not sessions:
        return DonorReliability(base, 0, cls)
    durations = np.array([[s.duration_s for s in sessions]], dtype=np.float64)
    ended = np.array([[s.ended for s in sessions]], dtype=bool)
    shape, scale = fit_many(
        durations,
        ended,
        np.ones_like(ended),
        np.array([base.shape]),
        np.array([base.scale_s]),
        prior_weight=prior_weight,
    )
    return DonorReliability(WeibullParams(float(shape[0]), float(scale[0])), len(sessions), cls)


def fit_many(
    durations_s: FloatArray,
    ended: npt.NDArray[np.bool_],
    valid: npt.NDArray[np.bool_],
    prior_shape: FloatArray,
    prior_scale_s: FloatArray,
    *,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
) -> tuple[FloatArray, FloatArray]:
    """Fit many donors at once from padded session matrices.

    Args:
        durations_s: ``(donors, max_sessions)`` session lengths; padding is ignored.
        ended: same shape; False for a session still running (censored).
        valid: same shape; False for padding.
        prior_shape, prior_scale_s: ``(donors,)`` prior parameters per donor.
        prior_weight: how many sessions the prior is worth (> 0).

    Returns:
        ``(shape, scale_s)`` arrays of shape ``(donors,)``.

    Raises:
        ValueError: shapes disagree, a valid duration is negative, or ``prior_weight`` <= 0.
    """
    if not prior_weight > 0:
        raise ValueError(f"prior_weight must be > 0, got {prior_weight!r}")
    durations_s = np.asarray(durations_s, dtype=np.float64)
    if (
        durations_s.ndim != 2
        or ended.shape != durations_s.shape
        or valid.shape != durations_s.shape
    ):
        raise ValueError(
            f"durations_s, ended and valid must be 2-D and alike, got "
            f"{durations_s.shape}, {ended.shape}, {valid.shape}"
        )
    k0 = np.asarray(prior_shape, dtype=np.float64)
    lam0 = np.asarray(prior_scale_s, dtype=np.float64)
    if k0.shape != (durations_s.shape[0],) or lam0.shape != k0.shape:
        raise ValueError("prior_shape and prior_scale_s need one entry per donor (row)")
    if np.any(valid & ~(durations_s >= 0)):
        raise ValueError("session durations must be >= 0")

    # Work in units of the prior scale so t**k stays near 1 for every k on the grid.
    # A zero-length session carries almost no information; 1 ms keeps its log finite.
    t = np.where(valid, np.maximum(durations_s, 1e-3) / lam0[:, None], 1.0)
    log_t = np.log(t)
    events = (ended & valid).astype(np.float64)
    n_data = events.sum(axis=1)
    n_events = n_data + prior_weight
    sum_log_t = (events * log_t).sum(axis=1)
    log_k0 = np.log(k0)
    valid_f = valid.astype(np.float64)

    # Joint MAP of (k, theta = scale**k in prior units). The prior is worth prior_weight
    # sessions: an inverse-gamma pull of theta toward 1 (scale toward the prior's), and a
    # log-normal pull of k toward k0 with sigma _SHAPE_PRIOR_SIGMA per pseudo-session.
    # (Using pseudo-sessions drawn from the prior for k too would let the prior's heavy
    # tail drag every fitted shape down; this keeps the shape prior bounded.)
    loglik = np.empty((t.shape[0], _SHAPE_GRID.size), dtype=np.float64)
    for j, k in enumerate(_SHAPE_GRID):
        theta = ((valid_f * t**k).sum(axis=1) + prior_weight) / n_events
        loglik[:, j] = (
            n_data * math.log(k)
            - n_events * np.log(theta)
            + (k - 1.0) * sum_log_t
            - prior_weight * (math.log(k) - log_k0) ** 2 / (2 * _SHAPE_PRIOR_SIGMA**2)
        )

    best = np.clip(np.argmax(loglik, axis=1), 1, _SHAPE_GRID.size - 2)
    # One parabola through the best grid point and its neighbours (in log k) refines it.
    rows = np.arange(t.shape[0])
    y0, y1, y2 = loglik[rows, best - 1], loglik[rows, best], loglik[rows, best + 1]
    denom = y0 - 2.0 * y1 + y2
    step = _LOG_SHAPE_GRID[1] - _LOG_SHAPE_GRID[0]
    offset = np.where(denom < 0, 0.5 * (y0 - y2) / np.where(denom < 0, denom, -1.0), 0.0)
    log_k = _LOG_SHAPE_GRID[best] + np.clip(offset, -1.0, 1.0) * step
    shape = np.exp(log_k)
    theta = ((valid_f * t ** shape[:, None]).sum(axis=1) + prior_weight) / n_events
    scale = lam0 * theta ** (1.0 / shape)
    # No history: the prior itself, exactly (the grid search only approximates it).
    empty = ~valid.any(axis=1)
    shape[empty], scale[empty] = k0[empty], lam0[empty]
    return shape, scale


def pad_histories(
    histories: Sequence[Sequence[SessionLike]], max_sessions: int | None = None
) -> tuple[FloatArray, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Pack per-donor histories into the padded matrices :func:`fit_many` takes.

    Keeps the most recent ``max_sessions`` sessions of each donor (all when None).
    """
    width = max((len(h) for h in histories), default=0)
    if max_sessions is not None:
        width = min(width, max_sessions)
    width = max(width, 1)
    durations = np.zeros((len(histories), width), dtype=np.float64)
    ended = np.zeros((len(histories), width), dtype=bool)
    valid = np.zeros((len(histories), width), dtype=bool)
    for i, history in enumerate(histories):
        recent = _as_sessions(history)[-width:]
        for j, session in enumerate(recent):
            durations[i, j] = session.duration_s
            ended[i, j] = session.ended
            valid[i, j] = True
    return durations, ended, valid


def history_from_records(
    records: Iterable[tuple[float, float | None, str | None, str | None]], now_s: float
) -> list[Session]:
    """Sessions as the registry records them -> the model's history.

    Args:
        records: ``(started_at, ended_at or None, ended_as, end_reason)`` per session.
        now_s: the clock, for the open session's length so far.
    """
    history = []
    for started, ended, ended_as, reason in records:
        end = ended if ended is not None else now_s
        departed = ended is not None and (ended_as == "lost" or reason not in NOT_DEPARTURES)
        history.append(Session(max(end - started, 1.0), departed))
    return history


class RecordedSession(Protocol):
    """A session as the registry records it (``dgpt.sdk.models.SessionView``)."""

    @property
    def started_at(self) -> float: ...

    @property
    def ended_at(self) -> float | None: ...

    @property
    def ended_as(self) -> str | None: ...

    @property
    def end_reason(self) -> str | None: ...


def _history(sessions: Iterable[RecordedSession], now_s: float) -> list[Session]:
    return history_from_records(((s.started_at, s.ended_at, s.ended_as, s.end_reason) for s in sessions), now_s)


def fit_recorded(sessions: Iterable[RecordedSession], device_class: str | None, now_s: float) -> WeibullParams:
    """A donor's uptime model from its recorded sessions and its device-class prior."""
    return fit(_history(sessions, now_s), device_class).params


def fit_recorded_many(
    donors: Sequence[tuple[Sequence[RecordedSession], str | None]], now_s: float
) -> list[WeibullParams]:
    """:func:`fit_recorded` for many donors at once (one vectorised fit; a registry start)."""
    if not donors:
        return []
    histories = [_history(sessions, now_s) for sessions, _ in donors]
    priors = [prior_for(cls) for _, cls in donors]
    durations, ended, valid = pad_histories(histories)
    shape, scale = fit_many(durations, ended, valid, np.array([p.shape for p in priors]),
                            np.array([p.scale_s for p in priors]))
    return [WeibullParams(float(k), float(lam)) for k, lam in zip(shape, scale, strict=True)]
