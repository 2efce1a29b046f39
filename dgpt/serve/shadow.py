"""Shadow comparison for Serve deployments: a sample of requests answered by two owners, compared.

Ray Serve's request router only chooses a replica for each request; it cannot send one
twice. So the copy is made where the request is answered: decorate a deployment method
with :func:`shadowed`, and for a sampled ``fraction`` of calls the replica, after
answering, sends the same call once more through a ``DeploymentHandle`` of its own
deployment, marked with a hint (``ranking.SHADOW_KWARG``) that makes ``DonorAwareRouter``
pick a replica on another node of another owner. The two outputs are compared with
``dgpt.verify.policy`` (exactly, or within a ``tolerance``)::

    @serve.deployment(request_router_config=router_config())
    class Classifier:
        @shadowed(fraction=0.05, tolerance=Tolerance(rtol=1e-4, atol=1e-6))
        async def predict(self, pixels: list[float]) -> list[float]: ...

What a comparison decides (``policy.judge_among``): agreeing outputs are valid for both
donors. On a disagreement a third replica of a third owner answers too, and the odd one
out is invalid; with no third owner, or three different answers, both sides are
inconclusive. Outcomes go to the trust store through the control plane, and the router
reads the lowered trust back through ``node_states``: a donor below ``min_trust`` gets no
more requests while others can take them. The client's response never waits for any of
this: the comparison runs after the answer, in the background, and at most
``max_in_flight`` at a time per replica (a sample is skipped beyond that).

The method's arguments must be picklable (parse an HTTP request first, then call the
shadowed method), and the method must be safe to run twice (no side effects that must
happen once). The drill switch (``DGPT_FAULT_INJECT=wrong-results``) perturbs every output
a shadowed method returns on that donor.

Limits: the replica that answered the client makes the comparison, so a donor that lies on
purpose can skip reporting itself; this catches broken or faulty donors and wrong shadow
answers. Results that matter belong in ``dgpt.verify.run``, judged by the driver.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dgpt import contract
from dgpt.serve.ranking import SHADOW_KWARG, ShadowHint
from dgpt.verify import fault
from dgpt.verify.policy import Outcome, Tolerance, judge_among, same
from dgpt.verify.trust import DonorOutcome, TrustPort

__all__ = ["ShadowComparer", "ShadowReply", "Where", "shadowed"]

log = logging.getLogger("ray.serve")

F = TypeVar("F", bound=Callable[..., Any])

#: Comparisons one replica runs at once; more samples are skipped, not queued.
MAX_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class Where:
    """The node a replica runs on: its Ray node id, donor id and owner (None when unlabelled)."""

    node_id: str
    donor_id: str | None
    owner: str | None


@dataclass(frozen=True, slots=True)
class ShadowReply:
    """One replica's answer to a (copy of a) request, and where it was answered."""

    value: Any
    where: Where


def _label(labels: Mapping[str, Any], key: str) -> str | None:
    value = labels.get(key)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return str(value) if value else None


def where_am_i() -> Where:
    """This worker's node, from Ray's runtime context and the node's dgpt labels."""
    import ray

    ctx = ray.get_runtime_context()
    labels = ctx.get_node_labels() or {}
    return Where(ctx.get_node_id(), _label(labels, contract.LABEL_DONOR_ID), _label(labels, contract.LABEL_OWNER))


Ask = Callable[[tuple[Any, ...], dict[str, Any], ShadowHint], Awaitable[ShadowReply]]
Record = Callable[[list[DonorOutcome]], Awaitable[None]]


class ShadowComparer:
    """Asks other owners' replicas for the same answer and judges them (no Serve here).

    Args:
        ask: sends a copy of the call with a hint, returns the reply.
        record: stores outcomes (the trust store, through the control plane).
        tolerance, canonical: how outputs are compared (``dgpt.verify.policy.same``).
        name: names the calls in outcome records (``serve:<app>/<deployment>.<method>``).
    """

    def __init__(self, ask: Ask, record: Record, tolerance: Tolerance | None = None,
                 canonical: Callable[[Any], Any] | None = None, name: str = "serve") -> None:
        self.ask = ask
        self.record = record
        self.tolerance = tolerance
        self.canonical = canonical or (lambda v: v)
        self.name = name

    def _new(self, reply: ShadowReply, heard: list[ShadowReply]) -> bool:
        """Whether ``reply`` comes from a node and an owner not heard yet."""
        for h in heard:
            if reply.where.node_id == h.where.node_id:
                return False
            if reply.where.owner is not None and reply.where.owner == h.where.owner:
                return False
        return True

    async def _another(self, args: tuple[Any, ...], kwargs: dict[str, Any], heard: list[ShadowReply]) -> bool:
        hint = ShadowHint(frozenset(h.where.owner for h in heard if h.where.owner),
                          frozenset(h.where.node_id for h in heard))
        reply = await self.ask(args, kwargs, hint)
        if not self._new(reply, heard):
            return False
        heard.append(reply)
        return True

    async def compare(self, primary: ShadowReply, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> list[DonorOutcome]:
        """Judge ``primary`` against another owner's answer (and a third on a disagreement).

        Returns the outcomes recorded: none when no other owner's replica answered.
        """
        heard = [primary]
        if not await self._another(args, kwargs, heard):
            log.debug("shadow of %s: no replica of another owner answered; nothing compared", self.name)
            return []
        values = [self.canonical(r.value) for r in heard]
        if not same(values[0], values[1], self.tolerance):
            if await self._another(args, kwargs, heard):
                values.append(self.canonical(heard[-1].value))
        verdicts = judge_among(values, self.tolerance)
        task_id = f"{self.name}:{uuid.uuid4().hex[:12]}"
        outcomes = [DonorOutcome(r.where.donor_id, task_id, o, _reason(o, len(heard)), r.where.node_id)
                    for r, o in zip(heard, verdicts, strict=True) if r.where.donor_id]
        if any(o is not Outcome.VALID for o in verdicts):
            log.warning("shadow of %s: donors %s answered differently (%s)", self.name,
                        ", ".join(str(r.where.donor_id) for r in heard), ", ".join(o.value for o in verdicts))
        if outcomes:
            await self.record(outcomes)
        return outcomes


def _reason(outcome: Outcome, n: int) -> str:
    return {Outcome.VALID: f"agreed with another owner's replica ({n} compared)",
            Outcome.INVALID: f"the other {n - 1} owners' replicas agreed on another output",
            Outcome.INCONCLUSIVE: f"{n} owners' replicas answered differently; nothing settled who was right",
            Outcome.ERROR: "no output"}[outcome]


class _Peers:
    """The Serve side of one shadowed method, in one replica process (built on first use).

    Its copies go out one at a time: Serve's FIFO fulfilment hands a replica found for one
    pending request to the oldest one waiting, so two copies in flight on one handle could
    swap the replicas their hints chose.
    """

    def __init__(self, method_name: str, timeout_s: float, trust: TrustPort | None) -> None:
        self.method_name = method_name
        self.timeout_s = timeout_s
        self._trust = trust
        self._handle: Any = None
        self._port_looked_up = trust is not None
        self._warned = False
        self._one_at_a_time = threading.Lock()
        self.name = f"serve:{method_name}"
        try:
            from ray import serve

            ctx = serve.get_replica_context()
            self.name = f"serve:{ctx.app_name}/{ctx.deployment}.{method_name}"
        except Exception:  # outside a replica (tests): the method's name alone
            pass

    def handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            ctx = serve.get_replica_context()
            self._handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name).options(
                method_name=self.method_name)
        return self._handle

    def _ask(self, args: tuple[Any, ...], kwargs: dict[str, Any], hint: ShadowHint) -> Any:
        with self._one_at_a_time:
            response = self.handle().remote(*args, **{**kwargs, SHADOW_KWARG: hint.as_kwarg()})
            return response.result(timeout_s=self.timeout_s)

    async def ask(self, args: tuple[Any, ...], kwargs: dict[str, Any], hint: ShadowHint) -> ShadowReply:
        # In a thread of the pool: the wait blocks neither the replica's event loop nor the
        # private loop of a sync method's comparison thread.
        reply = await asyncio.get_running_loop().run_in_executor(None, self._ask, args, kwargs, hint)
        if not isinstance(reply, ShadowReply):
            raise TypeError(f"a shadow copy of {self.name} answered {type(reply).__name__}, not a ShadowReply: "
                            "is the method decorated with @shadowed in every version of the deployment?")
        return reply

    def port(self) -> TrustPort | None:
        if not self._port_looked_up:
            from dgpt.verify.control import ControlPlane

            control = ControlPlane.find()
            self._trust = control.trust() if control is not None else None
            self._port_looked_up = True
        return self._trust

    async def record(self, outcomes: list[DonorOutcome]) -> None:
        loop = asyncio.get_running_loop()
        port = await loop.run_in_executor(None, self.port)
        if port is None:
            if not self._warned:
                self._warned = True
                log.warning("shadow comparisons of %s are not recorded: this head keeps no trust records", self.name)
            return
        await loop.run_in_executor(None, port.record, outcomes)


class _Sampler:
    """One shadowed method's settings and, per process, its comparison machinery.

    Serve pickles a deployment's class (by value when it is defined in a driver script), so
    what cannot be pickled (locks, tasks, handles) is made on first use in each replica.
    """

    def __init__(self, method_name: str, fraction: float, tolerance: Tolerance | None,
                 canonical: Callable[[Any], Any] | None, trust: TrustPort | None, timeout_s: float,
                 max_in_flight: int, rng: random.Random | None) -> None:
        self.method_name = method_name
        self.fraction = fraction
        self.tolerance = tolerance
        self.canonical = canonical
        self.trust = trust
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.rng = rng or random.Random()
        self._local: tuple[_Peers, threading.BoundedSemaphore, set[Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_local": None}

    def local(self) -> tuple[_Peers, threading.BoundedSemaphore, set[Any]]:
        if self._local is None:
            self._local = (_Peers(self.method_name, self.timeout_s, self.trust),
                           threading.BoundedSemaphore(self.max_in_flight), set())
        return self._local

    def sampled(self) -> bool:
        """Draw whether this call is copied, and take a comparison slot if it is."""
        return self.rng.random() < self.fraction and self.local()[1].acquire(blocking=False)

    async def compare(self, primary: ShadowReply, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        peers, slots, _ = self.local()
        try:
            await ShadowComparer(peers.ask, peers.record, self.tolerance, self.canonical,
                                 peers.name).compare(primary, args, kwargs)
        except Exception as exc:  # a comparison must never hurt serving
            log.warning("shadow comparison of %s failed: %s: %s", peers.name, type(exc).__name__, exc)
        finally:
            slots.release()

    def start_async(self, primary: ShadowReply, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        background = self.local()[2]
        task = asyncio.get_running_loop().create_task(self.compare(primary, args, kwargs))
        background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(background.discard)

    def start_thread(self, primary: ShadowReply, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        threading.Thread(target=asyncio.run, args=(self.compare(primary, args, kwargs),), daemon=True,
                         name=f"dgpt-shadow-{self.method_name}").start()


def shadowed(fraction: float = 0.05, *, tolerance: Tolerance | None = None,
             canonical: Callable[[Any], Any] | None = None, trust: TrustPort | None = None,
             timeout_s: float = 30.0, max_in_flight: int = MAX_IN_FLIGHT,
             rng: random.Random | None = None) -> Callable[[F], F]:
    """Decorate a Serve deployment method: compare a ``fraction`` of its calls across owners.

    Args:
        fraction: share of calls copied to another owner's replica (0..1).
        tolerance, canonical: how outputs are compared.
        trust: where outcomes go (default: the control plane's trust store).
        timeout_s: how long a copy may take before the comparison is dropped.
        max_in_flight: comparisons in progress per replica beyond which samples are skipped.
        rng: draws the sample (tests pass a seeded one).

    Raises:
        ValueError: a bad argument (named), at decoration time.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, got {fraction!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight!r}")

    def decorate(method: F) -> F:
        sampler = _Sampler(method.__name__, fraction, tolerance, canonical, trust, timeout_s, max_in_flight, rng)

        if inspect.iscoroutinefunction(method):
            @functools.wraps(method)
            async def async_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                hint = kwargs.pop(SHADOW_KWARG, None)
                value = fault.apply(await method(self, *args, **kwargs))
                if hint is not None:  # a copy: say where it ran, never copy it again
                    return ShadowReply(value, where_am_i())
                if sampler.sampled():
                    sampler.start_async(ShadowReply(value, where_am_i()), args, kwargs)
                return value

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(method)
        def sync_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            hint = kwargs.pop(SHADOW_KWARG, None)
            value = fault.apply(method(self, *args, **kwargs))
            if hint is not None:
                return ShadowReply(value, where_am_i())
            if sampler.sampled():
                sampler.start_thread(ShadowReply(value, where_am_i()), args, kwargs)
            return value

        return sync_wrapper  # type: ignore[return-value]

    return decorate
