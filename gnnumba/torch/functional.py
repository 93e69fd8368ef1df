"""``group_norm`` for torch tensors: argument checks, then the cheapest correct route.

Routes (``_run``), first match wins:

1. ``torch.compile`` / ``torch.export`` tracing, FakeTensor and meta tensors: the custom op
   ``torch.ops.gnnumba.group_norm_fwd`` (``library.py``), whose fake kernel and autograd let
   ``torch.compile(fullgraph=True)`` trace through with no graph break.
2. ``torch.jit.trace``: the custom op too, so the trace records a real op (the NumPy calls
   of the eager route would be recorded as a constant). Under the legacy
   ``torch.onnx.export(dynamo=False)``, which traces, the composite torch ops instead, which
   that exporter translates to standard ONNX.
3. Tensor subclasses (e.g. Opacus' ExpandedWeights, DTensor): the composite
   (``library.composite``), which torch's subclass machinery understands.
4. Forward-mode AD or ``torch.func`` transforms: ``autograd.GroupNormFunction``; a gradient
   needed in plain eager autograd: ``autograd.EagerFunction`` (the same, cheaper to call).
5. Everything else (inference, ``torch.no_grad()``): the kernels directly. The custom-op
   dispatcher and ``autograd.Function`` cost about as much as the kernel itself at small
   shapes, so this route skips both.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _checks, activations
from .._checks import GroupNormError
from . import library, ops
from .autograd import EagerFunction, GroupNormFunction

_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))
_PLAIN_PARAM = (Tensor, nn.Parameter, type(None))


# --------------------------------------------------------------------------- errors
# Where torch refuses an input, gnnumba raises an exception of torch's class too (and of the
# class gnnumba uses everywhere else): code that catches either keeps working.


class ShapeError(GroupNormError, RuntimeError):
    """Wrong channel count, weight/bias shape, input rank or C % num_groups (torch:
    RuntimeError; gnnumba: ValueError)."""


class DeviceError(GroupNormError, RuntimeError):
    """Parameters on another device than the input (torch: RuntimeError)."""


class ParamDtypeError(TypeError, RuntimeError):
    """Non-floating-point weight or bias (torch: RuntimeError "mixed dtype")."""


class InputDtypeError(TypeError, NotImplementedError):
    """Input dtype without a kernel (torch: NotImplementedError)."""


class ZeroGroupsError(GroupNormError, ZeroDivisionError):
    """num_groups == 0 (torch: ZeroDivisionError)."""


def _reraise(cls, check, *args):
    try:
        return check(*args)
    except GroupNormError as e:
        raise cls(str(e)) from None


# --------------------------------------------------------------------------- checks

# (C, type and value of num_groups, of eps, activation) -> (G, eps, act code) for argument
# combinations that passed the checks; types are part of the key because True == 1.
_VALID: dict = {}


def _check_args(C: int, num_groups, eps, activation) -> tuple[int, float, int]:
    key = (C, type(num_groups), num_groups, type(eps), eps, activation)
    try:
        hit = _VALID.get(key)
    except TypeError:  # unhashable: let the checks below name the problem
        hit = key = None
    if hit is not None:
        return hit
    if isinstance(num_groups, Tensor) and num_groups.numel() == 1 and \
            not num_groups.is_floating_point():
        num_groups = int(num_groups)  # F.group_norm takes a 0-d integer tensor
    if num_groups == 0 and not isinstance(num_groups, bool):
        raise ZeroGroupsError("num_groups must be >= 1, got 0")
    G = _reraise(ShapeError, _checks.check_num_groups, num_groups, C)
    eps = _checks.check_eps(eps)
    act = activations.code(_checks.check_activation(activation))
    if key is not None:
        if len(_VALID) >= 1024:
            _VALID.clear()
        _VALID[key] = (G, eps, act)
    return G, eps, act


def _check_param(name: str, p, x: Tensor, C: int) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({C},) or None, "
                        f"got {type(p).__name__}")
    if type(p) not in _PLAIN_PARAM:
        # a subclass (e.g. Opacus' ExpandedWeights, which refuses .dim()): check the tensor
        # itself, without its __torch_function__
        with torch._C.DisableTorchFunctionSubclass():
            return _check_plain_param(name, p, x, C)
    _check_plain_param(name, p, x, C)


def _check_plain_param(name: str, p: Tensor, x: Tensor, C: int) -> None:
    if p.dim() != 1 or p.shape[0] != C:
        _reraise(ShapeError, _checks.check_param_shape, name, tuple(p.shape), C)
    if not p.is_floating_point():
        raise ParamDtypeError(f"{name} has dtype {p.dtype}; use a floating-point {name} "
                              f"({name}.float())")
    if not (p.is_cpu and x.is_cpu) and p.device != x.device:
        raise DeviceError(f"{name} is on {p.device} but input is on {x.device}; move it "
                          f"with {name}.to(input.device)")


def check_input(input, num_channels: Optional[int] = None) -> None:
    """Type, rank, dtype and (when given) channel count of the input tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        _reraise(ShapeError, _checks.check_ndim, tuple(input.shape), "input")
    if input.dtype not in _DTYPES:
        raise InputDtypeError(f"input has dtype {input.dtype}, which is not supported; use "
                              f"float32, float64, float16 or bfloat16 (e.g. input.float())")
    if num_channels is not None and input.shape[1] != num_channels:
        raise ShapeError(
            f"expected input with {num_channels} channels (shape (N, {num_channels}, ...)), "
            f"got input of shape {tuple(input.shape)}; the channel dim is dim 1")


def _plain_param_ok(p, x: Tensor, C: int) -> bool:
    """The common case of ``_check_param`` in one expression (no call per check)."""
    return (type(p) in _PLAIN_PARAM and p.dim() == 1 and p.shape[0] == C
            and p.is_floating_point() and ((p.is_cpu and x.is_cpu) or p.device == x.device))


def checked(input, num_groups, weight, bias, eps, activation,
            num_channels: Optional[int] = None) -> tuple[int, float, int]:
    """Every check of one call; returns (G, eps, act code). The common case is tested inline
    (a call per check cost ~1 us of the ~6 us torch takes for a small GroupNorm); anything
    unusual goes through the checks that name the problem."""
    if not (type(input) is Tensor and input.dim() >= 2 and input.dtype in _DTYPES
            and (num_channels is None or input.shape[1] == num_channels)):
        check_input(input, num_channels)
    C = input.shape[1]
    G, eps, act = _check_args(C, num_groups, eps, activation)
    if weight is not None and not _plain_param_ok(weight, input, C):
        _check_param("weight", weight, input, C)
    if bias is not None and not _plain_param_ok(bias, input, C):
        _check_param("bias", bias, input, C)
    if input.numel() == G:  # N * C/G * spatial == 1: torch refuses, with this message
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {list(input.shape)} (one value per group: GroupNorm of it "
                         f"is the bias; use more channels per group or a larger input)")
    return G, eps, act


# --------------------------------------------------------------------------- routes


def _custom_op(x, G, weight, bias, eps, act) -> Tensor:
    return torch.ops.gnnumba.group_norm_fwd(x, G, weight, bias, eps, act)[0]


def _run(x: Tensor, G: int, weight, bias, eps: float, act: int) -> Tensor:
    """GroupNorm of validated arguments through the cheapest correct route (module doc)."""
    if torch.compiler.is_compiling():
        return _custom_op(x, G, weight, bias, eps, act)
    if torch._C._get_tracing_state() is not None:  # torch.jit.trace
        if torch.onnx.is_in_onnx_export():
            return library.composite(x, G, weight, bias, eps, act)
        return _custom_op(x, G, weight, bias, eps, act)
    if type(x) is not Tensor or type(weight) not in _PLAIN_PARAM or \
            type(bias) not in _PLAIN_PARAM:
        if x.is_meta or isinstance(x, torch._subclasses.FakeTensor):
            return _custom_op(x, G, weight, bias, eps, act)
        return library.composite(x, G, weight, bias, eps, act)
    if not (x.is_cpu or x.is_cuda):
        if x.is_meta:
            return _custom_op(x, G, weight, bias, eps, act)
        raise DeviceError(f"gnnumba runs on CPU and CUDA tensors, got a tensor on "
                          f"{x.device.type}; move it with .cpu() or use torch.nn.GroupNorm")
    if _interpreter_stack() is not None or _forward_ad._current_level >= 0:
        # a torch.func transform or a forward-mode AD level is active
        return GroupNormFunction.apply(x, G, weight, bias, eps, act)[0]
    if torch.is_grad_enabled() and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)):
        return EagerFunction.apply(x, G, weight, bias, eps, act)
    return ops.forward_y(x, G, weight, bias, eps, act)


_forward_ad = torch.autograd.forward_ad
_interpreter_stack = torch._C._functorch.peek_interpreter_stack


# --------------------------------------------------------------------------- public


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               activation: Optional[str] = None) -> Tensor:
    """Group Normalization with the signature of ``torch.nn.functional.group_norm``.

    ``input`` has shape (N, C, *spatial); ``weight``/``bias`` shape (C,) or None;
    ``activation`` None, "silu", "relu" or "gelu" returns ``act(group_norm(input))`` in one
    fused pass. CPU tensors run the Numba CPU kernels on zero-copy views, CUDA tensors the
    Numba CUDA kernels on torch's current stream; channels_last input gives channels_last
    output. float16 and bfloat16 are computed in float32. Differentiable in input, weight
    and bias to any order, and under ``torch.func`` transforms.
    """
    G, eps, act = checked(input, num_groups, weight, bias, eps, activation)
    return _run(input, G, weight, bias, eps, act)
