"""GroupNorm on CUDA arrays with Numba ``@cuda.jit`` kernels.

``gnnumba.group_norm*`` dispatch here for CUDA arrays (Numba device arrays, including the
simulator's, and any ``__cuda_array_interface__`` object); results are Numba device arrays.
The torch bridge calls the allocation-free ``launch_forward`` / ``launch_backward`` /
``launch_per_sample_param_grads`` directly, with torch-allocated outputs on torch's current
stream.

Files: ``kernels.py`` (the kernels, top-down), ``launch.py`` (validation, layouts, launch
configuration), ``config.py`` (tunables), ``selftest.py`` (``gnnumba check``).
"""

from __future__ import annotations


from .. import _checks
from . import launch
from .launch import (CL, NCHW, DevArray, is_device_array, launch_backward, launch_forward,
                     launch_per_sample_param_grads)

__all__ = ["group_norm_forward", "group_norm_backward", "per_sample_param_grads",
           "launch_forward", "launch_backward", "launch_per_sample_param_grads",
           "is_device_array"]


def group_norm_forward(x, G, weight, bias, eps, *, activation=None, out=None):
    """``(y, mean, rstd)`` for a CUDA array ``x``; ``G``, ``eps`` and ``activation`` have
    been validated by ``gnnumba.api``. ``y`` keeps x's layout (NCHW or channels-last; other
    strides give NCHW) unless ``out`` (x's shape and dtype, any layout, x itself for
    in-place) is given."""
    xa = launch.check_x(x)
    N, C = xa.shape[:2]
    if xa.layout is None:
        xa = launch.as_layout(xa, NCHW)
    sdt = _checks.accumulation_dtype(xa.dtype)
    mean = launch.empty((N, G), sdt, NCHW)
    rstd = launch.empty((N, G), sdt, NCHW)
    if out is None:
        y = launch.empty(xa.shape, xa.dtype, xa.layout)
        target = y
    else:
        y = out
        oa = launch._check_out_like(out, "out", xa)
        target = out if oa.layout == xa.layout else launch.empty(xa.shape, xa.dtype,
                                                                 xa.layout)
    launch_forward(xa.obj, G, weight, bias, eps, activation, target, mean, rstd)
    if target is not y:
        launch.copy_into(DevArray(target, "y"), DevArray(y, "out"))
    return y, mean, rstd


def group_norm_backward(dy, x, mean, rstd, G, weight, bias, *, activation=None):
    """``(dx, dweight, dbias)`` for CUDA arrays; ``dweight``/``dbias`` are None when the
    matching parameter is None, else in x's dtype. ``dx`` keeps x's layout."""
    activation = _checks.check_activation(activation)
    xa = _x_in_fast_layout(x)
    N, C = xa.shape[:2]
    dx = launch.empty(xa.shape, xa.dtype, xa.layout)
    dw = launch.empty((C,), xa.dtype, NCHW) if weight is not None else None
    db = launch.empty((C,), xa.dtype, NCHW) if bias is not None else None
    launch_backward(dy, xa.obj, mean, rstd, G, weight, bias, activation, dx, dweight=dw,
                    dbias=db)
    return dx, dw, db


def per_sample_param_grads(dy, x, mean, rstd, G, weight=None, bias=None, *, activation=None):
    """``(dweight_per_sample, dbias_per_sample)`` for CUDA arrays, both (N, C), float32
    (float64 for float64 x): the gradients of weight and bias for each sample on its own
    (``sum dz * xhat`` and ``sum dz`` over the sample's positions of each channel). One
    launch (NCHW groups that fit one block) or two, reading x and dy once; no dx is
    formed."""
    activation = _checks.check_activation(activation)
    xa = _x_in_fast_layout(x)
    N, C = xa.shape[:2]
    acc = _checks.accumulation_dtype(xa.dtype)
    dwn = launch.empty((N, C), acc, NCHW)
    dbn = launch.empty((N, C), acc, NCHW)
    launch_per_sample_param_grads(dy, xa.obj, mean, rstd, G, weight, bias, activation, dwn,
                                  dbn)
    return dwn, dbn


def _x_in_fast_layout(x):
    xa = launch.check_x(x)
    return launch.as_layout(xa, NCHW) if xa.layout is None else xa
