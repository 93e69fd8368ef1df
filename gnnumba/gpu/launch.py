"""Host side of the CUDA kernels: array adaptation, validation, layout, allocation, launch.

The entry points the torch bridge uses are ``launch_forward``, ``launch_backward`` and
``launch_per_sample_param_grads``: they take caller-allocated outputs (any
``__cuda_array_interface__`` object or Numba device array), enqueue the kernels on the
given stream and return at once. Nothing here synchronises the host: CUDA-array-interface
objects are wrapped with ``sync=False`` (the caller's stream orders the work), and only
workspaces (partials) are allocated here, from the caller's allocator when one is given
(``workspace_allocator``), so a call can be captured in a CUDA graph.

Host cost per call: the launch geometry of a (shape, G, layout, SM count, configuration) is
computed once (``forward_plan`` / ``backward_plan``, cached), and each kernel's configured
launcher once per (grid, block, stream) (``_launch``).

Every array is seen as a flat 1-D view in one of two fast memory layouts, NCHW
("nchw": C-contiguous) or channels-last ("cl": memory order N, spatial..., C); the
kernels index those views directly (see ``kernels``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import math
import warnings
from typing import NamedTuple

import numpy as np
from numba import cuda
from numba.core.errors import NumbaPerformanceWarning

from .. import _checks, activations
from . import config, kernels

try:  # numba-cuda types arrays of ml_dtypes.bfloat16 as __nv_bfloat16 (sm_80+)
    from ml_dtypes import bfloat16 as BFLOAT16
except ImportError:  # pragma: no cover - ml_dtypes comes with numba-cuda's dependencies
    BFLOAT16 = None

DTYPES = (np.float16, np.float32, np.float64) + ((BFLOAT16,) if BFLOAT16 is not None else ())
NCHW, CL = "nchw", "cl"

# Under NUMBA_ENABLE_CUDASIM=1 device arrays are FakeCUDAArray objects wrapping NumPy arrays
# and there is no __cuda_array_interface__.
SIMULATOR = "simulator" in cuda.device_array.__module__
if SIMULATOR:  # pragma: no cover - depends on the environment
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
else:
    # numba-cuda's own dependencies: the driver bindings and cuda.core's launcher (the
    # direct launch below uses them on every call, so they are bound once here)
    from cuda.bindings import driver as _drv
    from cuda.core import LaunchConfig, launch as _core_launch
    from numba.cuda.cudadrv.devicearray import DeviceNDArray


# --------------------------------------------------------------------------- arrays


is_device_array = _checks.is_cuda_array  # Numba device arrays (real or simulated), CAI objects


class Flat(NamedTuple):
    """A 1-D C-contiguous device array by address, the form every array argument of a kernel
    takes on a GPU: building a Numba device array per argument and call cost ~12 us, and
    Numba's per-launch argument marshalling as much again (see ``_launch``)."""

    ptr: int
    size: int
    dtype: np.dtype


# torch tensors are read through their own accessors (a few hundred ns) rather than their
# __cuda_array_interface__ property (~9 us, and no bfloat16 before torch 2.11)
_TORCH_DTYPES = {"torch.float16": np.dtype(np.float16), "torch.float32": np.dtype(np.float32),
                 "torch.float64": np.dtype(np.float64)}
if BFLOAT16 is not None:
    _TORCH_DTYPES["torch.bfloat16"] = np.dtype(BFLOAT16)


class DevArray:
    """Shape, dtype, element strides, layout and address of a CUDA array, plus flat views
    of it."""

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
        elif getattr(obj, "is_cuda", None) is True and str(obj.dtype) in _TORCH_DTYPES:
            self.shape = tuple(obj.shape)
            self.dtype = _TORCH_DTYPES[str(obj.dtype)]
            self.strides = tuple(obj.stride())
            self.ptr = obj.data_ptr()
        else:
            try:
                desc = obj.__cuda_array_interface__
            except AttributeError:
                raise TypeError(f"{name} must be a CUDA array (a Numba device array or an "
                                f"object with __cuda_array_interface__), got "
                                f"{type(obj).__name__}") from None
            except TypeError as e:  # torch before 2.11: no interface typestr for bfloat16
                raise TypeError(_bf16_message(name, e)) from None
            self.shape = tuple(desc["shape"])
            self.ptr = desc["data"][0]
            # A Numba device array knows its dtype; the interface's typestr does not say
            # bfloat16 (ml_dtypes' is "<V2", a void type)
            numba_array = isinstance(obj, DeviceNDArray)
            self.dtype = obj.dtype if numba_array else np.dtype(desc["typestr"])
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
        """1-D view over the elements in memory order (``Flat``; a simulated device array
        in the simulator); layout must be nchw/cl."""
        if self.layout is None:
            raise ValueError(f"{self.name} is neither C-contiguous nor channels-last")
        if SIMULATOR:
            a = self.host if self.layout == NCHW else np.moveaxis(self.host, 1, -1)
            v = a.view()
            v.shape = (self.size,)  # raises instead of copying: outputs must be views
            return FakeCUDAArray(v)
        return Flat(self.ptr, self.size, self.dtype)

    def span(self):
        """(1-D view over the whole memory span, offset of element 0) for strided_copy."""
        lo = sum(min(0, (n - 1) * s) for n, s in zip(self.shape, self.strides))
        hi = sum(max(0, (n - 1) * s) for n, s in zip(self.shape, self.strides))
        return Flat(self.ptr + lo * self.dtype.itemsize, hi - lo + 1, self.dtype), -lo


def _bf16_message(name, err):
    return (f"{name} could not be read through __cuda_array_interface__ ({err}): the "
            f"interface has no bfloat16 type. The kernels take bfloat16 as Numba device "
            f"arrays of ml_dtypes.bfloat16 (sm_80+); pass one of those, or use "
            f"gnnumba.torch, which hands torch bfloat16 tensors over itself")


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
    """A C-contiguous device array from the current workspace allocator (Numba's if none):
    whatever CUDA array the allocator returns (``DevArray`` reads it)."""
    alloc = _ALLOCATOR.get()
    if alloc is None:
        return cuda.device_array(shape, dtype=dtype, stream=stream)
    a = alloc(tuple(shape) if isinstance(shape, tuple) else (shape,), np.dtype(dtype))
    if SIMULATOR and not getattr(a, "__cuda_ndarray__", False):
        return FakeCUDAArray(np.asarray(a))  # simulated device memory is host memory
    return a


def _workspace(n, dtype, stream):
    """(owner, flat view) of a new 1-D workspace; the owner keeps it alive while the
    kernels that use it are enqueued."""
    a = device_array(n, dtype, stream)
    return a, DevArray(a, "workspace").flat()


def empty(shape, dtype, layout, stream=0):
    """Uninitialised device array of ``shape`` whose memory follows ``layout``."""
    if layout == NCHW or len(shape) < 3:
        return device_array(shape, dtype, stream)
    mem_shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    base = device_array(mem_shape, dtype, stream)
    if SIMULATOR:
        return FakeCUDAArray(np.moveaxis(base._ary, -1, 1))
    if not isinstance(base, DeviceNDArray):  # an allocator's array (rare: odd-stride copies)
        base = cuda.as_cuda_array(base, sync=False)
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
    _launch(ks, "strided_copy", (src.size + T - 1) // T, T, stream,
            s_flat, s_off, tuple(src.strides), d_flat, d_off, tuple(dst.strides),
            tuple(src.shape))


# --------------------------------------------------------------------------- launch plans
#
# A plan is the list of kernel launches (name, grid, block, workspace sizes, scalars) for
# one (kind, N, C, S, G, layout, dtype, activation, device SM count, configuration); it is
# computed once and cached, so a repeated call does no geometry arithmetic.


def _threads() -> int:
    T = config.THREADS
    if not (isinstance(T, int) and 32 <= T <= 1024 and T & (T - 1) == 0):
        raise ValueError(f"gnnumba.gpu.config.THREADS must be a power of two in [32, 1024], "
                         f"got {T!r}")
    return T


def _config_key():
    """Every tunable, so that plans and kernels follow changes to ``config`` (tests)."""
    return (_threads(), config.ITEMS, config.FUSED_ITEMS, config.FLUSH, config.BLOCKS_PER_SM,
            config.MIN_BLOCK_ELEMS, config.APPLY_ITEMS, config.CL_MIN_TILE_C)


def items(dtype) -> int:
    """Values per thread per tile: config.ITEMS, doubled for 2-byte types so that a thread
    has as many bytes in flight (16 with the default 4) for float16/bfloat16 as for
    float32."""
    return config.ITEMS * (2 if np.dtype(dtype).itemsize == 2 else 1)


_KERNEL_SETS: dict = {}


def _kernels(dtype, activation):
    """The compiled kernel set for x's dtype and the activation (memoised: resolving it
    cost ~5 us of dtype and config arithmetic per call)."""
    key = (dtype, activation, _config_key())
    ks = _KERNEL_SETS.get(key)
    if ks is None:
        acc = _checks.accumulation_dtype(dtype).name
        ks = _KERNEL_SETS[key] = kernels.build(_threads(), items(dtype), config.FUSED_ITEMS,
                                               config.FLUSH, acc, activations.code(activation))
    return ks


_DEVICES: dict = {}  # device ordinal -> (SM count, compute capability)


def _device_info():
    """(SM count, compute capability) of the current device, cached per device: asking
    Numba for the current device costs ~4 us per call, the driver for its ordinal ~0.3."""
    err, dev = _drv.cuCtxGetDevice()
    key = int(dev) if err == _drv.CUresult.CUDA_SUCCESS else None
    info = _DEVICES.get(key)
    if info is None:
        d = cuda.get_current_device()  # makes a context current where none is
        info = (int(d.MULTIPROCESSOR_COUNT), tuple(d.compute_capability))
        if key is not None:
            _DEVICES[key] = info
    return info


def sm_count() -> int:
    """Streaming multiprocessors of the current device (cached per device);
    ``config.FALLBACK_SM_COUNT`` in the simulator."""
    if SIMULATOR:
        return config.FALLBACK_SM_COUNT
    return _device_info()[0]


def _cdiv(a, b):
    return -(-a // b)


def _pow2_at_least(n):
    return 1 << max(0, int(n - 1).bit_length())


def _row_plan(S, rows, T, K, target_blocks=1):
    """NCHW row kernels: (threads, columns per block, column blocks). Blocks shrink to the
    row length; ``target_blocks`` > rows splits long rows so that small N*C still fills the
    GPU (never below MIN_BLOCK_ELEMS columns per block)."""
    bt = min(T, max(32, _pow2_at_least(S))) if T >= 32 else T
    per_block = bt * config.APPLY_ITEMS
    if target_blocks > rows:
        want = min(_cdiv(target_blocks, max(rows, 1)), max(1, S // config.MIN_BLOCK_ELEMS))
        per_block = max(per_block, _cdiv(S, max(want, 1)))
    per_block = max(per_block, _cdiv(S, 65535))  # gridDim.y limit
    tile = bt * K
    per_block = _cdiv(per_block, tile) * tile  # whole register tiles per block
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


def _cl_plan(N, S, C, T, K, elems_per_thread, target_blocks=0):
    """Channels-last kernels: (TC, TS, spatial positions per block, spatial blocks, channel
    tiles)."""
    TC = _tile_c(C, T)
    TS = T // TC
    nct = _cdiv(C, TC)
    spos = TS * elems_per_thread
    if target_blocks:
        want = min(_cdiv(target_blocks, N * nct),
                   max(1, (S * min(C, TC)) // config.MIN_BLOCK_ELEMS))
        spos = max(spos, _cdiv(S, max(want, 1)))
    spos = _cdiv(spos, TS * K) * TS * K
    return TC, TS, spos, _cdiv(S, spos), nct


def _rows_per_block(Cg, S, bt, ncol):
    """Whole rows of one group per apply block: the most that divides Cg and fits the
    block's APPLY_ITEMS per thread (1 when rows are split into column chunks). Each apply
    block merges its group's partials first; with one short row per block that merge was
    most of the kernel."""
    if ncol > 1:
        return 1
    limit = max(1, bt * config.APPLY_ITEMS // max(S, 1))
    return max(r for r in range(1, min(Cg, limit) + 1) if Cg % r == 0)


def _tiles_per_group(C, G, TC):
    """The most channel tiles of width TC that one group of C/G channels spans."""
    Cg = C // G
    return max(((g + 1) * Cg - 1) // TC - (g * Cg) // TC + 1 for g in range(G))


@functools.lru_cache(maxsize=4096)
def forward_plan(N, C, S, G, layout, sms, cfg, K):
    """Launches of the forward: ``[(kernel, grid, block, extra)]`` and the partials' size;
    K values per thread per tile (``items``)."""
    T = cfg[0]
    Cg = C // G
    D = Cg * S
    target = config.BLOCKS_PER_SM * sms
    if layout == NCHW and D <= T * config.FUSED_ITEMS:
        return [("fwd_fused_nchw", N * G, T, (D, S, Cg, G))], 0
    if layout == NCHW:
        want = min(_cdiv(target, N * G), max(1, D // config.MIN_BLOCK_ELEMS))
        chunk = _cdiv(_cdiv(D, want), T * K) * T * K
        nchunks = _cdiv(D, chunk)
        bt, colchunk, ncol = _row_plan(S, N * C, T, K)
        R = _rows_per_block(Cg, S, bt, ncol)
        return [("fwd_stats_nchw", N * G * nchunks, T, (D, chunk, nchunks)),
                ("fwd_apply_nchw", (N * C // R, ncol), bt, (nchunks, D, C, G, S, colchunk, R))], \
            N * G * nchunks * 3
    TC, TS, spos, nsb, nct = _cl_plan(N, S, C, T, K, K, target)
    tpg = _tiles_per_group(C, G, TC)
    # Every apply block merges the nsb*tpg partials of each group of its tile first, so it
    # gets at least as many positions as a statistics block (the tile is the same: _tile_c
    # depends on C and T only): the merge is amortised over as many elements.
    _, _, sposa, _, _ = _cl_plan(N, S, C, T, K, config.APPLY_ITEMS)
    sposa = max(sposa, spos)
    nsba = _cdiv(S, sposa)
    return [("fwd_stats_cl", (N * nsb, nct), (TC, TS), (S, C, G, spos, nsb, tpg)),
            ("fwd_apply_cl", (N * nsba, nct), (TC, TS), (S, C, G, sposa, nsba, nsb, tpg))], \
        N * G * nsb * tpg * 3


@functools.lru_cache(maxsize=4096)
def backward_plan(N, C, S, G, layout, sms, cfg, K, on_chip=True):
    """Launches of the backward and the partials' size. NCHW groups of at most
    THREADS*FUSED_ITEMS elements (``on_chip``: float32 accumulation): ``bwd_fused_nchw``
    (sums, per-sample gradients and dx, one block per group) then ``bwd_params`` (the sums
    over n; skipped for the per-sample gradients); otherwise sums, finalize, dx (the
    per-sample gradients take the first two)."""
    T = cfg[0]
    target = config.BLOCKS_PER_SM * sms
    Cg = C // G
    if layout == NCHW and on_chip and Cg * S <= T * config.FUSED_ITEMS:
        teams = 1  # teams of at least 32 lanes (8 for the simulator's small blocks) per channel
        while teams * 2 <= Cg and T // (teams * 2) >= min(32, T // 4):
            teams *= 2
        return [("bwd_fused_nchw", N * G, T, (Cg * S, S, Cg, G, T // teams)),
                ("bwd_params", _cdiv(C, T), T, (N, C))], 0
    if layout == NCHW:
        bt, colchunk, ncol = _row_plan(S, N * C, T, K, target)
        bta, colchunka, ncola = _row_plan(S, N * C, T, K)
        return [("bwd_sums_nchw", (N * C, ncol), bt, (C, G, S, colchunk)),
                ("bwd_finalize", N * G, T, (ncol, C, G, S)),
                ("bwd_dx_nchw", (N * C, ncola), bta, (N, C, G, S, colchunka))], N * C * ncol * 2
    TC, TS, spos, nsb, nct = _cl_plan(N, S, C, T, K, K, target)
    TCa, TSa, sposa, nsba, ncta = _cl_plan(N, S, C, T, K, config.APPLY_ITEMS)
    return [("bwd_sums_cl", (N * nsb, nct), (TC, TS), (S, C, G, spos, nsb)),
            ("bwd_finalize", N * G, T, (nsb, C, G, S)),
            ("bwd_dx_cl", (N * nsba, ncta), (TCa, TSa), (N, S, C, G, sposa, nsba))], \
        N * C * nsb * 2


_CONFIGURED: dict = {}


def _launch(ks, name, grid, block, stream, *args):
    """The one place kernels are enqueued (tests count launches here).

    On a GPU, array arguments are ``Flat`` views and the launch bypasses Numba's dispatcher:
    the kernel is compiled (or loaded) once per (kernel, grid, block, stream, argument
    types), and each call packs the arguments exactly as Numba's ``_Kernel._prepare_args``
    does (an array is meminfo, parent, size, itemsize, data, shape, strides) and enqueues
    with ``cuda.core.launch``. Numba's own path typed and marshalled every argument (~3.5 us
    each) and warned about grids of < 128 blocks on every call. Anything else (a Numba device
    array) goes through Numba's configured launcher."""
    kernel = getattr(ks, name)
    if SIMULATOR:  # the simulator's kernel[...] mutates the kernel: nothing to cache
        kernel[grid, block, stream](*args)
        return
    kinds = tuple(a.dtype if type(a) is Flat else len(a) if type(a) is tuple else type(a)
                  for a in args)
    key = (id(kernel), grid, block, id(stream) if not isinstance(stream, int) else stream,
           kinds)
    entry = _CONFIGURED.get(key)
    if entry is None:
        if len(_CONFIGURED) > 4096:
            _CONFIGURED.clear()
        entry = _CONFIGURED[key] = _configure(kernel, grid, block, stream, args)
    entry(args)


class _Direct:
    """A compiled kernel bound to its launch configuration, launched with packed args."""

    def __init__(self, compiled, config, stream, packers, keep):
        self.compiled, self.config, self.stream = compiled, config, stream
        self.packers, self.keep = packers, keep
        self.functions = {}  # context handle -> loaded kernel

    def __call__(self, args):
        params = []
        for pack, a in zip(self.packers, args):
            pack(params, a)
        _core_launch(self.stream, self.config, self._function(), *params)

    def _function(self):
        """The kernel loaded in the current context (Numba's lookup cost ~5 us; the
        driver's current context ~0.5)."""
        ctx = int(_drv.cuCtxGetCurrent()[1])
        f = self.functions.get(ctx)
        if f is None:
            f = self.functions[ctx] = self.compiled._codelibrary.get_cufunc().kernel
        return f


class _ViaNumba:
    """Numba's configured launcher (built once: its grid-size warning is silenced)."""

    def __init__(self, kernel, grid, block, stream):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaPerformanceWarning)
            self.launcher = kernel[grid, block, stream]
        self.stream = stream  # kept alive: the cache key holds its id

    def __call__(self, args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaPerformanceWarning)
            self.launcher(*args)


def _configure(kernel, grid, block, stream, args):
    packers, argtypes = [], []
    for a in args:
        packer, ty = _packer(a)
        if packer is None or not hasattr(kernel, "compile"):
            return _ViaNumba(kernel, grid, block, stream)
        packers.append(packer)
        argtypes.append(ty)
    from numba.cuda.cudadrv.driver import _to_core_stream

    compiled = kernel.compile(tuple(argtypes))
    return _Direct(compiled, LaunchConfig(grid=grid, block=block), _to_core_stream(stream),
                   packers, stream)


def _pack_flat(params, a):
    item = a.dtype.itemsize
    params += (0, 0, a.size, item, a.ptr, a.size, item)  # meminfo, parent, ..., shape, strides


def _packer(a):
    """(packer, Numba type) for one kernel argument, or (None, None) if not handled here."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support

    t = type(a)
    if t is Flat:
        return _pack_flat, types.Array(numpy_support.from_dtype(a.dtype), 1, "C")
    if t is bool or t is np.bool_:
        return (lambda params, v: params.append(bool(v))), types.boolean
    if t is int or t is np.int64:
        return (lambda params, v: params.append(ctypes.c_int64(v))), types.int64
    if t is np.float32:
        return (lambda params, v: params.append(ctypes.c_float(v))), types.float32
    if t is float or t is np.float64:
        return (lambda params, v: params.append(ctypes.c_double(v))), types.float64
    if t is tuple and all(type(v) is int for v in a):
        def pack(params, v):
            params += [ctypes.c_int64(i) for i in v]
        return pack, types.UniTuple(types.int64, len(a))
    return None, None



# --------------------------------------------------------------------------- validation


def _stream(stream):
    """0/None: the default stream; an int: a raw CUstream handle (e.g. torch's
    ``torch.cuda.current_stream().cuda_stream``); objects with ``cuda_stream``; or a Numba
    stream."""
    if stream is None or (isinstance(stream, int) and stream == 0):
        return 0
    if isinstance(stream, int):
        return _external_stream(stream)
    if hasattr(stream, "cuda_stream"):
        return _external_stream(stream.cuda_stream)
    return stream


@functools.lru_cache(maxsize=256)
def _external_stream(handle: int):
    """One Numba stream object per raw handle: creating one costs microseconds, and the
    launchers cached by ``_launch`` are keyed by the stream object."""
    return cuda.external_stream(handle)


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
    if BFLOAT16 is not None and xa.dtype == BFLOAT16 and not SIMULATOR:
        cc = _device_info()[1]
        if cc < (8, 0):
            raise TypeError(f"bfloat16 needs a GPU of compute capability 8.0 or newer, this "
                            f"one is {cc[0]}.{cc[1]}; cast x to float32 (x.astype(np.float32))")
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
    return _checks.accumulation_dtype(dtype).type


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
    - ``activation``: None, "silu", "relu" or "gelu" (``gnnumba.activations``).
    - ``stream``: 0/None (default stream), a raw ``CUstream`` int (torch:
      ``torch.cuda.current_stream().cuda_stream``), a torch stream or a Numba stream.

    One launch (NCHW groups that fit one block's registers) or two (statistics, then apply
    with the partials' merge in its prologue), in both layouts. Only the partial-statistics workspace is
    allocated here (``workspace_allocator``).
    """
    xa = check_x(x)
    N, C, S = _dims(xa)
    G = _checks.check_num_groups(G, C)
    eps = _checks.check_eps(eps)
    activation = _checks.check_activation(activation)
    wa = _check_param(weight, "weight", C, xa.dtype)
    ba = _check_param(bias, "bias", C, xa.dtype)
    sdt = _checks.accumulation_dtype(xa.dtype)
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
    ks = _kernels(xa.dtype, activation)
    accd = _acc_type(xa.dtype)
    mean, rstd = ma.flat(), ra.flat()
    if S == 0:  # empty groups: no variance
        T = _threads()
        _launch(ks, "fill_stats", _cdiv(N * G, T), T, st, mean, rstd, accd(np.nan))
        return
    x, y = xa.flat(), ya.flat()
    w = wa.flat() if wa is not None else x  # placeholder of the same type, never read
    b = ba.flat() if ba is not None else x
    hw, hb = wa is not None, ba is not None
    e = accd(eps)
    steps, nparts = forward_plan(N, C, S, G, xa.layout, sm_count(), _config_key(),
                                 items(xa.dtype))
    owner, part = _workspace(nparts, accd, st) if nparts else (None, None)
    # the group's shift (its first element, in the accumulation type), from the statistics
    # kernel to the apply: x itself may be overwritten by then (in place)
    shift_owner, shift = _workspace(N * G, accd, st) if nparts else (None, None)
    for name, grid, block, dims in steps:
        if name == "fwd_fused_nchw":
            args = (x, *dims, e, w, b, hw, hb, y, mean, rstd)
        elif name.startswith("fwd_stats"):
            args = (x, *dims, part, shift)
        else:  # fwd_apply_*: merges the partials itself
            args = (x, part, shift, *dims, e, mean, rstd, w, b, hw, hb, y)
        _launch(ks, name, grid, block, st, *args)


# --------------------------------------------------------------------------- backward


def launch_backward(dy, x, mean, rstd, G, weight, bias, activation, dx, dweight_n=None,
                    dbias_n=None, dweight=None, dbias=None, stream=0):
    """Enqueue GroupNorm backward on ``stream`` and return without synchronising: NCHW
    groups that fit one block (float16/bfloat16/float32): one launch that reads x and dy
    once and writes dx and the per-sample gradients, plus one for dweight/dbias; otherwise
    three (sums, per-group merge, dx with the parameter sums).

    Arguments are CUDA arrays (see ``launch_forward``); ``weight``/``bias`` may be None
    (``bias`` is only read for an activation).

    - ``dy``: gradient of y, x's shape and dtype (any layout; copied to x's if it differs).
    - ``mean``, ``rstd``: as returned by the forward, (N, G).
    - ``dx``: output, x's shape and dtype, in x's layout.
    - ``dweight_n``, ``dbias_n``: optional outputs (N, C), contiguous, float32 (float64 for
      float64 x): the per-sample parameter gradients ``dweight_per_sample`` and
      ``dbias_per_sample``. Allocated internally when None.
    - ``dweight``, ``dbias``: optional outputs (C,), in x's dtype or in the accumulation
      dtype (float32 for half x: the sum over n of float32 per-sample gradients is never
      rounded to half, so a large gradient does not overflow before the caller casts it to
      the parameters' dtype). Sums in order of n (deterministic, no atomics). Skipped when
      None.
    """
    xa, dya, ma, ra, wa, ba, pw, pb, st = _check_backward(
        dy, x, mean, rstd, G, weight, bias, activation, dweight_n, dbias_n, stream)
    G = ma.shape[1]
    dxa = _check_out_like(dx, "dx", xa)
    if dxa.layout != xa.layout:
        raise ValueError(f"dx must have the memory layout of x ({xa.layout}); allocate it "
                         f"with the same strides (torch.empty_like(x))")
    C = xa.shape[1]
    out_dtypes = (xa.dtype, np.dtype(_acc_type(xa.dtype)))
    gw = _check_param_grad(dweight, "dweight", C, out_dtypes)
    gb = _check_param_grad(dbias, "dbias", C, out_dtypes)
    if gw is not None and gb is not None and gw.dtype != gb.dtype:
        raise TypeError(f"dweight ({gw.dtype.name}) and dbias ({gb.dtype.name}) must have the "
                        f"same dtype")
    _backward(dya, xa, ma, ra, G, wa, ba, activation, dxa, pw, pb, gw, gb, st)


def launch_per_sample_param_grads(dy, x, mean, rstd, G, weight, bias, activation,
                                  dweight_per_sample, dbias_per_sample, stream=0):
    """Enqueue the per-sample parameter gradients on ``stream``: one launch (NCHW groups that
    fit one block) or two (sums, per-group merge) that read x and dy once and write no dx. ``dweight_per_sample`` and
    ``dbias_per_sample`` are (N, C) outputs, contiguous, float32 (float64 for float64 x);
    their sums over n are ``launch_backward``'s dweight/dbias. Other arguments as
    ``launch_backward``."""
    xa, dya, ma, ra, wa, ba, pw, pb, st = _check_backward(
        dy, x, mean, rstd, G, weight, bias, activation, dweight_per_sample, dbias_per_sample,
        stream, names=("dweight_per_sample", "dbias_per_sample"))
    _backward(dya, xa, ma, ra, ma.shape[1], wa, ba, activation, None, pw, pb, None, None, st)


def _check_backward(dy, x, mean, rstd, G, weight, bias, activation, dwn, dbn, stream,
                    names=("dweight_n", "dbias_n")):
    xa = check_x(x)
    N, C, S = _dims(xa)
    G = _checks.check_num_groups(G, C)
    activation = _checks.check_activation(activation)
    dya = _dev(dy, "dy")
    _checks.check_same_dtype("dy", dya.dtype, xa.dtype)
    _checks.check_same_shape("dy", dya.shape, xa.shape)
    sdt = _checks.accumulation_dtype(xa.dtype)
    ma = _check_stats(mean, "mean", N, G, sdt)
    ra = _check_stats(rstd, "rstd", N, G, sdt)
    wa = _check_param(weight, "weight", C, xa.dtype)
    ba = _check_param(bias, "bias", C, xa.dtype)
    accd = _acc_type(xa.dtype)
    st = _stream(stream)
    per_sample = []
    for a, name in zip((dwn, dbn), names):
        pa = (_check_out_like(a, name, xa, accd, (N, C)) if a is not None
              else DevArray(empty((N, C), accd, NCHW, st), name))
        if pa.layout != NCHW:
            raise ValueError(f"{name} must be contiguous")
        per_sample.append(pa)
    if xa.layout is None:
        xa = as_layout(xa, NCHW, st)
    dya = as_layout(dya, xa.layout, st)
    return xa, dya, ma, ra, wa, ba, per_sample[0], per_sample[1], st


def _check_param_grad(a, name, C, dtypes):
    if a is None:
        return None
    pa = _dev(a, name)
    if pa.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {pa.shape}")
    if pa.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {pa.dtype.name}, expected "
                        f"{' or '.join(d.name for d in dtypes)}")
    if pa.layout != NCHW:
        raise ValueError(f"{name} must be contiguous")
    return pa


def _backward(dya, xa, ma, ra, G, wa, ba, activation, dxa, pw, pb, gw, gb, st):
    """dx is skipped when ``dxa`` is None (per-sample gradients only)."""
    N, C, S = _dims(xa)
    T = _threads()
    ks = _kernels(xa.dtype, activation)
    accd = _acc_type(xa.dtype)
    dwn, dbn = pw.flat(), pb.flat()
    dwv = gw.flat() if gw is not None else None
    dbv = gb.flat() if gb is not None else None
    if N * C * S == 0:  # empty sums are 0 (dx is empty)
        if N * C:
            _launch(ks, "fill_stats", _cdiv(N * C, T), T, st, dwn, dbn, accd(0))
        if C and (dwv is not None or dbv is not None):
            a = dwv if dwv is not None else dbv
            _launch(ks, "fill_stats", _cdiv(C, T), T, st, a, dbv if dbv is not None else a,
                    accd(0))
        return
    x, dy = xa.flat(), dya.flat()
    mean, rstd = ma.flat(), ra.flat()
    w = wa.flat() if wa is not None else x
    b = ba.flat() if ba is not None else x
    hw, hb = wa is not None, ba is not None
    steps, nparts = backward_plan(N, C, S, G, xa.layout, sm_count(), _config_key(),
                                  items(xa.dtype), accd == np.float32)
    if steps[0][0] == "bwd_fused_nchw":
        (fused, fgrid, fblock, fdims), (params, pgrid, pblock, pdims) = steps
        want_dx = dxa is not None
        _launch(ks, fused, fgrid, fblock, st, dy, x, *fdims, mean, rstd, w, b, hw, hb,
                want_dx, dxa.flat() if want_dx else x, dwn, dbn)
        if want_dx and (dwv is not None or dbv is not None):
            ow = dwv if dwv is not None else dbv
            ob = dbv if dbv is not None else ow
            _launch(ks, params, pgrid, pblock, st, *pdims, dwn, dbn, ow, ob, dwv is not None,
                    dbv is not None)
        return
    (sums, sgrid, sblock, sdims), (fin, fgrid, fblock, fdims), (dxk, dgrid, dblock, ddims) = \
        steps
    p_owner, p = _workspace(nparts, accd, st)
    coef_owner, coef = _workspace(2 * N * G, accd, st)
    _launch(ks, sums, sgrid, sblock, st, dy, x, *sdims, mean, rstd, w, b, hw, hb, p)
    _launch(ks, fin, fgrid, fblock, st, p, *fdims, rstd, w, hw, dwn, dbn, coef)
    if dxa is None:
        return
    ow = dwv if dwv is not None else (dbv if dbv is not None else dwn)
    ob = dbv if dbv is not None else ow
    _launch(ks, dxk, dgrid, dblock, st, dy, x, *ddims, mean, rstd, w, b, hw, hb, coef,
            dxa.flat(), dwn, dbn, ow, ob, dwv is not None, dbv is not None)
