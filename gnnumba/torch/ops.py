"""GroupNorm for torch tensors: the Numba kernels behind a torch.library custom op.

Reads top-down: layout and dtype helpers, the CPU implementation (zero-copy NumPy views of
torch tensors handed to ``gnnumba.cpu``), the CUDA implementation (torch tensors handed to
``gnnumba.gpu.launch`` through ``__cuda_array_interface__`` on torch's current stream), the
custom ops ``gnnumba::group_norm_fwd`` / ``gnnumba::group_norm_bwd`` with fake kernels and
autograd, and finally the public ``group_norm``.

Two routes reach the same implementation functions:

* eager (plain CPU/CUDA tensors, not under ``torch.compile``): a ``torch.autograd.Function``,
  or a direct call when no gradient is needed. The custom-op dispatcher costs about as much
  as the whole kernel at small shapes (measured ~7 us of Python per call at (1, 32, 8, 8),
  where torch's native GroupNorm takes ~5 us), so eager calls skip it.
* everything else (``torch.compile``/``torch.export`` tracing, FakeTensor, meta tensors):
  ``torch.ops.gnnumba.group_norm_fwd``, whose fake kernel and ``register_autograd`` let
  ``torch.compile(fullgraph=True)`` trace through with no graph break.

Outputs are allocated once and written in place by the kernels: on CUDA by torch (its
caching allocator), on CPU by NumPy and wrapped with torch.from_numpy (see ``_cpu_empty``). Memory layout: NCHW-contiguous and channels-last (memory order N, spatial...,
C, what ``torch.channels_last`` gives) are used as they are and the output keeps the layout;
any other strides are copied once to NCHW.

dtypes: all four run natively on CPU. NumPy has no bfloat16 and Numba's CPU target no
float16, so half tensors reach the kernels as integer views of their bits and are converted
to float32 in registers (``gnnumba.cpu._load``/``_store``): no extra pass over memory. On CUDA,
float16 runs natively (float32 accumulation) and bfloat16 is upcast to float32 (no
CUDA-array-interface type for it).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import _checks, cpu

_HALF = (torch.float16, torch.bfloat16)
_NATIVE = (torch.float32, torch.float64)
# CUDA dtypes handed to the kernels as they are (bfloat16 is upcast to float32)
_CUDA_NATIVE = (torch.float16, torch.float32, torch.float64)
_ACTIVATION = {False: None, True: "silu"}


# --------------------------------------------------------------------------- layout helpers


def _channels_last(x: Tensor) -> bool:
    """True when x is in channels-last memory order and not plain NCHW-contiguous.

    The caller has already ruled out ``x.is_contiguous()``; channels-last means that
    moving C to the end gives a contiguous tensor (any rank >= 3, so 1-D (N, L, C) and
    3-D channels_last_3d are covered too).
    """
    return x.dim() >= 3 and x.movedim(1, -1).is_contiguous()


def _in_fast_layout(x: Tensor) -> tuple[Tensor, bool]:
    """(x in a kernel layout, channels_last). Other strides are copied once to NCHW."""
    if x.is_contiguous():
        return x, False
    if _channels_last(x):
        return x, True
    return x.contiguous(), False


def _has_layout(t: Tensor, channels_last: bool) -> bool:
    return t.movedim(1, -1).is_contiguous() if channels_last else t.is_contiguous()


def _in_layout(t: Tensor, channels_last: bool) -> Tensor:
    """t (e.g. an incoming gradient) in the given layout: itself if it already is."""
    if _has_layout(t, channels_last):
        return t
    if channels_last:
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _mem_shape(shape, channels_last: bool) -> tuple:
    """Shape in memory order: (N, C, *spatial) or, channels-last, (N, *spatial, C)."""
    if channels_last:
        return (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return tuple(shape)


def _empty(x: Tensor, channels_last: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A torch-allocated tensor of x's shape, standard strides in the given layout (CUDA
    outputs, from torch's caching allocator). The fake kernels use it too; ``_cpu_empty``
    gives the same strides, so what torch.compile traces is what the kernels produce."""
    t = x.new_empty(_mem_shape(x.shape, channels_last), dtype=dtype or x.dtype)
    return t.movedim(-1, 1) if channels_last else t


# NumPy storage for each torch dtype. Half types are handed to the kernels as their bits
# (gnnumba.cpu.HALF_BITS: bfloat16 as uint16, float16 as int16), converted in registers.
_NP_STORAGE = {torch.float32: np.float32, torch.float64: np.float64,
               torch.float16: cpu.HALF_BITS["float16"], torch.bfloat16: cpu.HALF_BITS["bfloat16"]}
_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.uint16}
_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _cpu_empty(x: Tensor, channels_last: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A CPU tensor of x's shape in the given layout whose memory NumPy allocated
    (``_cpu_out`` also returns the kernels' 3-D view of it).

    Why not torch.empty: NumPy asks for transparent huge pages on large arrays and torch's
    CPU allocator does not, so a fresh torch tensor pays one page fault per 4 KiB on first
    touch. At (8, 256, 64, 64) float32, torch.empty_like + fill measured 28 ms against
    6.5 ms through NumPy: more than the normalisation itself. The tensor shares the array's
    memory (torch.from_numpy) and keeps it alive.
    """
    dtype = dtype or x.dtype
    a = cpu.empty(_mem_shape(x.shape, channels_last), _NP_STORAGE[dtype])
    if channels_last:
        nd = a.ndim
        a = a.transpose((0, nd - 1) + tuple(range(1, nd - 1)))
    t = torch.from_numpy(a)
    return t.view(dtype) if dtype in _HALF else t


def _cpu_out(x: Tensor, channels_last: bool, N: int, C: int, S: int):
    """(tensor like x in the layout, NumPy (N, C, S) / (N, S, C) view of it) for a kernel
    output in x's dtype (half types: the NumPy view holds their bits)."""
    shape = _mem_shape(x.shape, channels_last)
    a = cpu.empty(shape, _NP_STORAGE[x.dtype])
    a3 = a.reshape(N, S, C) if channels_last else a.reshape(N, C, S)
    if channels_last:
        nd = a.ndim
        a = a.transpose((0, nd - 1) + tuple(range(1, nd - 1)))
    t = torch.from_numpy(a)
    return (t.view(x.dtype) if x.dtype in _HALF else t), a3


def _cpu_cast(t: Tensor, channels_last: bool, dtype: torch.dtype) -> Tensor:
    """t converted to dtype and laid out as asked, in one pass."""
    out = _cpu_empty(t, channels_last, dtype)
    out.copy_(t)
    return out


_CL_PERM = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


def _np3(t: Tensor, channels_last: bool, N: int, C: int, S: int) -> np.ndarray:
    """NumPy (N, C, S) view of an NCHW tensor, or (N, S, C) view of a channels-last one.

    Before the reshape the array is C-contiguous (t is contiguous in that order), and NumPy
    reshapes a C-contiguous array without copying, so the kernels' writes land in ``t``.
    (NumPy's reshape is ~1 us cheaper than torch's view at small sizes.)
    """
    a = t.view(_BITS_VIEW[t.dtype]).numpy() if t.dtype in _HALF else t.numpy()
    if channels_last:
        nd = a.ndim
        a = a.transpose(_CL_PERM.get(nd) or ((0,) + tuple(range(2, nd)) + (1,)))
        return a.reshape(N, S, C)
    return a.reshape(N, C, S)


def _stats_dtype(x: Tensor) -> torch.dtype:
    """dtype of the op's mean/rstd. CPU: float64, what gnnumba.cpu computes, returned without
    a conversion (and read back as is by the backward). CUDA: float64 for float64 input,
    float32 otherwise, as in the array API."""
    if x.device.type == "cpu":
        return torch.float64
    return _cuda_stats_dtype(x.dtype)


def _cuda_stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_stats(x: Tensor, G: int, eps: float):
    """mean/rstd for an empty input (N == 0 or an empty spatial dim), as gnnumba.api and
    torch.native_group_norm give: an empty group has mean 0 and no variance (rstd NaN)."""
    sdt = _stats_dtype(x)
    mean = x.new_zeros((x.shape[0], G), dtype=sdt)
    rstd = torch.full_like(mean, float("nan"))
    return mean, rstd


# --------------------------------------------------------------------------- CPU


def _np_param(p: Optional[Tensor], C: int, default: float, dtype: np.dtype) -> np.ndarray:
    """A (C,) parameter as the CPU kernels take it: a zero-copy NumPy view in x's compute
    dtype (converted only when the parameter's dtype differs, e.g. bfloat16 weights)."""
    if p is None:
        return cpu.default_param(C, dtype, default)
    a = p.detach()
    if a.dtype != _TORCH_OF[dtype]:
        a = a.to(_TORCH_OF[dtype])
    return a.contiguous().numpy()


def _cpu_forward(x: Tensor, G: int, weight, bias, eps: float, silu: bool):
    x, cl = _in_fast_layout(x.detach())
    shape = x.shape
    N, C = shape[0], shape[1]
    numel = x.numel()
    if numel == 0:
        return (_cpu_empty(x, cl),) + _empty_stats(x, G, eps)
    S = numel // (N * C)
    y, y3 = _cpu_out(x, cl, N, C, S)
    cdt = cpu.compute_dtype(y3.dtype)
    mean, rstd = cpu.forward(_np3(x, cl, N, C, S), G, _np_param(weight, C, 1.0, cdt),
                             _np_param(bias, C, 0.0, cdt), eps, silu, y3, cl)
    return y, torch.from_numpy(mean), torch.from_numpy(rstd)


def _cpu_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight, bias,
                  silu: bool):
    x, cl = _in_fast_layout(x.detach())
    dy = dy.detach()
    if dy.dtype != x.dtype or not _has_layout(dy, cl):
        dy = _cpu_cast(dy, cl, x.dtype)
    shape = x.shape
    N, C = shape[0], shape[1]
    numel = x.numel()
    if numel == 0:
        zeros = x.new_zeros(C, dtype=torch.float64)
        return _cpu_empty(x, cl), zeros, zeros.clone()
    S = numel // (N * C)
    dx, dx3 = _cpu_out(x, cl, N, C, S)
    cdt = cpu.compute_dtype(dx3.dtype)
    dgamma_n, dbeta_n = cpu.backward(
        _np3(dy, cl, N, C, S), _np3(x, cl, N, C, S),
        np.ascontiguousarray(mean.detach().numpy(), dtype=np.float64),
        np.ascontiguousarray(rstd.detach().numpy(), dtype=np.float64),
        _np_param(weight, C, 1.0, cdt), _np_param(bias, C, 0.0, cdt), silu, dx3, cl)
    dw, db = cpu.reduce_params(dgamma_n, dbeta_n)  # sums over N in order: deterministic
    return dx, torch.from_numpy(dw), torch.from_numpy(db)


# --------------------------------------------------------------------------- CUDA
#
# gnnumba.gpu.launch takes torch CUDA tensors directly (through __cuda_array_interface__),
# NCHW or channels-last, float16/32/64, outputs preallocated, and only enqueues work on the
# stream it is given: no host synchronisation. bfloat16 has no CUDA-array-interface type,
# so it is upcast to float32.

_streams: dict = {}


def _numba_stream(device: torch.device):
    """Numba's handle on torch's current stream for ``device``, cached per stream pointer
    (creating one costs a few microseconds)."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    s = _streams.get(ptr)
    if s is None:
        from numba import cuda

        s = _streams[ptr] = cuda.external_stream(ptr)
    return s


def _on_device(device: torch.device):
    """Numba's context for the tensor's GPU; a no-op on single-GPU machines, where Numba
    and torch share the device's primary context anyway."""
    if torch.cuda.device_count() > 1:
        from numba import cuda

        return cuda.gpus[device.index if device.index is not None else 0]
    return contextlib.nullcontext()


def _torch_allocator(device: torch.device):
    """Workspaces (partials) from torch's caching allocator instead of cudaMalloc per call;
    allocated on the current stream, where the kernels run, so freeing them is safe."""

    def alloc(shape, dtype):
        return torch.empty(shape, dtype=getattr(torch, dtype.name), device=device)

    return alloc


def _cuda_param(p: Optional[Tensor], dtype: torch.dtype):
    """launch_* want parameters in x's dtype and contiguous."""
    return None if p is None else p.detach().to(dtype).contiguous()


def _cuda_forward(x: Tensor, G: int, weight, bias, eps: float, silu: bool):
    if x.dtype not in _CUDA_NATIVE:
        y, mean, rstd = _cuda_forward(x.float(), G, weight, bias, eps, silu)
        return y.to(x.dtype), mean, rstd
    from ..gpu import launch  # lazy: numba-cuda is an optional extra

    x, cl = _in_fast_layout(x.detach())
    y = _empty(x, cl)
    if x.numel() == 0:
        return (y,) + _empty_stats(x, G, eps)
    sdt = _cuda_stats_dtype(x.dtype)
    mean = x.new_empty((x.shape[0], G), dtype=sdt)
    rstd = torch.empty_like(mean)
    with _on_device(x.device), launch.workspace_allocator(_torch_allocator(x.device)):
        launch.launch_forward(x, G, _cuda_param(weight, x.dtype), _cuda_param(bias, x.dtype),
                              eps, _ACTIVATION[silu], y, mean, rstd,
                              stream=_numba_stream(x.device))
    return y, mean, rstd


def _cuda_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight, bias,
                   silu: bool):
    if x.dtype not in _CUDA_NATIVE:
        dx, dw, db = _cuda_backward(dy.float(), x.float(), mean, rstd, weight, bias, silu)
        return dx.to(x.dtype), dw, db
    from ..gpu import launch

    x, cl = _in_fast_layout(x.detach())
    dy = _in_layout(dy.detach().to(x.dtype), cl)
    dx = _empty(x, cl)
    N, C = x.shape[0], x.shape[1]
    if x.numel() == 0:
        zeros = x.new_zeros(C)
        return dx, zeros, zeros.clone()
    sdt = _cuda_stats_dtype(x.dtype)
    # per-sample (N, C) workspaces in the accumulation dtype; the (C,) sums in x's dtype
    dweight_n = x.new_empty((N, C), dtype=sdt)
    dbias_n = torch.empty_like(dweight_n)
    dweight = x.new_empty(C)
    dbias = x.new_empty(C)
    with _on_device(x.device), launch.workspace_allocator(_torch_allocator(x.device)):
        launch.launch_backward(dy, x, mean.detach().to(sdt).contiguous(),
                               rstd.detach().to(sdt).contiguous(), mean.shape[1],
                               _cuda_param(weight, x.dtype), _cuda_param(bias, x.dtype),
                               _ACTIVATION[silu], dx, dweight_n, dbias_n, dweight, dbias,
                               stream=_numba_stream(x.device))
    return dx, dweight, dbias


# --------------------------------------------------------------------------- implementation


def forward_impl(x: Tensor, G: int, weight, bias, eps: float, silu: bool):
    """(y, mean, rstd) on x's device; arguments already validated."""
    if x.is_cuda:
        return _cuda_forward(x, G, weight, bias, eps, silu)
    return _cpu_forward(x, G, weight, bias, eps, silu)


def backward_impl(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight, bias,
                  silu: bool):
    """(dx, dweight, dbias): dx in x's dtype and layout; dweight/dbias of shape (C,) (float64
    on CPU, x's dtype on CUDA), cast to the parameter dtype by the caller."""
    if x.is_cuda:
        return _cuda_backward(dy, x, mean, rstd, weight, bias, silu)
    return _cpu_backward(dy, x, mean, rstd, weight, bias, silu)


def _param_grad(g: Tensor, p: Optional[Tensor], x: Tensor) -> Tensor:
    return g.to(p.dtype if p is not None else x.dtype)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gnnumba::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, silu: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm forward: (y, mean, rstd), mean/rstd of shape (N, num_groups)."""
    return forward_impl(x, num_groups, weight, bias, eps, silu)


@group_norm_fwd.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    sdt = _stats_dtype(x)
    stats = (x.shape[0], num_groups)
    y = _empty(*_in_fast_layout(x))
    return y, x.new_empty(stats, dtype=sdt), x.new_empty(stats, dtype=sdt)


@torch.library.custom_op("gnnumba::group_norm_bwd", mutates_args=())
def group_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor,
                   weight: Optional[Tensor], bias: Optional[Tensor], silu: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm backward: (dx, dweight, dbias); dweight/dbias are returned (zeros) even
    for a missing parameter so the op has a fixed signature."""
    dx, dw, db = backward_impl(dy, x, mean, rstd, weight, bias, silu)
    return dx, _param_grad(dw, weight, x), _param_grad(db, bias, x)


@group_norm_bwd.register_fake
def _(dy, x, mean, rstd, weight, bias, silu):
    C = x.shape[1]
    return (_empty(*_in_fast_layout(x)),
            x.new_empty(C, dtype=weight.dtype if weight is not None else x.dtype),
            x.new_empty(C, dtype=bias.dtype if bias is not None else x.dtype))


def _fwd_setup_context(ctx, inputs, output):
    x, _num_groups, weight, bias, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.silu = silu


def _fwd_backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.gnnumba.group_norm_bwd(dy, x, mean, rstd, weight, bias, ctx.silu)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, None, dw if need[2] else None,
            db if need[3] else None, None, None)


group_norm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)

_DOUBLE_BACKWARD = (
    "gnnumba GroupNorm does not support double backward (second derivatives, e.g. "
    "torch.autograd.grad(..., create_graph=True) followed by another backward, as in "
    "gradient penalties); use torch.nn.GroupNorm for that part of the model"
)


def _bwd_setup_context(ctx, inputs, output):
    pass


def _bwd_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD)


group_norm_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# --------------------------------------------------------------------------- eager route


class _GroupNormFunction(torch.autograd.Function):
    """Eager autograd: the same implementation as the custom op, minus the dispatcher."""

    @staticmethod
    def forward(ctx, x, G, weight, bias, eps, silu):
        y, mean, rstd = forward_impl(x, G, weight, bias, eps, silu)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: go through the op whose own backward raises a clear error
            # rather than returning a graph-less gradient (a silently wrong 2nd derivative).
            dx, dw, db = torch.ops.gnnumba.group_norm_bwd(dy, x, mean, rstd, weight, bias,
                                                          ctx.silu)
        else:
            dx, dw, db = backward_impl(dy, x, mean, rstd, weight, bias, ctx.silu)
            dw = _param_grad(dw, weight, x)
            db = _param_grad(db, bias, x)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, None, dw if need[2] else None,
                db if need[3] else None, None, None)


def _run(x: Tensor, G: int, weight, bias, eps: float, silu: bool) -> Tensor:
    """GroupNorm of validated arguments through the cheapest correct route."""
    compiling = torch.compiler.is_compiling()
    if type(x) is torch.Tensor and (x.is_cpu or x.is_cuda) and not compiling:
        if torch.is_grad_enabled() and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        ):
            return _GroupNormFunction.apply(x, G, weight, bias, eps, silu)
        return forward_impl(x, G, weight, bias, eps, silu)[0]
    if not compiling and x.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"gnnumba runs on CPU and CUDA tensors, got a tensor on "
                         f"{x.device.type}; move it with .cpu() or use torch.nn.GroupNorm")
    return torch.ops.gnnumba.group_norm_fwd(x, G, weight, bias, eps, silu)[0]


# --------------------------------------------------------------------------- public


def _check_tensor(name: str, t, x: Tensor, C: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({C},) or None, "
                        f"got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; use a floating-point {name} "
                        f"({name}.float())")
    _checks.check_param_shape(name, tuple(t.shape), C)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}; move it "
                         f"with {name}.to(input.device)")


def check_input(input, num_channels: Optional[int] = None) -> None:
    """Type, rank and (when given) channel count of the input tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        _checks.check_ndim(tuple(input.shape), "input")
    if input.dtype not in _NATIVE and input.dtype not in _HALF:
        raise TypeError(f"input has dtype {input.dtype}, which is not supported; use "
                        f"float32, float64, float16 or bfloat16 (e.g. input.float())")
    if num_channels is not None and input.shape[1] != num_channels:
        raise _checks.GroupNormError(
            f"expected input with {num_channels} channels (shape (N, {num_channels}, ...)), "
            f"got input of shape {tuple(input.shape)}; the channel dim is dim 1"
        )


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               activation: Optional[str] = None) -> Tensor:
    """Group Normalization with the signature of ``torch.nn.functional.group_norm``.

    ``input`` has shape (N, C, *spatial); ``weight``/``bias`` shape (C,) or None;
    ``activation="silu"`` returns ``silu(group_norm(input))`` in one fused pass. CPU tensors
    run the Numba CPU kernels on zero-copy views, CUDA tensors the Numba CUDA kernels on
    torch's current stream; channels_last input gives channels_last output. float16 and
    bfloat16 are computed in float32 (see the module doc).
    Differentiable in input, weight and bias (first order; double backward raises).
    """
    check_input(input)
    C = input.shape[1]
    G = _checks.check_num_groups(num_groups, C)
    eps = _checks.check_eps(eps)
    silu = _checks.check_activation(activation) == "silu"
    if weight is not None:
        _check_tensor("weight", weight, input, C)
    if bias is not None:
        _check_tensor("bias", bias, input, C)
    return _run(input, G, weight, bias, eps, silu)
