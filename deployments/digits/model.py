"""The digits network, its weight files and input scaling, shared by training and serving.

Inputs are scikit-learn's ``load_digits`` images: 8x8 pixels, each an integer count 0..16
(the number of "on" pixels in a 4x4 block of the original 32x32 bitmap). The network sees
them flattened to 64 values and divided by 16, so every input lies in 0..1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

NUM_PIXELS = 64
IMAGE_SIDE = 8
PIXEL_MAX = 16.0  # load_digits counts on-pixels in 4x4 blocks: 0..16
NUM_CLASSES = 10

# Weights live next to this module so they ship with the package and load without a download.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_PATH = WEIGHTS_DIR / "digits_mlp.pt"
METADATA_PATH = WEIGHTS_DIR / "digits_mlp.json"


class DigitsMLP(nn.Module):
    """A two-hidden-layer MLP: 64 scaled pixels -> logits over the 10 digit classes."""

    def __init__(self, hidden: Sequence[int] = (128, 64), dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = NUM_PIXELS
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a ``(batch, 64)`` tensor of pixels already scaled to 0..1."""
        return self.net(x)


@dataclass(frozen=True)
class ModelMetadata:
    """What training recorded next to the weights (``digits_mlp.json``)."""

    accuracy: float
    hidden: tuple[int, ...]
    dropout: float
    seed: int
    test_fraction: float
    n_train: int
    n_test: int
    classes: tuple[int, ...]
    input_shape: tuple[int, int]
    pixel_range: tuple[float, float]
    torch_version: str
    sklearn_version: str
    epochs: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelMetadata:
        """Build from the parsed JSON file; lists become tuples."""
        return cls(
            accuracy=float(data["accuracy"]),
            hidden=tuple(int(h) for h in data["hidden"]),
            dropout=float(data["dropout"]),
            seed=int(data["seed"]),
            test_fraction=float(data["test_fraction"]),
            n_train=int(data["n_train"]),
            n_test=int(data["n_test"]),
            classes=tuple(int(c) for c in data["classes"]),
            input_shape=(int(data["input_shape"][0]), int(data["input_shape"][1])),
            pixel_range=(float(data["pixel_range"][0]), float(data["pixel_range"][1])),
            torch_version=str(data["torch_version"]),
            sklearn_version=str(data["sklearn_version"]),
            epochs=int(data["epochs"]),
        )


def scale_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Map raw 0..16 pixel counts to the 0..1 range the network was trained on."""
    return pixels.to(torch.float32) / PIXEL_MAX


def load_model(
    device: torch.device | str = "cpu",
    weights_path: Path = WEIGHTS_PATH,
    metadata_path: Path = METADATA_PATH,
) -> tuple[DigitsMLP, ModelMetadata]:
    """Load the trained network in eval mode on ``device``, with its metadata.

    Raises:
        FileNotFoundError: the weights or metadata file is missing; run
            ``python -m deployments.digits.train`` to create them.
    """
    for path in (weights_path, metadata_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; run `python -m deployments.digits.train` to create it"
            )
    metadata = ModelMetadata.from_json(json.loads(metadata_path.read_text()))
    model = DigitsMLP(hidden=metadata.hidden, dropout=metadata.dropout)
    state = torch.load(weights_path, map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device)
    model.eval()
    return model, metadata
