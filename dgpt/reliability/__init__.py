"""Reliability: session history -> probability a donor stays for the next T seconds."""

from dgpt.reliability.model import (
    DEVICE_CLASS_PRIORS,
    DonorReliability,
    Session,
    WeibullParams,
    fit,
    fit_many,
    fit_recorded,
    history_from_records,
    log_stay_probability,
    pad_histories,
    prior_for,
    stay_probability,
)

__all__ = [
    "DEVICE_CLASS_PRIORS",
    "DonorReliability",
    "Session",
    "WeibullParams",
    "fit",
    "fit_many",
    "fit_recorded",
    "history_from_records",
    "log_stay_probability",
    "pad_histories",
    "prior_for",
    "stay_probability",
]
