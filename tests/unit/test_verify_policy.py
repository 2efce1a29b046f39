"""The pure verification policy: digests, tolerance, quorums, trust, adaptive replication, donor choice."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dgpt.verify.policy import (
    DEFAULT_REPLICATION,
    DEFAULT_TRUST,
    Candidate,
    Outcome,
    ReplicationParams,
    Tolerance,
    TrustParams,
    TrustState,
    advance,
    check_probability,
    choose_replicas,
    count_votes,
    default_quorum,
    digest,
    judge_by_majority,
    judge_by_reference,
    same,
    should_check,
)

# ----- digests ---------------------------------------------------------------------------


def test_equal_values_digest_alike_whatever_their_order_in_memory() -> None:
    assert digest({"a": 1, "b": [1, 2.5]}) == digest({"b": [1, 2.5], "a": 1})
    assert digest({3, 1, 2}) == digest({2, 3, 1})
    assert digest(-0.0) == digest(0.0)
    assert digest(float("nan")) == digest(-float("nan"))
    assert digest(np.array([-0.0, np.nan])) == digest(np.array([0.0, -np.nan]))
    assert digest(np.arange(6.0).reshape(2, 3)) == digest(np.arange(6.0).reshape(2, 3).T.copy().T)  # layout is not value


def test_a_set_of_strings_digests_alike_in_processes_with_different_hash_seeds() -> None:
    code = "import json; from dgpt.verify.policy import digest; print(digest({'alpha', 'beta', 'gamma', 'delta'}))"
    seen = set()
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        seen.add(out.stdout.strip())
    assert len(seen) == 1  # one digest, of 64 hex digits
    assert len(next(iter(seen))) == 64


@pytest.mark.parametrize(("a", "b"), [
    (1, 1.0), (1, True), (0, None), ([1, 2], (1, 2)), ("1", 1), (b"x", "x"), ({"a": 1}, {"a": 1.0}),
    (np.zeros(3, np.float32), np.zeros(3, np.float64)), (np.zeros((2, 3)), np.zeros((3, 2))),
    (torch.zeros(3), np.zeros(3, np.float32)), (torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)),
    ([1, [2, 3]], [1, [2, 4]]), ("ab", "ba"),
])
def test_different_values_digest_apart(a: object, b: object) -> None:
    assert digest(a) != digest(b)
    assert not same(a, b)


def test_tensors_and_arrays_digest_by_value() -> None:
    t = torch.arange(12.0).reshape(3, 4)
    assert digest(t) == digest(t.clone()) == digest(t.t().contiguous().t())
    assert digest(np.int64(3)) == digest(np.array(3, dtype=np.int64))
    assert digest(np.array(["a", 1], dtype=object)) == digest(np.array(["a", 1], dtype=object))
    assert digest(np.array(["a", 1], dtype=object)) != digest(np.array(["a", 2], dtype=object))


def test_a_type_with_no_canonical_form_is_refused_by_name() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match="Opaque.*canonical="):
        digest([1, Opaque()])


def test_a_cyclic_result_is_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="deeper than"):
        digest(loop)


# ----- tolerance -------------------------------------------------------------------------


def test_tolerance_lets_close_floats_agree_and_nothing_else() -> None:
    tol = Tolerance(rtol=1e-6, atol=1e-9)
    assert same(1.0, 1.0 + 1e-9, tol) and not same(1.0, 1.0 + 1e-9)
    assert not same(1.0, 1.001, tol)
    a = np.linspace(0, 1, 100)
    assert same(a, a + 1e-12, tol) and not same(a, a + 1e-3, tol)
    assert same({"loss": 0.5, "w": [a, torch.tensor(a)]}, {"loss": 0.5 + 1e-12, "w": [a + 1e-12, torch.tensor(a) + 1e-12]}, tol)
    assert not same(a, a.astype(np.float32), tol)  # dtypes must match
    assert not same(a, a[:50], tol)  # and shapes
    assert not same(1, 2, Tolerance(rtol=1.0, atol=10.0))  # integers are never "close"
    assert not same([1.0], (1.0,), tol)
    assert same(float("nan"), float("nan"), tol)


@pytest.mark.parametrize("bad", [{"rtol": -1.0}, {"atol": math.inf}, {"rtol": float("nan")}])
def test_tolerance_is_validated_by_field(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=f"Tolerance.{next(iter(bad))}"):
        Tolerance(**bad)


# ----- quorum ----------------------------------------------------------------------------


def test_default_quorum_is_a_strict_majority() -> None:
    assert [default_quorum(k) for k in (2, 3, 4, 5)] == [2, 2, 3, 3]


def test_votes_find_the_majority_and_its_dissenters() -> None:
    votes = count_votes([7, 7, 8], quorum=2)
    assert votes.majority == (0, 1) and votes.groups == ((0, 1), (2,)) and not votes.unanimous
    assert judge_by_majority(3, votes) == [Outcome.VALID, Outcome.VALID, Outcome.INVALID]
    assert count_votes([7, 7], quorum=2).unanimous
    none = count_votes([7, 8], quorum=2)
    assert none.majority is None and len(none.groups) == 2
    with pytest.raises(ValueError, match="no group made the quorum"):
        judge_by_majority(2, none)
    # Two groups of two never make a winner, even with a (too small) quorum of two.
    assert count_votes([1, 1, 2, 2], quorum=2).majority is None
    with pytest.raises(ValueError, match="quorum"):
        count_votes([1], quorum=0)


def test_votes_group_close_floats_under_a_tolerance() -> None:
    votes = count_votes([1.0, 1.0 + 1e-12, 2.0], quorum=2, tolerance=Tolerance())
    assert votes.majority == (0, 1)
    assert count_votes([1.0, 1.0 + 1e-12, 2.0], quorum=2).majority is None


def test_judging_by_the_trusted_result() -> None:
    assert judge_by_reference([1, 2, 1], 1) == [Outcome.VALID, Outcome.INVALID, Outcome.VALID]
    assert judge_by_reference([1.0 + 1e-12], 1.0, Tolerance()) == [Outcome.VALID]


# ----- trust -----------------------------------------------------------------------------


def test_valid_results_raise_trust_slowly_and_an_invalid_one_drops_it_sharply() -> None:
    s = advance(None, Outcome.VALID)
    assert s.valid == 1 and s.consecutive_valid == 1 and s.trust == pytest.approx(0.525)
    for _ in range(17):
        s = advance(s, Outcome.VALID)
    assert 0.78 < s.trust < 0.82  # 18 valid results from 0.5: about 0.8
    bad = advance(s, Outcome.INVALID)
    assert bad.invalid == 1 and bad.consecutive_valid == 0 and bad.valid == 18
    assert bad.trust == pytest.approx(s.trust * 0.2) and bad.trust < DEFAULT_TRUST.low
    # Even a long-trusted donor falls below the threshold with one wrong result.
    veteran = TrustState(valid=500, consecutive_valid=500, trust=0.95)
    assert advance(veteran, Outcome.INVALID).trust < DEFAULT_TRUST.low


def test_climbing_back_takes_several_valid_results_in_a_row() -> None:
    s = advance(None, Outcome.INVALID)
    steps = 0
    while s.trust < DEFAULT_TRUST.low:
        s = advance(s, Outcome.VALID)
        steps += 1
    assert 2 <= steps <= 6


def test_errors_and_inconclusive_comparisons_reset_the_run() -> None:
    s = TrustState(valid=20, consecutive_valid=20, trust=0.9)
    err = advance(s, Outcome.ERROR)
    assert err.errors == 1 and err.consecutive_valid == 0 and err.trust == 0.9
    inc = advance(s, Outcome.INCONCLUSIVE)
    assert inc.inconclusive == 1 and inc.consecutive_valid == 0 and inc.trust == pytest.approx(0.81)


@pytest.mark.parametrize("bad", [{"gain": 0.0}, {"low": 1.5}, {"keep_on_invalid": -0.1}])
def test_trust_params_are_validated_by_field(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=f"TrustParams.{next(iter(bad))}"):
        TrustParams(**bad)


@given(outcomes=st.lists(st.sampled_from(list(Outcome)), max_size=200))
def test_trust_stays_within_0_and_1_and_counts_add_up(outcomes: list[Outcome]) -> None:
    s = None
    for o in outcomes:
        s = advance(s, o)
        assert 0.0 <= s.trust <= 1.0
    if s is not None:
        assert s.valid + s.invalid + s.errors + s.inconclusive == len(outcomes)
        tail = len(outcomes) - max((i + 1 for i, o in enumerate(outcomes) if o is not Outcome.VALID), default=0)
        assert s.consecutive_valid == tail


# ----- adaptive replication --------------------------------------------------------------


def test_new_donors_and_donors_with_recent_failures_are_always_checked() -> None:
    assert check_probability(None) == 1.0
    assert check_probability(TrustState(valid=9, consecutive_valid=9, trust=0.7)) == 1.0
    failed = advance(TrustState(valid=100, consecutive_valid=100, trust=0.99), Outcome.INVALID)
    assert check_probability(failed) == 1.0
    errored = advance(TrustState(valid=100, consecutive_valid=100, trust=0.99), Outcome.ERROR)
    assert check_probability(errored) == 1.0
    distrusted = TrustState(valid=100, consecutive_valid=100, trust=0.1)
    assert check_probability(distrusted) == 1.0


def test_a_long_record_is_checked_on_a_shrinking_sample_never_below_the_floor() -> None:
    at = {n: check_probability(TrustState(valid=n, consecutive_valid=n, trust=0.9)) for n in (10, 20, 100, 10_000)}
    assert at == {10: 1.0, 20: 0.5, 100: 0.1, 10_000: DEFAULT_REPLICATION.floor}


@given(n=st.integers(0, 100_000), m=st.integers(0, 100_000))
def test_check_probability_falls_with_the_run_and_keeps_its_floor(n: int, m: int) -> None:
    lo, hi = sorted((n, m))
    p_lo = check_probability(TrustState(consecutive_valid=lo, trust=0.9))
    p_hi = check_probability(TrustState(consecutive_valid=hi, trust=0.9))
    assert DEFAULT_REPLICATION.floor <= p_hi <= p_lo <= 1.0


def test_should_check_draws_at_the_stated_rate() -> None:
    rng = random.Random(7)
    state = TrustState(valid=40, consecutive_valid=40, trust=0.9)  # p = 0.25
    hits = sum(should_check(state, rng) for _ in range(20_000))
    assert 0.23 < hits / 20_000 < 0.27
    assert all(should_check(None, rng) for _ in range(100))


def test_replication_params_are_validated_by_field() -> None:
    with pytest.raises(ValueError, match="trusted_after"):
        ReplicationParams(trusted_after=0)
    with pytest.raises(ValueError, match="floor"):
        ReplicationParams(floor=0.0)


# ----- choosing donors -------------------------------------------------------------------

POOL = [Candidate("a1", "alice", "n-a1", 0.9), Candidate("a2", "alice", "n-a2", 0.9),
        Candidate("b1", "bob", "n-b1", None), Candidate("c1", "carol", "n-c1", 0.05)]


def test_replicas_go_to_distinct_owners_low_trust_last() -> None:
    for seed in range(50):
        picked = choose_replicas(POOL, 3, random.Random(seed))
        assert len({c.owner for c in picked}) == 3
        assert picked[-1].donor_id == "c1"  # carol's only donor is below the trust threshold


def test_every_trusted_owner_gets_to_be_primary() -> None:
    primaries = Counter(choose_replicas(POOL, 2, random.Random(seed))[0].owner for seed in range(200))
    assert set(primaries) == {"alice", "bob"}
    donors = Counter(c.donor_id for seed in range(200) for c in choose_replicas(POOL, 2, random.Random(seed)))
    assert donors["a1"] > 0 and donors["a2"] > 0 and "c1" not in donors


def test_included_donors_come_first_and_are_checked_for_owner_clashes() -> None:
    picked = choose_replicas(POOL, 2, random.Random(1), include=["c1"])
    assert picked[0].donor_id == "c1" and picked[1].owner in {"alice", "bob"}
    with pytest.raises(ValueError, match="zed"):
        choose_replicas(POOL, 2, random.Random(1), include=["zed"])
    with pytest.raises(ValueError, match="share owner 'alice'"):
        choose_replicas(POOL, 2, random.Random(1), include=["a1", "a2"])


def test_fewer_owners_than_k_returns_what_there_is() -> None:
    assert len(choose_replicas(POOL[:2], 2, random.Random(0))) == 1
    assert choose_replicas([], 2, random.Random(0)) == []
