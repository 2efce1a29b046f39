"""The digits app behind DonorAwareRouter on a real local multi-node Ray fabric.

One cluster for the whole module: a head with no CPUs for user work and two donor worker
nodes (their own raylets, ``donor`` resource, ``dgpt.io/*`` labels), Ray token auth on,
Serve HTTP on a free port. The app is deployed with the options of ``deployments/digits.yaml``
(label selector, one replica per node, DonorAwareRouter). A stand-in ``registry`` actor plays
the lead's registry to drive donor states.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from ray.cluster_utils import Cluster  # noqa: E402

from deployments.digits.api import NODE_HEADER, DigitsAppArgs  # noqa: E402
from deployments.digits.app import DEPLOYMENT_NAME, DigitsClassifier  # noqa: E402
from deployments.digits.model import load_model, scale_pixels  # noqa: E402
from deployments.digits.train import load_split  # noqa: E402
from dgpt.serve.router import REGISTRY_ACTOR_NAME, REGISTRY_NAMESPACE  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

YAML_PATH = Path(__file__).resolve().parents[2] / "deployments" / "digits.yaml"
# Small limits so the 413 paths are cheap to hit.
MAX_IMAGES = 8
MAX_BODY_BYTES = 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _reset_token_cache() -> None:
    # The token loader caches per process; another module in this pytest run may have used a
    # different token. Ray's own test helper resets it (absent in some Ray builds: harmless).
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:  # pragma: no cover
        return
    reset_auth_token_state()


@dataclass(frozen=True)
class Fabric:
    """What the tests need to know about the running cluster."""

    base_url: str
    donor_node_ids: tuple[str, str]


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        _reset_token_cache()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "labels": {"dgpt.io/role": "head"},
            },
        )
        try:
            donors = [
                cluster.add_node(
                    num_cpus=1,
                    resources={"donor": 1},
                    labels={
                        "dgpt.io/role": "donor",
                        "dgpt.io/donor-id": f"donor-{i}",
                        "dgpt.io/device-class": "laptop",
                        "dgpt.io/gpu": "none",
                    },
                )
                for i in range(2)
            ]
            ray.init(address=cluster.address, namespace="dgpt-test-serve-router")
            cluster.wait_for_nodes()
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            _deploy_from_yaml()
            yield Fabric(
                base_url=f"http://127.0.0.1:{port}/digits",
                donor_node_ids=(donors[0].node_id, donors[1].node_id),
            )
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
                _reset_token_cache()


def _deploy_from_yaml() -> None:
    """Deploy the app with the deployment options of deployments/digits.yaml."""
    config = yaml.safe_load(YAML_PATH.read_text())
    app_cfg = config["applications"][0]
    (dep_cfg,) = app_cfg["deployments"]
    assert dep_cfg["name"] == DEPLOYMENT_NAME
    options = {k: v for k, v in dep_cfg.items() if k != "name"}
    args = DigitsAppArgs(max_images=MAX_IMAGES, max_body_bytes=MAX_BODY_BYTES)
    serve.run(
        DigitsClassifier.options(**options).bind(args),
        name=app_cfg["name"],
        route_prefix=app_cfg["route_prefix"],
    )


@pytest.fixture(scope="module")
def client(fabric: Fabric) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fabric.base_url, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """Held-out images the local copy of the model gets right, with their labels."""
    model, meta = load_model("cpu")
    split = load_split(meta.seed, meta.test_fraction)
    with torch.no_grad():
        predicted = model(scale_pixels(torch.from_numpy(split.x_test))).argmax(dim=1).numpy()
    right = predicted == split.y_test
    return split.x_test[right], split.y_test[right]


def _post(client: httpx.Client, body: Any) -> httpx.Response:
    return client.post("/predict", json=body)


def test_healthz_and_info(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["model"] == "digits_mlp"
    assert info["accuracy"] > 0.95
    assert info["classes"] == list(range(10))
    assert info["max_images"] == MAX_IMAGES


def test_predicts_held_out_digits(client: httpx.Client, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = held_out
    # One flat image.
    r = _post(client, {"pixels": images[0].tolist()})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert pred["digit"] == labels[0]
    assert abs(sum(pred["probabilities"]) - 1.0) < 1e-3
    # One image as 8 rows of 8.
    r = _post(client, {"pixels": images[1].reshape(8, 8).tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["digit"] == labels[1]
    # A batch, answered in order.
    r = _post(client, {"pixels": images[2 : 2 + MAX_IMAGES].tolist()})
    assert r.status_code == 200, r.text
    assert [p["digit"] for p in r.json()["predictions"]] == labels[2 : 2 + MAX_IMAGES].tolist()


def test_without_registry_every_request_succeeds(
    client: httpx.Client, held_out: tuple[np.ndarray, np.ndarray], fabric: Fabric
) -> None:
    images, labels = held_out
    nodes = set()
    for i in range(20):
        r = _post(client, {"pixels": images[i].tolist()})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["digit"] == labels[i]
        nodes.add(r.headers[NODE_HEADER])
    assert nodes <= set(fabric.donor_node_ids), "a replica ran outside the donor nodes"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"pixels": [1, 2, 3]}), "pixels has 3 values"),
        (json.dumps({"pixels": [[0] * 8] * 7}), "7 lists"),
        (json.dumps({"pixels": [0] * 63 + [99]}), "pixels[63] = 99 is outside 0..16"),
        (json.dumps({}), "pixels: field required"),
        (json.dumps({"image": [0] * 64}), "pixels: field required"),
    ],
)
def test_bad_requests_get_422_naming_the_problem(client: httpx.Client, body: str, needle: str) -> None:
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert needle in r.json()["message"]


def test_oversize_requests_get_413(client: httpx.Client) -> None:
    big = json.dumps({"pixels": [[16] * 64] * 400})  # ~100 KB > MAX_BODY_BYTES
    assert len(big) > MAX_BODY_BYTES
    r = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]
    r = _post(client, {"pixels": [[0] * 64] * (MAX_IMAGES + 1)})
    assert r.status_code == 413, r.text
    assert f"at most {MAX_IMAGES}" in r.json()["detail"]


def _make_registry() -> Any:
    @ray.remote(num_cpus=0)
    class StandInRegistry:
        """The lead's registry, reduced to the one method DonorAwareRouter calls."""

        def __init__(self) -> None:
            self._states: dict[str, dict[str, Any]] = {}

        def set_states(self, states: dict[str, dict[str, Any]]) -> None:
            self._states = states

        def node_states(self) -> dict[str, dict[str, Any]]:
            return self._states

    return StandInRegistry.options(
        name=REGISTRY_ACTOR_NAME, namespace=REGISTRY_NAMESPACE, lifetime="detached"
    ).remote()


def test_router_steers_away_from_leaving_donors(
    client: httpx.Client, held_out: tuple[np.ndarray, np.ndarray], fabric: Fabric
) -> None:
    images, _ = held_out
    node_a, node_b = fabric.donor_node_ids
    registry = _make_registry()

    def states(a: str, b: str) -> dict[str, dict[str, Any]]:
        # "unreachable": an active donor that missed its heartbeats.
        def entry(donor: str, state: str) -> dict[str, Any]:
            return {"donor_id": donor, "state": "active" if state == "unreachable" else state,
                    "reliability": 0.9, "reachable": state != "unreachable"}

        return {node_a: entry("donor-0", a), node_b: entry("donor-1", b)}

    def only_served_by(node: str) -> Callable[[], bool]:
        def check() -> bool:
            # Ten answers in a row from `node`; the router refreshes donor states each second.
            for i in range(10):
                r = _post(client, {"pixels": images[i].tolist()})
                assert r.status_code == 200, r.text
                if r.headers[NODE_HEADER] != node:
                    return False
            return True

        return check

    try:
        ray.get(registry.set_states.remote(states("draining", "active")))
        _wait_for(only_served_by(node_b), 30, "requests to avoid the draining donor")
        ray.get(registry.set_states.remote(states("active", "unreachable")))
        _wait_for(only_served_by(node_a), 30, "requests to avoid the unreachable donor")
        # Every donor leaving: requests still succeed (a leaving replica beats none).
        ray.get(registry.set_states.remote(states("draining", "draining")))
        time.sleep(1.5)  # let one registry refresh pass; nothing to poll for here
        for i in range(5):
            assert _post(client, {"pixels": images[i].tolist()}).status_code == 200
    finally:
        ray.kill(registry)
