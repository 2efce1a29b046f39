"""Label-aware reservations of the donor-aware coordinator, and goodput from progress events."""

from __future__ import annotations

from dgpt.train.coordinator import reserve
from dgpt.train.progress import summarize

NODES = {"a": {"CPU": 2.0, "donor": 1.0}, "b": {"CPU": 2.0, "donor": 1.0}, "c": {"CPU": 4.0, "donor": 1.0},
         "head": {"CPU": 0.0}}
LABELS = {"a": {"dgpt.io/donor-id": "d-a", "dgpt.io/role": "donor"},
          "b": {"dgpt.io/donor-id": "d-b", "dgpt.io/role": "donor"},
          "c": {"dgpt.io/donor-id": "d-c", "dgpt.io/role": "donor"},
          "head": {"dgpt.io/role": "head"}}
WORKER = {"CPU": 1.0, "donor": 1.0}


def test_a_donor_resource_holds_one_worker_per_node() -> None:
    got = reserve([WORKER] * 4, [{}] * 4, "PACK", NODES, LABELS)
    assert sorted(got) == ["a", "b", "c"] and all(r["donor"] == 1.0 for r in got.values())


def test_bundles_only_count_on_nodes_their_selector_matches() -> None:
    sel = {"dgpt.io/donor-id": "in(d-a,d-c)"}
    got = reserve([WORKER] * 3, [sel] * 3, "PACK", NODES, LABELS)
    assert sorted(got) == ["a", "c"], "Ray 2.60's coordinator would also count node b"
    assert reserve([WORKER], [{"dgpt.io/donor-id": "d-zzz"}], "PACK", NODES, LABELS) == {}


def test_strategies_mirror_ray() -> None:
    cpu = {"CPU": 1.0}
    packed = reserve([cpu] * 3, [{}] * 3, "PACK", NODES, LABELS)
    assert packed == {"a": {"CPU": 2.0}, "b": {"CPU": 1.0}}
    spread = reserve([cpu] * 3, [{}] * 3, "SPREAD", NODES, LABELS)
    assert sorted(spread) == ["a", "b", "c"]
    strict = reserve([{"CPU": 2.0}] * 4, [{}] * 4, "STRICT_SPREAD", NODES, LABELS)
    assert sorted(strict) == ["a", "b", "c"]
    assert reserve([{"CPU": 2.0}] * 2, [{}] * 2, "STRICT_PACK", NODES, LABELS) == {"c": {"CPU": 4.0}}
    assert reserve([{"CPU": 3.0}] * 2, [{}] * 2, "STRICT_PACK", NODES, LABELS) == {}
    assert NODES["a"] == {"CPU": 2.0, "donor": 1.0}, "the capacity passed in is not modified"


def _ev(t: float, ev: str, attempt: str, **kw: object) -> dict:
    return {"t": t, "ev": ev, "attempt": attempt, **kw}


def test_summary_counts_lost_steps_and_recovery_per_interruption() -> None:
    events = [_ev(0, "attempt", "a1", world_size=3, resume_step=0)]
    events += [_ev(1 + s * 0.1, "step", "a1", step=s) for s in range(1, 31)]  # steps 1..30, t up to 4.0
    events += [_ev(2.0, "checkpoint", "a1", step=10, kind="periodic"), _ev(3.0, "checkpoint", "a1", step=20,
                                                                           kind="periodic")]
    # a vanish after step 30: resumes from 20, so 10 steps are redone
    events += [_ev(10, "attempt", "a2", world_size=2, resume_step=20)]
    events += [_ev(11 + i * 0.1, "step", "a2", step=s) for i, s in enumerate(range(21, 41))]
    events += [_ev(12.5, "drain", "a2", step=35, deadline_ms=1), _ev(12.6, "checkpoint", "a2", step=40, kind="jit")]
    events += [_ev(20, "attempt", "a3", world_size=2, resume_step=40), _ev(21, "step", "a3", step=41),
               _ev(22, "step", "a3", step=42), _ev(22.5, "done", "a3", step=42)]
    s = summarize(reversed(events))  # order does not matter
    assert s.attempts == 3 and s.final_step == 42
    first, second = s.interruptions
    assert (first.cause, first.last_step, first.resumed_from, first.lost_steps) == ("failure", 30, 20, 10)
    assert first.recovery_s == 11 - 4.0 and first.restart_s == 10 - 4.0
    assert (first.world_size_before, first.world_size_after) == (3, 2)
    assert (second.cause, second.lost_steps, second.jit_step) == ("drain", 0, 40)
    assert s.lost_steps == 10 and s.computed_steps == 30 + 20 + 2
    assert s.computed_steps - s.lost_steps == s.final_step
    assert s.checkpoints == {"periodic": 2, "jit": 1}
    assert s.wall_s == 22.5 and s.steps_per_s == 42 / 22.5


def test_summary_of_nothing_is_empty() -> None:
    s = summarize([])
    assert s.attempts == 0 and s.steps_per_s == 0.0 and s.interruptions == ()
