"""The runner's pure parts: options, candidates, judging answers, argument checks (no Ray started)."""

from __future__ import annotations

from typing import Any

import pytest

from dgpt import contract
from dgpt.exceptions import VerificationError
from dgpt.fleet import FleetDonor, FleetView
from dgpt.resources import Resources
from dgpt.verify import runner
from dgpt.verify.policy import Candidate, Outcome, count_votes
from dgpt.verify.runner import (
    Decision,
    _Answer,
    _function_and_options,
    _judge,
    candidates,
    run,
    verified,
)


def square(x: int) -> int:
    return x * x


def test_a_ray_remote_function_gives_its_body_and_resource_options() -> None:
    import ray

    remote = ray.remote(num_cpus=2, num_gpus=0, max_retries=5)(square)
    fn, opts = _function_and_options(remote, {})
    assert fn(3) == 9 and opts == {"num_cpus": 2, "num_gpus": 0}
    fn, opts = _function_and_options(square, {"num_cpus": 0.5, "memory": 1 << 20})
    assert fn is square and opts == {"num_cpus": 0.5, "memory": 1 << 20}
    assert _function_and_options(square, {})[1] == {"num_cpus": 1}


@pytest.mark.parametrize(("options", "match"), [
    ({"scheduling_strategy": "SPREAD"}, "scheduling_strategy"),
    ({"num_cpus": -1}, "num_cpus=-1"),
    ({"num_gpus": "one"}, "num_gpus='one'"),
])
def test_bad_task_options_are_named(options: dict[str, Any], match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        _function_and_options(square, options)


def test_only_a_function_can_be_verified() -> None:
    with pytest.raises(VerificationError, match="fn must be a function"):
        _function_and_options(42, {})


def _donor(donor_id: str, owner: str, cpus: float = 2.0, *, node: str | None = "auto", draining: bool = False,
           role: str = contract.ROLE_DONOR) -> FleetDonor:
    return FleetDonor(donor_id=donor_id, owner=owner, caps=Resources(cpus, 0.0, 4e9), available=Resources(0.0, 0.0, 0.0),
                      node_id=f"n-{donor_id}" if node == "auto" else node, draining=draining,
                      labels={contract.LABEL_ROLE: role})


def test_candidates_are_running_donors_whose_caps_hold_the_task() -> None:
    view = FleetView(now_s=0.0, active=(
        _donor("busy", "alice"),  # nothing free now: the replica waits its turn there
        _donor("small", "bob", cpus=0.5),
        _donor("leaving", "carol", draining=True),
        _donor("joining", "dave", node=None),
        _donor("head", "", role=contract.ROLE_HEAD),
        _donor("ok", "erin"),
    ))
    got = candidates(view, Resources(1.0, 0.0, 0.0), {"ok": 0.9})
    assert got == [Candidate("busy", "alice", "n-busy", None), Candidate("ok", "erin", "n-ok", 0.9)]


def _answers(*values: object, errors: int = 0) -> list[_Answer]:
    out = [_Answer(Candidate(f"d{i}", f"o{i}", f"n{i}"), value=v) for i, v in enumerate(values)]
    out += [_Answer(Candidate(f"e{i}", f"p{i}", f"m{i}"), error="WorkerCrashedError: gone") for i in range(errors)]
    return out


def test_judging_against_the_trusted_result() -> None:
    answers = _answers(5, 6, errors=1)
    values = [5, 6]
    judged = _judge(answers, values, count_votes(values, 2), Decision.RERUN, 5, None)
    assert [o for o, _ in judged] == [Outcome.VALID, Outcome.INVALID, Outcome.ERROR]
    assert judged[1][1] == "the trusted node's result differs" and judged[2][1] == "WorkerCrashedError: gone"


def test_judging_by_a_majority_when_no_trusted_node_answered() -> None:
    answers = _answers(5, 5, 6)
    values = [5, 5, 6]
    judged = _judge(answers, values, count_votes(values, 2), Decision.MAJORITY, None, None)
    assert [o for o, _ in judged] == [Outcome.VALID, Outcome.VALID, Outcome.INVALID]
    assert judged[2][1] == "2 of 3 donors agreed on another result"
    assert _judge(_answers(1, 1), [1, 1], count_votes([1, 1], 2), Decision.AGREED, None, None) == \
        [(Outcome.VALID, "all 2 donors agreed")] * 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 1}, "k=1"), ({"k": 17}, "k=17"), ({"k": True}, "k=True"),
    ({"k": 3, "quorum": 1}, "quorum=1"), ({"k": 3, "quorum": 4}, "quorum=4"),
    ({"timeout_s": 0}, "timeout_s=0"),
])
def test_run_refuses_bad_arguments_before_touching_ray(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        run(square, 3, **kwargs)


def test_the_decorator_checks_its_settings_and_passes_calls_through(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(VerificationError, match="bogus"):
        verified(k=2, bogus=1)
    calls: list[tuple[Any, ...]] = []

    def fake_run(fn: Any, *args: Any, **kwargs: Any) -> str:
        calls.append((fn, args, kwargs))
        return "verified"

    monkeypatch.setattr(runner, "run", fake_run)
    f = verified(k=3, num_cpus=0.5)(square)
    assert f(4, extra=1) == "verified"  # type: ignore[call-arg,comparison-overlap]
    assert calls == [(square, (4,), {"fn_kwargs": {"extra": 1}, "k": 3, "num_cpus": 0.5})]
    assert f.__name__ == "square"
