"""GroupNorm forward, backward and per-sample parameter gradients as Numba CPU kernels.

The host functions here take 3-D views, (N, C, S) for NCHW or (N, S, C) for channels-last
(S = all spatial dims), pick a kernel and allocate the small outputs. The kernels live in

* ``storage``: reading/writing elements (float32, float64, half precision as bits),
* ``activation``: the activation table compiled for the kernels,
* ``stats``: chunk statistics with Chan's merges, gradient sums, per-channel coefficients,
* ``nchw``: the serial, fused and split kernels for contiguous groups,
* ``channels_last``: the blocked kernels for channels-last input.

``act`` is a code of ``gnnumba.activations.CODES`` (True/False still mean silu/none). Backward
uses the saved mean/rstd in closed form; the per-channel sums it needs are the per-sample
parameter gradients, computed by the same code as ``per_sample_param_grads``.

No atomics anywhere; every blocking is a constant from ``config``, so the result does not
depend on the number of threads, and every path of one layout gives the same bits.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from .. import _threading, config
from . import channels_last as _cl
from . import pool
from . import nchw as _nchw
from .stats import reduce_params as _reduce_params
from .storage import HALF_BITS, compute_dtype

__all__ = ["HALF_BITS", "compute_dtype", "forward", "backward", "per_sample_param_grads",
           "reduce_params", "run_serially", "choose_path", "empty", "default_param"]

# --------------------------------------------------------------------------- threads


def run_serially(x_size: int) -> bool:
    """Small inputs (below torch's grain size, 32768 elements: waking the pool costs more than
    the work, and a busy core would stall the call), and every forked child (GNU OpenMP is
    not fork-safe; see ``gnnumba._threading``)."""
    return x_size < config.CPU_SERIAL_MAX_ELEMENTS or not _threading.parallel_allowed()


def choose_path(x_size: int, num_groups_total: int, group_bytes: int) -> str:
    """NCHW path: "serial" (see ``run_serially``), "fused" when every thread gets several
    whole groups that fit in L2, else "split". All three give bit-identical results."""
    if run_serially(x_size):
        return "serial"  # decided first: numba.get_num_threads() costs ~1.4 us
    if (num_groups_total >= config.CPU_FUSED_MIN_TASKS_PER_THREAD * numba.get_num_threads()
            and group_bytes <= config.CPU_FUSED_MAX_BYTES):
        return "fused"
    return "split"


def choose_cl_path(x_size: int, N: int, sample_bytes: int) -> str:
    """Channels-last path: "serial" (see ``run_serially``); "fused", one task per sample in
    one parallel region, when the batch splits evenly over the threads; else "split", the
    blocks of every sample spread over the threads in three regions (statistics, merges,
    apply). All three give bit-identical results."""
    if run_serially(x_size):
        return "serial"
    threads = numba.get_num_threads()
    if (N % threads == 0 or N >= config.CPU_FUSED_MIN_TASKS_PER_THREAD * threads) and \
            sample_bytes <= config.CPU_CL_FUSED_MAX_BYTES:
        return "fused"
    return "split"


# --------------------------------------------------------------------------- kernels

_FWD = {"serial": _nchw.fwd_serial, "fused": _nchw.fwd_fused, "split": _nchw.fwd_split}
_BWD = {"serial": _nchw.bwd_serial, "fused": _nchw.bwd_fused, "split": _nchw.bwd_split}
_SUMS = {"serial": _nchw.sums_serial, "fused": _nchw.sums_fused, "split": _nchw.sums_split}
_CL_FWD = {"serial": _cl.fwd_serial, "fused": _cl.fwd_fused, "split": _cl.fwd}
_CL_BWD = {"serial": _cl.bwd_serial, "fused": _cl.bwd_fused, "split": _cl.bwd}
_CL_SUMS = {"serial": _cl.sums_serial, "fused": _cl.sums_fused, "split": _cl.sums}


@functools.lru_cache(maxsize=None)
def _compute(storage: np.dtype) -> tuple:
    """(compute dtype, 1 in it) for a storage dtype; cached (a few dtypes; called per call)."""
    cdt = compute_dtype(storage)
    return cdt, cdt.type(1)


def _dims(x3, channels_last):
    if channels_last:
        N, S, C = x3.shape
    else:
        N, C, S = x3.shape
    return N, C, S


def forward(x3, num_groups, weight, bias, eps, act, y3, channels_last, path=None):
    """y3 = act(group_norm(x3)); returns float64 (mean, rstd) of shape (N, G).

    ``weight``/``bias``: contiguous (C,) arrays in x's compute dtype (``compute_dtype``;
    coefficients are formed in float64 from them). ``path`` ("serial"/"fused"/"split")
    forces an NCHW path."""
    N, C, S = _dims(x3, channels_last)
    G = num_groups
    mean = np.empty((N, G))
    rstd = np.empty((N, G))
    cdt, one = _compute(x3.dtype)
    coef = np.empty((N, 3, C), dtype=cdt)
    act = int(act)
    if channels_last:
        if path is None:
            path = choose_cl_path(x3.size, N, S * C * x3.itemsize)
        _CL_FWD[path](x3, weight, bias, eps, act, one, config.CPU_CL_BLOCK, y3, mean, rstd, coef)
        return mean, rstd
    D = (C // G) * S
    x2 = x3.reshape(N * G, D)
    if path is None:
        path = choose_path(x3.size, N * G, D * x3.itemsize)
    _FWD[path](x2, x3, weight, bias, eps, act, one, config.CPU_CHUNK, y3, mean, rstd, coef)
    return mean, rstd


def backward(dy3, x3, mean, rstd, weight, bias, act, dx3, channels_last, path=None):
    """dx written into ``dx3``; returns float64 (dweight_per_sample, dbias_per_sample) of
    shape (N, C). ``mean``/``rstd``: float64 (N, G) from ``forward``."""
    N, C, S = _dims(x3, channels_last)
    G = mean.shape[1]
    dweight_ps = np.empty((N, C))
    dbias_ps = np.empty((N, C))
    cdt, one = _compute(x3.dtype)
    coef = np.empty((N, 5, C), dtype=cdt)
    act = int(act)
    if channels_last:
        if path is None:
            path = choose_cl_path(x3.size, N, 2 * S * C * x3.itemsize)
        _CL_BWD[path](dy3, x3, mean, rstd, weight, bias, act, one, config.CPU_CL_BLOCK, dx3,
                      dweight_ps, dbias_ps, coef)
        return dweight_ps, dbias_ps
    if path is None:
        path = choose_path(x3.size, N * G, 2 * (C // G) * S * x3.itemsize)
    _BWD[path](dy3, x3, mean, rstd, weight, bias, act, one, config.CPU_CHUNK, dx3, dweight_ps,
               dbias_ps, coef)
    return dweight_ps, dbias_ps


def per_sample_param_grads(dy3, x3, mean, rstd, weight, bias, act, channels_last, path=None):
    """float64 (dweight_per_sample, dbias_per_sample) of shape (N, C): the backward's
    per-channel sums (same code, same bits), reading x and dy once and writing no dx.
    ``bias`` enters only through the activation's pre-activation."""
    N, C, S = _dims(x3, channels_last)
    G = mean.shape[1]
    dweight_ps = np.empty((N, C))
    dbias_ps = np.empty((N, C))
    cdt, one = _compute(x3.dtype)
    coef = np.empty((N, 3, C), dtype=cdt)
    act = int(act)
    if channels_last:
        if path is None:
            path = choose_cl_path(x3.size, N, 2 * S * C * x3.itemsize)
        _CL_SUMS[path](dy3, x3, mean, rstd, weight, bias, act, one, config.CPU_CL_BLOCK,
                       dweight_ps, dbias_ps, coef)
        return dweight_ps, dbias_ps
    if path is None:
        path = choose_path(x3.size, N * G, 2 * (C // G) * S * x3.itemsize)
    _SUMS[path](dy3, x3, mean, rstd, weight, bias, act, one, config.CPU_CHUNK, dweight_ps,
                dbias_ps, coef)
    return dweight_ps, dbias_ps


def reduce_params(dweight_per_sample, dbias_per_sample, dtype=np.float64):
    """(dweight, dbias) of shape (C,): the per-sample sums added over N in order, in float64,
    and stored in ``dtype`` (float32 rounds once, as converting the float64 sums would)."""
    C = dbias_per_sample.shape[1]
    dweight = np.empty(C, dtype)
    dbias = np.empty(C, dtype)
    _reduce_params(dweight_per_sample, dbias_per_sample, dweight, dbias)
    return dweight, dbias


# --------------------------------------------------------------------------- outputs


@functools.lru_cache(maxsize=64)
def _default_param(C: int, dtype: np.dtype, value: float) -> np.ndarray:
    return np.full(C, value, dtype=dtype)  # writeable: a read-only array is another Numba type


def default_param(C: int, dtype, value: float) -> np.ndarray:
    """The (C,) constant that stands for a missing weight (1) or bias (0), never written by
    the kernels; the last 64 are cached (a model has a few channel counts; a sweep over
    many C must not grow memory without bound)."""
    return _default_param(C, np.dtype(dtype), value)


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised array for a kernel output, from ``pool``: large outputs reuse freed
    buffers whose pages are already mapped (a fresh large block pays a page fault per 4 KiB
    on first write, and its memory goes back to the kernel when freed)."""
    dtype = np.dtype(dtype)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    n = dtype.itemsize
    for d in shape:
        n *= d
    if n < config.CPU_POOL_MIN_BYTES:
        return np.empty(shape, dtype)
    return pool.empty(n).view(dtype).reshape(shape)
