"""The floor for ``benchmarks.serve_router``: the digits model behind a plain uvicorn app, no Ray.

Same HTTP contract (``deployments.digits.api.create_api``) and the same weights as the Serve
deployment, one process, one torch thread, no batching across requests: what a request costs
without any routing at all.

    uvicorn benchmarks.digits_floor:app --port 8011
"""

from __future__ import annotations

import torch
from fastapi import FastAPI

from deployments.digits.api import MODEL_NAME, DigitsAppArgs, ModelInfo, create_api
from deployments.digits.model import load_model, scale_pixels

__all__ = ["app"]


class LocalPredictor:
    """The digits MLP in this process, on the CPU."""

    node_id: str | None = None

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self._model, self._metadata = load_model("cpu")

    async def predict_images(self, images: list[list[float]]) -> list[list[float]]:
        x = scale_pixels(torch.tensor(images, dtype=torch.float32))
        with torch.inference_mode():
            probs = torch.softmax(self._model(x), dim=1)
        return [[round(p, 6) for p in row] for row in probs.tolist()]

    def model_info(self) -> ModelInfo:
        meta = self._metadata
        args = DigitsAppArgs()
        return ModelInfo(model=MODEL_NAME, accuracy=meta.accuracy, classes=list(meta.classes),
                         input_shape=meta.input_shape, pixel_range=meta.pixel_range, device="cpu",
                         node_id=None, torch_version=torch.__version__, max_images=args.max_images,
                         max_body_bytes=args.max_body_bytes, max_batch_size=1)


app: FastAPI = create_api(LocalPredictor(), DigitsAppArgs())
