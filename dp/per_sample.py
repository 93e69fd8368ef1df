"""``per_sample_grads``: per-sample GroupNorm weight/bias gradients for NumPy, torch and CUDA
arrays, from x and dy alone.

A thin layer over gnnumba's public kernels: ``gnnumba.group_norm_forward`` for the
statistics (Opacus hands a sampler the layer's input and output gradient, not its mean and
rstd), then ``gnnumba.per_sample_param_grads``. NumPy needs nothing else: this module
imports neither torch nor Opacus. torch CPU tensors go in as zero-copy NumPy views
(float16/bfloat16 upcast to float32 first, one copy); CUDA tensors and CUDA arrays go to
gnnumba's CUDA kernels.
"""

from __future__ import annotations

import sys

import numpy as np

import gnnumba


def per_sample_grads(x, dy, num_groups, eps=1e-5, *, activation=None, weight=None, bias=None):
    """Per-sample gradients ``(grad_weight, grad_bias)``, both of shape (N, C), of a GroupNorm
    over ``x`` of shape (N, C, *spatial), given ``dy`` = d loss / d output.

    ``grad_weight[n, c] = Σ_spatial dz·x̂`` and ``grad_bias[n, c] = Σ_spatial dz`` with
    x̂ = (x − mean) · rstd over each sample's group, and dz = dy for ``activation=None``.

    ``activation`` ("silu", "relu", "gelu"): the layer's output is ``act(x̂·weight + bias)``
    and ``dy`` is the gradient w.r.t. that output, so the pre-activation must be recomputed:
    pass the layer's ``weight`` and ``bias`` (shape (C,); ``None`` means 1 and 0, i.e.
    ``affine=False``). Without an activation they do not enter the result.

    NumPy in -> NumPy out, torch in -> torch out, in x's dtype; CUDA arrays give Numba device
    arrays. Deterministic (bit-identical on every call, for any thread count). Bad input
    raises ``ValueError``/``TypeError`` naming the problem (gnnumba's checks).
    """
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; NumPy users skip it
    if torch is not None and isinstance(x, torch.Tensor):
        return _torch_per_sample_grads(torch, x, dy, num_groups, eps, activation, weight, bias)
    gw, gb = _per_sample_grads(x, dy, num_groups, eps, activation, weight, bias)
    if isinstance(x, np.ndarray):
        return gw.astype(x.dtype, copy=False), gb.astype(x.dtype, copy=False)
    return gw, gb


def _per_sample_grads(x, dy, G, eps, activation, weight, bias):
    """Statistics, then the per-sample sums; any array kind gnnumba takes."""
    psg = getattr(gnnumba, "per_sample_param_grads", None)
    if psg is None:  # a gnnumba from before the public kernel
        return _per_sample_by_backward(x, dy, G, eps, activation, weight, bias)
    # the statistics do not depend on the affine or the activation: skip both
    _, mean, rstd = gnnumba.group_norm_forward(x, G, None, None, eps)
    return psg(dy, x, mean, rstd, G, weight, bias, activation=activation)


def _per_sample_by_backward(x, dy, G, eps, activation, weight, bias):
    """The same numbers from one ``group_norm_backward`` call: the batch seen as ONE sample
    of N·C channels in N·G groups has the same groups, so its dweight/dbias over N·C
    channels are the per-sample gradients (dx is computed and dropped). For gnnumba versions
    without ``per_sample_param_grads``."""
    if getattr(x, "ndim", 0) < 2:  # gnnumba names the problem
        gnnumba.group_norm_forward(x, G, None, None, eps)
    # validate on an empty batch first, so that errors name C and G, not N·C and N·G
    _, m0, r0 = gnnumba.group_norm_forward(x[:0], G, None, None, eps)
    gnnumba.group_norm_backward(dy[:0], x[:0], m0, r0, G, weight, bias, activation=activation)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy has shape {tuple(dy.shape)} but x has shape {tuple(x.shape)}; "
                         f"dy must have the same shape as x")
    N, C = x.shape[:2]
    acc = np.float64 if x.dtype == np.float64 else np.float32
    if N == 0 or x.size == 0:
        zeros = np.zeros((N, C), acc)
        if isinstance(x, np.ndarray):
            return zeros, zeros.copy()
        from numba import cuda

        return cuda.to_device(zeros), cuda.to_device(zeros)
    flat = (1, N * C) + tuple(x.shape[2:])
    x1, dy1 = x.reshape(flat), dy.reshape(flat)
    w = np.ones(C, x.dtype) if weight is None else weight
    b = np.zeros(C, x.dtype) if bias is None else bias
    if isinstance(x, np.ndarray):
        w1, b1 = np.tile(w, N), np.tile(b, N)
    else:  # CUDA arrays: tile on the host (C values)
        from numba import cuda

        host = [a if isinstance(a, np.ndarray) else a.copy_to_host() for a in (w, b)]
        w1, b1 = (cuda.to_device(np.tile(a, N)) for a in host)
    _, mean, rstd = gnnumba.group_norm_forward(x1, N * G, None, None, eps)
    _, dw, db = gnnumba.group_norm_backward(dy1, x1, mean, rstd, N * G, w1, b1,
                                            activation=activation)
    return dw.reshape(N, C), db.reshape(N, C)


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
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"x has dtype {x.dtype}, which is not supported; use float32, float64, "
                        f"float16 or bfloat16 (e.g. x.float())")
    if x.device.type not in ("cpu", "cuda"):
        raise TypeError(f"per_sample_grads supports CPU and CUDA tensors, got device {x.device}")
    # half precision is accumulated in float32 anyway; NumPy has no bfloat16
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32

    def arr(t):
        if t is None:
            return None
        t = t.detach().to(compute)
        # CPU: .numpy() is a zero-copy view that keeps the strides (channels_last stays so);
        # CUDA: gnnumba reads the tensor through __cuda_array_interface__
        return t.numpy() if t.device.type == "cpu" else t

    gw, gb = _per_sample_grads(arr(x), arr(dy), num_groups, eps, activation,
                               arr(weight), arr(bias))
    return (torch.as_tensor(np.asarray(gw) if x.device.type == "cpu" else gw,
                            device=x.device).to(x.dtype),
            torch.as_tensor(np.asarray(gb) if x.device.type == "cpu" else gb,
                            device=x.device).to(x.dtype))
