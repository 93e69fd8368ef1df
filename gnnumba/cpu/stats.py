"""Group statistics and gradient sums, the reductions every CPU kernel shares.

Statistics: each chunk gets the corrected two-pass algorithm while it is in cache (mean, then
deviations and their sum, which removes the rounding error of the mean), summed in x's dtype;
chunks are merged in float64 with Chan's parallel formula, always in chunk order. Never
E[x^2] - E[x]^2.

Gradient sums: per channel, sum(dz) and sum(dz * (x - mean)) with dz = dy * act'(z); these are
the per-sample parameter gradients (``dbias_per_sample`` and ``dweight_per_sample / rstd``),
and the backward's dx needs exactly them, so both are computed by the same code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .activation import NONE, derivative
from .storage import cast, load

# Fast-math is confined to the two reduction helpers, chunk_stats and row_sums: "reassoc"
# lets LLVM vectorise their sums (several accumulators). They are separate compiled
# functions, so every kernel runs the same reduction code; everything else is strict IEEE.
# With reassoc on a whole kernel, LLVM re-associated the scalar merge formulas differently in
# the serial and parallel kernels and their results differed in the last bit. NaN/Inf
# semantics are kept (no "nnan"/"ninf"), so NaN input gives NaN output.
FASTMATH = {"reassoc", "nsz"}


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def chunk_stats(a):
    """(mean, M2) of an L1-sized chunk, in float64: the corrected two-pass algorithm.

    Pass 1 sums in x's dtype (float32 lanes: twice the SIMD width of float64, and the chunk
    is short), pass 2 sums d = x - m and d*d around that rounded mean m; the sum of d then
    removes m's rounding error exactly to first order (Chan, Golub & LeVeque, 1983):
    mean = m + sum(d)/n, M2 = sum(d*d) - sum(d)**2/n. Chunks are merged in float64."""
    n = a.shape[0]
    s = cast(a, 0)
    for i in range(n):
        s += load(a, i)
    m = cast(a, s / n)
    d1 = cast(a, 0)
    q = cast(a, 0)
    for i in range(n):
        d = load(a, i) - m
        d1 += d
        q += d * d
    return m + d1 / n, q - d1 * d1 / n


@njit(inline="always")
def merge(n_a, m_a, q_a, n_b, m_b, q_b):
    """Chan et al.'s merge of (count, mean, M2) partials; exact order-dependent, so callers
    always merge in a fixed order."""
    n = n_a + n_b
    if n_b == 0:
        return n_a, m_a, q_a
    d = m_b - m_a
    f = n_b / n
    return n, m_a + d * f, q_a + q_b + d * d * n_a * f


@njit(inline="always")
def rstd_of(m2, count, eps):
    """1/sqrt(var + eps); with eps = 0 and a constant group this is inf, as in torch (the
    kernels use error_model="numpy": no ZeroDivisionError)."""
    if count == 0:
        return 1.0 / np.sqrt(eps)
    return 1.0 / np.sqrt(m2 / count + eps)


@njit(inline="always")
def group_stats(xg, chunk, eps):
    """(mean, rstd) of one contiguous group: chunk statistics merged in chunk order (the
    split path does the same merges in the same order)."""
    cnt = 0
    mu = 0.0
    m2 = 0.0
    for lo in range(0, xg.shape[0], chunk):
        m, q = chunk_stats(xg[lo:lo + chunk])
        cnt, mu, m2 = merge(cnt, mu, m2, min(chunk, xg.shape[0] - lo), m, q)
    return mu, rstd_of(m2, xg.shape[0], eps)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def row_sums(dyr, xr, m, a, c0, one, act):
    """sum(dz) and sum(dz * (x - m)) over one chunk of a row, dz = dy * act'(z) with the
    pre-activation z = (x - m)*a + c0 recomputed as the forward formed it. Accumulated in x's
    dtype (the chunk is short); callers add the chunk results up in float64."""
    s1 = cast(xr, 0)
    s2 = cast(xr, 0)
    for s in range(xr.shape[0]):
        d = load(xr, s) - m
        v = load(dyr, s)
        if act != NONE:
            v = v * derivative(act, d * a + c0, one)
        s1 += v
        s2 += v * d
    return s1, s2


@njit(cache=True, error_model="numpy")
def reduce_params(dweight_per_sample, dbias_per_sample, dweight, dbias):
    """dweight[c] = sum_n dweight_per_sample[n, c] (and dbias alike), in order of n. Serial:
    N*C numbers, less work than waking the thread pool."""
    N, C = dbias_per_sample.shape
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            s1 += dweight_per_sample[n, c]
            s2 += dbias_per_sample[n, c]
        dweight[c] = s1
        dbias[c] = s2


# --------------------------------------------------------------------------- coefficients
# coef[n, row, c], in x's compute dtype so the element loops run in that precision:
# 0 scale = rstd*weight, 1 shift = bias, 2 mean (z = (x - mean)*scale + shift is the
# pre-activation), and for the backward 3 k1, 4 k0 with dx = scale*dz + k1*(x - mean) + k0.


@njit(inline="always")
def set_coefs(coef, n, g, Cg, mean, rstd, w, b):
    """Rows 0-2 of group g: z = (x - mean) * scale + shift is the pre-activation."""
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 0, c] = rstd * w[c]
        coef[n, 1, c] = b[c]
        coef[n, 2, c] = mean


@njit(inline="always")
def set_dx_coefs(coef, n, g, Cg, M, rstd, w, dweight_ps, dbias_ps):
    """Rows 3-4 of group g: dx = scale*dz + k1*(x - mean) + k0, from the group's sums."""
    A = 0.0
    B = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        A += w[c] * dbias_ps[n, c]
        B += w[c] * dweight_ps[n, c]
    k1 = -rstd * rstd * B / M if M > 0 else 0.0
    k0 = -rstd * A / M if M > 0 else 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 3, c] = k1
        coef[n, 4, c] = k0
