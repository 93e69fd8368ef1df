"""Arrays of any framework in and out of the CPU kernels, without copies.

The CPU kernels read and write NumPy arrays. ``take`` turns what the caller passed into a
NumPy view of the caller's memory plus two facts the API needs: the element type (a name:
"float32", "float64", "float16", "bfloat16") and the array's :class:`Kind`, which knows how
to hand a result back as the caller's kind (torch in -> torch out, JAX in -> JAX out, NumPy
stays NumPy).

* NumPy arrays are used as they are (checked first: the common case pays nothing more).
* any CPU array that speaks DLPack (``__dlpack__``) is viewed through ``np.from_dlpack``:
  zero-copy, NCHW and channels-last strides kept. torch tensors go through DLPack too, by
  torch's C-level exporter (``torch_to_dlpack``, wrapped in :class:`DLPackCapsule`) and
  ``torch.from_dlpack(array.__dlpack__())`` back: 0.6-0.7 us per tensor each way, as
  ``Tensor.numpy()``/``torch.from_numpy``, where the Python-level
  ``np.from_dlpack(tensor)`` takes 2.7 us and ``torch.from_dlpack(array)`` 1.1 us (a forward
  moves six arrays). JAX arrays are read with ``np.asarray`` (0.7 us against 4.2 us for
  ``np.from_dlpack``), and JAX results made with ``jnp.from_dlpack`` (a view of a 64-byte
  aligned buffer).
* NumPy has no bfloat16 and Numba's CPU target no float16, so the half types travel as their
  bits (``cpu.HALF_BITS``: bfloat16 as uint16, float16 as int16); the kernels convert them in
  registers. JAX bfloat16 is read through NumPy's buffer protocol (``ml_dtypes``), because
  DLPack exporters refuse a dtype NumPy cannot name.

Which framework an array belongs to is asked of ``array_api_compat`` (imported only for
non-NumPy input, so NumPy alone is enough to run gnnumba). CUDA arrays never come here: the
API sends them to ``gnnumba.gpu`` first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import cpu

HALF = ("float16", "bfloat16")
# DLPack device types (dlpack.h) by number, for messages about arrays on other devices
_DLPACK_DEVICES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal",
                   10: "ROCm", 11: "ROCm host", 13: "CUDA managed", 14: "oneAPI"}
# JAX hands out a buffer as a view only when it is 64-byte aligned; outputs are allocated so.
_ALIGN = 64


@dataclass(frozen=True)
class Kind:
    """A family of arrays: where results go back to. ``wrap(storage, dtype)`` makes an array
    of this kind from a NumPy array of the kernels' storage type (no copy where the framework
    allows one); ``cast(a64, dtype)`` converts a small float64 result (a (C,) gradient) to
    ``dtype`` as this kind."""

    name: str  # "numpy", "torch", "jax", or the module of another DLPack producer
    writeable: bool  # whether ``out=`` may be of this kind
    wrap: Callable[[np.ndarray, str], object]
    cast: Callable[[np.ndarray, str], object]
    aligned: bool = False  # whether outputs must be 64-byte aligned to be wrapped without a copy


def _numpy_cast(a, dtype):
    return a.astype(dtype, copy=False)


NUMPY = Kind("numpy", True, lambda a, dtype: a, _numpy_cast)


def _torch_kind():
    import torch

    bits = {"float16": torch.int16, "bfloat16": torch.uint16}
    # str(dtype) costs ~1 us a call
    names = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
             torch.bfloat16: "bfloat16"}

    def wrap(a, dtype):
        if dtype in HALF:
            return torch.from_dlpack(a.__dlpack__()).view(getattr(torch, dtype))
        return torch.from_dlpack(a.__dlpack__())

    def cast(a, dtype):
        return torch.from_dlpack(a.__dlpack__()).to(getattr(torch, dtype))

    return Kind("torch", True, wrap, cast), bits, names


def _jax_kind():
    import jax
    import jax.numpy as jnp

    def wrap(a, dtype):
        if dtype == "bfloat16":  # DLPack has no bfloat16 from NumPy: a bitcast (one copy)
            return jax.lax.bitcast_convert_type(jnp.from_dlpack(a), jnp.bfloat16)
        if dtype == "float16":
            a = a.view(np.float16)
        return jnp.from_dlpack(a)  # zero-copy when 64-byte aligned (``empty``)

    def cast(a, dtype):
        return jnp.asarray(a, dtype=getattr(jnp, dtype))

    return Kind("jax", False, wrap, cast, aligned=True)


def _other_kind(a):
    """Another DLPack producer: results through its namespace's ``from_dlpack`` when
    array_api_compat knows the namespace, else as NumPy arrays."""
    import array_api_compat

    try:
        xp = array_api_compat.array_namespace(a)
    except TypeError:
        xp = None
    name = type(a).__module__.split(".")[0]

    def as_numpy(r, dtype):  # float16 results come from the kernels as their bits
        return r.view(np.float16) if dtype == "float16" else r

    if xp is None or not hasattr(xp, "from_dlpack"):
        return Kind(name, True, as_numpy, _numpy_cast)
    return Kind(name, True, lambda r, dtype: xp.from_dlpack(as_numpy(r, dtype)),
                lambda r, dtype: xp.from_dlpack(r.astype(dtype)))


_TORCH = None
_JAX = None


def _accepted(name: str) -> str:
    return (f"{name} must be a numpy.ndarray, a CPU array that speaks DLPack (a torch tensor, "
            f"a JAX array, ...) or a CUDA array")


def take(a, name: str):
    """``(storage, dtype, kind)``: a zero-copy NumPy view of ``a`` in the kernels' storage
    type, its element type's name, and its :class:`Kind`. Raises a TypeError that names what
    is accepted for anything else."""
    if type(a) is np.ndarray:
        return a, _numpy_dtype(a, name), NUMPY
    if isinstance(a, np.ndarray):
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(
                f"{name} is a masked array; GroupNorm has no masked form and would silently "
                f"use the masked values: pass {name}.filled(value) or {name}.data"
            )
        a = a.view(np.ndarray)  # np.memmap and other subclasses: the same memory
        return a, _numpy_dtype(a, name), NUMPY
    if hasattr(a, "__dlpack__"):
        import array_api_compat as aac

        if aac.is_torch_array(a):
            return _take_torch(a, name)
        if aac.is_jax_array(a):
            return _take_jax(a, name)
        return _take_dlpack(a, name)
    if hasattr(a, "__array_interface__"):
        a = np.asarray(a)  # a view of the exporter's memory
        return a, _numpy_dtype(a, name), NUMPY
    raise TypeError(
        f"{_accepted(name)}; got {type(a).__name__} (convert with np.asarray({name}, "
        f"dtype=np.float32))"
    )


# dtype -> name without ``np.dtype.name`` (pure Python in NumPy, ~4 us a call)
NAMES = {np.dtype(t): np.dtype(t).name for t in (np.float32, np.float64, np.float16)}


def _numpy_dtype(a: np.ndarray, name: str) -> str:
    dtype_name = NAMES.get(a.dtype)
    if dtype_name is not None:
        return dtype_name
    if not a.dtype.isnative and a.dtype.kind == "f":
        raise TypeError(
            f"{name} has non-native byte order (dtype '{a.dtype.str}'); convert it once with "
            f"{name}.astype({name}.dtype.newbyteorder('='))"
        )
    return a.dtype.name


def _refuse_device(name: str, device: str):
    raise TypeError(
        f"{name} is on device {device}; the CPU kernels take CPU arrays and the CUDA kernels "
        f"take arrays with __cuda_array_interface__ (torch CUDA tensors, CuPy, Numba device "
        f"arrays): move {name} to the CPU or to CUDA"
    )


class DLPackCapsule:
    """A DLPack capsule in the form ``np.from_dlpack`` takes (an object with ``__dlpack__``
    and ``__dlpack_device__``; on the CPU, so the stream arguments are ignored)."""

    __slots__ = ("capsule",)

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, **_kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU, device 0


def numpy_view(capsule) -> np.ndarray:
    """The NumPy view of a CPU DLPack capsule (e.g. ``torch_to_dlpack(t)``)."""
    return np.from_dlpack(DLPackCapsule(capsule))


def torch_to_dlpack(t):
    """A versioned DLPack capsule of a CPU tensor: NumPy views a legacy capsule (what
    ``torch.utils.dlpack.to_dlpack`` makes) as read-only, a versioned one as writeable, as
    the tensor is. torch's C exporter where this torch has it (0.1 us), else the public
    ``Tensor.__dlpack__`` (1.7 us more: argument and stream handling in Python)."""
    return _torch_exporter()(t)


@functools.lru_cache(maxsize=None)
def _torch_exporter():
    import torch

    exporter = getattr(torch._C, "_to_dlpack_versioned", None)
    if exporter is not None:
        return exporter
    return lambda t: t.__dlpack__(max_version=(1, 0))


def _take_torch(t, name):
    global _TORCH
    if _TORCH is None:
        _TORCH = _torch_kind()
    kind, bits, names = _TORCH
    if not t.is_cpu:
        _refuse_device(name, str(t.device))
    dtype = names.get(t.dtype) or str(t.dtype).removeprefix("torch.")
    t = t.detach()
    if dtype in HALF:
        t = t.view(bits[dtype])
    try:
        a = numpy_view(torch_to_dlpack(t))  # zero-copy, strides kept (module docstring)
    except (BufferError, RuntimeError, TypeError) as e:  # sparse, conjugate, int4, ...
        raise TypeError(f"{name} (torch tensor of dtype {dtype}, layout {t.layout}) cannot "
                        f"be viewed as an array: {e}") from None
    return a, dtype, kind


def _take_jax(j, name):
    global _JAX
    if _JAX is None:
        _JAX = _jax_kind()
    try:
        devices = {d.platform for d in j.devices()}
    except Exception:  # a tracer has no devices
        devices = None
    if devices is None or not hasattr(j, "unsafe_buffer_pointer"):
        raise TypeError(
            f"{name} is a traced JAX value (inside jax.jit, grad or vmap); gnnumba's kernels "
            f"run on concrete arrays: call them outside the traced function"
        )
    if devices != {"cpu"}:
        _refuse_device(name, "/".join(sorted(devices)))
    dtype = str(j.dtype)
    a = np.asarray(j)  # a read-only view of the CPU buffer (bfloat16: an ml_dtypes array)
    if dtype == "bfloat16":
        a = a.view(cpu.HALF_BITS["bfloat16"])
    return a, dtype, _JAX


def _take_dlpack(a, name):
    try:
        dev_type, dev_id = a.__dlpack_device__()
    except Exception:
        dev_type, dev_id = 1, 0  # no device query: let from_dlpack decide
    if int(dev_type) != 1:
        label = _DLPACK_DEVICES.get(int(dev_type), "unknown")
        _refuse_device(name, f"DLPack device type {int(dev_type)} ({label}) #{dev_id}")
    try:
        arr = np.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:
        dtype = getattr(a, "dtype", None)  # most producers name it; DLPack's error does not
        what = f"dtype {dtype}" if dtype is not None else "a DLPack dtype"
        raise TypeError(
            f"{name} ({type(a).__name__}) has {what}, which NumPy cannot read ({e}); "
            f"supported: float32, float64 (float16/bfloat16 from torch and JAX)"
        ) from None
    return arr, _numpy_dtype(arr, name), _other_kind(a)


def same_kind(kind: Kind, x_kind: Kind, name: str) -> None:
    if kind.name != x_kind.name:
        raise TypeError(
            f"{name} is a {kind.name} array but x is a {x_kind.name} array; mixing array "
            f"kinds is not supported: pass {name} as a {x_kind.name} array too"
        )


# --------------------------------------------------------------------------- storage


_STORAGE = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64), **cpu.HALF_BITS}


def storage_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype the kernels see for element type ``dtype`` (half types as bits)."""
    return _STORAGE[dtype]


def as_compute(a: np.ndarray, dtype: str) -> np.ndarray:
    """A small array (a (C,) parameter) of element type ``dtype`` in the kernels' compute
    dtype: itself for float32/float64, the half types' bits widened to float32."""
    if dtype == "float16":
        return a.view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def empty(shape, dtype, aligned: bool = False) -> np.ndarray:
    """``cpu.empty`` (pages mapped); ``aligned``: at a multiple of 64 bytes, so that JAX can
    take it as a view (costs ~2 us, so only for kinds that need it)."""
    if not aligned:
        return cpu.empty(shape, dtype)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = cpu.empty(nbytes + _ALIGN, np.uint8)
    off = -buf.__array_interface__["data"][0] % _ALIGN
    return buf[off:off + nbytes].view(dtype).reshape(shape)

