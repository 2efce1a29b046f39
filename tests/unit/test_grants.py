"""Ray nodes against the grants the head made: what a donor may claim, and what flags it."""

from __future__ import annotations

import pytest

from dgpt.contract import DonorState
from dgpt.head.grants import claims_problem, grant_problem

GRANT = {"CPU": 2.0, "memory": 2.0 * 2**30, "donor": 1.0}
LABELS = {"dgpt.io/donor-id": "d-1", "dgpt.io/role": "donor", "dgpt.io/owner": "alice"}
# What a donor's raylet really reports: its grant plus what Ray adds by itself.
HONEST = {**GRANT, "object_store_memory": 5e8, "node:10.0.0.2": 1.0}


def _check(resources: dict | None = None, labels: dict | None = None, **kw: object):  # type: ignore[no-untyped-def]
    args = {"is_head": False, "donor_id": "d-1", "known": True, "state": DonorState.ACTIVE,
            "resources": HONEST if resources is None else resources, "labels": LABELS if labels is None else labels,
            "granted_resources": GRANT, "granted_labels": LABELS}
    args.update(kw)
    return grant_problem(**args)  # type: ignore[arg-type]


def test_an_honest_donor_and_the_head_pass() -> None:
    assert _check() is None
    assert _check(labels={**LABELS, "ray.io/node-id": "abc"}) is None  # Ray's own labels are not claims
    assert _check(is_head=True, labels={"dgpt.io/role": "head"}, resources={"node:__internal_head__": 1}) is None


@pytest.mark.parametrize("resources, labels, words", [
    ({**HONEST, "CPU": 16.0}, None, "claims CPU=16, granted 2"),
    ({**HONEST, "node:__internal_head__": 1.0}, None, "the head's resource"),
    ({**HONEST, "dgpt_head": 1.0}, None, "claims resource dgpt_head=1, not granted"),
    ({**HONEST, "GPU": 1.0}, None, "claims resource GPU=1, not granted"),
    (None, {**LABELS, "dgpt.io/role": "head"}, "claims label dgpt.io/role=head, granted donor"),
    (None, {**LABELS, "dgpt.io/gpu": "A100"}, "claims label dgpt.io/gpu=A100, not granted"),
])
def test_claims_beyond_the_grant_are_named(resources: dict | None, labels: dict | None, words: str) -> None:
    problem = _check(resources, labels)
    assert problem is not None and not problem.lingering and words in problem.reason


def test_a_node_without_a_session_is_flagged_and_a_lingering_one_gets_a_grace() -> None:
    no_label = _check(labels={"dgpt.io/role": "donor"}, donor_id=None)
    assert no_label is not None and "no dgpt.io/donor-id label, role donor" in no_label.reason
    unknown = _check(known=False)
    assert unknown is not None and "unknown donor id d-1" in unknown.reason and not unknown.lingering
    standby = _check(state=DonorState.STANDBY)
    assert standby is not None and standby.lingering and "granted no session (standby)" in standby.reason
    assert _check(state=DonorState.GONE) is None  # a lost donor's raylet is listed until Ray sees it dead
    assert _check(state=DonorState.ACTIVATING) is None


def test_memory_rounding_is_not_a_claim() -> None:
    assert claims_problem({"memory": GRANT["memory"] + 0.5}, {}, GRANT, {}) is None
