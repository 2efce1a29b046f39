"""Small datasets that ship inside packages (nothing is downloaded), split the same way everywhere.

scikit-learn's bundled ``load_digits`` (1,797 8x8 images) is what the digits endpoint
serves and what the training examples learn; both split it here, so a held-out image is
held out for every one of them. scikit-learn is imported when a split is made (the ``ml``
extra), never by ``import dgpt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The split the shipped digits weights were trained on (they record it in their metadata).
DIGITS_SEED = 20240501
#: A fifth of the 1,797 images (360) is enough for accuracy to be resolved to ~0.3 %.
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """Raw (unscaled, 0..16) pixels as ``(n, 64)`` float32 and integer labels."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def digits_split(seed: int = DIGITS_SEED, test_fraction: float = DIGITS_TEST_FRACTION) -> DigitsSplit:
    """The stratified train/held-out split of ``load_digits`` for ``seed`` (deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsSplit(x_train, x_test, y_train, y_test)
