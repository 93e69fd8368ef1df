"""The array-level API: validation, layout handling and dispatch to a backend.

``x`` is a CPU array (NumPy, or any array that speaks DLPack: torch, JAX, ...; seen by the
CPU kernels in ``gnnumba.cpu`` as a zero-copy NumPy view, see ``_arrays``) or a CUDA array
(kernels in ``gnnumba.gpu``). Results are of x's kind. Nothing the caller passes is
modified, except ``out``.

``group_norm_backward`` and ``per_sample_param_grads`` share one validated input
(``_BackwardInputs``) and the same per-sample sums: the backward's dweight/dbias are the
per-sample gradients summed over N, in order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _arrays, _checks, activations, cpu

# element types per kind: NumPy has float32/float64; torch and JAX also bring their half
# types, which the CPU kernels read as bits and accumulate in float32
NUMPY_DTYPES = ("float32", "float64")
DLPACK_DTYPES = NUMPY_DTYPES + _arrays.HALF
STATS_DTYPES = ("float32", "float64")
_NUMPY_NAMES = {np.dtype(d): d for d in NUMPY_DTYPES}


# --------------------------------------------------------------------------- dispatch


_is_cuda_array = _checks.is_cuda_array


def _cuda_backend():
    # imported lazily: numba-cuda is an optional extra. (The package is "gpu", not "cuda":
    # numba-cuda's import redirector hijacks every module name containing "numba.cuda".)
    from . import gpu as backend

    return backend


def _take(a, name, x_kind=None):
    """(NumPy storage view, dtype name, kind) of a CPU argument, refusing another kind
    than x's and any dtype its kind does not bring."""
    if type(a) is np.ndarray and (x_kind is None or x_kind is _arrays.NUMPY):
        dtype = _NUMPY_NAMES.get(a.dtype)  # the common case in one lookup
        if dtype is not None:
            return a, dtype, _arrays.NUMPY
    storage, dtype, kind = _arrays.take(a, name)
    if x_kind is not None:
        _arrays.same_kind(kind, x_kind, name)
    allowed = NUMPY_DTYPES if kind is _arrays.NUMPY else DLPACK_DTYPES
    _checks.check_dtype_name(dtype, allowed, name)
    if dtype in _arrays.HALF:  # NumPy float16 from a DLPack producer: the kernels take bits
        storage = storage.view(_arrays.storage_dtype(dtype))
    return storage, dtype, kind


# --------------------------------------------------------------------------- layouts


def is_channels_last(x: np.ndarray) -> bool:
    """Memory order (N, spatial..., C), as torch.channels_last gives, and not plain NCHW."""
    if x.ndim < 3 or x.flags.c_contiguous:
        return False
    return np.moveaxis(x, 1, -1).flags.c_contiguous


def _views(x: np.ndarray, channels_last: bool) -> np.ndarray:
    """3-D view (N, C, S) for NCHW or (N, S, C) for channels-last; no copy."""
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])  # not -1: N == 0 leaves it undetermined
    if channels_last:
        return np.moveaxis(x, 1, -1).reshape(N, S, C)
    return x.reshape(N, C, S)


def _empty_like_layout(x: np.ndarray, channels_last: bool, dtype=None,
                       aligned: bool = False) -> np.ndarray:
    """A new output of x's shape in the given layout, its pages mapped (``_arrays.empty``;
    ``aligned`` for kinds that need it)."""
    dtype = x.dtype if dtype is None else dtype
    if channels_last:
        shape = (x.shape[0],) + x.shape[2:] + (x.shape[1],)
        return np.moveaxis(_arrays.empty(shape, dtype, aligned), -1, 1)
    return _arrays.empty(x.shape, dtype, aligned)


def _as_layout(a: np.ndarray, channels_last: bool) -> np.ndarray:
    """``a`` in the given layout: itself when it already is, else one copy."""
    if channels_last:
        if is_channels_last(a):
            return a
        out = _empty_like_layout(a, True)
        np.copyto(out, a)
        return out
    return np.ascontiguousarray(a)


def _choose_layout(x: np.ndarray):
    """(x in a fast layout, channels_last). Other strides are copied once to NCHW."""
    if is_channels_last(x):
        return x, True
    return np.ascontiguousarray(x), False


def _writable_in_layout(a, channels_last) -> bool:
    return is_channels_last(a) if channels_last else a.flags.c_contiguous


def _param(p, name, C, dtype, kind):
    """(the (C,) parameter as the kernels take it: contiguous, in x's compute dtype (no copy
    for float32/float64: the kernels never write it), its storage view for overlap checks),
    or (None, None) for a missing parameter."""
    if p is None:
        return None, None
    storage, p_dtype, _ = _take(p, name, kind)
    _checks.check_same_dtype(name, p_dtype, dtype)
    _checks.check_param_shape(name, storage.shape, C)
    return _arrays.as_compute(np.ascontiguousarray(storage), dtype), storage


def _params(weight, bias, C, dtype, kind):
    """Validated (weight, bias) in the compute dtype, defaults for missing ones, and the
    storage views of those given (for overlap checks)."""
    cdt = cpu.compute_dtype(_arrays.storage_dtype(dtype))
    w, ws = _param(weight, "weight", C, dtype, kind)
    b, bs = _param(bias, "bias", C, dtype, kind)
    w = cpu.default_param(C, cdt, 1.0) if w is None else w
    b = cpu.default_param(C, cdt, 0.0) if b is None else b
    return w, b, [(n, s) for n, s in (("weight", ws), ("bias", bs)) if s is not None]


def _is_empty(shape) -> bool:
    return any(d == 0 for d in shape)


def _stats(a64: np.ndarray, acc: np.dtype, kind):
    """mean/rstd (float64 from the kernels) in the accumulation dtype, as x's kind."""
    a = a64.astype(acc, copy=False)
    return kind.wrap(a, _arrays.NAMES[acc])


# --------------------------------------------------------------------------- forward


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
                       out=None):
    """GroupNorm forward; returns ``(y, mean, rstd)``.

    ``mean``/``rstd`` have shape (N, num_groups), float64 for float64 input and float32
    otherwise, with ``rstd = 1/sqrt(var + eps)`` (biased variance). ``y`` keeps the layout
    of ``x`` (NCHW or channels-last). All three are of x's kind (NumPy, torch, JAX, ...).
    ``out``: a writeable array of x's kind, shape and dtype (x itself for in-place).
    """
    return _forward(x, num_groups, weight, bias, eps, activation, out, stats=True)


def _forward(x, num_groups, weight, bias, eps, activation, out, stats):
    """``group_norm_forward``; with ``stats=False`` mean/rstd are not converted to x's kind
    (``group_norm`` drops them: for JAX that saves two array constructions, ~20 us each)."""
    if _is_cuda_array(x):
        _checks.check_ndim(x.shape)
        G = _checks.check_num_groups(num_groups, x.shape[1])
        return _cuda_backend().group_norm_forward(
            x, G, weight, bias, _checks.check_eps(eps),
            activation=_checks.check_activation(activation), out=out)
    if out is None and type(x) is np.ndarray:
        plan = _numpy_plan(x, num_groups, eps, activation)
        if plan is not None and _plain(weight, x, plan.C) and _plain(bias, x, plan.C):
            return _numpy_forward(x, plan, weight, bias, stats)
    xa, dtype, kind = _take(x, "x")
    _checks.check_ndim(xa.shape)
    G = _checks.check_num_groups(num_groups, xa.shape[1])
    eps = _checks.check_eps(eps)
    act = activations.code(_checks.check_activation(activation))
    N, C = xa.shape[:2]
    w, b, given = _params(weight, bias, C, dtype, kind)
    acc = _checks.accumulation_dtype(dtype)
    xl, channels_last = _choose_layout(xa)
    y = _out(out, xa, dtype, kind, channels_last, given)
    if _is_empty(xa.shape):
        # an empty group has no variance: mean 0 and rstd NaN, as torch.native_group_norm
        mean, rstd = np.zeros((N, G)), np.full((N, G), np.nan)
    else:
        y_target = y if _writable_in_layout(y, channels_last) else \
            _empty_like_layout(xa, channels_last)
        mean, rstd = cpu.forward(_views(xl, channels_last), G, w, b, eps, act,
                                 _views(y_target, channels_last), channels_last)
        if y_target is not y:
            np.copyto(y, y_target)
    y_out = out if out is not None else kind.wrap(y, dtype)
    if not stats:
        return y_out, None, None
    return y_out, _stats(mean, acc, kind), _stats(rstd, acc, kind)


# --------------------------------------------------------------------------- NumPy fast path
#
# The common call, a NumPy float32/float64 x in a fast layout with NumPy parameters and no
# ``out``, skips the general path's per-call validation and layout work: what it would
# re-derive is cached per (shape, strides, dtype, num_groups, eps, activation). At 1x32x8x8
# the general path spent 5.5 us around a 3 us kernel call.


class _NumpyPlan(NamedTuple):
    G: int
    eps: float
    act: int
    channels_last: bool
    N: int
    C: int
    mem_shape: tuple  # y's shape in memory order
    mem3: tuple  # the kernels' 3-D view: (N, C, S) or (N, S, C)
    to_logical: tuple | None  # channels-last: axes from memory order to (N, C, *spatial)
    acc: np.dtype  # dtype of mean/rstd


_NUMPY_PLANS: dict = {}


def _numpy_plan(x: np.ndarray, num_groups, eps, activation):
    """The cached plan for x, or None where the general path must run (other dtypes or
    strides, empty input, unhashable arguments; errors are raised there)."""
    key = (x.shape, x.strides, x.dtype, type(num_groups), num_groups, type(eps), eps,
           activation)
    try:
        plan = _NUMPY_PLANS.get(key)
    except TypeError:  # e.g. a 0-d array as num_groups
        return None
    if plan is not None or _NUMPY_NAMES.get(x.dtype) is None or x.ndim < 2 or x.size == 0:
        return plan
    channels_last = is_channels_last(x)
    if not (channels_last or x.flags.c_contiguous):
        return None
    N, C = x.shape[:2]
    G = _checks.check_num_groups(num_groups, C)
    S = math.prod(x.shape[2:])
    nd = x.ndim
    plan = _NumpyPlan(
        G, _checks.check_eps(eps), activations.code(_checks.check_activation(activation)),
        channels_last, N, C,
        (N,) + x.shape[2:] + (C,) if channels_last else x.shape,
        (N, S, C) if channels_last else (N, C, S),
        (0, nd - 1) + tuple(range(1, nd - 1)) if channels_last else None,
        _checks.accumulation_dtype(_NUMPY_NAMES[x.dtype]))
    if len(_NUMPY_PLANS) >= 256:  # bounded against a sweep over many shapes
        _NUMPY_PLANS.clear()
    _NUMPY_PLANS[key] = plan
    return plan


def _plain(p, x: np.ndarray, C: int) -> bool:
    """A parameter the kernels take as it is: None, or a contiguous (C,) NumPy array of
    x's dtype (anything else goes through the general path's checks)."""
    return p is None or (type(p) is np.ndarray and p.dtype == x.dtype and p.shape == (C,)
                         and p.flags.c_contiguous)


def _numpy_forward(x: np.ndarray, plan: _NumpyPlan, weight, bias, stats: bool):
    if weight is None:
        weight = cpu.default_param(plan.C, x.dtype, 1.0)
    if bias is None:
        bias = cpu.default_param(plan.C, x.dtype, 0.0)
    y = _arrays.empty(plan.mem_shape, x.dtype)
    x3 = (x.transpose(_memory_axes(x.ndim)) if plan.channels_last else x).reshape(plan.mem3)
    mean, rstd = cpu.forward(x3, plan.G, weight, bias, plan.eps, plan.act,
                             y.reshape(plan.mem3), plan.channels_last)
    if plan.channels_last:
        y = y.transpose(plan.to_logical)
    if not stats:
        return y, None, None
    return y, mean.astype(plan.acc, copy=False), rstd.astype(plan.acc, copy=False)


def _memory_axes(nd: int) -> tuple:
    """Axes from (N, C, *spatial) to memory order (N, *spatial, C)."""
    return (0,) + tuple(range(2, nd)) + (1,)


def _out(out, x, dtype, kind, channels_last, params):
    """The storage ``y`` is written to: a new array in x's layout, or ``out`` checked."""
    if out is None:
        return _empty_like_layout(x, channels_last, aligned=kind.aligned)
    o, o_dtype, _ = _take(out, "out", kind)
    if not kind.writeable:
        raise TypeError(f"out cannot be a {kind.name} array: {kind.name} arrays are immutable; "
                        f"leave out=None and use the returned array")
    _checks.check_same_shape("out", o.shape, x.shape)
    if o_dtype != dtype:
        raise TypeError(f"out has dtype {o_dtype} but x has dtype {dtype}; "
                        f"pass an out array of dtype {dtype}")
    if not o.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
    if np.may_share_memory(o, x) and not (
        o.__array_interface__["data"][0] == x.__array_interface__["data"][0]
        and o.strides == x.strides
    ):
        raise ValueError("out partially overlaps x; pass a separate array, or x itself for "
                         "an in-place update")
    for name, p in params:
        if np.may_share_memory(o, p):
            raise ValueError(f"out shares memory with {name}, which the kernels read while "
                             f"writing out; pass a separate out array")
    return o


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, out=None):
    """GroupNorm (Wu & He, 2018): ``y = act((x - mean) * rstd * weight + bias)`` per
    (sample, group of C/num_groups channels), like ``torch.nn.functional.group_norm``.

    Parameters
    ----------
    x : array of shape (N, C, *spatial), zero or more spatial dims
        NumPy float32/float64, or any CPU array that speaks DLPack (torch float16/bfloat16
        too; JAX), read in place; or a CUDA array (Numba device array,
        ``__cuda_array_interface__``). C-contiguous and channels-last are fast paths; other
        strides are copied once.
    num_groups : int dividing C (a 0-d integer array is accepted)
    weight, bias : arrays of shape (C,) in x's dtype and kind, or None (1 and 0)
    eps : float >= 0, added to the biased variance
    activation : None, "silu", "relu" or "gelu" (erf form), fused
    out : optional array of x's kind, shape and dtype to write into (x itself for in-place)

    Returns
    -------
    y : of x's kind, dtype and layout (CUDA input: a Numba device array)

    Raises
    ------
    ValueError
        C not divisible by num_groups (the message lists the valid counts), num_groups < 1,
        x.ndim < 2, wrong weight/bias shape, eps < 0, unknown activation, ``out``
        overlapping an input other than being x itself.
    TypeError
        non-array input, unsupported dtype (ints, complex, mixed dtypes), arrays of mixed
        kinds, masked or byte-swapped arrays, an immutable ``out`` (JAX).
    """
    return _forward(x, num_groups, weight, bias, eps, activation, out, stats=False)[0]


# --------------------------------------------------------------------------- backward


class _BackwardInputs(NamedTuple):
    """What the backward kernels take, validated: 3-D views in one fast layout, float64
    statistics, parameters in the compute dtype."""

    dy3: np.ndarray
    x3: np.ndarray
    mean: np.ndarray
    rstd: np.ndarray
    w: np.ndarray
    b: np.ndarray
    act: int
    channels_last: bool
    x: np.ndarray  # x in the fast layout (the shape and layout of dx)
    dtype: str
    kind: _arrays.Kind


def _backward_inputs(dy, x, mean, rstd, num_groups, weight, bias, activation):
    xa, dtype, kind = _take(x, "x")
    _checks.check_ndim(xa.shape)
    G = _checks.check_num_groups(num_groups, xa.shape[1])
    act = activations.code(_checks.check_activation(activation))
    dya, dy_dtype, _ = _take(dy, "dy", kind)
    _checks.check_same_dtype("dy", dy_dtype, dtype)
    _checks.check_same_shape("dy", dya.shape, xa.shape)
    N, C = xa.shape[:2]
    stats = []
    for name, s in (("mean", mean), ("rstd", rstd)):
        sa, s_dtype, _ = _take(s, name, kind)
        _checks.check_dtype_name(s_dtype, STATS_DTYPES, name)
        _checks.check_stats_shape(name, sa.shape, N, G)
        stats.append(np.ascontiguousarray(sa, dtype=np.float64))
    w, b, _ = _params(weight, bias, C, dtype, kind)
    xl, channels_last = _choose_layout(xa)
    dyl = _as_layout(dya, channels_last)
    return _BackwardInputs(_views(dyl, channels_last), _views(xl, channels_last), stats[0],
                           stats[1], w, b, act, channels_last, xl, dtype, kind)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, bias=None, *,
                        activation=None):
    """Gradients ``(dx, dweight, dbias)`` of GroupNorm, from the ``mean``/``rstd`` that
    ``group_norm_forward`` returned, as x's kind. ``dweight``/``dbias`` (x's dtype) are None
    when the matching parameter is None. ``bias`` is only read by an activation (the
    pre-activation needs it)."""
    if _is_cuda_array(x):
        _checks.check_ndim(x.shape)
        G = _checks.check_num_groups(num_groups, x.shape[1])
        return _cuda_backend().group_norm_backward(
            dy, x, mean, rstd, G, weight, bias, activation=_checks.check_activation(activation))
    p = _backward_inputs(dy, x, mean, rstd, num_groups, weight, bias, activation)
    N, C = p.x.shape[:2]
    dx = _empty_like_layout(p.x, p.channels_last, aligned=p.kind.aligned)
    if _is_empty(p.x.shape):
        dweight_ps, dbias_ps = np.zeros((N, C)), np.zeros((N, C))
    else:
        dweight_ps, dbias_ps = cpu.backward(p.dy3, p.x3, p.mean, p.rstd, p.w, p.b, p.act,
                                            _views(dx, p.channels_last), p.channels_last)
    dweight, dbias = cpu.reduce_params(dweight_ps, dbias_ps)  # over N, in order
    kind, dtype = p.kind, p.dtype
    return (kind.wrap(dx, dtype),
            kind.cast(dweight, dtype) if weight is not None else None,
            kind.cast(dbias, dtype) if bias is not None else None)


def per_sample_param_grads(dy, x, mean, rstd, num_groups, weight=None, bias=None, *,
                           activation=None):
    """The gradients of weight and bias for each sample on its own:
    ``(dweight_per_sample, dbias_per_sample)``, both of shape (N, C), float64 for float64
    input and float32 otherwise, as x's kind. Summed over N they are
    ``group_norm_backward``'s dweight/dbias. Reads x and dy once and computes no dx (the
    kernel differential privacy needs). Both are returned whether or not ``weight``/``bias``
    are given (a missing weight is 1, a missing bias 0)."""
    if _is_cuda_array(x):
        _checks.check_ndim(x.shape)
        G = _checks.check_num_groups(num_groups, x.shape[1])
        return _cuda_backend().per_sample_param_grads(
            dy, x, mean, rstd, G, weight, bias, activation=_checks.check_activation(activation))
    p = _backward_inputs(dy, x, mean, rstd, num_groups, weight, bias, activation)
    N, C = p.x.shape[:2]
    if _is_empty(p.x.shape):  # empty sums are 0
        dweight_ps, dbias_ps = np.zeros((N, C)), np.zeros((N, C))
    else:
        dweight_ps, dbias_ps = cpu.per_sample_param_grads(p.dy3, p.x3, p.mean, p.rstd, p.w,
                                                          p.b, p.act, p.channels_last)
    acc = _checks.accumulation_dtype(p.dtype)
    return _stats(dweight_ps, acc, p.kind), _stats(dbias_ps, acc, p.kind)
