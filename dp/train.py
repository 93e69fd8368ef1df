"""DP-SGD with Opacus on scikit-learn's bundled digits, with the gnnumba GroupNorm CNN.

``python -m dp`` reports the test accuracy reached at a few privacy budgets ε (δ = 1e-5,
the PRV accountant's ε), beside non-private GroupNorm and BatchNorm baselines.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

DELTA = 1e-5


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _loader(x, y, batch_size, seed):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def train_nonprivate(model, x, y, *, epochs: int, batch_size: int = 64, lr: float = 0.05,
                     seed: int = 0):
    """Plain SGD with momentum; returns the model (trained in place)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for xb, yb in _loader(x, y, batch_size, seed):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model


def train_private(model, x, y, *, target_epsilon: float, epochs: int, batch_size: int = 128,
                  lr: float = 1.0, max_grad_norm: float = 1.0, delta: float = DELTA,
                  grad_sample_mode: str = "hooks", seed: int = 0):
    """DP-SGD (Poisson sampling, per-sample clipping to ``max_grad_norm``, Gaussian noise
    calibrated so the run ends at ``target_epsilon``). Returns (model, ε spent, σ)."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # a demo, not prod
        engine = PrivacyEngine()
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest)")
        out = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=_loader(x, y, batch_size, seed),
            target_epsilon=target_epsilon, target_delta=delta, epochs=epochs,
            max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode)
    model, opt, loader = out[0], out[1], out[-1]
    criterion = out[2] if grad_sample_mode == "ghost" else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest)")
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                if len(xb) == 0:  # Poisson sampling can draw an empty batch
                    continue
                opt.zero_grad()
                logits = model(xb)
                if criterion is not None:
                    criterion(logits, yb).backward()
                else:
                    F.cross_entropy(logits, yb).backward()
                opt.step()
        eps = engine.get_epsilon(delta)
    return model, eps, opt.noise_multiplier
