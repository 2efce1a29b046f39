"""Verified Ray tasks: run on k donors of different owners, accept the majority, rerun on dispute.

    import dgpt.verify

    out = dgpt.verify.run(simulate, seed, k=2, num_cpus=1)
    out.value                  # the accepted result
    out.outcome.wrong_donors   # donors whose result was wrong (charged, credit voided)

    @dgpt.verify.verified(k=3)
    def score(batch): ...

What one call does (the decisions are ``dgpt.verify.policy``'s):

1. **Pick donors.** From the live fleet (the registry's placement view), donors that are
   running, not draining and whose caps hold the task, one per owner, trusted owners first
   (:func:`~dgpt.verify.policy.choose_replicas`). The first pick is the primary.
2. **Decide whether to check.** The primary's trust record gives the probability that the
   task is replicated at all (adaptive replication). Unchecked, the task runs on the primary
   alone and its result is returned as is (outcome ``unchecked``, no record changes).
3. **Run.** One replica on each of the ``k`` donors, pinned with
   ``NodeAffinitySchedulingStrategy(node, soft=False)`` and never retried elsewhere.
4. **Judge.** All agree: accepted, every donor valid. A dispute (any dissent, an error, no
   quorum): the task runs again on a trusted node (the head, which the operator controls,
   or ``trusted_nodes``), whose result is accepted and decides who was valid and who was
   invalid. Without a trusted node (or if it fails) a quorum still wins, dissenters invalid.
5. **Charge.** Outcomes go to the trust store; every invalid result becomes a credit void
   of its donor's span (through ``client`` when given, else the control plane's
   ``void_credit``), listed in the outcome either way; the metrics count the decision.

The replica wrapper runs on the donor and applies the drill switch (``dgpt.verify.fault``).
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from dgpt import contract
from dgpt.exceptions import VerificationError
from dgpt.fleet import FleetView
from dgpt.resources import Resources
from dgpt.verify.control import ControlPlane
from dgpt.verify.policy import (
    DEFAULT_REPLICATION,
    DEFAULT_TRUST,
    Candidate,
    Outcome,
    ReplicationParams,
    Tolerance,
    TrustParams,
    Votes,
    check_probability,
    choose_replicas,
    count_votes,
    default_quorum,
    digest,
    judge_by_majority,
    judge_by_reference,
)
from dgpt.verify.trust import DonorOutcome, TrustPort, TrustRecord

if TYPE_CHECKING:  # pragma: no cover
    from dgpt.sdk.client import Client

__all__ = ["CreditVoid", "Decision", "ReplicaReport", "VerificationOutcome", "Verified", "VerifiedFunction",
           "candidates", "head_node_id", "run", "verified"]

log = logging.getLogger("dgpt.verify")

T = TypeVar("T")

#: Largest k: each replica costs a donor's time; BOINC projects rarely go past 3.
MAX_K = 16
#: Ray resource options a verified task may carry (the rest of Ray's options do not apply:
#: scheduling is verification's own).
RESOURCE_OPTIONS = ("num_cpus", "num_gpus", "memory")
#: The credit API's limit on a void's reason.
MAX_VOID_REASON = 200
#: Ray's resource that only the head node has (set by ``ray start --head``).
HEAD_RESOURCE = "node:__internal_head__"


class Decision(str, enum.Enum):
    """How the accepted result was decided."""

    UNCHECKED = "unchecked"  # adaptive replication let the primary's result through alone
    AGREED = "agreed"  # every replica agreed
    MAJORITY = "majority"  # a quorum agreed, and no trusted node could settle the dissent
    RERUN = "rerun"  # a dispute, settled by the trusted node's result


@dataclass(frozen=True)
class ReplicaReport:
    """One run of the task: where, what it answered, how it was judged."""

    donor_id: str  # "" for a trusted node that is not a donor (the head)
    owner: str
    node_id: str
    digest: str | None  # of the (canonical) result; None when it gave none
    outcome: Outcome | None  # None for the trusted run and unchecked tasks
    reason: str = ""
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class CreditVoid:
    """Credit to take back: a donor's span of work on a task whose result was wrong.

    ``applied`` tells whether the void was sent (``voided_credit`` is what it took back).
    The ledger voids rows already written; a row still open when the void is sent (its
    interval has not closed yet) is not covered, so a caller that keeps this list can send
    it again once the donor's interval closed (``POST /api/v1/donors/{id}/credit/void``).
    """

    donor_id: str
    node_id: str
    task_id: str
    start_at: float
    end_at: float
    reason: str
    applied: bool = False
    voided_credit: float = 0.0


@dataclass(frozen=True)
class VerificationOutcome:
    """Everything one verified call decided."""

    task_id: str
    decision: Decision
    k: int
    quorum: int
    check_probability: float
    replicas: tuple[ReplicaReport, ...]
    trusted: ReplicaReport | None = None
    voids: tuple[CreditVoid, ...] = ()
    records: tuple[TrustRecord, ...] = ()
    recorded: bool = False  # the outcomes reached a trust store

    @property
    def wrong_donors(self) -> list[str]:
        """Donors whose result was judged invalid."""
        return [r.donor_id for r in self.replicas if r.outcome is Outcome.INVALID]

    @property
    def valid_donors(self) -> list[str]:
        return [r.donor_id for r in self.replicas if r.outcome is Outcome.VALID]


@dataclass(frozen=True)
class Verified(Generic[T]):
    """The accepted result and how it was reached."""

    value: T
    outcome: VerificationOutcome


# ---------------------------------------------------------------- on the worker


def _replica(payload: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> tuple[Any, str, float, float]:
    """The task as it runs on a donor (or the trusted node): its result, node and span.

    The drill switch applies here, to the result this node returns.
    """
    import ray

    from dgpt.verify import fault

    fn, args, kwargs = payload
    started = time.time()
    value = fault.apply(fn(*args, **kwargs))
    return value, ray.get_runtime_context().get_node_id(), started, time.time()


@functools.cache
def _remote_replica() -> Any:
    import ray

    return ray.remote(_replica)


# ---------------------------------------------------------------- in the driver


@dataclass
class _Answer:
    candidate: Candidate
    value: Any = None
    error: str | None = None
    node_id: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def _function_and_options(fn: Any, options: Mapping[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The Python function behind ``fn`` and its resource options (``options`` win)."""
    from ray.remote_function import RemoteFunction

    out: dict[str, Any] = {"num_cpus": 1}
    if isinstance(fn, RemoteFunction):
        # Ray keeps a remote function's body and options in these fields and offers no public
        # accessor; verification runs the body in its own wrapper, with its own scheduling.
        inner = getattr(fn, "_function", None)
        defaults = getattr(fn, "_default_options", {}) or {}
        if not callable(inner):
            raise VerificationError("cannot find the Python function inside this Ray remote function",
                                    hint="pass the plain function to dgpt.verify.run instead of its @ray.remote form")
        out.update({k: v for k, v in defaults.items() if k in RESOURCE_OPTIONS and v is not None})
        fn = inner
    if not callable(fn):
        raise VerificationError(f"fn must be a function or a Ray remote function, got {type(fn).__name__}")
    unknown = sorted(set(options) - set(RESOURCE_OPTIONS))
    if unknown:
        raise VerificationError(f"unknown task option(s) for a verified task: {', '.join(unknown)}",
                                hint=f"use {', '.join(RESOURCE_OPTIONS)}; verification chooses the nodes itself")
    out.update({k: v for k, v in options.items() if v is not None})
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise VerificationError(f"{key}={value!r} must be a number >= 0")
    return fn, out


def _request(opts: Mapping[str, Any]) -> Resources:
    return Resources(float(opts.get("num_cpus", 0)), float(opts.get("num_gpus", 0)), float(opts.get("memory", 0)))


def candidates(snapshot: FleetView, request: Resources, scores: Mapping[str, float]) -> list[Candidate]:
    """Live donors whose caps hold ``request``: running, not draining, on a Ray node."""
    out = []
    for d in snapshot.active:
        if d.node_id and d.is_donor and not d.draining and request.fits_in(d.caps):
            out.append(Candidate(d.donor_id, d.owner, d.node_id, scores.get(d.donor_id)))
    return out


def head_node_id() -> str | None:
    """The head's node: alive, labelled ``dgpt.io/role=head`` and holding Ray's head resource.

    Raises:
        VerificationError: more than one node claims to be the head (a rogue raylet).
    """
    import ray

    heads = [str(n["NodeID"]) for n in ray.nodes()
             if n.get("Alive") and (n.get("Labels") or {}).get(contract.LABEL_ROLE) == contract.ROLE_HEAD
             and HEAD_RESOURCE in (n.get("Resources") or {})]
    if len(heads) > 1:
        raise VerificationError(f"{len(heads)} nodes claim to be the head ({', '.join(heads)}): none is trusted",
                                hint="see rogue nodes in `dgpt status`, or pass trusted_nodes= explicitly")
    return heads[0] if heads else None


def _alive_nodes() -> set[str]:
    import ray

    return {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive")}


def _launch(payload: Any, where: Sequence[Candidate], opts: Mapping[str, Any], task_id: str, retries: int) -> list[Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = _remote_replica()
    return [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(c.node_id, soft=False),
                         max_retries=retries, name=f"dgpt-verify:{task_id}", **opts).remote(payload)
            for c in where]


def _collect(refs: Sequence[Any], where: Sequence[Candidate], timeout_s: float) -> list[_Answer]:
    """Wait for every replica up to ``timeout_s``; those still running are cancelled."""
    import ray

    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    done = {ref.hex() for ref in ready}
    answers = []
    for ref, c in zip(refs, where, strict=True):
        a = _Answer(c)
        if ref.hex() not in done:
            a.error = f"no result within {timeout_s:g}s"
        else:
            try:
                a.value, a.node_id, a.started_at, a.ended_at = ray.get(ref)
            except Exception as exc:  # the task raised, its worker or node died, it was unschedulable
                last = (str(exc).strip().splitlines() or [""])[-1]
                a.error, a.exception = f"{type(exc).__name__}: {last}"[:300], exc
            else:
                if a.node_id != c.node_id:
                    a.error = f"ran on node {a.node_id}, not on the chosen {c.node_id}"
        answers.append(a)
    return answers


def _report(a: _Answer, canonical: Callable[[Any], Any], outcome: Outcome | None, reason: str) -> ReplicaReport:
    d = digest(canonical(a.value)) if a.ok else None
    return ReplicaReport(a.candidate.donor_id, a.candidate.owner, a.candidate.node_id, d, outcome, reason,
                         a.started_at, a.ended_at)


def _trusted_run(payload: Any, trusted: Candidate, opts: Mapping[str, Any], task_id: str, timeout_s: float) -> _Answer:
    return _collect(_launch(payload, [trusted], opts, task_id, retries=1), [trusted], timeout_s)[0]


def _judge(answers: Sequence[_Answer], values: Sequence[Any], votes: Votes, decision: Decision,
           trusted_value: Any, tolerance: Tolerance | None) -> list[tuple[Outcome, str]]:
    """(outcome, reason) of each answer; ``values`` are the canonical results of the ok ones, in order."""
    n = len(answers)
    ok = [i for i, a in enumerate(answers) if a.ok]
    if decision is Decision.AGREED:
        return [(Outcome.VALID, f"all {n} donors agreed")] * n
    if decision is Decision.RERUN:
        verdicts = judge_by_reference(values, trusted_value, tolerance)
        reasons = {Outcome.VALID: "agreed with the trusted node", Outcome.INVALID: "the trusted node's result differs"}
    else:
        verdicts = judge_by_majority(len(values), votes)
        size = len(votes.majority or ())
        reasons = {Outcome.VALID: f"{size} of {n} donors agreed",
                   Outcome.INVALID: f"{size} of {n} donors agreed on another result"}
    judged = {i: (o, reasons[o]) for i, o in zip(ok, verdicts, strict=True)}
    return [judged.get(i) or (Outcome.ERROR, answers[i].error or "no result") for i in range(n)]


def _void(v: CreditVoid, client: Client | None, control: ControlPlane | None) -> CreditVoid:
    try:
        if client is not None:
            voided = client.void_credit(v.donor_id, v.start_at, v.end_at, v.reason).voided_credit
        elif control is not None:
            voided = control.void(v.donor_id, v.start_at, v.end_at, v.reason)
        else:
            return v
    except Exception as exc:  # the verdict stands; the void is listed for the head to apply
        log.warning("cannot void the credit of donor %s for task %s: %s", v.donor_id, v.task_id, exc)
        return v
    return CreditVoid(v.donor_id, v.node_id, v.task_id, v.start_at, v.end_at, v.reason, True, voided)


_warned_no_trust = False


def _trust_port(trust: TrustPort | None, control: ControlPlane | None) -> TrustPort | None:
    global _warned_no_trust
    if trust is not None:
        return trust
    port = control.trust() if control is not None else None
    if port is None and not _warned_no_trust:
        _warned_no_trust = True
        log.warning("this head keeps no trust records: every donor is checked on every task and outcomes are "
                    "only returned; pass trust=dgpt.verify.TrustBook(path) to record them")
    return port


def run(
    fn: Callable[..., T] | Any,
    *args: Any,
    k: int = 2,
    quorum: int | None = None,
    tolerance: Tolerance | None = None,
    canonical: Callable[[Any], Any] | None = None,
    fn_kwargs: Mapping[str, Any] | None = None,
    include: Sequence[str] = (),
    trusted_nodes: Sequence[str] | None = None,
    trust: TrustPort | None = None,
    client: Client | None = None,
    void_credit: bool = True,
    task_id: str | None = None,
    timeout_s: float = 600.0,
    replication: ReplicationParams = DEFAULT_REPLICATION,
    trust_params: TrustParams = DEFAULT_TRUST,
    rng: random.Random | None = None,
    snapshot: FleetView | None = None,
    **options: Any,
) -> Verified[T]:
    """Run ``fn(*args, **fn_kwargs)`` as a verified Ray task (see the module docstring).

    Args:
        fn: a plain function, or a ``@ray.remote`` function (its CPU/GPU/memory options apply).
        k: donors of distinct owners that run it when it is checked (2..16).
        quorum: agreeing results that accept one without a trusted rerun's say (default a
            strict majority); with k=2, both.
        tolerance: float results agree when this close (default: exactly equal).
        canonical: maps a result to what is compared (e.g. drop a timestamp it carries).
        fn_kwargs: keyword arguments of ``fn``.
        include: donor ids that must be among the replicas (a spot check); a task with
            ``include`` is always checked.
        trusted_nodes: Ray node ids whose result settles a dispute; default the head node.
        trust: where outcomes are read and recorded; default the control plane's store.
        client: an API client to void credit through (default: the control plane over Ray).
        void_credit: take back wrong results' credit (they are listed in the outcome anyway).
        task_id: names the task in records and voids (default a random id).
        timeout_s: how long each round of replicas may take.
        replication, trust_params: adaptive replication and trust thresholds.
        rng: for choosing donors and drawing checks (tests pass a seeded one).
        snapshot: the fleet view to pick donors from (default the live one).
        **options: ``num_cpus`` (default 1), ``num_gpus``, ``memory`` of each replica.

    Returns:
        :class:`Verified`: ``value`` (the accepted result) and ``outcome``.

    Raises:
        VerificationError: bad arguments, too few owners, or a dispute nothing could settle.
        PlacementError: this Ray cluster is not a dgpt fabric.
        Exception: the task's own error, when it fails on the trusted node too.
    """
    import ray

    q = _checked(k, quorum, timeout_s)
    func, opts = _function_and_options(fn, options)
    canon = canonical or (lambda v: v)
    rng = rng or random.Random()
    task_id = task_id or f"task-{uuid.uuid4().hex[:16]}"
    if not ray.is_initialized():
        ray.init()  # as Ray itself does on the first .remote(): RAY_ADDRESS or a local cluster
    control = ControlPlane.find()
    port = _trust_port(trust, control)
    if snapshot is None:
        from dgpt.placement.live import current_snapshot

        snapshot = current_snapshot()
    pool, records = _pool(snapshot, _request(opts), port)
    try:
        chosen = choose_replicas(pool, k, rng, include=include, low_trust=trust_params.low)
    except ValueError as exc:
        raise VerificationError(str(exc), hint="list live donors with `dgpt status`") from None
    if not chosen:
        raise VerificationError(f"no live donor can hold the task ({opts})",
                                hint="wait for donors to activate (`dgpt status`), or ask for less")
    record = records.get(chosen[0].donor_id)
    p = 1.0 if include else check_probability(record.state if record else None, replication, trust_params)
    payload = ray.put((func, tuple(args), dict(fn_kwargs or {})))
    if p < 1.0 and rng.random() >= p:
        return _unchecked(payload, chosen[0], opts, task_id, timeout_s, canon, k, q, p)
    if len(chosen) < k:
        owners = sorted({c.owner for c in pool})
        raise VerificationError(f"k={k} needs donors of {k} different owners; live donors with room belong to "
                                f"{len(owners)}: {', '.join(owners) or 'none'}",
                                hint="lower k, or wait for donors of other owners to activate (`dgpt status`)")
    answers = _collect(_launch(payload, chosen, opts, task_id, retries=0), chosen, timeout_s)
    values = [canon(a.value) for a in answers if a.ok]
    votes = count_votes(values, q, tolerance)
    if votes.unanimous and len(values) == len(answers):
        decision, accepted, trusted_report, reference = Decision.AGREED, answers[0].value, None, None
    else:
        decision, accepted, trusted_report, reference = _settle(answers, votes, payload, trusted_nodes, opts,
                                                                task_id, timeout_s, canon)
    judged = _judge(answers, values, votes, decision, reference, tolerance)
    reports = tuple(_report(a, canon, o, r) for a, (o, r) in zip(answers, judged, strict=True))
    recorded, voids = _charge(reports, task_id, port, client if void_credit else None,
                              control if void_credit else None)
    if control is not None:
        _count(control, decision, voids)
    outcome = VerificationOutcome(task_id, decision, k, q, p, reports, trusted_report, voids, tuple(recorded),
                                  bool(recorded))
    if outcome.wrong_donors:
        log.warning("task %s: donor(s) %s returned wrong results (%s)", task_id, ", ".join(outcome.wrong_donors),
                    decision.value)
    return Verified(accepted, outcome)


def _checked(k: int, quorum: int | None, timeout_s: float) -> int:
    """The quorum for ``k`` (a strict majority unless given), the arguments checked."""
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_K:
        raise VerificationError(f"k={k!r} must be an integer within 2..{MAX_K}",
                                hint="k=2 checks each result once; k=3 outvotes one wrong donor")
    q = default_quorum(k) if quorum is None else quorum
    if isinstance(q, bool) or not isinstance(q, int) or not k / 2 < q <= k:
        raise VerificationError(f"quorum={quorum!r} must be an integer above k/2 and at most k={k}")
    if not timeout_s > 0:
        raise VerificationError(f"timeout_s={timeout_s!r} must be > 0")
    return q


def _pool(snapshot: FleetView, request: Resources, port: TrustPort | None
          ) -> tuple[list[Candidate], dict[str, TrustRecord]]:
    """The candidates for the task, and the trust records of the live donors."""
    records: dict[str, TrustRecord] = {}
    if port is not None:
        try:
            records = port.records(d.donor_id for d in snapshot.active)
        except Exception as exc:  # without records every donor is new: checked, never skipped
            log.warning("cannot read trust records (%s); checking this task on every donor", exc)
    return candidates(snapshot, request, {d: r.trust for d, r in records.items()}), records


def _unchecked(payload: Any, primary: Candidate, opts: Mapping[str, Any], task_id: str, timeout_s: float,
               canon: Callable[[Any], Any], k: int, q: int, p: float) -> Verified[Any]:
    """Adaptive replication let the task through: it runs once, on the primary, unjudged."""
    a = _collect(_launch(payload, [primary], opts, task_id, retries=3), [primary], timeout_s)[0]
    if not a.ok:
        if a.exception is not None:
            raise a.exception
        raise VerificationError(f"task {task_id} on donor {primary.donor_id}: {a.error}")
    report = _report(a, canon, None, "not checked (adaptive replication)")
    return Verified(a.value, VerificationOutcome(task_id, Decision.UNCHECKED, k, q, p, (report,)))


def _settle(answers: Sequence[_Answer], votes: Votes, payload: Any, trusted_nodes: Sequence[str] | None,
            opts: Mapping[str, Any], task_id: str, timeout_s: float, canon: Callable[[Any], Any]
            ) -> tuple[Decision, Any, ReplicaReport | None, Any]:
    """A dispute: (decision, accepted value, the trusted run's report, its canonical result).

    Raises:
        Exception: the task's own error, when no donor and not the trusted node could run it.
        VerificationError: no quorum, and no trusted node answered.
    """
    ok = [a for a in answers if a.ok]
    trusted = _trusted_candidate(trusted_nodes, opts)
    t: _Answer | None = None
    report: ReplicaReport | None = None
    if trusted is not None:
        t = _trusted_run(payload, trusted[0], trusted[1], task_id, timeout_s)
        report = ReplicaReport("", "", trusted[0].node_id, digest(canon(t.value)) if t.ok else None, None,
                               t.error or "trusted", t.started_at, t.ended_at)
    if t is not None and t.ok:
        return Decision.RERUN, t.value, report, canon(t.value)
    if votes.majority is not None:
        return Decision.MAJORITY, ok[votes.majority[0]].value, report, None
    if not ok and t is not None and t.exception is not None:
        raise t.exception  # it fails everywhere: the task's own error
    why = "there is no trusted node" if t is None else f"the trusted rerun failed ({t.error})"
    raise VerificationError(
        f"task {task_id}: donors {', '.join(a.candidate.donor_id for a in answers)} gave {len(votes.groups)} "
        f"different result(s) and {len(answers) - len(ok)} error(s), and {why}",
        hint="pass trusted_nodes= (node ids you control), or raise k so that a quorum can form")


def _charge(reports: Sequence[ReplicaReport], task_id: str, port: TrustPort | None, client: Client | None,
            control: ControlPlane | None) -> tuple[list[TrustRecord], tuple[CreditVoid, ...]]:
    """Record every judged donor's outcome; void the credit of the invalid ones' spans.

    Voids go through ``client`` if given, else ``control``; with neither they are only listed.
    """
    recorded: list[TrustRecord] = []
    if port is not None:
        try:
            recorded = port.record(DonorOutcome(r.donor_id, task_id, r.outcome, r.reason, r.node_id)
                                   for r in reports if r.outcome is not None)
        except Exception as exc:  # the verdict stands; the outcomes are in the answer
            log.error("cannot record verification outcomes of task %s: %s", task_id, exc)
    reason = f"verification failed: task {task_id}"[:MAX_VOID_REASON]
    voids = tuple(_void(CreditVoid(r.donor_id, r.node_id, task_id, r.started_at, r.ended_at or r.started_at, reason),
                        client, control)
                  for r in reports if r.outcome is Outcome.INVALID and r.started_at is not None)
    return recorded, voids


def _count(control: ControlPlane, decision: Decision, voids: Sequence[CreditVoid]) -> None:
    control.count("agreed" if decision is Decision.AGREED else "disagreed")
    if decision is Decision.RERUN:
        control.count("rerun")
    for v in voids:
        if v.applied:
            control.count("voided")


def _trusted_candidate(trusted_nodes: Sequence[str] | None, opts: Mapping[str, Any]
                       ) -> tuple[Candidate, dict[str, Any]] | None:
    """The node that settles a dispute and the options to run there; None if there is none.

    The head offers no CPUs to user work (``head_cpus`` 0), so the rerun there reserves
    none: it is one task, run only on a dispute.
    """
    if trusted_nodes:
        alive = _alive_nodes()
        for node in trusted_nodes:
            if node in alive:
                return Candidate("", "", node), dict(opts)
        return None
    head = head_node_id()
    if head is None:
        return None
    head_opts: dict[str, Any] = {"num_cpus": 0}
    if opts.get("num_gpus"):
        head_opts["num_gpus"] = opts["num_gpus"]
    return Candidate("", "", head), head_opts


class VerifiedFunction(Generic[T]):
    """A function whose calls run verified: ``f(*args, **kwargs)`` returns :class:`Verified`."""

    def __init__(self, fn: Callable[..., T], settings: Mapping[str, Any]) -> None:
        self.fn = fn
        self.settings = dict(settings)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Verified[T]:
        return run(self.fn, *args, fn_kwargs=kwargs, **self.settings)


def verified(k: int = 2, **settings: Any) -> Callable[[Callable[..., T]], VerifiedFunction[T]]:
    """Decorator: every call of the function runs as :func:`run` with these settings.

    Raises:
        VerificationError: a setting that :func:`run` does not take (at decoration time).
    """
    named = {n for n, p in inspect.signature(run).parameters.items() if p.kind is p.KEYWORD_ONLY}
    allowed = (named | set(RESOURCE_OPTIONS)) - {"fn_kwargs"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise VerificationError(f"unknown setting(s) for @verified: {', '.join(unknown)}",
                                hint=f"valid: {', '.join(sorted(allowed))}")

    def wrap(fn: Callable[..., T]) -> VerifiedFunction[T]:
        return VerifiedFunction(fn, {"k": k, **settings})

    return wrap

