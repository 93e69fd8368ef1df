"""Input validation shared by the CPU, CUDA and torch front ends.

Every check works on shapes and dtypes only, so each backend calls the same functions and
users get the same message whichever device they are on. Messages name the problem, the
values seen and the fix.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

from .activations import NAMES as ACTIVATIONS


class GroupNormError(ValueError):
    """Raised for a bad GroupNorm argument (a ValueError, so callers can catch either)."""


def is_cuda_array(x) -> bool:
    """True for what the CUDA backend takes: Numba device arrays (the simulator's have no
    ``__cuda_array_interface__``) and anything with ``__cuda_array_interface__``."""
    if isinstance(x, np.ndarray):
        return False
    if getattr(x, "is_cuda", None) is True:  # torch: cheaper than evaluating the interface
        return True
    if getattr(x, "__cuda_ndarray__", False):
        return True
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # torch raises TypeError for bfloat16 CUDA tensors
        return True  # the CUDA backend then raises its clear bfloat16 TypeError


def valid_group_counts(num_channels: int) -> list[int]:
    return [g for g in range(1, num_channels + 1) if num_channels % g == 0]


def check_num_groups(num_groups, num_channels: int) -> int:
    """An int, or what ``operator.index`` takes (NumPy integers, 0-d integer arrays and
    tensors, as ``F.group_norm`` accepts); never a bool or a float."""
    try:
        if isinstance(num_groups, (bool, np.bool_)) or str(
                getattr(num_groups, "dtype", "")) in ("bool", "torch.bool"):
            raise TypeError  # operator.index takes bools
        num_groups = operator.index(num_groups)
    except TypeError:
        raise TypeError(
            f"num_groups must be an int, got {type(num_groups).__name__} ({num_groups!r})"
        ) from None
    if num_groups < 1:
        raise GroupNormError(f"num_groups must be >= 1, got {num_groups}")
    if num_channels % num_groups != 0:
        counts = ", ".join(map(str, valid_group_counts(num_channels)))
        raise GroupNormError(
            f"num_channels (C={num_channels}) must be divisible by num_groups "
            f"(G={num_groups}); valid group counts for C={num_channels}: {counts}"
        )
    return num_groups


def check_ndim(shape: tuple, name: str = "x") -> None:
    if len(shape) < 2:
        raise GroupNormError(
            f"{name} must have shape (N, C, *spatial) with at least 2 dims, got shape "
            f"{tuple(shape)}; add a batch dim with {name}[None] or reshape to (N, C)"
        )


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} ({eps!r})")
    eps = float(eps)
    if not eps >= 0.0 or eps == float("inf"):  # also rejects NaN
        raise GroupNormError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_activation(activation):
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        known = ", ".join(repr(a) for a in ACTIVATIONS)
        raise GroupNormError(f"unknown activation {activation!r}; supported: {known} "
                             f"(None is plain GroupNorm)")
    return activation


def check_dtype(dtype, supported, name: str = "x") -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in supported:
        names = ", ".join(np.dtype(d).name for d in supported)
        raise TypeError(
            f"{name} has dtype {dtype.name}, which is not supported; use one of {names} "
            f"(e.g. {name}.astype(np.float32))"
        )
    return dtype


def check_same_dtype(name: str, dtype, x_dtype) -> None:
    if np.dtype(dtype) != np.dtype(x_dtype):
        raise TypeError(
            f"{name} has dtype {np.dtype(dtype).name} but x has dtype {np.dtype(x_dtype).name}; "
            f"mixed dtypes are not supported, cast {name} to {np.dtype(x_dtype).name}"
        )


def check_param_shape(name: str, shape: tuple, num_channels: int) -> None:
    if tuple(shape) != (num_channels,):
        raise GroupNormError(
            f"{name} must have shape (C,) = ({num_channels},) to match x's channel dim, "
            f"got shape {tuple(shape)}"
        )


def check_same_shape(name: str, shape: tuple, x_shape: tuple) -> None:
    if tuple(shape) != tuple(x_shape):
        raise GroupNormError(
            f"{name} must have the same shape as x {tuple(x_shape)}, got {tuple(shape)}"
        )


def check_stats_shape(name: str, shape: tuple, n: int, num_groups: int) -> None:
    if tuple(shape) != (n, num_groups):
        raise GroupNormError(
            f"{name} must have shape (N, num_groups) = ({n}, {num_groups}) as returned by "
            f"group_norm_forward, got {tuple(shape)}"
        )


def check_dtype_name(dtype: str, supported, name: str = "x") -> None:
    """Like ``check_dtype`` for a dtype given by name (half types have no NumPy dtype)."""
    if dtype not in supported:
        names = ", ".join(supported)
        raise TypeError(
            f"{name} has dtype {dtype}, which is not supported; use one of {names} "
            f"(e.g. {name}.astype(np.float32), or {name}.float() for a torch tensor)"
        )


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def accumulation_dtype(dtype) -> np.dtype:
    """THE rule for what gnnumba accumulates in and returns statistics, per-sample gradients
    and CUDA partial sums in: float64 only for float64 input, float32 otherwise (half types
    included). ``dtype``: a NumPy dtype, a dtype name, or a torch/JAX dtype."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:  # torch dtypes, and "bfloat16" without ml_dtypes
            name = str(dtype).removeprefix("torch.")
    return _FLOAT64 if name == "float64" else _FLOAT32

