"""DonorAwareRouter's mechanism with fake replicas and a fake registry (no Ray started)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import (  # noqa: E402
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest  # noqa: E402

import dgpt.serve.router as router_mod  # noqa: E402
from dgpt.contract import DonorState  # noqa: E402
from dgpt.exceptions import ServeError  # noqa: E402
from dgpt.serve.router import (  # noqa: E402
    ROUTER_CLASS_PATH,
    DonorAwareRouter,
    parse_node_states,
    router_config,
)

DEPLOYMENT = DeploymentID(name="DigitsClassifier", app_name="digits")


class FakeReplica:
    """The slice of RunningReplica a router touches."""

    def __init__(self, name: str, node_id: str, queue_len: int = 0, stats: dict[str, Any] | None = None) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.node_id = node_id
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.max_ongoing_requests = 32
        self.routing_stats = stats or {}
        self.is_cross_language = False
        self.queue_len = queue_len

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len

    def push_proxy_handle(self, handle: Any) -> None:
        pass


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRef:
    def __init__(self, value: Any = None, hang: bool = False) -> None:
        self._future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if not hang:
            self._future.set_result(value)

    def future(self) -> concurrent.futures.Future[Any]:
        return self._future


class FakeRegistry:
    """Stands in for the lead's registry actor handle."""

    def __init__(self, states: dict[str, Any], hang: bool = False) -> None:
        self.states = states
        self.calls = 0
        outer = self

        class _Method:
            def remote(self) -> FakeRef:
                outer.calls += 1
                return FakeRef(outer.states, hang=hang)

        self.node_states = _Method()


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())  # type: ignore[arg-type]


def make_router(replicas: list[FakeReplica], clock: FakeClock, **kwargs: Any) -> DonorAwareRouter:
    router = DonorAwareRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,
    )
    router.initialize_state(**kwargs)
    router._clock = clock
    router.update_replicas(replicas)  # type: ignore[arg-type]
    return router


def use_registry(monkeypatch: pytest.MonkeyPatch, registry: FakeRegistry | None) -> list[tuple[str, str]]:
    lookups: list[tuple[str, str]] = []

    def get_actor(name: str, namespace: str | None = None) -> FakeRegistry:
        lookups.append((name, str(namespace)))
        if registry is None:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return registry

    monkeypatch.setattr(router_mod.ray, "get_actor", get_actor)
    return lookups


async def refresh(router: DonorAwareRouter) -> None:
    """Trigger one background refresh through the routing path and let it finish."""
    await router.choose_replicas(router._replicas_list)
    task = router._refresh_task
    if task is not None:
        await task


async def chosen_ids(router: DonorAwareRouter, times: int = 30) -> set[str]:
    seen: set[str] = set()
    for _ in range(times):
        ranks = await router.choose_replicas(router._replicas_list)
        assert all(len(rank) == 1 for rank in ranks)
        seen |= {rank[0].replica_id.unique_id for rank in ranks}
    return seen


def test_without_registry_every_node_is_active_with_default_reliability(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        lookups = use_registry(monkeypatch, None)
        router = make_router([FakeReplica("a", "node-a"), FakeReplica("b", "node-b")], FakeClock())
        await refresh(router)
        assert lookups == [("registry", "dgpt")]
        assert router.donor_info("node-a").reliability == 0.5
        assert router.donor_info("node-a").state is None
        assert await chosen_ids(router) == {"a", "b"}

    run(body)


def test_draining_and_lost_donors_are_dropped_after_one_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        registry = FakeRegistry(
            {
                "node-a": {"donor_id": "d-a", "state": "draining", "reliability": 0.9},
                "node-b": {"donor_id": "d-b", "state": "active", "reliability": 0.9},
                # Missed its heartbeats: out of rotation before Ray declares its node dead.
                "node-c": {"donor_id": "d-c", "state": "active", "reliability": 0.9, "reachable": False},
            }
        )
        use_registry(monkeypatch, registry)
        clock = FakeClock()
        replicas = [FakeReplica("a", "node-a"), FakeReplica("b", "node-b"), FakeReplica("c", "node-c")]
        router = make_router(replicas, clock)
        await refresh(router)
        assert [r.unique_id for r in router.routable_replica_ids] == ["b"]
        assert await chosen_ids(router) == {"b"}
        # Everyone leaving: use them all rather than nothing.
        registry.states = {n: {"state": "draining"} for n in ("node-a", "node-b", "node-c")}
        clock.now += 1.0
        await refresh(router)
        assert await chosen_ids(router, 60) == {"a", "b", "c"}

    run(body)


def test_registry_is_asked_at_most_once_per_period(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        registry = FakeRegistry({})
        use_registry(monkeypatch, registry)
        clock = FakeClock()
        router = make_router([FakeReplica("a", "node-a"), FakeReplica("b", "node-b")], clock)
        for _ in range(50):
            await refresh(router)
        assert registry.calls == 1
        clock.now += 1.0
        await refresh(router)
        assert registry.calls == 2

    run(body)


def test_routing_never_waits_for_a_hanging_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        use_registry(monkeypatch, FakeRegistry({}, hang=True))
        router = make_router([FakeReplica("a", "node-a"), FakeReplica("b", "node-b")], FakeClock())
        for _ in range(20):
            ranks = await asyncio.wait_for(router.choose_replicas(router._replicas_list), 0.5)
            assert len(ranks) == 2
        assert router._refresh_task is not None  # still waiting, in the background
        router._refresh_task.cancel()

    run(body)


def test_forgets_registry_states_when_it_stays_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        registry = FakeRegistry({"node-a": {"state": "draining"}})
        use_registry(monkeypatch, registry)
        clock = FakeClock()
        router = make_router([FakeReplica("a", "node-a"), FakeReplica("b", "node-b")], clock, registry_stale_after_s=5.0)
        await refresh(router)
        assert router.donor_info("node-a").state is DonorState.DRAINING
        use_registry(monkeypatch, None)
        router._registry = None  # the actor went away
        clock.now += 2.0
        await refresh(router)
        assert router.donor_info("node-a").state is DonorState.DRAINING  # a blip is tolerated
        clock.now += 10.0
        await refresh(router)
        assert router.donor_info("node-a").state is None

    run(body)


def _pending(request_id: str) -> PendingRequest:
    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id=request_id, internal_request_id=request_id))


def test_measured_latency_steers_to_the_fast_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        use_registry(monkeypatch, None)
        clock = FakeClock()
        fast, slow = FakeReplica("fast", "node-a"), FakeReplica("slow", "node-b")
        router = make_router([fast, slow], clock)
        await asyncio.sleep(0)  # let the initial queue-length probes land
        for i, (replica, took_s) in enumerate([(fast, 0.01), (slow, 0.2)] * 3):
            router.on_request_routed(_pending(f"r{i}"), replica.replica_id, None)  # type: ignore[arg-type]
            clock.now += took_s
            router.on_request_completed(replica.replica_id, f"r{i}")
        est_fast = router.latency_estimate(fast.replica_id)
        est_slow = router.latency_estimate(slow.replica_id)
        assert est_fast is not None and est_slow is not None
        # Samples ~10 ms and ~200 ms; between samples each estimate ages a little toward the prior.
        assert est_fast.ewma_ms == pytest.approx(10.0, rel=0.05)
        assert est_slow.ewma_ms == pytest.approx(200.0, rel=0.05)
        for _ in range(20):
            ranks = await router.choose_replicas(router._replicas_list)
            assert ranks[0][0].replica_id == fast.replica_id

    run(body)


def test_unmeasured_replica_starts_from_its_reported_routing_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        use_registry(monkeypatch, None)
        router = make_router(
            [FakeReplica("a", "node-a", stats={"ewma_latency_ms": 80.0}), FakeReplica("b", "node-b", stats={"ewma_latency_ms": 4.0})],
            FakeClock(),
        )
        await asyncio.sleep(0)
        for _ in range(10):
            ranks = await router.choose_replicas(router._replicas_list)
            assert ranks[0][0].replica_id.unique_id == "b"

    run(body)


def test_completion_before_routed_and_rejections_leave_no_residue(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        use_registry(monkeypatch, None)
        replica = FakeReplica("a", "node-a")
        router = make_router([replica], FakeClock())
        router.on_request_completed(replica.replica_id, "early")  # overtook on_request_routed
        router.on_request_routed(_pending("early"), replica.replica_id, None)  # type: ignore[arg-type]
        router.on_request_completed(replica.replica_id, "rejected")  # never routed
        assert router._in_flight == {}
        assert router._started == {}
        assert router.latency_estimate(replica.replica_id) is None

    run(body)


def test_dead_replica_is_dropped_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        use_registry(monkeypatch, None)
        a, b = FakeReplica("a", "node-a"), FakeReplica("b", "node-b")
        router = make_router([a, b], FakeClock())
        router.on_replica_actor_died(a.replica_id)
        assert await chosen_ids(router) == {"b"}

    run(body)


def test_router_config_validates_kwargs_at_deploy_time() -> None:
    assert router_config() == {"request_router_class": ROUTER_CLASS_PATH, "request_router_kwargs": {}}
    cfg = router_config(registry_refresh_period_s=2.0)
    assert cfg["request_router_kwargs"] == {"registry_refresh_period_s": 2.0}
    with pytest.raises(ServeError, match="registry_refresh_period_s"):
        router_config(registry_refresh_period_s=0.0)
    with pytest.raises(ServeError, match="bogus"):
        router_config(bogus=1)


def test_parse_node_states_is_tolerant() -> None:
    states = parse_node_states(
        {
            "n1": {"donor_id": "d1", "state": "ACTIVE", "reliability": 0.8, "new_field": 1},
            "n2": {"state": "weird"},
            "n3": {"state": "draining", "reliability": "high"},
            "n4": {"reliability": 7},
            "n5": "not a dict",
        }
    )
    assert states["n1"].state is DonorState.ACTIVE and states["n1"].reliability == 0.8
    assert states["n2"].state is None and states["n2"].reliability == 0.5
    assert states["n3"].state is DonorState.DRAINING and states["n3"].reliability == 0.5
    assert states["n4"].reliability == 1.0
    assert "n5" not in states
    with pytest.raises(TypeError, match="dict"):
        parse_node_states(["n1"])


def test_a_broken_registry_answer_is_reported_once_and_routing_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        registry = FakeRegistry(["not", "a", "dict"])  # type: ignore[arg-type]
        use_registry(monkeypatch, registry)
        clock = FakeClock()
        router = make_router([FakeReplica("a", "node-a"), FakeReplica("b", "node-b")], clock)
        for _ in range(3):
            await refresh(router)
            clock.now += 1.0
        assert registry.calls == 3
        assert await chosen_ids(router) == {"a", "b"}

    with caplog.at_level("WARNING", logger="ray.serve"):
        run(body)
    warnings = [r for r in caplog.records if "cannot read donor states" in r.getMessage()]
    assert len(warnings) == 1
    assert "registry" in warnings[0].getMessage()


def test_the_router_uses_only_the_public_request_router_api() -> None:
    """Serve's RequestRouter keeps its state in private fields that change between releases:
    DonorAwareRouter reads curr_replicas and replica_queue_len_cache, and its own fields only."""
    import ast
    import inspect

    source = inspect.getsource(router_mod.DonorAwareRouter)
    tree = ast.parse(source)
    own = {t.attr for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
           for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
           if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    own |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}
    private_of_serve = {a for a in used - own if a.startswith("_")}
    assert not private_of_serve, f"reaches into RequestRouter's private fields: {sorted(private_of_serve)}"
    assert {"curr_replicas", "replica_queue_len_cache"} <= used


def test_parse_node_states_reads_trust_and_owner_when_present() -> None:
    states = parse_node_states({
        "n1": {"state": "active", "trust": 0.12, "owner": "alice"},
        "n2": {"state": "active"},
        "n3": {"state": "active", "trust": "high", "owner": 7},
        "n4": {"state": "active", "trust": 3.0, "owner": ""},
        "n5": {"state": "active", "trust": True},
        "n6": {"state": "active", "trust": float("nan")},
    })
    assert (states["n1"].trust, states["n1"].owner) == (0.12, "alice")
    assert (states["n2"].trust, states["n2"].owner) == (None, None)
    assert (states["n3"].trust, states["n3"].owner) == (None, None)
    assert (states["n4"].trust, states["n4"].owner) == (1.0, None)
    assert states["n5"].trust is None and states["n6"].trust is None


def test_low_trust_donors_get_no_requests_until_they_are_all_that_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        registry = FakeRegistry({
            "node-a": {"donor_id": "d-a", "state": "active", "trust": 0.1},  # caught returning wrong results
            "node-b": {"donor_id": "d-b", "state": "active", "trust": 0.8},
            "node-c": {"donor_id": "d-c", "state": "active"},  # never checked: unknown, routable
        })
        use_registry(monkeypatch, registry)
        clock = FakeClock()
        router = make_router([FakeReplica("a", "node-a"), FakeReplica("b", "node-b"), FakeReplica("c", "node-c")],
                             clock)
        await refresh(router)
        assert sorted(r.unique_id for r in router.routable_replica_ids) == ["b", "c"]
        assert await chosen_ids(router, 60) == {"b", "c"}
        registry.states = {n: {"state": "active", "trust": 0.05} for n in ("node-a", "node-b", "node-c")}
        clock.now += 1.0
        await refresh(router)
        assert await chosen_ids(router, 60) == {"a", "b", "c"}
        # A stricter threshold, set at deploy time, is honoured.
        strict = make_router([FakeReplica("a", "node-a"), FakeReplica("b", "node-b")], clock, min_trust=0.9)
        registry.states = {"node-a": {"state": "active", "trust": 0.8}, "node-b": {"state": "active", "trust": 0.95}}
        await refresh(strict)
        assert await chosen_ids(strict) == {"b"}

    run(body)


def _shadow_request(request_id: str, avoid_owners: list[str], avoid_nodes: list[str]) -> PendingRequest:
    from dgpt.serve.ranking import SHADOW_KWARG

    return PendingRequest(args=[1], kwargs={SHADOW_KWARG: {"avoid_owners": avoid_owners, "avoid_nodes": avoid_nodes}},
                          metadata=RequestMetadata(request_id=request_id, internal_request_id=request_id))


def test_a_shadow_copy_goes_to_another_owners_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        registry = FakeRegistry({
            "node-a1": {"donor_id": "d-a1", "state": "active", "owner": "alice"},
            "node-a2": {"donor_id": "d-a2", "state": "active", "owner": "alice"},
            "node-b": {"donor_id": "d-b", "state": "active", "owner": "bob"},
            "node-c": {"donor_id": "d-c", "state": "active", "owner": "carol", "trust": 0.1},
        })
        use_registry(monkeypatch, registry)
        replicas = [FakeReplica("a1", "node-a1"), FakeReplica("a2", "node-a2"), FakeReplica("b", "node-b"),
                    FakeReplica("c", "node-c")]
        router = make_router(replicas, FakeClock())
        await refresh(router)
        seen: set[str] = set()
        for i in range(40):
            ranks = await router.choose_replicas(router._replicas_list, _shadow_request(f"s{i}", ["alice"], ["node-a1"]))
            seen |= {rank[0].replica_id.unique_id for rank in ranks}
        assert seen == {"b"}  # not alice's, and carol's only while bob's is there
        # Only alice's and carol's left to avoid alice: the distrusted other owner still beats her.
        seen = set()
        for i in range(40):
            ranks = await router.choose_replicas(router._replicas_list,
                                                 _shadow_request(f"t{i}", ["alice", "bob"], ["node-a1", "node-b"]))
            seen |= {rank[0].replica_id.unique_id for rank in ranks}
        assert seen == {"c"}
        # Nobody else: the copy is routed as any request (its wrapper sees it came back from a known owner).
        seen = set()
        for i in range(40):
            ranks = await router.choose_replicas(router._replicas_list,
                                                 _shadow_request(f"u{i}", ["alice", "bob", "carol"], []))
            seen |= {rank[0].replica_id.unique_id for rank in ranks}
        assert seen == {"a1", "a2", "b"}

    run(body)


def test_router_config_validates_min_trust() -> None:
    assert router_config(min_trust=0.5)["request_router_kwargs"] == {"min_trust": 0.5}
    with pytest.raises(ServeError, match="min_trust"):
        router_config(min_trust=2.0)
