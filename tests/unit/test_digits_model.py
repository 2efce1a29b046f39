"""The digits model, its HTTP contract and its Serve config, without starting Ray."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from pydantic import ValidationError

from deployments.digits.api import (
    NODE_HEADER,
    DigitsAppArgs,
    ModelInfo,
    PredictRequest,
    create_api,
    normalize_pixels,
)
from deployments.digits.model import (
    METADATA_PATH,
    WEIGHTS_PATH,
    DigitsMLP,
    load_model,
    scale_pixels,
)
from deployments.digits.train import accuracy, load_split, train

YAML_PATH = Path(__file__).resolve().parents[2] / "deployments" / "digits.yaml"


# ----- the trained model -----------------------------------------------------------------


def test_weights_are_small_and_load_with_their_metadata() -> None:
    assert WEIGHTS_PATH.stat().st_size < 500_000
    model, meta = load_model("cpu")
    assert isinstance(model, DigitsMLP) and not model.training
    assert meta.classes == tuple(range(10))
    assert meta.input_shape == (8, 8)
    assert meta.pixel_range == (0.0, 16.0)
    assert json.loads(METADATA_PATH.read_text())["seed"] == meta.seed


def test_held_out_accuracy_is_above_95_percent() -> None:
    model, meta = load_model("cpu")
    split = load_split(meta.seed, meta.test_fraction)
    assert len(split.y_test) == meta.n_test
    acc = accuracy(model, split.x_test, split.y_test)
    assert acc > 0.95
    assert acc == pytest.approx(meta.accuracy, abs=1e-6)


def test_training_is_deterministic_for_a_seed() -> None:
    torch.set_num_threads(1)
    first = train(seed=3, epochs=2).model.state_dict()
    second = train(seed=3, epochs=2).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_missing_weights_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="deployments.digits.train"):
        load_model("cpu", weights_path=tmp_path / "none.pt")


# ----- request validation ----------------------------------------------------------------


def test_pixels_accepts_flat_rows_and_batches() -> None:
    flat = [float(i % 17) for i in range(64)]
    rows = [flat[r * 8 : r * 8 + 8] for r in range(8)]
    assert normalize_pixels(flat) == [flat]
    assert normalize_pixels(rows) == [flat]
    assert normalize_pixels([flat, flat]) == [flat, flat]
    assert normalize_pixels([rows, rows, rows]) == [flat, flat, flat]


@pytest.mark.parametrize(
    ("pixels", "needle"),
    [
        ([1, 2, 3], "pixels has 3 values"),
        ([[0] * 8] * 7, "7 lists"),
        ([0] * 63 + [16.5], "pixels[63] = 16.5 is outside 0..16"),
        ([0] * 63 + [-1], "pixels[63] = -1 is outside 0..16"),
        ([True] * 64, "pixels[0] = True is not a number"),
        ([[0] * 64, [0] * 63], "lengths [63, 64]"),
        ([[[0] * 8] * 8, [[0] * 8] * 9], "pixels[1] has 9 rows"),
        ([0, [0]], "mixes numbers and lists"),
        ([], "non-empty list"),
        ("abc", "non-empty list"),
    ],
)
def test_bad_pixels_name_the_field_and_the_problem(pixels: Any, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        PredictRequest.model_validate({"pixels": pixels})
    (err,) = info.value.errors()
    assert err["loc"] == ("pixels",)
    assert needle in err["msg"]


def test_missing_and_unknown_fields_are_named() -> None:
    with pytest.raises(ValidationError) as info:
        PredictRequest.model_validate({"image": [0] * 64})
    problems = {(e["loc"], e["type"]) for e in info.value.errors()}
    assert problems == {(("pixels",), "missing"), (("image",), "extra_forbidden")}


# ----- the HTTP contract, on an in-process model -----------------------------------------


class LocalPredictor:
    """The routes' view of a replica, backed by the real weights in this process."""

    node_id = "node-local"

    def __init__(self) -> None:
        self.model, self.meta = load_model("cpu")

    async def predict_images(self, images: list[list[float]]) -> list[list[float]]:
        with torch.no_grad():
            return torch.softmax(self.model(scale_pixels(torch.tensor(images))), dim=1).tolist()

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model="digits_mlp", accuracy=self.meta.accuracy, classes=list(self.meta.classes),
            input_shape=self.meta.input_shape, pixel_range=self.meta.pixel_range, device="cpu",
            node_id=self.node_id, torch_version=torch.__version__, max_images=4,
            max_body_bytes=8192, max_batch_size=32,
        )  # fmt: skip


def _call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    api = create_api(LocalPredictor(), DigitsAppArgs(max_images=4, max_body_bytes=8192))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://digits") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_predict_returns_the_right_digit_and_names_the_node() -> None:
    model, meta = load_model("cpu")
    split = load_split(meta.seed, meta.test_fraction)
    with torch.no_grad():
        local = model(scale_pixels(torch.from_numpy(split.x_test))).argmax(dim=1).numpy()
    idx = [i for i in range(len(local)) if local[i] == split.y_test[i]][:3]
    r = _call("POST", "/predict", json={"pixels": split.x_test[idx].tolist()})
    assert r.status_code == 200, r.text
    assert [p["digit"] for p in r.json()["predictions"]] == split.y_test[idx].tolist()
    assert r.headers[NODE_HEADER] == "node-local"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "body: Input should be an object"),
        ('{"pixels": [1]}', "pixels has 1 values"),
        ("{}", "pixels: field required"),
    ],
)
def test_bad_requests_get_422_with_a_message(body: str, needle: str) -> None:
    r = _call("POST", "/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert needle in r.json()["message"]
    assert "input" not in json.dumps(r.json()["detail"])  # never echo the payload back


def test_oversize_requests_get_413() -> None:
    big = json.dumps({"pixels": [[16] * 64] * 60})
    r = _call("POST", "/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "8192 bytes" in r.json()["detail"]
    r = _call("POST", "/predict", json={"pixels": [[0] * 64] * 5})
    assert r.status_code == 413 and "at most 4" in r.json()["detail"]


def test_healthz_and_info() -> None:
    assert _call("GET", "/healthz").json() == {"status": "ok"}
    assert _call("GET", "/info").json()["classes"] == list(range(10))
    schema = _call("GET", "/openapi.json").json()
    assert "pixels" in json.dumps(schema["paths"]["/predict"]["post"]["requestBody"])


# ----- the Serve config file -------------------------------------------------------------


def test_serve_config_validates_and_spreads_replicas_over_donors() -> None:
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(YAML_PATH.read_text()))
    (app,) = config.applications
    assert (app.name, app.route_prefix, app.import_path) == ("digits", "/digits", "deployments.digits.app:app")
    (dep,) = app.deployments
    assert dep.name == "DigitsClassifier"
    assert dep.num_replicas == "auto"
    assert dep.max_replicas_per_node == 1
    assert dep.ray_actor_options.label_selector == {"dgpt.io/role": "donor"}
    autoscaling = AutoscalingConfig.model_validate(dep.autoscaling_config)
    assert 1 <= autoscaling.min_replicas <= 2 and autoscaling.max_replicas >= 4
    router = RequestRouterConfig.model_validate(dep.request_router_config)
    assert router.request_router_class == "dgpt.serve.router:DonorAwareRouter"
    assert router.get_request_router_class().__name__ == "DonorAwareRouter"


def test_import_path_is_a_serve_application_with_the_donor_router() -> None:
    from ray.serve import Application

    from deployments.digits.app import DEPLOYMENT_NAME, app, build_app

    assert isinstance(app, Application)
    assert isinstance(build_app({"max_images": 8}), Application)
    deployment = app._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    router_cfg = deployment._deployment_config.request_router_config
    assert router_cfg.request_router_class == "dgpt.serve.router:DonorAwareRouter"


def test_bad_app_args_say_which_one() -> None:
    from deployments.digits.app import build_app
    from dgpt.exceptions import ServeError

    with pytest.raises(ServeError, match="max_images"):
        build_app({"max_images": 0})
    with pytest.raises(ServeError, match="colour"):
        build_app({"colour": "red"})
