"""Erasure codec: every profile decodes from every erasure pattern it must tolerate (MDS)."""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgpt.exceptions import NotEnoughDonors, StorageError
from dgpt.storage.codec import (
    DEFAULT_PROFILES,
    Codec,
    Profile,
    choose_profile,
    codec_for,
    join_data_fragments,
)

PROFILES = sorted({p for _, p in DEFAULT_PROFILES} | {Profile(29, 80, 35), Profile(1, 3, 1), Profile(5, 11, 7), Profile(10, 16, 12)},
                  key=lambda p: (p.k, p.n))


def decodes_from(driver_decode, fragments: list[bytes], keep: list[int], data: bytes) -> bool:
    """True if decoding from the fragments at ``keep`` gives ``data`` back (an error counts as False)."""
    try:
        return driver_decode({i: fragments[i] for i in keep}) == data
    except Exception:
        return False


@st.composite
def erasure_case(draw):
    """A profile, a stripe size, and 24 erasure patterns of up to n - k pieces (mostly exactly n - k)."""
    profile = draw(st.sampled_from(PROFILES))
    size = draw(st.integers(min_value=1, max_value=4096))
    patterns = []
    for _ in range(24):
        lost = draw(st.one_of(st.just(profile.m), st.integers(min_value=0, max_value=profile.m)))
        patterns.append(sorted(draw(st.permutations(range(profile.n)))[:lost]))
    return profile, size, patterns


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(erasure_case(), st.randoms(use_true_random=False))
def test_every_profile_decodes_from_any_n_minus_k_erasures(case, rnd):
    profile, size, patterns = case
    codec = codec_for(profile.k, profile.n)
    data = rnd.randbytes(size)
    fragments = codec.encode(data)
    assert len(fragments) == profile.n
    for erased in patterns:
        keep = [i for i in range(profile.n) if i not in erased]
        assert decodes_from(codec.decode, fragments, keep, data), (profile, size, erased)
        # Exactly k survivors, from the end: as little systematic help as possible.
        assert decodes_from(codec.decode, fragments, keep[-profile.k:], data), (profile, size, erased)


def test_the_check_catches_a_non_mds_code():
    """ISA-L's Vandermonde matrix is not MDS for m >= 5; the same check fails on it."""
    from pyeclib.ec_iface import ECDriver

    k, m = 5, 6
    data = os.urandom(k * 64)
    vand = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand")
    frags = vand.encode(data)

    def vand_decode(chosen: dict[int, bytes]) -> bytes:
        return vand.decode(list(chosen.values()))

    assert not decodes_from(vand_decode, frags, [1, 2, 5, 7, 10], data)
    failures = [keep for keep in itertools.combinations(range(k + m), k)
                if not decodes_from(vand_decode, frags, list(keep), data)]
    assert failures, "isa_l_rs_vand 5-of-11 should have undecodable patterns"
    cauchy = Codec(k, k + m)
    cfrags = cauchy.encode(data)
    assert all(decodes_from(cauchy.decode, cfrags, list(keep), data) for keep in itertools.combinations(range(k + m), k))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(PROFILES), st.integers(min_value=1, max_value=70_000), st.randoms(use_true_random=False))
def test_systematic_join_equals_decode(profile, size, rnd):
    codec = codec_for(profile.k, profile.n)
    data = rnd.randbytes(size)
    frags = codec.encode(data)
    assert join_data_fragments(frags[: profile.k]) == data
    assert len(frags[0]) == codec.fragment_bytes(size)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PROFILES), st.integers(min_value=1, max_value=20_000), st.randoms(use_true_random=False))
def test_reconstruct_rebuilds_identical_fragments(profile, size, rnd):
    codec = codec_for(profile.k, profile.n)
    frags = codec.encode(rnd.randbytes(size))
    lost = sorted(rnd.sample(range(profile.n), profile.m))
    have = {i: f for i, f in enumerate(frags) if i not in lost}
    rebuilt = codec.reconstruct(have, lost)
    assert rebuilt == {i: frags[i] for i in lost}


def test_decode_needs_k_fragments():
    codec = codec_for(4, 12)
    frags = codec.encode(b"x" * 1000)
    with pytest.raises(StorageError, match="need 4 fragments"):
        codec.decode({0: frags[0], 5: frags[5], 9: frags[9]})


def test_join_refuses_fragments_out_of_place():
    codec = codec_for(2, 3)
    frags = codec.encode(b"hello world")
    with pytest.raises(StorageError, match="carries index 1"):
        join_data_fragments([frags[1], frags[0]])


@pytest.mark.parametrize("kwargs, field", [
    ({"k": 0, "n": 3, "repair_at": 1}, "1 <= k < n"),
    ({"k": 3, "n": 3, "repair_at": 3}, "1 <= k < n"),
    ({"k": 2, "n": 6, "repair_at": 1}, "k <= repair_at < n"),
    ({"k": 2, "n": 6, "repair_at": 6}, "k <= repair_at < n"),
    ({"k": 100, "n": 300, "repair_at": 150}, "exceeds"),
])
def test_profile_rejects_bad_numbers(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Profile(**kwargs)


def test_choose_profile_by_eligible_donors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert choose_profile(10_000) == Profile(16, 48, 32)
        assert choose_profile(60) == Profile(16, 48, 32)
        assert choose_profile(59) == Profile(8, 24, 16)
        assert choose_profile(15).n == 12
        assert choose_profile(8).n == 6
        assert choose_profile(3) == Profile(2, 3, 2)
    for minimum, profile in DEFAULT_PROFILES:
        # Room to repair: every wide tier needs more donors than pieces.
        assert minimum >= profile.n
        assert profile.overhead <= 3.0
        assert profile.repair_at == min(2 * profile.k, profile.n - 1)


def test_small_profiles_warn_and_tiny_fleets_are_refused():
    with pytest.warns(UserWarning, match="not durable"):
        choose_profile(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_profile(60)  # wide codes do not warn
    with pytest.raises(NotEnoughDonors) as err:
        choose_profile(2)
    assert "at least 3" in err.value.message and "--disk-gb" in (err.value.hint or "")
