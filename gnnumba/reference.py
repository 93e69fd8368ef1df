"""A float64 NumPy reference for GroupNorm, written straight from the paper's formulas.

Slow and simple on purpose: the tests and ``gnnumba check`` compare every kernel with it.
"""

from __future__ import annotations

import numpy as np


def _grouped(a, num_groups):
    N, C = a.shape[:2]
    return a.reshape(N, num_groups, (C // num_groups) * int(np.prod(a.shape[2:], dtype=int)))


def _per_channel(p, x_ndim):
    return p.reshape((1, -1) + (1,) * (x_ndim - 2))


def _silu(z):
    return z / (1.0 + np.exp(-z))


def forward(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """Returns float64 ``(y, mean, rstd)``."""
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[1]
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, dtype=np.float64)
    xg = _grouped(x, num_groups)
    if xg.shape[-1] == 0:  # empty groups: mean 0, rstd NaN (as torch), empty output
        return x.copy(), np.zeros(xg.shape[:2]), np.full(xg.shape[:2], np.nan)
    mean = xg.mean(axis=-1)
    var = ((xg - mean[..., None]) ** 2).mean(axis=-1)  # biased, two-pass
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    z = xhat * _per_channel(w, x.ndim) + _per_channel(b, x.ndim)
    y = _silu(z) if activation == "silu" else z
    return y, mean, rstd


def backward(dy, x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """Returns float64 ``(dx, dweight, dbias, dweight_per_sample, dbias_per_sample)``."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    N, C = x.shape[:2]
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, dtype=np.float64)
    if x.size == 0:  # empty sums are 0
        zeros = np.zeros((N, C))
        return np.zeros(x.shape), zeros.sum(axis=0), zeros.sum(axis=0), zeros, zeros
    _, mean, rstd = forward(x, num_groups, w, b, eps)
    xg = _grouped(x, num_groups)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    dz = dy
    if activation == "silu":
        z = xhat * _per_channel(w, x.ndim) + _per_channel(b, x.ndim)
        sig = 1.0 / (1.0 + np.exp(-z))
        dz = dy * sig * (1.0 + z * (1.0 - sig))
    spatial = tuple(range(2, x.ndim))
    dw_n = (dz * xhat).sum(axis=spatial)  # (N, C)
    db_n = dz.sum(axis=spatial)
    g = _grouped(dz * _per_channel(w, x.ndim), num_groups)  # d loss / d xhat
    xh = _grouped(xhat, num_groups)
    dxg = rstd[..., None] * (g - g.mean(axis=-1, keepdims=True)
                             - xh * (g * xh).mean(axis=-1, keepdims=True))
    return dxg.reshape(x.shape), dw_n.sum(axis=0), db_n.sum(axis=0), dw_n, db_n
