"""Training of the digits MLP: ``python -m deployments.digits.train`` writes weights/ and metadata.

Uses scikit-learn's bundled ``load_digits`` (1,797 images shipped inside the package, so
nothing is downloaded), holds out a stratified test split, trains deterministically from a
seed on CPU and refuses to write weights that miss the accuracy floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn
import torch
from torch import nn

from deployments.digits.model import (
    IMAGE_SIDE,
    METADATA_PATH,
    NUM_CLASSES,
    PIXEL_MAX,
    WEIGHTS_PATH,
    DigitsMLP,
    scale_pixels,
)
from dgpt.datasets import DIGITS_SEED, DIGITS_TEST_FRACTION, DigitsSplit, digits_split

DEFAULT_SEED = DIGITS_SEED
DEFAULT_TEST_FRACTION = DIGITS_TEST_FRACTION
# Below this the model is not worth serving; an MLP this size reaches ~0.97-0.98.
ACCURACY_FLOOR = 0.95


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced."""

    model: DigitsMLP
    accuracy: float
    split: DigitsSplit


def load_split(seed: int = DEFAULT_SEED, test_fraction: float = DEFAULT_TEST_FRACTION) -> DigitsSplit:
    """The stratified train/held-out split of ``load_digits`` for ``seed`` (deterministic)."""
    return digits_split(seed, test_fraction)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on raw 0..16 pixels ``x`` with labels ``y``."""
    model.eval()
    with torch.no_grad():
        logits = model(scale_pixels(torch.from_numpy(x)))
    return float((logits.argmax(dim=1).numpy() == y).mean())


def train(
    seed: int = DEFAULT_SEED,
    epochs: int = 80,
    batch_size: int = 64,
    lr: float = 2e-3,
    hidden: tuple[int, ...] = (128, 64),
    dropout: float = 0.1,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> TrainResult:
    """Train a fresh ``DigitsMLP`` from ``seed``; same seed and versions give the same weights."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    split = load_split(seed, test_fraction)
    model = DigitsMLP(hidden=hidden, dropout=dropout)
    # Small weight decay: 1,437 training images are few for ~17k parameters.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    x = scale_pixels(torch.from_numpy(split.x_train))
    y = torch.from_numpy(split.y_train)
    shuffler = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=shuffler)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    return TrainResult(model, accuracy(model, split.x_test, split.y_test), split)


def write_artifacts(
    result: TrainResult,
    seed: int,
    epochs: int,
    hidden: tuple[int, ...],
    dropout: float,
    test_fraction: float,
    weights_path: Path = WEIGHTS_PATH,
    metadata_path: Path = METADATA_PATH,
) -> None:
    """Write the state dict and the metadata JSON that ``model.load_model`` reads."""
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), weights_path)
    metadata = {
        "accuracy": round(result.accuracy, 6),
        "hidden": list(hidden),
        "dropout": dropout,
        "seed": seed,
        "test_fraction": test_fraction,
        "n_train": len(result.split.y_train),
        "n_test": len(result.split.y_test),
        "classes": list(range(NUM_CLASSES)),
        "input_shape": [IMAGE_SIDE, IMAGE_SIDE],
        "pixel_range": [0.0, PIXEL_MAX],
        "torch_version": torch.__version__,
        "sklearn_version": sklearn.__version__,
        "epochs": epochs,
    }
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights file (.pt)")
    args = parser.parse_args(argv)
    hidden, dropout = (128, 64), 0.1
    # One thread: deterministic reductions, and the machine is shared.
    torch.set_num_threads(1)
    result = train(seed=args.seed, epochs=args.epochs, hidden=hidden, dropout=dropout)
    print(f"held-out accuracy: {result.accuracy:.4f} on {len(result.split.y_test)} images")
    if result.accuracy < ACCURACY_FLOOR:
        print(
            f"accuracy {result.accuracy:.4f} is below {ACCURACY_FLOOR}; weights not written. "
            "Try more --epochs or another --seed.",
            file=sys.stderr,
        )
        return 1
    metadata_path = args.out.with_suffix(".json")
    write_artifacts(
        result, args.seed, args.epochs, hidden, dropout, DEFAULT_TEST_FRACTION, args.out, metadata_path
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {metadata_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
