"""The data-parallel digits training job: a small CNN, a fixed global batch, deterministic data order.

Shared by ``examples/train_digits.py`` (with dgpt) and ``examples/train_digits_plain.py``
(plain Ray Train), so both train exactly the same thing. Design choices that make a run
independent of how many workers it had and of where it resumed:

- the global batch is fixed (:data:`GLOBAL_BATCH`); rank r of n takes every n-th sample of
  it, and its loss is scaled so DDP's average over ranks equals the full batch's mean loss
  (the gradient does not depend on n, up to float summation order);
- step s uses the samples of a permutation drawn from ``(seed, epoch)``, so a run resumed
  at step s sees exactly the data an uninterrupted one would;
- no dropout (its masks would differ per rank count).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deployments.digits.model import IMAGE_SIDE, NUM_CLASSES, PIXEL_MAX

#: Samples per step over all workers: divisible by 1..4 and 6 workers, about 1/15 of the
#: 1,437 training images (an epoch is ~15 steps).
GLOBAL_BATCH = 96
DEFAULT_SEED = 20240501
LEARNING_RATE = 2e-3


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and a hidden layer: 8x8 digits -> 10 logits (~150k parameters)."""

    def __init__(self, channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * channels * (IMAGE_SIDE // 2) ** 2, hidden), nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``(batch, 64)`` pixels already scaled to 0..1."""
        return self.head(self.features(x.view(-1, 1, IMAGE_SIDE, IMAGE_SIDE)))


@dataclass(frozen=True)
class Data:
    """Scaled train and held-out tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays, to ship the data to workers (which then need no scikit-learn)."""
        return {k: getattr(self, k).numpy() for k in ("x_train", "y_train", "x_test", "y_test")}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Data:
        return cls(*(torch.from_numpy(np.asarray(arrays[k])) for k in ("x_train", "y_train", "x_test", "y_test")))


def load_data(seed: int = DEFAULT_SEED) -> Data:
    """The stratified split of scikit-learn's bundled digits, pixels scaled to 0..1."""
    from deployments.digits.train import load_split

    s = load_split(seed)
    scale = 1.0 / PIXEL_MAX
    return Data(torch.from_numpy(s.x_train) * scale, torch.from_numpy(s.y_train),
                torch.from_numpy(s.x_test) * scale, torch.from_numpy(s.y_test))


def build(seed: int = DEFAULT_SEED, channels: int = 32, hidden: int = 128) -> tuple[DigitsCNN, torch.optim.Optimizer]:
    """A freshly initialised model (same weights for the same seed) and its optimizer."""
    torch.manual_seed(seed)
    model = DigitsCNN(channels, hidden)
    return model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)


def batch_indices(step: int, n_train: int, seed: int = DEFAULT_SEED, batch: int = GLOBAL_BATCH) -> np.ndarray:
    """Indices of the global batch of ``step`` (0-based): a pure function of its arguments."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n_train)
        perm = np.random.default_rng([seed, epoch]).permutation(n_train)
        out.extend(perm[offset: offset + batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def local_indices(global_idx: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The share of rank ``rank``: every ``world_size``-th sample of the global batch."""
    return global_idx[rank::world_size]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, step: int, rank: int,
               world_size: int, device: torch.device, seed: int = DEFAULT_SEED) -> float:
    """One optimizer step on this rank's share of step ``step``'s batch; returns the batch loss share."""
    idx = torch.from_numpy(local_indices(batch_indices(step, len(data.y_train), seed), rank, world_size))
    x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    # Sum over my samples / global batch * n: DDP's mean over n ranks is then the batch mean.
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * (world_size / GLOBAL_BATCH)
    loss.backward()
    optimizer.step()
    return float(loss.detach()) / world_size


def accuracy(model: nn.Module, data: Data, device: torch.device) -> float:
    """Top-1 accuracy on the held-out images."""
    model.eval()
    with torch.no_grad():
        pred = model(data.x_test.to(device)).argmax(dim=1).cpu()
    return float((pred == data.y_test).float().mean())


def state_files(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    """The model's and optimizer's state as checkpoint files."""
    inner = getattr(model, "module", model)  # unwrap DDP

    def dump(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    return {"model.pt": dump(inner.state_dict()), "optimizer.pt": dump(optimizer.state_dict())}


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, files: Mapping[str, bytes],
               device: torch.device) -> None:
    """Load :func:`state_files` output into ``model`` (before DDP wrapping) and ``optimizer``."""
    inner = getattr(model, "module", model)
    inner.load_state_dict(torch.load(io.BytesIO(files["model.pt"]), map_location=device, weights_only=True))
    optimizer.load_state_dict(torch.load(io.BytesIO(files["optimizer.pt"]), map_location=device, weights_only=True))
