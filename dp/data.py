"""The demonstration's data and model: scikit-learn's bundled digits and a small CNN.

``load_digits`` ships inside scikit-learn (1797 8x8 images, no download).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def digits(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): float32 (N, 1, 8, 8) standardised images, int64
    labels; a fixed, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.3) / 0.4  # about zero mean, unit spread
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction,
                                          random_state=seed, stratify=d.target)

    def t(a, b):
        return torch.from_numpy(np.ascontiguousarray(a)[:, None]), torch.from_numpy(b).long()

    return (*t(xtr, ytr), *t(xte, yte))


def cnn(norm: str = "bn", seed: int = 0, width: int = 8) -> nn.Module:
    """conv-norm-relu, strided conv-norm-relu (8x8 -> 4x4), linear on the flattened map.
    ``norm="bn"``: BatchNorm2d; ``norm="gn"``: the same network (same initial weights) after
    ``gnnumba.torch.convert_batchnorm`` (width 8 -> 4 groups, 16 -> 8 groups)."""
    if norm not in ("bn", "gn"):
        raise ValueError(f"norm must be 'bn' or 'gn', got {norm!r}")
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width),
        nn.ReLU(), nn.Flatten(), nn.Linear(2 * width * 16, 10),
    )
    if norm == "gn":
        from gnnumba.torch import convert_batchnorm

        model = convert_batchnorm(model)
    return model
