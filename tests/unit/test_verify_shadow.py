"""Serve's shadow comparison without Serve: fake replicas answer copies, a fake trust store records."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

pytest.importorskip("ray.serve")

import dgpt.serve.shadow as shadow_mod  # noqa: E402
from dgpt.serve.ranking import SHADOW_KWARG, ShadowHint  # noqa: E402
from dgpt.serve.shadow import ShadowComparer, ShadowReply, Where, shadowed  # noqa: E402
from dgpt.verify.fault import FAULT_INJECT_ENV  # noqa: E402
from dgpt.verify.policy import Outcome, Tolerance, judge_among  # noqa: E402
from dgpt.verify.trust import DonorOutcome  # noqa: E402

A = Where("node-a", "d-a", "alice")
B = Where("node-b", "d-b", "bob")
C = Where("node-c", "d-c", "carol")
A2 = Where("node-a2", "d-a2", "alice")


class Fleet:
    """Replicas that answer copies: each one's answer, and the hints it was asked with."""

    def __init__(self, answers: dict[Where, Any], order: list[Where]) -> None:
        self.answers = answers
        self.order = order
        self.hints: list[ShadowHint] = []
        self.recorded: list[DonorOutcome] = []

    async def ask(self, args: tuple[Any, ...], kwargs: dict[str, Any], hint: ShadowHint) -> ShadowReply:
        self.hints.append(hint)
        # The router's rule: the first replica the hint allows, else any (here: the first).
        allowed = [w for w in self.order if w.node_id not in hint.avoid_nodes and w.owner not in hint.avoid_owners]
        where = (allowed or self.order)[0]
        return ShadowReply(self.answers[where], where)

    async def record(self, outcomes: list[DonorOutcome]) -> None:
        self.recorded += outcomes


def compare(fleet: Fleet, primary: Where, value: Any, tolerance: Tolerance | None = None) -> list[DonorOutcome]:
    comparer = ShadowComparer(fleet.ask, fleet.record, tolerance, name="serve:app/Model.predict")
    return asyncio.run(comparer.compare(ShadowReply(value, primary), (1,), {}))


def by_donor(outcomes: list[DonorOutcome]) -> dict[str, Outcome]:
    return {o.donor_id: o.outcome for o in outcomes}


def test_judging_without_a_trusted_node() -> None:
    assert judge_among([1, 1]) == [Outcome.VALID, Outcome.VALID]
    assert judge_among([1, 2]) == [Outcome.INCONCLUSIVE, Outcome.INCONCLUSIVE]
    assert judge_among([1, 2, 1]) == [Outcome.VALID, Outcome.INVALID, Outcome.VALID]
    assert judge_among([1, 2, 3]) == [Outcome.INCONCLUSIVE] * 3
    with pytest.raises(ValueError, match="at least two"):
        judge_among([1])


def test_agreeing_owners_are_both_valid() -> None:
    fleet = Fleet({B: [0.5, 0.5]}, [B])
    outcomes = compare(fleet, A, [0.5, 0.5])
    assert by_donor(outcomes) == {"d-a": Outcome.VALID, "d-b": Outcome.VALID}
    assert fleet.recorded == outcomes
    assert fleet.hints == [ShadowHint(frozenset({"alice"}), frozenset({"node-a"}))]
    assert len({o.task_id for o in outcomes}) == 1 and outcomes[0].task_id.startswith("serve:app/Model.predict:")


def test_a_disagreement_is_settled_by_a_third_owner() -> None:
    fleet = Fleet({B: "seven", C: "seven"}, [B, C])
    outcomes = compare(fleet, A, "one")  # the replica that answered the client was wrong
    assert by_donor(outcomes) == {"d-a": Outcome.INVALID, "d-b": Outcome.VALID, "d-c": Outcome.VALID}
    assert fleet.hints[1] == ShadowHint(frozenset({"alice", "bob"}), frozenset({"node-a", "node-b"}))


def test_a_disagreement_nothing_settles_is_inconclusive_for_both() -> None:
    fleet = Fleet({B: "seven", A2: "one"}, [B, A2])  # the only third replica is alice's again
    outcomes = compare(fleet, A, "one")
    assert by_donor(outcomes) == {"d-a": Outcome.INCONCLUSIVE, "d-b": Outcome.INCONCLUSIVE}


def test_no_other_owner_means_nothing_is_compared_or_recorded() -> None:
    fleet = Fleet({A2: "seven"}, [A2])
    assert compare(fleet, A, "one") == []
    assert fleet.recorded == []
    same_node = Fleet({A: "one"}, [A])
    assert compare(same_node, A, "one") == []


def test_outputs_are_compared_within_the_tolerance() -> None:
    fleet = Fleet({B: 0.1 + 0.2}, [B])
    assert by_donor(compare(fleet, A, 0.3, Tolerance())) == {"d-a": Outcome.VALID, "d-b": Outcome.VALID}
    strict = Fleet({B: 0.1 + 0.2, C: 0.1 + 0.2}, [B, C])
    assert by_donor(compare(strict, A, 0.3))["d-a"] is Outcome.INVALID


# ----- the decorator ---------------------------------------------------------------------


class Model:
    def __init__(self) -> None:
        self.calls = 0

    @shadowed(fraction=1.0, rng=random.Random(0))
    async def predict(self, x: int) -> int:
        self.calls += 1
        return x * 2

    @shadowed(fraction=0.0)
    def never(self, x: int) -> int:
        return x


def test_the_wrapper_answers_copies_with_where_it_ran_and_samples_originals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shadow_mod, "where_am_i", lambda: B)
    asked: list[tuple[tuple[Any, ...], dict[str, Any], ShadowHint]] = []
    recorded: list[DonorOutcome] = []

    async def ask(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any], hint: ShadowHint) -> ShadowReply:
        asked.append((args, kwargs, hint))
        return ShadowReply(args[0] * 2, C)

    async def record(self: Any, outcomes: list[DonorOutcome]) -> None:
        recorded.extend(outcomes)

    monkeypatch.setattr(shadow_mod._Peers, "ask", ask)
    monkeypatch.setattr(shadow_mod._Peers, "record", record)
    model = Model()

    async def body() -> None:
        copy = await model.predict(3, **{SHADOW_KWARG: ShadowHint(frozenset({"alice"})).as_kwarg()})
        assert copy == ShadowReply(6, B)  # a copy: answered with its node, never copied again
        assert asked == []
        assert await model.predict(4) == 8  # the client's answer does not wait for the comparison
        for _ in range(50):
            if recorded:
                break
            await asyncio.sleep(0.01)

    asyncio.run(body())
    assert asked == [((4,), {}, ShadowHint(frozenset({"bob"}), frozenset({"node-b"})))]
    assert by_donor(recorded) == {"d-b": Outcome.VALID, "d-c": Outcome.VALID}
    assert model.never(5) == 5


def test_the_drill_switch_perturbs_what_a_shadowed_method_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shadow_mod, "where_am_i", lambda: B)
    monkeypatch.setenv(FAULT_INJECT_ENV, "wrong-results")
    assert Model().never(5) == 6
    assert asyncio.run(Model().predict(1, **{SHADOW_KWARG: {}})) == ShadowReply(3, B)


def test_decorator_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="fraction"):
        shadowed(fraction=1.5)
    with pytest.raises(ValueError, match="timeout_s"):
        shadowed(timeout_s=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        shadowed(max_in_flight=0)


def test_a_shadowed_class_pickles_by_value_after_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve ships a driver's deployment class by value: no lock or task may ride along."""
    import cloudpickle

    monkeypatch.setattr(shadow_mod, "where_am_i", lambda: B)

    class Local:
        @shadowed(fraction=1.0, rng=random.Random(0))
        def double(self, x: int) -> int:
            return 2 * x

    monkeypatch.setattr(shadow_mod._Sampler, "start_thread", lambda self, *a: None)
    assert Local().double(2) == 4  # made the sampler's per-process state
    again = cloudpickle.loads(cloudpickle.dumps(Local))
    assert again().double(3) == 6
