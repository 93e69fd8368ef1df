"""A float64 NumPy reference for GroupNorm, written straight from the paper's formulas.

Slow and simple on purpose: the tests and ``gnnumba check`` compare every kernel with it.
Activations come from the one table, ``gnnumba.activations`` (its float64 NumPy forms).
"""

from __future__ import annotations

import numpy as np

from . import activations


def _grouped(a, num_groups):
    N, C = a.shape[:2]
    return a.reshape(N, num_groups, (C // num_groups) * int(np.prod(a.shape[2:], dtype=int)))


def _per_channel(p, x_ndim):
    return p.reshape((1, -1) + (1,) * (x_ndim - 2))


def _params(weight, bias, C):
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, dtype=np.float64)
    return w, b


def forward(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """Returns float64 ``(y, mean, rstd)``, y = activation(xhat * weight + bias)."""
    x = np.asarray(x, dtype=np.float64)
    w, b = _params(weight, bias, x.shape[1])
    xg = _grouped(x, num_groups)
    if xg.shape[-1] == 0:  # empty groups: mean 0, rstd NaN (as torch), empty output
        return x.copy(), np.zeros(xg.shape[:2]), np.full(xg.shape[:2], np.nan)
    mean = xg.mean(axis=-1)
    var = ((xg - mean[..., None]) ** 2).mean(axis=-1)  # biased, two-pass
    with np.errstate(divide="ignore"):  # eps = 0 and a constant group: inf, as torch
        rstd = 1.0 / np.sqrt(var + eps)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    z = xhat * _per_channel(w, x.ndim) + _per_channel(b, x.ndim)
    return activations.numpy_forward(activation, z), mean, rstd


def backward(dy, x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """Returns float64 ``(dx, dweight, dbias, dweight_per_sample, dbias_per_sample)``; the
    per-sample gradients have shape (N, C) and sum over N to dweight and dbias."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    N, C = x.shape[:2]
    w, b = _params(weight, bias, C)
    if x.size == 0:  # empty sums are 0
        zeros = np.zeros((N, C))
        return np.zeros(x.shape), zeros.sum(axis=0), zeros.sum(axis=0), zeros, zeros
    _, mean, rstd = forward(x, num_groups, w, b, eps)
    xg = _grouped(x, num_groups)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    z = xhat * _per_channel(w, x.ndim) + _per_channel(b, x.ndim)
    dz = dy * activations.numpy_derivative(activation, z)  # d loss / d z
    spatial = tuple(range(2, x.ndim))
    dweight_per_sample = (dz * xhat).sum(axis=spatial)  # (N, C)
    dbias_per_sample = dz.sum(axis=spatial)
    g = _grouped(dz * _per_channel(w, x.ndim), num_groups)  # d loss / d xhat
    xh = _grouped(xhat, num_groups)
    dxg = rstd[..., None] * (g - g.mean(axis=-1, keepdims=True)
                             - xh * (g * xh).mean(axis=-1, keepdims=True))
    return (dxg.reshape(x.shape), dweight_per_sample.sum(axis=0), dbias_per_sample.sum(axis=0),
            dweight_per_sample, dbias_per_sample)
