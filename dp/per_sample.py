"""``per_sample_grads``: per-sample GroupNorm weight/bias gradients for NumPy and torch.

NumPy arrays (float32/float64) and torch CPU tensors run the Numba kernels of
``dp.kernels`` (torch tensors zero-copy through ``.numpy()``; float16/bfloat16 are upcast to
float32 first, one copy, because NumPy has no bfloat16). CUDA tensors / CUDA arrays go to
gnnumba's CUDA backend (``gnnumba.gpu``: its forward for the statistics, then its
``per_sample_param_grads``); without numba-cuda they raise NotImplementedError.
"""

from __future__ import annotations

import sys

import numpy as np

from gnnumba import _checks
from gnnumba.api import _as_layout, _choose_layout, _is_cuda_array, _views

from .kernels import per_sample_grads_3d

CPU_DTYPES = (np.float32, np.float64)


def per_sample_grads(x, dy, num_groups, eps=1e-5, *, activation=None, weight=None, bias=None):
    """Per-sample gradients ``(grad_weight, grad_bias)``, both of shape (N, C), of a GroupNorm
    over ``x`` of shape (N, C, *spatial), given ``dy`` = d loss / d output.

    ``grad_weight[n, c] = Σ_spatial dz·x̂`` and ``grad_bias[n, c] = Σ_spatial dz`` with
    x̂ = (x − mean) · rstd over each sample's group, and dz = dy for ``activation=None``.

    ``activation="silu"``: the layer's output is ``silu(x̂·weight + bias)`` and ``dy`` is the
    gradient w.r.t. that output, so the pre-activation must be recomputed: pass the layer's
    ``weight`` and ``bias`` (shape (C,); ``None`` means 1 and 0, i.e. ``affine=False``). Without
    an activation they do not enter the result and may be omitted.

    NumPy in -> NumPy out, torch in -> torch out, in x's dtype. Deterministic (bit-identical
    on every call, for any thread count).
    """
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; NumPy users skip it
    if torch is not None and isinstance(x, torch.Tensor):
        return _torch_per_sample_grads(torch, x, dy, num_groups, eps, activation, weight, bias)
    if _is_cuda_array(x):
        return _cuda_per_sample_grads(x, dy, num_groups, eps, activation, weight, bias)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__} "
                        f"(convert with np.asarray(x, dtype=np.float32))")
    if not isinstance(dy, np.ndarray):
        raise TypeError(f"dy must be a numpy.ndarray like x, got {type(dy).__name__}")
    _checks.check_dtype(x.dtype, CPU_DTYPES, "x")
    _checks.check_ndim(x.shape)
    gw, gb = _numpy_per_sample_grads(x, dy, num_groups, eps, activation,
                                     _np_param(weight, "weight", x), _np_param(bias, "bias", x))
    return gw.astype(x.dtype, copy=False), gb.astype(x.dtype, copy=False)


def _validate(x_shape, dy_shape, num_groups, eps, activation):
    _checks.check_ndim(tuple(x_shape))
    G = _checks.check_num_groups(num_groups, x_shape[1])
    eps = _checks.check_eps(eps)
    activation = _checks.check_activation(activation)
    _checks.check_same_shape("dy", tuple(dy_shape), tuple(x_shape))
    return G, eps, activation


def _np_param(p, name, x):
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of shape (C,) like x, or None; "
                        f"got {type(p).__name__}")
    _checks.check_param_shape(name, p.shape, x.shape[1])
    return p


def _numpy_per_sample_grads(x, dy, num_groups, eps, activation, weight, bias):
    """Validated CPU path on NumPy arrays; float64 (N, C) results."""
    G, eps, activation = _validate(x.shape, dy.shape, num_groups, eps, activation)
    _checks.check_same_dtype("dy", dy.dtype, x.dtype)
    N, C = x.shape[:2]
    if x.size == 0:  # sums over nothing (N == 0 or an empty spatial dim)
        return np.zeros((N, C)), np.zeros((N, C))
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, dtype=np.float64)
    xl, channels_last = _choose_layout(x)
    dyl = _as_layout(dy, channels_last)
    return per_sample_grads_3d(_views(xl, channels_last), _views(dyl, channels_last), G, eps,
                               w, b, activation == "silu", channels_last)


def _torch_per_sample_grads(torch, x, dy, num_groups, eps, activation, weight, bias):
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"dy must be a torch.Tensor like x, got {type(dy).__name__}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype} but x has dtype {x.dtype}; cast dy to {x.dtype}")
    if dy.device != x.device:
        raise ValueError(f"dy is on {dy.device} but x is on {x.device}; move both to one device")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (C,) or None when x is a "
                            f"torch.Tensor, got {type(p).__name__}")
    if x.is_cuda:
        # bfloat16 is upcast (one copy) like on the CPU; weight/bias must match x's dtype
        compute = torch.float32 if x.dtype == torch.bfloat16 else x.dtype

        def dev(t):
            return None if t is None else t.detach().to(compute).reshape(-1).contiguous()

        gw, gb = _cuda_per_sample_grads(x.detach().to(compute), dy.detach().to(compute),
                                        num_groups, eps, activation, dev(weight), dev(bias))
        return (torch.as_tensor(gw, device=x.device).to(x.dtype),
                torch.as_tensor(gb, device=x.device).to(x.dtype))
    if x.device.type != "cpu":
        raise TypeError(f"per_sample_grads supports CPU and CUDA tensors, got device {x.device}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"x has dtype {x.dtype}, which is not supported; use float32, float64, "
                        f"float16 or bfloat16 (e.g. x.float())")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32

    def as_np(t):
        # .numpy() is a zero-copy view that keeps the strides (channels_last stays so)
        return t.detach().to(compute).numpy()

    if x.ndim < 2:
        _checks.check_ndim(tuple(x.shape))
    C = x.shape[1]
    w = None if weight is None else weight.detach().to(torch.float64).reshape(-1).numpy()
    b = None if bias is None else bias.detach().to(torch.float64).reshape(-1).numpy()
    for name, p in (("weight", w), ("bias", b)):
        if p is not None:
            _checks.check_param_shape(name, p.shape, C)
    gw, gb = _numpy_per_sample_grads(as_np(x), as_np(dy), num_groups, eps, activation, w, b)
    return torch.from_numpy(gw).to(x.dtype), torch.from_numpy(gb).to(x.dtype)


def _cuda_per_sample_grads(x, dy, num_groups, eps, activation, weight, bias):
    """CUDA arrays/tensors: the statistics from the CUDA forward, then the CUDA backend's
    backward with its (N, C) per-sample sums (dx comes along; cheap next to the reads).
    Results are Numba device arrays (float32, float64 for float64 x)."""
    G, eps, activation = _validate(x.shape, dy.shape, num_groups, eps, activation)
    try:
        # the package is gnnumba.gpu (numba-cuda hijacks module names containing "cuda")
        from gnnumba import gpu as backend
    except ImportError as e:
        raise NotImplementedError(
            "per_sample_grads got a CUDA array, but gnnumba's CUDA backend is not available "
            f"({e}); move the tensors to the CPU (x.cpu(), dy.cpu()) or install gnnumba[cuda]"
        ) from e
    fn = getattr(backend, "per_sample_param_grads", None)
    if fn is None:
        raise NotImplementedError(
            "per_sample_grads got a CUDA array, but this gnnumba.gpu has no "
            "per_sample_param_grads; move the tensors to the CPU (x.cpu(), dy.cpu())"
        )
    _, mean, rstd = backend.group_norm_forward(x, G, weight, bias, eps, activation=activation,
                                               out=None)
    gw, gb = fn(dy, x, mean, rstd, G, weight, bias, activation=activation)
    return gw, gb
