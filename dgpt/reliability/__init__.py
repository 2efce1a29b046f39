"""Reliability: session history -> probability a donor stays for the next T seconds."""

from dgpt.reliability.model import (
    DEVICE_CLASS_PRIORS,
    DonorReliability,
    Session,
    WeibullParams,
    fit,
    fit_many,
    fit_recorded,
    fit_recorded_many,
    history_from_records,
    log_stay_probability,
    pad_histories,
    prior_for,
    stay_probability,
)
from dgpt.reliability.score import REFERENCE_GFLOPS, donor_score

__all__ = [
    "DEVICE_CLASS_PRIORS",
    "DonorReliability",
    "REFERENCE_GFLOPS",
    "Session",
    "WeibullParams",
    "donor_score",
    "fit",
    "fit_many",
    "fit_recorded",
    "fit_recorded_many",
    "history_from_records",
    "log_stay_probability",
    "pad_histories",
    "prior_for",
    "stay_probability",
]
