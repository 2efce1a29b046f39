"""The head's control-plane actor as verification uses it: trust records, credit voids, metrics.

Drivers and Serve replicas may run on donors, far from the head's SQLite file, so they reach
the trust store through the control-plane actor (``registry`` in namespace ``dgpt``), by
the methods this module names. The calls it relies on::

    void_credit(donor_id, start_at, end_at, reason) -> dict   # CreditVoidResponse as data
    record_verification(outcome: "agreed" | "disagreed" | "rerun" | "voided") -> None
    trust_records(donor_ids: list[str]) -> dict[str, TrustRecord]       # TrustBook.records
    record_trust(outcomes: list[DonorOutcome]) -> list[TrustRecord]     # TrustBook.record

A head without the last two keeps no trust records: :meth:`ControlPlane.trust` is then None.
Ray is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from dgpt.contract import NAMESPACE, REGISTRY_ACTOR
from dgpt.verify.trust import DonorOutcome, TrustRecord

__all__ = ["RECORD_TRUST", "TRUST_RECORDS", "ControlPlane", "ControlPlaneTrust"]

log = logging.getLogger("dgpt.verify")

TRUST_RECORDS = "trust_records"
RECORD_TRUST = "record_trust"
#: How long a call to the control plane may take before verification gives up on it.
CALL_TIMEOUT_S = 30.0


class ControlPlaneTrust:
    """A :class:`dgpt.verify.trust.TrustPort` over the control-plane actor's trust methods."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def records(self, donor_ids: Iterable[str]) -> dict[str, TrustRecord]:
        import ray

        out: dict[str, TrustRecord] = ray.get(getattr(self._actor, TRUST_RECORDS).remote(list(donor_ids)),
                                              timeout=CALL_TIMEOUT_S)
        return out

    def record(self, outcomes: Iterable[DonorOutcome]) -> list[TrustRecord]:
        import ray

        out: list[TrustRecord] = ray.get(getattr(self._actor, RECORD_TRUST).remote(list(outcomes)),
                                         timeout=CALL_TIMEOUT_S)
        return out


class ControlPlane:
    """The control-plane actor handle, with the calls verification makes on it."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    @classmethod
    def find(cls) -> ControlPlane | None:
        """The running fabric's control plane; None outside a dgpt fabric."""
        import ray

        try:
            return cls(ray.get_actor(REGISTRY_ACTOR, namespace=NAMESPACE))
        except ValueError:
            return None

    def trust(self) -> ControlPlaneTrust | None:
        """Its trust store, if this head keeps one (see the module docstring)."""
        if hasattr(self._actor, TRUST_RECORDS) and hasattr(self._actor, RECORD_TRUST):
            return ControlPlaneTrust(self._actor)
        return None

    def void(self, donor_id: str, start_at: float, end_at: float, reason: str) -> float:
        """Take back the donor's credit for ``[start_at, end_at]``; returns the credit voided."""
        import ray

        answer = ray.get(self._actor.void_credit.remote(donor_id, start_at, end_at, reason), timeout=CALL_TIMEOUT_S)
        return float(answer.get("voided_credit", 0.0))

    def count(self, outcome: str) -> None:
        """Count one outcome in ``dgpt_verification_outcomes_total`` (best effort, not awaited)."""
        try:
            self._actor.record_verification.remote(outcome)
        except Exception as exc:  # metrics must never fail a verified task
            log.warning("cannot count verification outcome %r: %s", outcome, exc)
