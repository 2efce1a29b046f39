"""The digits Serve application: the replica (batched torch inference) and its app builder.

Deploy with the config file, or from Python::

    serve deploy deployments/digits.yaml          # needs donor-labelled nodes, see the file

    from ray import serve
    from deployments.digits.app import build_app
    serve.run(build_app({"max_images": 32}), name="digits", route_prefix="/digits")

Then ``POST /digits/predict`` with ``{"pixels": [...64 values 0..16...]}``; the HTTP
contract (routes, validation, limits) lives in ``deployments.digits.api``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
import torch
from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from deployments.digits.api import (
    MODEL_NAME,
    DigitPrediction,
    DigitsAppArgs,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    create_api,
)
from deployments.digits.model import WEIGHTS_PATH, ModelMetadata, load_model, scale_pixels
from dgpt.exceptions import ServeError
from dgpt.serve.ranking import LatencyEstimate, update_latency
from dgpt.serve.router import router_config

__all__ = [
    "DEPLOYMENT_NAME",
    "DigitPrediction",
    "DigitsAppArgs",
    "DigitsClassifier",
    "ModelInfo",
    "PredictRequest",
    "PredictResponse",
    "app",
    "build_app",
]

DEPLOYMENT_NAME = "DigitsClassifier"


@serve.deployment(
    name=DEPLOYMENT_NAME,
    # Room for a full batch from concurrent requests; Serve's default of 5 would cap batches at 5.
    max_ongoing_requests=32,
    # Half a core: the MLP needs little, and a donor's cap is often one or two cores.
    ray_actor_options={"num_cpus": 0.5},
    request_router_config=router_config(),
)
@serve.ingress()
class DigitsClassifier:
    """One replica: the MLP on CUDA if its node has a GPU (and the replica was given one).

    Ray hides GPUs from actors that did not ask for one, so add ``num_gpus`` to
    ``ray_actor_options`` to serve from a donor's GPU.
    """

    def __init__(self, args: DigitsAppArgs | None = None) -> None:
        self._args = args or DigitsAppArgs()
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self._device.type == "cpu":
            # One thread per replica: replicas on a donor share its few capped cores.
            torch.set_num_threads(1)
        self._model, self._metadata = load_model(self._device)
        self.node_id: str | None = (
            ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        )
        self._latency: LatencyEstimate | None = None
        # A donor slowed on purpose (benchmarks): the delay holds no CPU, like a far-away node.
        self._delay_s = (
            self._args.slow_delay_ms / 1000.0 if self.node_id in self._args.slow_node_ids else 0.0
        )
        self._in_flight = 0
        # serve.batch's typing hides the setters it adds to the batched method.
        self._infer.set_max_batch_size(self._args.max_batch_size)  # type: ignore[attr-defined]
        self._infer.set_batch_wait_timeout_s(self._args.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after ``__init__``: the HTTP routes around this replica."""
        return create_api(self, self._args)

    async def predict_images(self, images: list[list[float]]) -> list[list[float]]:
        """Probabilities per image; images join batches shared with concurrent requests."""
        started = time.monotonic()
        self._in_flight += 1
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            return list(await asyncio.gather(*(self._infer(image) for image in images)))
        finally:
            self._in_flight -= 1
            now = time.monotonic()
            sample_ms = (now - started) * 1000.0
            prior_ms = self._latency.ewma_ms if self._latency else sample_ms
            self._latency = update_latency(self._latency, sample_ms, now, prior_ms)

    def model_info(self) -> ModelInfo:
        """The served model's metadata and this deployment's request limits."""
        return describe_model(self._metadata, self._device, self.node_id, self._args)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _infer(self, images: list[list[float]]) -> list[list[float]]:
        """Class probabilities for a batch of flat images gathered across requests."""
        x = scale_pixels(torch.tensor(images, dtype=torch.float32, device=self._device))
        with torch.inference_mode():
            probs = torch.softmax(self._model(x), dim=1)
        return [[round(p, 6) for p in row] for row in probs.cpu().tolist()]

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this every ``request_routing_stats_period_s``; routers read the result.

        ``ewma_latency_ms`` is this replica's own request time (batch wait + inference):
        DonorAwareRouter starts from it for replicas it has not timed itself yet.
        """
        stats: dict[str, Any] = {"device": self._device.type}
        if self._latency is not None:
            # Rounded: every change of these stats is broadcast to every router.
            stats["ewma_latency_ms"] = round(self._latency.ewma_ms, 1)
        return stats


def describe_model(
    metadata: ModelMetadata, device: torch.device, node_id: str | None, args: DigitsAppArgs
) -> ModelInfo:
    """``GET /info``'s answer.

    A module-level function, not a method, on purpose: the deployment class is pickled by
    value, and cloudpickle fails on any by-value function that names the global ``torch``
    and an attribute called ``classes`` (it mistakes it for the ``torch.classes`` module).
    """
    return ModelInfo(
        model=MODEL_NAME,
        accuracy=metadata.accuracy,
        classes=list(metadata.classes),
        input_shape=metadata.input_shape,
        pixel_range=metadata.pixel_range,
        device=str(device),
        node_id=node_id,
        torch_version=torch.__version__,
        max_images=args.max_images,
        max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size,
    )


def parse_args(args: dict[str, Any] | DigitsAppArgs | None) -> DigitsAppArgs:
    """Validate builder arguments.

    Raises:
        ServeError: an argument is unknown or out of range; the message names it.
    """
    if isinstance(args, DigitsAppArgs):
        return args
    try:
        return DigitsAppArgs.model_validate(args or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}"
            for e in exc.errors()
        )
        raise ServeError(
            f"invalid digits app args: {problems}",
            hint=f"valid args: {', '.join(DigitsAppArgs.model_fields)}",
        ) from None


def build_app(args: dict[str, Any] | DigitsAppArgs | None = None) -> Application:
    """The digits application (Serve's application builder; config ``args:`` arrive here).

    Raises:
        ServeError: an argument is invalid, or the weights file is missing.
    """
    if not WEIGHTS_PATH.is_file():
        raise ServeError(
            f"model weights {WEIGHTS_PATH} are missing",
            hint="run `python -m deployments.digits.train` to create them",
        )
    return DigitsClassifier.bind(parse_args(args))  # type: ignore[attr-defined]


app = build_app()
