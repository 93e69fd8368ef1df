"""Host side of the CUDA kernels: array adaptation, validation, layout, allocation, launch.

The two entry points the torch bridge uses are ``launch_forward`` and ``launch_backward``:
they take caller-allocated outputs (any ``__cuda_array_interface__`` object or Numba device
array), enqueue the kernels on the given stream and return at once. Nothing here
synchronises the host: CUDA-array-interface objects are wrapped with ``sync=False`` (the
caller's stream orders the work), and only workspaces (partials) are allocated here.

Every array is seen as a flat 1-D view in one of two fast memory layouts, NCHW
("nchw": C-contiguous) or channels-last ("cl": memory order N, spatial..., C); the
kernels index those views directly (see ``kernels``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np
from numba import cuda

from .. import _checks
from . import config, kernels

DTYPES = (np.float16, np.float32, np.float64)
NCHW, CL = "nchw", "cl"

# Under NUMBA_ENABLE_CUDASIM=1 device arrays are FakeCUDAArray objects wrapping NumPy arrays
# and there is no __cuda_array_interface__.
SIMULATOR = "simulator" in cuda.device_array.__module__
if SIMULATOR:  # pragma: no cover - depends on the environment
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray


# --------------------------------------------------------------------------- arrays


is_device_array = _checks.is_cuda_array  # Numba device arrays (real or simulated), CAI objects


class DevArray:
    """Shape, dtype, element strides and layout of a CUDA array, plus flat views of it."""

    def __init__(self, obj, name):
        self.obj = obj
        self.name = name
        if SIMULATOR:
            if not isinstance(obj, FakeCUDAArray):
                raise TypeError(f"{name} must be a CUDA device array (numba.cuda.to_device), "
                                f"got {type(obj).__name__}")
            host = obj._ary
            self.host = host
            self.shape = tuple(host.shape)
            self.dtype = host.dtype
            self.strides = tuple(s // host.itemsize for s in host.strides)
            self.desc = None
        else:
            try:
                desc = obj.__cuda_array_interface__
            except AttributeError:
                raise TypeError(f"{name} must be a CUDA array (a Numba device array or an "
                                f"object with __cuda_array_interface__), got "
                                f"{type(obj).__name__}") from None
            except TypeError as e:  # torch: bfloat16 has no CUDA-array-interface typestr
                raise TypeError(_bf16_message(name, e)) from None
            self.desc = desc
            self.shape = tuple(desc["shape"])
            self.dtype = np.dtype(desc["typestr"])
            item = self.dtype.itemsize
            if desc.get("strides") is None:
                self.strides = _c_strides(self.shape)
            else:
                if any(s % item for s in desc["strides"]):
                    raise ValueError(f"{name} has strides {desc['strides']} that are not a "
                                     f"multiple of its item size {item}; pass a contiguous "
                                     f"array")
                self.strides = tuple(s // item for s in desc["strides"])
        self.size = math.prod(self.shape)
        self.layout = _layout(self.shape, self.strides)

    def flat(self):
        """1-D device array over the elements in memory order; layout must be nchw/cl."""
        if self.layout is None:
            raise ValueError(f"{self.name} is neither C-contiguous nor channels-last")
        if SIMULATOR:
            a = self.host if self.layout == NCHW else np.moveaxis(self.host, 1, -1)
            v = a.view()
            v.shape = (self.size,)  # raises instead of copying: outputs must be views
            return FakeCUDAArray(v)
        desc = dict(self.desc, shape=(self.size,), strides=None)
        desc.pop("stream", None)  # ordered by the caller's stream: no host sync
        desc.pop("mask", None)
        return cuda.from_cuda_array_interface(desc, owner=self.obj, sync=False)

    def span(self):
        """(1-D array over the whole memory span, offset of element 0) for strided_copy."""
        lo = sum(min(0, (n - 1) * s) for n, s in zip(self.shape, self.strides))
        hi = sum(max(0, (n - 1) * s) for n, s in zip(self.shape, self.strides))
        desc = dict(self.desc, shape=(hi - lo + 1,), strides=None)
        desc.pop("stream", None)
        desc.pop("mask", None)
        ptr, ro = desc["data"]
        desc["data"] = (ptr + lo * self.dtype.itemsize, ro)
        return cuda.from_cuda_array_interface(desc, owner=self.obj, sync=False), -lo


def _bf16_message(name, err):
    return (f"{name} could not be read through __cuda_array_interface__ ({err}). bfloat16 "
            f"is not supported by the Numba CUDA kernels (numba-cuda has a bfloat16 scalar "
            f"type but no bfloat16 arrays); use float16 or float32, or gnnumba.torch, which "
            f"converts bfloat16 for you")


def _c_strides(shape):
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _is_c_order(shape, strides) -> bool:
    """C-contiguous in elements, ignoring the strides of size-1 dims (as NumPy does)."""
    expected = 1
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _layout(shape, strides):
    """"nchw", "cl" (memory order N, spatial..., C) or None (any other strides)."""
    if math.prod(shape) == 0 or _is_c_order(shape, strides):
        return NCHW
    if len(shape) >= 3:
        perm = (0,) + tuple(range(2, len(shape))) + (1,)
        if _is_c_order([shape[i] for i in perm], [strides[i] for i in perm]):
            return CL
    return None


_ALLOCATOR = contextvars.ContextVar("gnnumba_gpu_allocator", default=None)


@contextlib.contextmanager
def workspace_allocator(alloc):
    """Inside this block, every device array gnnumba allocates (partials, copies of other
    strides) comes from ``alloc(shape, numpy_dtype)``, which returns a CUDA array (e.g.
    ``torch.empty(..., device="cuda")``). The torch bridge uses it so no call reaches
    cudaMalloc: torch's caching allocator hands out stream-ordered blocks, safe to free as
    soon as the kernels using them are enqueued on that stream."""
    token = _ALLOCATOR.set(alloc)
    try:
        yield
    finally:
        _ALLOCATOR.reset(token)


def device_array(shape, dtype, stream=0):
    """A C-contiguous device array from the current workspace allocator (Numba's if none)."""
    alloc = _ALLOCATOR.get()
    if alloc is None:
        return cuda.device_array(shape, dtype=dtype, stream=stream)
    a = alloc(tuple(shape) if isinstance(shape, tuple) else (shape,), np.dtype(dtype))
    if getattr(a, "__cuda_ndarray__", False):
        return a
    if SIMULATOR:  # the simulator's "device" memory is host memory (tests hand torch CPU tensors)
        return FakeCUDAArray(np.asarray(a))
    return cuda.as_cuda_array(a, sync=False)


def empty(shape, dtype, layout, stream=0):
    """Uninitialised device array of ``shape`` whose memory follows ``layout``."""
    if layout == NCHW or len(shape) < 3:
        return device_array(shape, dtype, stream)
    mem_shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    base = device_array(mem_shape, dtype, stream)
    if SIMULATOR:
        return FakeCUDAArray(np.moveaxis(base._ary, -1, 1))
    s = base.strides
    strides = (s[0], s[-1]) + tuple(s[1:-1])
    return DeviceNDArray(shape, strides, np.dtype(dtype), stream=stream, gpu_data=base.gpu_data)


def as_layout(a: DevArray, layout, stream=0) -> DevArray:
    """``a`` itself when it already has ``layout``, else a copy in ``layout`` (one kernel)."""
    if a.layout == layout:
        return a
    out = empty(a.shape, a.dtype, layout, stream)
    copy_into(a, DevArray(out, a.name), stream)
    return DevArray(out, a.name)


def copy_into(src: DevArray, dst: DevArray, stream=0):
    """dst[...] = src[...] for device arrays of equal shape and dtype, any strides."""
    if src.size == 0:
        return
    if SIMULATOR:
        np.copyto(dst.host, src.host)
        return
    ks = _kernels(src.dtype, None)
    s_flat, s_off = src.span()
    d_flat, d_off = dst.span()
    T = _threads()
    ks.strided_copy[(src.size + T - 1) // T, T, stream](
        s_flat, s_off, tuple(src.strides), d_flat, d_off, tuple(dst.strides), tuple(src.shape))


# --------------------------------------------------------------------------- launch plans


def _threads() -> int:
    T = config.THREADS
    if not (isinstance(T, int) and 1 <= T <= 1024 and T & (T - 1) == 0):
        raise ValueError(f"gnnumba.gpu.config.THREADS must be a power of two in [1, 1024], "
                         f"got {T!r}")
    return T


def _kernels(dtype, activation):
    acc = "float64" if np.dtype(dtype) == np.float64 else "float32"
    return kernels.build(_threads(), config.ITEMS, config.FUSED_ITEMS, acc,
                         activation == "silu")


def _cdiv(a, b):
    return -(-a // b)


def _pow2_at_least(n):
    return 1 << max(0, int(n - 1).bit_length())


def _row_plan(S, rows, T, min_blocks=1):
    """NCHW row kernels: (threads, columns per block, column blocks). Blocks shrink to the
    row length; ``min_blocks`` > 1 splits long rows so that small N*C still fills the GPU."""
    bt = min(T, max(32, _pow2_at_least(S))) if T >= 32 else T
    per_block = bt * config.APPLY_ITEMS
    if min_blocks > 1:
        want = min(_cdiv(min_blocks, max(rows, 1)), max(1, S // config.MIN_BLOCK_ELEMS))
        per_block = max(per_block, _cdiv(S, max(want, 1)))
    per_block = max(per_block, _cdiv(S, 65535))  # gridDim.y limit
    per_block = _cdiv(per_block, bt) * bt
    return bt, per_block, max(1, _cdiv(S, per_block))


def _tile_c(C, T):
    """Channel tile of the channels-last kernels: the power of two in
    [min(T, CL_MIN_TILE_C), T] wasting the fewest threads on C (ties: the larger)."""
    best = None
    tc = min(T, config.CL_MIN_TILE_C)
    while tc <= T:
        waste = _cdiv(C, tc) * tc - C
        if best is None or waste <= best[0]:
            best = (waste, tc)
        tc *= 2
    return best[1]


def _cl_plan(N, S, C, T, elems_per_thread, split):
    """Channels-last kernels: (TC, TS, spatial positions per block, spatial blocks)."""
    TC = _tile_c(C, T)
    TS = T // TC
    nct = _cdiv(C, TC)
    spos = TS * elems_per_thread
    if split:
        want = min(_cdiv(config.TARGET_BLOCKS, N * nct),
                   max(1, (S * min(C, TC)) // config.MIN_BLOCK_ELEMS))
        spos = max(spos, _cdiv(S, max(want, 1)))
    spos = _cdiv(spos, TS) * TS
    return TC, TS, spos, _cdiv(S, spos), nct


# --------------------------------------------------------------------------- validation


def _stream(stream):
    """0/None: the default stream; an int: a raw CUstream handle (e.g. torch's
    ``torch.cuda.current_stream().cuda_stream``); objects with ``cuda_stream``; or a Numba
    stream."""
    if stream is None or (isinstance(stream, int) and stream == 0):
        return 0
    if isinstance(stream, int):
        return cuda.external_stream(stream)
    if hasattr(stream, "cuda_stream"):
        return cuda.external_stream(stream.cuda_stream)
    return stream


def _dev(a, name):
    if a is None:
        return None
    if not is_device_array(a):
        raise TypeError(f"{name} must be a CUDA array like x (a Numba device array or an "
                        f"object with __cuda_array_interface__), got {type(a).__name__}")
    return DevArray(a, name)


def check_x(x):
    xa = _dev(x, "x")
    _checks.check_dtype(xa.dtype, DTYPES, "x")
    _checks.check_ndim(xa.shape)
    return xa


def _check_param(p, name, C, dtype):
    if p is None:
        return None
    pa = _dev(p, name)
    _checks.check_same_dtype(name, pa.dtype, dtype)
    _checks.check_param_shape(name, pa.shape, C)
    if pa.layout != NCHW:
        raise ValueError(f"{name} must be contiguous; pass a contiguous copy")
    return pa


def _check_out_like(a, name, xa, dtype=None, shape=None):
    """A caller-provided output: shape, dtype, and (for tensors) the layout of x."""
    oa = _dev(a, name)
    shape = xa.shape if shape is None else shape
    dtype = xa.dtype if dtype is None else np.dtype(dtype)
    if oa.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {oa.shape}")
    if oa.dtype != dtype:
        raise TypeError(f"{name} has dtype {oa.dtype.name}, expected {dtype.name}")
    return oa


def _check_stats(a, name, N, G, sdt, out=False):
    sa = _dev(a, name)
    if not out:
        _checks.check_dtype(sa.dtype, (np.float32, np.float64), name)
    _checks.check_stats_shape(name, sa.shape, N, G)
    if sa.dtype != sdt:
        raise TypeError(f"{name} has dtype {sa.dtype.name}; for x of dtype "
                        f"{np.dtype(sdt).name if sdt != np.float32 else 'float16/float32'} "
                        f"it must be {np.dtype(sdt).name} (cast it with .astype)")
    if sa.layout != NCHW:
        raise ValueError(f"{name} must be contiguous; pass a contiguous copy")
    return sa


def _dims(xa):
    N, C = xa.shape[:2]
    S = math.prod(xa.shape[2:])
    return N, C, S


def _acc_type(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# --------------------------------------------------------------------------- forward


def launch_forward(x, G, weight, bias, eps, activation, y, mean, rstd, stream=0):
    """Enqueue GroupNorm forward on ``stream`` and return without synchronising.

    Arguments are CUDA arrays (Numba device arrays or any ``__cuda_array_interface__``
    object, e.g. torch CUDA tensors); ``weight``/``bias`` may be None.

    - ``x``: (N, C, *spatial), float16/float32/float64, NCHW or channels-last (other
      strides are copied once to NCHW on the device).
    - ``y``: output, x's shape and dtype, in x's layout (or, for an x of other strides, C-
      contiguous). ``y`` may be ``x`` itself (in-place).
    - ``mean``, ``rstd``: outputs of shape (N, G), contiguous, float32 (float64 for float64
      x); ``rstd = 1/sqrt(biased var + eps)``; empty groups give mean 0, rstd NaN.
    - ``stream``: 0/None (default stream), a raw ``CUstream`` int (torch:
      ``torch.cuda.current_stream().cuda_stream``), a torch stream or a Numba stream.

    Only the partial-statistics workspace is allocated here (through Numba).
    """
    xa = check_x(x)
    N, C, S = _dims(xa)
    G = _checks.check_num_groups(G, C)
    eps = _checks.check_eps(eps)
    activation = _checks.check_activation(activation)
    wa = _check_param(weight, "weight", C, xa.dtype)
    ba = _check_param(bias, "bias", C, xa.dtype)
    sdt = _checks.stats_dtype(xa.dtype)
    ma = _check_stats(mean, "mean", N, G, sdt, out=True)
    ra = _check_stats(rstd, "rstd", N, G, sdt, out=True)
    ya = _check_out_like(y, "y", xa)
    st = _stream(stream)
    if xa.layout is None:
        xa = as_layout(xa, NCHW, st)
    if ya.layout != xa.layout:
        raise ValueError(f"y must have the memory layout of x ({xa.layout}); allocate it "
                         f"with the same strides (torch.empty_like(x))")
    _forward(xa, G, wa, ba, eps, activation, ya, ma, ra, st)


def _forward(xa, G, wa, ba, eps, activation, ya, ma, ra, st):
    N, C, S = _dims(xa)
    if N * C == 0:
        return
    T = _threads()
    ks = _kernels(xa.dtype, activation)
    accd = _acc_type(xa.dtype)
    mean, rstd = ma.flat(), ra.flat()
    if S == 0:  # empty groups: no variance
        ks.fill_stats[_cdiv(N * G, T), T, st](mean, rstd, accd(np.nan))
        return
    x, y = xa.flat(), ya.flat()
    w = wa.flat() if wa is not None else x  # placeholder of the same type, never read
    b = ba.flat() if ba is not None else x
    hw, hb = wa is not None, ba is not None
    Cg = C // G
    D = Cg * S
    e = accd(eps)
    if xa.layout == NCHW and D <= T * config.FUSED_ITEMS:
        ks.fwd_fused_nchw[N * G, T, st](x, D, S, Cg, G, e, w, b, hw, hb, y, mean, rstd)
        return
    if xa.layout == NCHW:
        K = config.ITEMS
        want = min(_cdiv(config.TARGET_BLOCKS, N * G), max(1, D // config.MIN_BLOCK_ELEMS))
        chunk = _cdiv(_cdiv(D, want), T * K) * T * K
        nchunks = _cdiv(D, chunk)
        pc, pm, pq = _partials(N * G, nchunks, accd, st)
        ks.fwd_stats_nchw[N * G * nchunks, T, st](x, D, chunk, nchunks, pc, pm, pq)
        ks.fwd_finalize[N * G, T, st](pc, pm, pq, e, mean, rstd)
        bt, colchunk, ncol = _row_plan(S, N * C, T)
        ks.fwd_apply_nchw[(N * C, ncol), bt, st](x, C, G, S, colchunk, mean, rstd, w, b, hw,
                                                 hb, y)
        return
    TC, TS, spos, nsb, nct = _cl_plan(N, S, C, T, config.ITEMS, split=True)
    pc, pm, pq = _partials(N * G, nsb * Cg, accd, st)
    ks.fwd_stats_cl[(N * nsb, nct), (TC, TS), st](x, S, C, G, spos, nsb, pc, pm, pq)
    ks.fwd_finalize[N * G, T, st](pc, pm, pq, e, mean, rstd)
    TC, TS, spos, nsb, nct = _cl_plan(N, S, C, T, config.APPLY_ITEMS, split=False)
    ks.fwd_apply_cl[(N * nsb, nct), (TC, TS), st](x, S, C, G, spos, nsb, mean, rstd, w, b,
                                                  hw, hb, y)


def _partials(rows, cols, accd, st):
    return (device_array((rows, cols), np.int64, st),
            device_array((rows, cols), accd, st),
            device_array((rows, cols), accd, st))


# --------------------------------------------------------------------------- backward


def launch_backward(dy, x, mean, rstd, G, weight, bias, activation, dx, dweight_n=None,
                    dbias_n=None, dweight=None, dbias=None, stream=0):
    """Enqueue GroupNorm backward on ``stream`` and return without synchronising.

    Arguments are CUDA arrays (see ``launch_forward``); ``weight``/``bias`` may be None
    (``bias`` is only read for activation="silu").

    - ``dy``: gradient of y, x's shape and dtype (any layout; copied to x's if it differs).
    - ``mean``, ``rstd``: as returned by the forward, (N, G).
    - ``dx``: output, x's shape and dtype, in x's layout.
    - ``dweight_n``, ``dbias_n``: optional outputs (N, C), contiguous, float32 (float64 for
      float64 x): the per-sample parameter gradients sum(dz * xhat) and sum(dz) (Opacus).
      Allocated internally when None.
    - ``dweight``, ``dbias``: optional outputs (C,) in x's dtype: the sums over N of the
      per-sample gradients, in order of n (deterministic, no atomics). Skipped when None.
    """
    xa = check_x(x)
    N, C, S = _dims(xa)
    G = _checks.check_num_groups(G, C)
    activation = _checks.check_activation(activation)
    dya = _dev(dy, "dy")
    _checks.check_same_dtype("dy", dya.dtype, xa.dtype)
    _checks.check_same_shape("dy", dya.shape, xa.shape)
    sdt = _checks.stats_dtype(xa.dtype)
    ma = _check_stats(mean, "mean", N, G, sdt)
    ra = _check_stats(rstd, "rstd", N, G, sdt)
    wa = _check_param(weight, "weight", C, xa.dtype)
    ba = _check_param(bias, "bias", C, xa.dtype)
    dxa = _check_out_like(dx, "dx", xa)
    accd = _acc_type(xa.dtype)
    st = _stream(stream)
    pw = (_check_out_like(dweight_n, "dweight_n", xa, accd, (N, C))
          if dweight_n is not None else DevArray(empty((N, C), accd, NCHW, st), "dweight_n"))
    pb = (_check_out_like(dbias_n, "dbias_n", xa, accd, (N, C))
          if dbias_n is not None else DevArray(empty((N, C), accd, NCHW, st), "dbias_n"))
    for a in (pw, pb):
        if a.layout != NCHW:
            raise ValueError(f"{a.name} must be contiguous")
    gw = _check_out_like(dweight, "dweight", xa, shape=(C,)) if dweight is not None else None
    gb = _check_out_like(dbias, "dbias", xa, shape=(C,)) if dbias is not None else None
    if xa.layout is None:
        xa = as_layout(xa, NCHW, st)
    dya = as_layout(dya, xa.layout, st)
    if dxa.layout != xa.layout:
        raise ValueError(f"dx must have the memory layout of x ({xa.layout}); allocate it "
                         f"with the same strides (torch.empty_like(x))")
    _backward(dya, xa, ma, ra, G, wa, ba, activation, dxa, pw, pb, gw, gb, st)


def _backward(dya, xa, ma, ra, G, wa, ba, activation, dxa, pw, pb, gw, gb, st):
    N, C, S = _dims(xa)
    T = _threads()
    ks = _kernels(xa.dtype, activation)
    accd = _acc_type(xa.dtype)
    dwn, dbn = pw.flat(), pb.flat()
    if N * C > 0:
        if S == 0:
            zeros = ks.fill_stats  # reuse: writes 0 to the first array, a value to the other
            zeros[_cdiv(N * C, T), T, st](dwn, dbn, accd(0))
        else:
            _backward_sums_dx(ks, dya, xa, ma, ra, G, wa, ba, dxa, dwn, dbn, accd, st)
    if (gw is not None or gb is not None) and C > 0:
        dwv = gw.flat() if gw is not None else None
        dbv = gb.flat() if gb is not None else None
        ks.bwd_params[_cdiv(C, T), T, st](dwn, dbn, N, C, dwv if dwv is not None else dbv,
                                          dbv if dbv is not None else dwv, gw is not None,
                                          gb is not None)


def _backward_sums_dx(ks, dya, xa, ma, ra, G, wa, ba, dxa, dwn, dbn, accd, st):
    N, C, S = _dims(xa)
    T = _threads()
    x, dy, dx = xa.flat(), dya.flat(), dxa.flat()
    mean, rstd = ma.flat(), ra.flat()
    w = wa.flat() if wa is not None else x
    b = ba.flat() if ba is not None else x
    hw, hb = wa is not None, ba is not None
    k1 = device_array(N * G, accd, st)
    k0 = device_array(N * G, accd, st)
    if xa.layout == NCHW:
        bt, colchunk, ncol = _row_plan(S, N * C, T, min_blocks=config.TARGET_BLOCKS)
        p1 = device_array((N * C, ncol), accd, st)
        p2 = device_array((N * C, ncol), accd, st)
        ks.bwd_sums_nchw[(N * C, ncol), bt, st](dy, x, C, G, S, colchunk, mean, rstd, w, b,
                                                hw, hb, p1, p2)
        ks.bwd_finalize[N * G, T, st](p1, p2, C, G, S, rstd, w, hw, dwn, dbn, k1, k0)
        bt, colchunk, ncol = _row_plan(S, N * C, T)
        ks.bwd_dx_nchw[(N * C, ncol), bt, st](dy, x, C, G, S, colchunk, mean, rstd, w, b, hw,
                                              hb, k1, k0, dx)
        return
    TC, TS, spos, nsb, nct = _cl_plan(N, S, C, T, config.ITEMS, split=True)
    p1 = device_array((N * C, nsb), accd, st)
    p2 = device_array((N * C, nsb), accd, st)
    ks.bwd_sums_cl[(N * nsb, nct), (TC, TS), st](dy, x, S, C, G, spos, nsb, mean, rstd, w, b,
                                                 hw, hb, p1, p2)
    ks.bwd_finalize[N * G, T, st](p1, p2, C, G, S, rstd, w, hw, dwn, dbn, k1, k0)
    TC, TS, spos, nsb, nct = _cl_plan(N, S, C, T, config.APPLY_ITEMS, split=False)
    ks.bwd_dx_cl[(N * nsb, nct), (TC, TS), st](dy, x, S, C, G, spos, nsb, mean, rstd, w, b,
                                               hw, hb, k1, k0, dx)
