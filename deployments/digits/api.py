"""The digits HTTP API: request/response models, input validation and the FastAPI routes.

No Ray here: ``create_api`` builds the routes around any ``Predictor`` (the Serve replica in
``app.py``, or a plain in-process model in tests), so the HTTP contract is testable alone.

Routes (under the Serve route prefix, e.g. ``/digits``):

- ``POST /predict``  body ``{"pixels": ...}``: one image (64 values, or 8 rows of 8) or a
  list of such images, each value a pixel count 0..16 as in scikit-learn's ``load_digits``;
  answers the predicted digit and the class probabilities for each image.
- ``GET /healthz``   liveness.
- ``GET /info``      the model's metadata (accuracy, classes, input shape) and the limits.

Bad JSON, a wrong shape and a missing field get 422, whose ``message`` names the field and
the problem; a body above ``max_body_bytes`` or more than ``max_images`` images get 413.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.digits.model import IMAGE_SIDE, NUM_CLASSES, NUM_PIXELS, PIXEL_MAX

__all__ = [
    "DigitPrediction",
    "DigitsAppArgs",
    "ModelInfo",
    "PredictRequest",
    "PredictResponse",
    "Predictor",
    "create_api",
    "normalize_pixels",
]

MODEL_NAME = "digits_mlp"
# 1 MiB holds ~4,000 images as JSON (~250 bytes each): far above any sane batch, far below
# what would let one client tie up a replica parsing.
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_IMAGES = 64
# Response header naming the Ray node that answered: lets operators (and tests) see routing.
NODE_HEADER = "x-dgpt-node-id"


def _is_number(value: object) -> bool:
    # JSON true/false arrive as bool, which Python counts as int; they are not pixels.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(values: list[Any], where: str) -> list[float]:
    out: list[float] = []
    for i, v in enumerate(values):
        if not _is_number(v):
            raise ValueError(f"{where}[{i}] = {v!r} is not a number")
        f = float(v)
        if not math.isfinite(f) or not 0.0 <= f <= PIXEL_MAX:
            raise ValueError(f"{where}[{i}] = {v!r} is outside 0..{PIXEL_MAX:g}")
        out.append(f)
    return out


def _one_image(value: Any, where: str) -> list[float]:
    """One image, flat (64 numbers) or as 8 rows of 8, to 64 floats."""
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of {NUM_PIXELS} values or {IMAGE_SIDE} rows")
    if not any(isinstance(v, list) for v in value):
        if len(value) != NUM_PIXELS:
            raise ValueError(
                f"{where} has {len(value)} values; an image is {NUM_PIXELS} values "
                f"(or {IMAGE_SIDE} rows of {IMAGE_SIDE})"
            )
        return _check_values(value, where)
    if all(isinstance(row, list) for row in value):
        lengths = [len(row) for row in value]
        if len(value) != IMAGE_SIDE or any(n != IMAGE_SIDE for n in lengths):
            raise ValueError(
                f"{where} has {len(value)} rows of lengths {sorted(set(lengths))}; "
                f"an image is {IMAGE_SIDE} rows of {IMAGE_SIDE} values (or {NUM_PIXELS} values)"
            )
        flat: list[float] = []
        for r, row in enumerate(value):
            flat += _check_values(row, f"{where}[{r}]")
        return flat
    raise ValueError(f"{where} mixes numbers and lists; send {NUM_PIXELS} numbers or {IMAGE_SIDE} rows")


def normalize_pixels(value: Any) -> list[list[float]]:
    """``pixels`` as sent (one image or a batch, flat or 8x8) to a batch of flat 64-float images.

    Raises:
        ValueError: the shape or a value is wrong; the message points at the offending item.
    """
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"must be a non-empty list: one image ({NUM_PIXELS} values, or {IMAGE_SIDE} rows "
            f"of {IMAGE_SIDE}) or a list of images; got {type(value).__name__}"
        )
    if not any(isinstance(v, list) for v in value):
        return [_one_image(value, "pixels")]
    if not all(isinstance(v, list) for v in value):
        raise ValueError("mixes numbers and lists; send one image or a list of images")
    # A list of lists: either one image as 8 rows of 8, or a batch of images.
    if all(v and not any(isinstance(x, list) for x in v) for v in value):
        if len(value) == IMAGE_SIDE and all(len(v) == IMAGE_SIDE for v in value):
            return [_one_image(value, "pixels")]
        if not all(len(v) == NUM_PIXELS for v in value):
            lengths = sorted({len(v) for v in value})
            raise ValueError(
                f"got {len(value)} lists of lengths {lengths}; send one image as {NUM_PIXELS} "
                f"values or {IMAGE_SIDE} rows of {IMAGE_SIDE}, or a list of such images"
            )
    return [_one_image(image, f"pixels[{i}]") for i, image in enumerate(value)]


class PredictRequest(BaseModel):
    """``POST /predict`` body."""

    model_config = ConfigDict(extra="forbid")

    pixels: list[list[float]] = Field(
        ...,
        description=(
            f"One image ({NUM_PIXELS} values, or {IMAGE_SIDE} rows of {IMAGE_SIDE}) or a list of "
            f"images; each value is a pixel count 0..{PIXEL_MAX:g} (scikit-learn load_digits scale)."
        ),
        examples=[[[0, 0, 5, 13, 9, 1, 0, 0] * 8]],
    )

    @field_validator("pixels", mode="before")
    @classmethod
    def _normalize(cls, value: Any) -> list[list[float]]:
        return normalize_pixels(value)


class DigitPrediction(BaseModel):
    """The model's answer for one image."""

    model_config = ConfigDict(frozen=True)

    digit: int = Field(..., ge=0, le=NUM_CLASSES - 1, description="Most likely class.")
    confidence: float = Field(..., ge=0, le=1, description="Probability of `digit`.")
    probabilities: list[float] = Field(..., description="Probability of each class 0..9.")


class PredictResponse(BaseModel):
    """``POST /predict`` answer: one prediction per image, in request order."""

    model_config = ConfigDict(frozen=True)

    model: str
    predictions: list[DigitPrediction]


class ModelInfo(BaseModel):
    """``GET /info``: what is being served and the request limits."""

    model_config = ConfigDict(frozen=True)

    model: str
    accuracy: float
    classes: list[int]
    input_shape: tuple[int, int]
    pixel_range: tuple[float, float]
    device: str
    node_id: str | None
    torch_version: str
    max_images: int
    max_body_bytes: int
    max_batch_size: int


class DigitsAppArgs(BaseModel):
    """Application builder arguments (``args:`` in the Serve config file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(default=32, ge=1, le=1024, description="Images per forward pass.")
    batch_wait_timeout_s: float = Field(
        default=0.002,
        ge=0,
        le=1,
        description=(
            "How long the first image of a batch waits for company. 2 ms: well under a "
            "network round trip, enough to coalesce concurrent requests under load."
        ),
    )
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024, le=64 << 20)
    max_images: int = Field(default=DEFAULT_MAX_IMAGES, ge=1, le=4096)
    slow_node_ids: tuple[str, ...] = Field(
        default=(),
        description=(
            "Ray node ids (hex) whose replicas add `slow_delay_ms` to every request: a slow "
            "donor on purpose, for benchmarks of the request router."
        ),
    )
    slow_delay_ms: float = Field(default=0.0, ge=0, le=60_000)


def _too_large(what: str, limit: int) -> str:
    return f"{what} is over the limit of {limit} bytes; send fewer images per request"


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    where = ".".join(loc) if loc else "body"
    kind = err.get("type", "")
    if kind == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "invalid JSON")
        return f"body is not valid JSON ({reason}); send a JSON object like {{\"pixels\": [...]}}"
    if kind == "missing":
        return f"{where}: field required"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    # Our own validators already start with the field ("pixels[3] has 63 values").
    return msg if msg.startswith(where) else f"{where}: {msg}"


def _validation_payload(errors: list[dict[str, Any]]) -> dict[str, Any]:
    problems = [_describe_error(e) for e in errors]
    # Echo locations and messages, never the input: it may be a megabyte of pixels.
    detail = [
        {"loc": list(e.get("loc", ())), "msg": p, "type": e.get("type")}
        for e, p in zip(errors, problems, strict=True)
    ]
    return {"message": "; ".join(problems), "detail": detail}


class Predictor(Protocol):
    """What the routes need from a model server."""

    node_id: str | None

    async def predict_images(self, images: list[list[float]]) -> list[list[float]]:
        """Class probabilities (10 per image) for flat 64-value images on the 0..16 scale."""
        ...

    def model_info(self) -> ModelInfo:
        """Metadata of the served model and the request limits."""
        ...


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=_too_large(f"body of {declared} bytes", limit))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=_too_large("body", limit))
        chunks.append(chunk)
    return b"".join(chunks)


def create_api(predictor: Predictor, args: DigitsAppArgs) -> FastAPI:
    """The FastAPI app serving ``predictor`` with the limits in ``args``.

    Built per replica (Serve's ``__serve_build_asgi_app__``) rather than once per module:
    FastAPI apps of this FastAPI version cannot be pickled, and per-replica limits need
    no global state.
    """
    api = FastAPI(
        title="dgpt digits classifier",
        description="Handwritten digit (8x8) classification served from donor devices.",
        version="1",
    )

    @api.exception_handler(RequestValidationError)
    async def _on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=_validation_payload(list(exc.errors())))

    @api.post(
        "/predict",
        response_model=PredictResponse,
        # The body is read by hand (to enforce the byte limit before parsing); this keeps
        # the request schema in the OpenAPI docs all the same.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(request: Request, response: Response) -> PredictResponse:
        """Classify one image or a batch."""
        raw = await _read_body(request, args.max_body_bytes)
        try:
            body = PredictRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
            ) from None
        if len(body.pixels) > args.max_images:
            raise HTTPException(
                status_code=413,
                detail=(
                    f"pixels: {len(body.pixels)} images in one request; at most "
                    f"{args.max_images} allowed. Split the batch into smaller requests."
                ),
            )
        probabilities = await predictor.predict_images(body.pixels)
        if predictor.node_id:
            response.headers[NODE_HEADER] = predictor.node_id
        predictions = []
        for probs in probabilities:
            digit = max(range(NUM_CLASSES), key=probs.__getitem__)
            predictions.append(
                DigitPrediction(digit=digit, confidence=probs[digit], probabilities=probs)
            )
        return PredictResponse(model=MODEL_NAME, predictions=predictions)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the replica is up and its model is loaded."""
        return {"status": "ok"}

    @api.get("/info", response_model=ModelInfo)
    async def info() -> ModelInfo:
        """The served model's metadata and this deployment's request limits."""
        return predictor.model_info()

    return api
