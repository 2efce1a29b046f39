"""Verified results on untrusted donors: BOINC-style redundancy, adaptive replication, trust.

    import dgpt.verify

    out = dgpt.verify.run(simulate, seed, k=2)      # on 2 donors of different owners
    out.value, out.outcome.decision, out.outcome.wrong_donors

- ``dgpt.verify.policy``: comparing results, quorums, adaptive replication, trust (pure);
- ``dgpt.verify.trust``: :class:`TrustBook`, per-donor records in a SQLite file;
- ``dgpt.verify.runner``: :func:`run` and :func:`verified`, the Ray side;
- ``dgpt.verify.control``: the head's control-plane calls verification makes;
- ``dgpt.verify.fault``: the ``DGPT_FAULT_INJECT=wrong-results`` drill switch.

Importing this package imports neither Ray nor torch (the runner imports Ray when it runs).
"""

from dgpt.verify.policy import Outcome, ReplicationParams, Tolerance, TrustParams
from dgpt.verify.runner import Decision, VerificationOutcome, Verified, run, verified
from dgpt.verify.trust import DonorOutcome, TrustBook, TrustRecord

__all__ = [
    "Decision",
    "DonorOutcome",
    "Outcome",
    "ReplicationParams",
    "Tolerance",
    "TrustBook",
    "TrustParams",
    "TrustRecord",
    "VerificationOutcome",
    "Verified",
    "run",
    "verified",
]
