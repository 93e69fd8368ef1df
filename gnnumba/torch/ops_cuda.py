"""GroupNorm of CUDA torch tensors on the gnnumba CUDA kernels: the CUDA half of the bridge
(``ops.py`` dispatches here for CUDA tensors and holds the layout helpers both halves share).

torch tensors go to ``gnnumba.gpu.launch`` (``__cuda_array_interface__``, which carries
torch's current stream; the kernels are enqueued on that stream, no host sync), outputs
preallocated by torch's caching allocator. bfloat16 has no type in that interface: where the
CUDA kernels take bfloat16 (``launch.BFLOAT16``, sm_80+) the tensor's bits are handed over as
a Numba array of ``ml_dtypes.bfloat16`` (zero-copy); otherwise it is upcast to float32.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import activations
from . import ops  # layout helpers shared with the CPU half (looked up at call time)

# CUDA dtypes handed to the kernels as they are (bfloat16 is upcast to float32)
_CUDA_NATIVE = (torch.float16, torch.float32, torch.float64)
_ACTIVATION_NAME = {code: name for name, code in activations.CODES.items()}


# --------------------------------------------------------------------------- CUDA
#
# gnnumba.gpu.launch takes torch CUDA tensors directly (through __cuda_array_interface__),
# NCHW or channels-last, float16/32/64, outputs preallocated, and only enqueues work on the
# stream it is given: no host synchronisation.

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
    return None if p is None else _cuda_array(p.detach().to(dtype).contiguous())


def _bf16_native(launch, x: Tensor) -> bool:
    """The CUDA kernels take bfloat16 for x's device (the simulator: always)."""
    if getattr(launch, "BFLOAT16", None) is None:
        return False
    return getattr(launch, "SIMULATOR", False) or _capability(x.device.index) >= (8, 0)


@functools.lru_cache(maxsize=None)
def _capability(index) -> tuple:
    return torch.cuda.get_device_capability(index)


def _cuda_array(t: Tensor):
    """What launch_* take for a tensor: the tensor itself (``launch.DevArray`` reads its
    address, strides and dtype, bfloat16 included, through torch's accessors). In the
    simulator (tests, CPU tensors standing in for CUDA ones) a bfloat16 tensor becomes a
    simulated array of ``ml_dtypes.bfloat16`` over its bits."""
    if t.dtype is not torch.bfloat16:
        return t
    from ..gpu import launch

    if getattr(launch, "SIMULATOR", False):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(t.view(torch.int16).numpy().view(launch.BFLOAT16))
    return t


def forward(x: Tensor, G: int, weight, bias, eps: float, act: int):
    from ..gpu import launch  # lazy: numba-cuda is an optional extra

    if x.dtype not in _CUDA_NATIVE and not _bf16_native(launch, x):
        y, mean, rstd = forward(x.float(), G, weight, bias, eps, act)
        return y.to(x.dtype), mean, rstd

    x, cl = ops.in_fast_layout(x.detach())
    y = ops.empty_like_layout(x, cl)
    if x.numel() == 0:
        return (y,) + ops._empty_stats(x, G, ops.accumulation_dtype(x))
    mean = x.new_empty((x.shape[0], G), dtype=ops.accumulation_dtype(x))
    rstd = torch.empty_like(mean)
    with _on_device(x.device), launch.workspace_allocator(_torch_allocator(x.device)):
        launch.launch_forward(_cuda_array(x), G, _cuda_param(weight, x.dtype),
                              _cuda_param(bias, x.dtype), eps, _ACTIVATION_NAME[act],
                              _cuda_array(y), mean, rstd,
                              stream=_numba_stream(x.device))
    return y, mean, rstd


def backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight, bias,
                   act: int, per_sample: bool):
    from ..gpu import launch

    if x.dtype not in _CUDA_NATIVE and not _bf16_native(launch, x):
        dx, dw, db = backward(dy.float(), x.float(), mean, rstd, weight, bias, act,
                                    per_sample)
        return dx.to(x.dtype), dw, db

    x, cl = ops.in_fast_layout(x.detach())
    dy = ops.in_layout(dy.detach().to(x.dtype), cl)
    dx = ops.empty_like_layout(x, cl)
    N, C = x.shape[0], x.shape[1]
    sdt = ops.accumulation_dtype(x)
    if x.numel() == 0:
        zeros = x.new_zeros((N, C) if per_sample else C, dtype=sdt)
        return dx, zeros, zeros.clone()
    # per-sample (N, C) sums and their (C,) sums over N in the accumulation dtype: float32
    # for half input (a float16 dweight overflows above 65504); the caller casts to the
    # parameter's dtype
    dweight_n = x.new_empty((N, C), dtype=sdt)
    dbias_n = torch.empty_like(dweight_n)
    dweight = x.new_empty(C, dtype=sdt)
    dbias = x.new_empty(C, dtype=sdt)
    with _on_device(x.device), launch.workspace_allocator(_torch_allocator(x.device)):
        launch.launch_backward(_cuda_array(dy), _cuda_array(x),
                               mean.detach().to(sdt).contiguous(),
                               rstd.detach().to(sdt).contiguous(), mean.shape[1],
                               _cuda_param(weight, x.dtype), _cuda_param(bias, x.dtype),
                               _ACTIVATION_NAME[act], _cuda_array(dx), dweight_n, dbias_n,
                               _cuda_array(dweight), _cuda_array(dbias),
                               stream=_numba_stream(x.device))
    if per_sample:
        return dx, dweight_n, dbias_n
    return dx, dweight, dbias
