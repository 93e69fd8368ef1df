"""The array-level API: validation, layout handling and dispatch to a backend.

``x`` is a NumPy array (CPU kernels in ``gnnumba.cpu``) or a CUDA array (kernels in
``gnnumba.gpu``). Nothing the caller passes is modified, except ``out``.
"""

from __future__ import annotations

import numpy as np

from . import _checks, activations, cpu

CPU_DTYPES = (np.float32, np.float64)


# --------------------------------------------------------------------------- dispatch


_is_cuda_array = _checks.is_cuda_array


def _cuda_backend():
    # imported lazily: numba-cuda is an optional extra. (The package is "gpu", not "cuda":
    # numba-cuda's import redirector hijacks every module name containing "numba.cuda".)
    from . import gpu as backend

    return backend


def _check_x(x, name="x"):
    if _is_cuda_array(x):
        return _cuda_backend()
    if not isinstance(x, np.ndarray):
        hint = ""
        if type(x).__module__.startswith("torch"):
            hint = "; for torch tensors use gnnumba.torch.group_norm"
        raise TypeError(
            f"{name} must be a numpy.ndarray or a CUDA array, got {type(x).__name__}"
            f" (convert with np.asarray({name}, dtype=np.float32)){hint}"
        )
    _checks.check_dtype(x.dtype, CPU_DTYPES, name)
    return None


# --------------------------------------------------------------------------- layouts


def is_channels_last(x: np.ndarray) -> bool:
    """Memory order (N, spatial..., C), as torch.channels_last gives, and not plain NCHW."""
    if x.ndim < 3 or x.flags.c_contiguous:
        return False
    return np.moveaxis(x, 1, -1).flags.c_contiguous


def _views(x: np.ndarray, channels_last: bool) -> np.ndarray:
    """3-D view (N, C, S) for NCHW or (N, S, C) for channels-last; no copy."""
    N, C = x.shape[:2]
    if channels_last:
        return np.moveaxis(x, 1, -1).reshape(N, -1, C)
    return x.reshape(N, C, -1)


def _empty_like_layout(x: np.ndarray, channels_last: bool, dtype=None) -> np.ndarray:
    """A new output of x's shape in the given layout, its pages mapped (``cpu.empty``)."""
    dtype = x.dtype if dtype is None else dtype
    if channels_last:
        shape = (x.shape[0],) + x.shape[2:] + (x.shape[1],)
        return np.moveaxis(cpu.empty(shape, dtype), -1, 1)
    return cpu.empty(x.shape, dtype)


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


def _param(p, name, C, dtype, default):
    """The (C,) parameter as the kernels take it: x's dtype, contiguous (no copy when it
    already is; the kernels never write it)."""
    if p is None:
        return cpu.default_param(C, dtype, default)
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of shape ({C},) or None, "
                        f"got {type(p).__name__}")
    _checks.check_same_dtype(name, p.dtype, dtype)
    _checks.check_param_shape(name, p.shape, C)
    return np.ascontiguousarray(p)


def _is_empty(shape) -> bool:
    return any(d == 0 for d in shape)


# --------------------------------------------------------------------------- public API


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
                       out=None):
    """GroupNorm forward; returns ``(y, mean, rstd)``.

    ``mean``/``rstd`` have shape (N, num_groups), float64 for float64 input and float32
    otherwise, with ``rstd = 1/sqrt(var + eps)`` (biased variance). ``y`` keeps the layout
    of ``x`` (NCHW or channels-last).
    """
    backend = _check_x(x)
    _checks.check_ndim(x.shape)
    G = _checks.check_num_groups(num_groups, x.shape[1])
    eps = _checks.check_eps(eps)
    activation = _checks.check_activation(activation)
    if backend is not None:
        return backend.group_norm_forward(x, G, weight, bias, eps, activation=activation,
                                          out=out)
    N, C = x.shape[:2]
    w = _param(weight, "weight", C, x.dtype, 1.0)
    b = _param(bias, "bias", C, x.dtype, 0.0)
    sdt = _checks.stats_dtype(x.dtype)
    xl, channels_last = _choose_layout(x)
    y = _check_out(out, x, channels_last)
    if _is_empty(x.shape):
        # an empty group has no variance: mean 0 and rstd NaN, as torch.native_group_norm
        mean = np.zeros((N, G), dtype=sdt)
        rstd = np.full((N, G), np.nan, dtype=sdt)
        return y, mean, rstd
    y_target = y if _writable_in_layout(y, channels_last) else _empty_like_layout(x, channels_last)
    mean, rstd = cpu.forward(_views(xl, channels_last), G, w, b, eps, activations.code(activation),
                             _views(y_target, channels_last), channels_last)
    if y_target is not y:
        np.copyto(y, y_target)
    return y, mean.astype(sdt), rstd.astype(sdt)


def _check_out(out, x, channels_last):
    if out is None:
        return _empty_like_layout(x, channels_last)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    _checks.check_same_shape("out", out.shape, x.shape)
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype.name} but x has dtype {x.dtype.name}; "
                        f"pass an out array of dtype {x.dtype.name}")
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
    if np.may_share_memory(out, x) and not (
        out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
        and out.strides == x.strides
    ):
        raise ValueError("out partially overlaps x; pass a separate array, or x itself for "
                         "an in-place update")
    return out


def _writable_in_layout(a, channels_last) -> bool:
    return is_channels_last(a) if channels_last else a.flags.c_contiguous


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, out=None):
    """GroupNorm (Wu & He, 2018) of ``x`` with shape (N, C, *spatial); returns ``y``.

    ``out`` may be a preallocated array of x's shape and dtype (x itself for in-place).
    """
    return group_norm_forward(x, num_groups, weight, bias, eps, activation=activation,
                              out=out)[0]


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, bias=None, *,
                        activation=None):
    """Gradients ``(dx, dweight, dbias)`` of GroupNorm, from the ``mean``/``rstd`` that
    ``group_norm_forward`` returned. ``dweight``/``dbias`` are None when the matching
    parameter is None. ``bias`` is only read for activation="silu"."""
    backend = _check_x(x)
    _checks.check_ndim(x.shape)
    G = _checks.check_num_groups(num_groups, x.shape[1])
    activation = _checks.check_activation(activation)
    if backend is not None:
        return backend.group_norm_backward(dy, x, mean, rstd, G, weight, bias,
                                           activation=activation)
    dx, dxh, db = _cpu_backward(dy, x, mean, rstd, G, weight, bias, activation)
    dw, dbias = cpu.reduce_params(dxh, db)
    return (dx, dw.astype(x.dtype) if weight is not None else None,
            dbias.astype(x.dtype) if bias is not None else None)


def _cpu_backward(dy, x, mean, rstd, G, weight, bias, activation):
    """Validated CPU backward: (dx, per-sample dgamma, per-sample dbeta), the latter two
    float64 of shape (N, C) (summed over N by ``group_norm_backward``)."""
    if not isinstance(dy, np.ndarray):
        raise TypeError(f"dy must be a numpy.ndarray like x, got {type(dy).__name__}")
    _checks.check_same_dtype("dy", dy.dtype, x.dtype)
    _checks.check_same_shape("dy", dy.shape, x.shape)
    N, C = x.shape[:2]
    for name, s in (("mean", mean), ("rstd", rstd)):
        if not isinstance(s, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of shape ({N}, {G}), "
                            f"got {type(s).__name__}")
        _checks.check_dtype(s.dtype, CPU_DTYPES, name)
        _checks.check_stats_shape(name, s.shape, N, G)
    w = _param(weight, "weight", C, x.dtype, 1.0)
    b = _param(bias, "bias", C, x.dtype, 0.0)
    xl, channels_last = _choose_layout(x)
    dx = _empty_like_layout(x, channels_last)
    if _is_empty(x.shape):
        return dx, np.zeros((N, C)), np.zeros((N, C))
    dyl = _as_layout(dy, channels_last)
    dxh, db = cpu.backward(_views(dyl, channels_last), _views(xl, channels_last),
                           np.ascontiguousarray(mean, dtype=np.float64),
                           np.ascontiguousarray(rstd, dtype=np.float64), w, b,
                           activations.code(activation), _views(dx, channels_last), channels_last)
    return dx, dxh, db
