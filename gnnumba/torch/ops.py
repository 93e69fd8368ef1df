"""GroupNorm of torch tensors on the gnnumba kernels: the host side of the bridge.

``forward_impl`` / ``backward_impl`` take validated torch tensors and return torch tensors;
everything torch-specific above them (custom ops, autograd, routes) lives in ``library.py``,
``autograd.py`` and ``functional.py``.

CPU: tensors and NumPy arrays are exchanged through DLPack in both directions, zero-copy:
inputs become NumPy views (``_to_numpy``), kernel outputs allocated by NumPy become tensors
(``_to_torch``). The exchange goes through torch's C-level exporter
(``_arrays.torch_to_dlpack``, as for torch input to the array API) and NumPy's
``__dlpack__``: the Python-level ``Tensor.__dlpack__`` / ``np.from_dlpack(tensor)`` route
measured 2.0 us per tensor against 0.7 us for this one (``Tensor.numpy()``: 0.6 us), at
1x32x8x8 and 8x256x64x64 alike, and a call hands over three to five tensors.
NumPy has no bfloat16 and Numba's CPU target no float16, so half tensors are handed over as
integer views of their bits (``gnnumba.cpu.HALF_BITS``) and converted in registers.

CUDA tensors go to ``ops_cuda.py``, the CUDA half of the bridge.

Layout: NCHW-contiguous and channels-last (memory order N, spatial..., C, what
``torch.channels_last`` gives) are used as they are and the output keeps the layout; any other
strides are copied once to NCHW. What a call needs to know about its input's layout is worked
out once per (shape, strides, dtype, G) and cached (``_plan``): a repeat call does no layout
work.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .. import _arrays, _checks, cpu
from . import ops_cuda

_HALF = (torch.float16, torch.bfloat16)

# NumPy storage for each torch dtype (half types: their bits) and the kernels' compute dtype
_NP_STORAGE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
               torch.float16: cpu.HALF_BITS["float16"], torch.bfloat16: cpu.HALF_BITS["bfloat16"]}
_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.uint16}
_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


# --------------------------------------------------------------------------- layout


def channels_last(x: Tensor) -> bool:
    """True when x is in channels-last memory order and not plain NCHW-contiguous (any rank
    >= 3: moving C to the end gives a contiguous tensor)."""
    return not x.is_contiguous() and x.dim() >= 3 and x.movedim(1, -1).is_contiguous()


def in_fast_layout(x: Tensor) -> tuple[Tensor, bool]:
    """(x in a kernel layout, channels_last). Other strides are copied once to NCHW."""
    if x.is_contiguous():
        return x, False
    if x.dim() >= 3 and x.movedim(1, -1).is_contiguous():
        return x, True
    return x.contiguous(), False


def in_layout(t: Tensor, cl: bool) -> Tensor:
    """t (e.g. an incoming gradient) in the given layout: itself if it already is."""
    if cl:
        return t if t.movedim(1, -1).is_contiguous() else \
            t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def mem_shape(shape, cl: bool) -> tuple:
    """Shape in memory order: (N, C, *spatial) or, channels-last, (N, *spatial, C)."""
    if cl:
        return (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return tuple(shape)


def empty_like_layout(x: Tensor, cl: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A torch-allocated tensor of x's shape, standard strides in the given layout (CUDA
    outputs and the fake kernels; the CPU outputs have the same strides)."""
    t = x.new_empty(mem_shape(x.shape, cl), dtype=dtype or x.dtype)
    return t.movedim(-1, 1) if cl else t


def stats_dtype(x: Tensor) -> torch.dtype:
    """dtype of the op's mean/rstd. CPU: float64, what gnnumba.cpu computes, returned without
    a conversion. CUDA: float64 for float64 input, float32 otherwise."""
    if x.device.type == "cpu":
        return torch.float64
    return accumulation_dtype(x)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (_checks.accumulation_dtype)."""
    return _TORCH_OF[_checks.accumulation_dtype(x.dtype)]


def _empty_stats(x: Tensor, G: int, sdt: torch.dtype):
    """mean/rstd for an empty input (N == 0 or an empty spatial dim), as torch gives: an empty
    group has mean 0 and no variance (rstd NaN)."""
    mean = x.new_zeros((x.shape[0], G), dtype=sdt)
    return mean, torch.full_like(mean, float("nan"))


# --------------------------------------------------------------------------- CPU plan


class _Plan(NamedTuple):
    """What a CPU call needs to know about an input of given shape, strides, dtype and G."""
    copy: bool          # odd strides: copy x once to NCHW first
    cl: bool            # channels-last memory order
    N: int
    C: int
    S: int              # spatial size (product of the spatial dims)
    storage: np.dtype   # NumPy dtype the kernels see (half types: their bits)
    compute: np.dtype   # dtype the kernels compute in (float32 for half types)
    mem_shape: tuple    # output shape in memory order
    mem3: tuple         # the kernels' 3-D view of it: (N, C, S) or (N, S, C)
    empty: bool         # no elements
    param_dtype: torch.dtype  # torch dtype of the compute dtype (parameters taken as they are)
    bits: Optional[torch.dtype]  # half types: the integer dtype their bits are viewed as
    to_logical: Optional[tuple]  # channels-last: axes from memory order to (N, C, *spatial)
    to_memory: Optional[tuple]   # and back


_PLANS: dict = {}
_MAX_PLANS = 256  # a model has a few dozen GroupNorm shapes; bounded against dynamic shapes


def _plan(x: Tensor, G: int) -> _Plan:
    key = (x.shape, x.stride(), x.dtype, G)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        contiguous = x.is_contiguous()
        cl = not contiguous and x.dim() >= 3 and x.movedim(1, -1).is_contiguous()
        shape = tuple(x.shape)
        N, C = shape[0], shape[1]
        S = 1
        for s in shape[2:]:
            S *= s
        nd = len(shape)
        storage = _NP_STORAGE[x.dtype]
        compute = cpu.compute_dtype(storage)
        plan = _PLANS[key] = _Plan(
            copy=not (contiguous or cl), cl=cl, N=N, C=C, S=S, storage=storage,
            compute=compute, mem_shape=mem_shape(shape, cl),
            mem3=(N, S, C) if cl else (N, C, S), empty=N * C * S == 0,
            param_dtype=_TORCH_OF[compute], bits=_BITS_VIEW.get(x.dtype),
            to_logical=(0, nd - 1) + tuple(range(1, nd - 1)) if cl else None,
            to_memory=(0,) + tuple(range(2, nd)) + (1,) if cl else None)
    return plan


def _to_numpy(t: Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor (no half types: NumPy has no bfloat16), through
    DLPack (``_arrays.numpy_view``)."""
    return _arrays.numpy_view(_arrays.torch_to_dlpack(t))


def _to_torch(a: np.ndarray) -> Tensor:
    """A tensor sharing a NumPy array's memory (and keeping it alive), through DLPack."""
    return torch.from_dlpack(a.__dlpack__())


def _np3(t: Tensor, p: _Plan) -> np.ndarray:
    """(N, C, S) view of an NCHW tensor, or (N, S, C) of a channels-last one, zero-copy (half
    types: their bits). The memory-order array is C-contiguous, so NumPy reshapes it without
    copying. ``t`` needs no grad."""
    a = _to_numpy(t.view(p.bits) if p.bits is not None else t)
    return (a.transpose(p.to_memory) if p.cl else a).reshape(p.mem3)


def _cpu_out(p: _Plan, dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
    """(output tensor in the plan's layout, the kernels' 3-D view of it).

    From the kernels' output pool (``cpu.empty``, reused buffers with their pages mapped)
    and handed to torch (``_to_torch``): a fresh torch tensor pays one page fault per 4 KiB
    on first touch (at 8x256x64x64 float32, torch.empty_like + fill measured 28 ms against
    6.5 ms)."""
    a = cpu.empty(p.mem_shape, p.storage)
    a3 = a.reshape(p.mem3)
    t = _to_torch(a.transpose(p.to_logical) if p.cl else a)
    return (t.view(dtype) if p.bits is not None else t), a3


# Zero-copy NumPy views of parameters, by (address, C, dtype). A view keeps its tensor's
# memory alive, so no other tensor can take that address while the entry exists: an entry
# always describes the memory it views, and in-place updates (optimizer steps) are seen.
_PARAM_VIEWS: dict = {}


def _np_param(p: Optional[Tensor], plan: _Plan, default: float) -> np.ndarray:
    """A (C,) parameter as the CPU kernels take it, in x's compute dtype: a cached zero-copy
    view, or a converted copy when the dtypes differ (e.g. bfloat16 weights)."""
    if p is None:
        return cpu.default_param(plan.C, plan.compute, default)
    if p.dtype is plan.param_dtype and p.is_contiguous():
        key = (p.data_ptr(), plan.C, plan.param_dtype)
        a = _PARAM_VIEWS.get(key)
        if a is None:
            if len(_PARAM_VIEWS) >= 1024:
                _PARAM_VIEWS.clear()
            a = _PARAM_VIEWS[key] = _to_numpy(p.detach())
        return a
    return _to_numpy(p.detach().to(plan.param_dtype).contiguous())


def _cpu_run(x: Tensor, G: int, weight, bias, eps: float, act: int):
    """The forward kernel on a CPU tensor: (y, plan, x read, its view, weight and bias as
    the kernels took them, float64 mean, rstd); for an empty input (y, plan, x) and Nones.
    A plain tuple: the tiny no-grad call pays for no more (a NamedTuple cost 0.4 us)."""
    p = _plan(x, G)
    if p.copy:
        x = x.contiguous()
        p = _plan(x, G)
    if x.requires_grad:
        x = x.detach()
    if p.empty:
        return empty_like_layout(x, p.cl), p, x, None, None, None, None, None
    y, y3 = _cpu_out(p, x.dtype)
    x3 = _np3(x, p)
    w = _np_param(weight, p, 1.0)
    b = _np_param(bias, p, 0.0)
    mean, rstd = cpu.forward(x3, G, w, b, eps, act, y3, p.cl)
    return y, p, x, x3, w, b, mean, rstd


def _cpu_forward(x: Tensor, G: int, weight, bias, eps: float, act: int,
                 stats: bool = True):
    y, _, _, x3, _, _, mean, rstd = _cpu_run(x, G, weight, bias, eps, act)
    if not stats:
        return y
    if x3 is None:  # an empty input
        return (y,) + _empty_stats(x, G, torch.float64)
    return y, _to_torch(mean), _to_torch(rstd)


def _cpu_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight, bias,
                  act: int, per_sample: bool):
    p = _plan(x, mean.shape[1])
    if p.copy:
        x = x.contiguous()
        p = _plan(x, mean.shape[1])
    x = x.detach()
    if p.empty:
        zeros = x.new_zeros((p.N, p.C) if per_sample else p.C, dtype=torch.float64)
        return empty_like_layout(x, p.cl), zeros, zeros.clone()
    saved = CpuSaved(p, x.dtype, x.stride(), _np3(x, p),
                     np.ascontiguousarray(_to_numpy(mean.detach()), dtype=np.float64),
                     np.ascontiguousarray(_to_numpy(rstd.detach()), dtype=np.float64),
                     _np_param(weight, p, 1.0), _np_param(bias, p, 0.0))
    dx, dw_n, db_n = _cpu_dx(dy, saved, act)
    if per_sample:
        return dx, _to_torch(dw_n), _to_torch(db_n)
    dw, db = cpu.reduce_params(dw_n, db_n)  # sums over N in order: deterministic
    return dx, _to_torch(dw), _to_torch(db)


# --------------------------------------------------------------------------- eager autograd
# The first-order eager backward (``autograd.EagerFunction``) reuses what its forward already
# has as NumPy: the input's view, the float64 statistics and the parameters' views. Against
# converting them again from the saved tensors (``backward_impl``), this saves 5 DLPack
# exchanges and the plan lookup, and the parameter gradients are summed straight into the
# parameters' dtype: ~10 us of ~70 us per forward+backward at 1x32x8x8.


class CpuSaved(NamedTuple):
    """What the CPU forward keeps for its backward (NumPy views of the same memory)."""
    plan: _Plan
    dtype: torch.dtype      # x's dtype
    stride: tuple           # strides of the x the kernels read (after a layout copy)
    x3: np.ndarray
    mean: np.ndarray        # float64 (N, G)
    rstd: np.ndarray
    weight: np.ndarray      # as the kernels take them (``_np_param``)
    bias: np.ndarray


def cpu_forward_saved(x: Tensor, G: int, weight, bias, eps: float,
                      act: int) -> tuple[Tensor, Optional[CpuSaved]]:
    """(y, saved) for a CPU tensor; ``saved`` is None for an empty input (the backward then
    takes ``backward_impl``'s route)."""
    y, p, x, x3, w, b, mean, rstd = _cpu_run(x, G, weight, bias, eps, act)
    if x3 is None:
        return y, None
    return y, CpuSaved(p, x.dtype, x.stride(), x3, mean, rstd, w, b)


def cpu_saved_stats(s: CpuSaved) -> tuple[Tensor, Tensor]:
    """The saved statistics as tensors (for the differentiable backward)."""
    return _to_torch(s.mean), _to_torch(s.rstd)


def _cpu_dx(dy: Tensor, s: CpuSaved, act: int):
    """(dx, float64 dweight_per_sample, dbias_per_sample): the backward kernel, dy taken in
    x's dtype and layout."""
    p = s.plan
    if dy.requires_grad:
        dy = dy.detach()
    if dy.dtype != s.dtype or dy.stride() != s.stride:
        dy = in_layout(dy.to(s.dtype), p.cl)
    dx, dx3 = _cpu_out(p, s.dtype)
    dw_n, db_n = cpu.backward(_np3(dy, p), s.x3, s.mean, s.rstd, s.weight, s.bias, act, dx3,
                              p.cl)
    return dx, dw_n, db_n


_PARAM_GRAD_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def cpu_backward_saved(dy: Tensor, s: CpuSaved, act: int, weight_dtype, bias_dtype):
    """(dx, dweight, dbias) from a ``cpu_forward_saved``; dweight/dbias in the given torch
    dtypes (None: not needed, None returned)."""
    dx, dw_n, db_n = _cpu_dx(dy, s, act)
    if weight_dtype is None and bias_dtype is None:
        return dx, None, None
    wdt, bdt = weight_dtype or bias_dtype, bias_dtype or weight_dtype
    out = _PARAM_GRAD_DTYPES.get(wdt) if wdt == bdt else None
    # float32/float64 parameters: summed in float64, rounded once into their dtype (the bits
    # of converting the float64 sums); others: the float64 sums converted by torch
    dw, db = cpu.reduce_params(dw_n, db_n, out if out is not None else np.float64)
    dw, db = _to_torch(dw), _to_torch(db)
    if out is None:
        dw, db = dw.to(wdt), db.to(bdt)
    return dx, dw if weight_dtype is not None else None, db if bias_dtype is not None else None


# --------------------------------------------------------------------------- entry points


def forward_impl(x: Tensor, G: int, weight, bias, eps: float, act: int):
    """(y, mean, rstd) on x's device; arguments already validated; ``act`` an
    ``activations`` code."""
    if x.is_cuda:
        return ops_cuda.forward(x, G, weight, bias, eps, act)
    return _cpu_forward(x, G, weight, bias, eps, act)


def forward_y(x: Tensor, G: int, weight, bias, eps: float, act: int) -> Tensor:
    """y alone: the no-grad route, which needs no statistics as tensors."""
    if x.is_cuda:
        return ops_cuda.forward(x, G, weight, bias, eps, act)[0]
    return _cpu_forward(x, G, weight, bias, eps, act, stats=False)


def backward_impl(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight, bias,
                  act: int, per_sample: bool = False):
    """(dx, dweight, dbias): dx in x's dtype and layout. dweight/dbias are the (C,) sums
    (float64 on CPU, x's dtype on CUDA) or, with ``per_sample``, the (N, C) per-sample
    gradients (float64 on CPU, the statistics' dtype on CUDA); the caller casts them."""
    if x.is_cuda:
        return ops_cuda.backward(dy, x, mean, rstd, weight, bias, act, per_sample)
    return _cpu_backward(dy, x, mean, rstd, weight, bias, act, per_sample)
