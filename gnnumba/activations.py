"""The fused activations: the ONE table every backend reads.

``y = act(group_norm(x))`` is computed in the kernels' apply loop, and the backward needs
``act'(z)`` at the pre-activation ``z`` (recomputed from x, mean and rstd, never stored).

Everything about an activation lives in this file:

* ``CODES``: its name (the public ``activation=`` argument) and the small int the kernels
  branch on (0 is "no activation"; kernels treat it as a loop-invariant constant).
* ``forward(code, z, one)`` and ``derivative(code, z, one)``: the scalar formulas, written as
  plain Python over ``math`` so that each backend compiles the same source: the CPU kernels
  with ``numba.njit(inline="always")``, the CUDA kernels with ``cuda.jit(device=True)``, and
  the CUDA simulator and the float64 NumPy reference run them as they are. ``one`` is 1 in
  the kernels' compute dtype: every constant is derived from it, so float32 arithmetic stays
  float32 (a Python float literal would promote it to float64 in Numba).
* ``TORCH_NAMES``: the ``torch.nn.functional`` function that is the same activation (the
  torch oracle in the tests, the peers in ``gnnumba bench``, ONNX export).

Adding an activation: a code in ``CODES``, a branch in ``forward`` and ``derivative``, its
torch name; then the tests in ``tests/cases.py`` pick it up.
"""

from __future__ import annotations

import math

import numpy as np

NONE, SILU, RELU, GELU = 0, 1, 2, 3

CODES = {None: NONE, "silu": SILU, "relu": RELU, "gelu": GELU}

# torch.nn.functional.<name> computes the same function (gelu: the default, exact erf form)
TORCH_NAMES = {"silu": "silu", "relu": "relu", "gelu": "gelu"}

NAMES = tuple(CODES)  # (None, "silu", "relu", "gelu"): what ``activation=`` accepts


def forward(code, z, one):
    """act(z). ``code`` is a value of ``CODES``."""
    if code == SILU:
        return z / (one + math.exp(-z))
    if code == RELU:
        # z < 0 -> 0; NaN and -0.0 fall through unchanged, as torch.relu keeps NaN
        return z * (one - one) if z < one - one else z
    if code == GELU:
        half = one / (one + one)
        return half * z * (one + math.erf(z * math.sqrt(half)))
    return z


def derivative(code, z, one):
    """d act / dz at the pre-activation z."""
    if code == SILU:
        sg = one / (one + math.exp(-z))
        return sg * (one + z * (one - sg))
    if code == RELU:
        # torch's threshold_backward: gradient 1 where z > 0, else 0 (also at z == 0)
        return one if z > one - one else one - one
    if code == GELU:
        half = one / (one + one)
        cdf = half * (one + math.erf(z * math.sqrt(half)))
        # 1/sqrt(2 pi) from ``one`` (acos(-1) = pi): a float literal would promote to float64
        pdf = math.exp(-half * z * z) * math.sqrt(half / math.acos(-one))
        return cdf + z * pdf
    return one


def code(activation) -> int:
    """The kernels' code for a validated ``activation`` name (see ``_checks.check_activation``)."""
    return CODES[activation]


# float64 NumPy versions for the reference and the tests (elementwise over the scalar formulas)
_np_forward = np.vectorize(forward, otypes=[np.float64])
_np_derivative = np.vectorize(derivative, otypes=[np.float64])


def numpy_forward(activation, z: np.ndarray) -> np.ndarray:
    """act(z) in float64 over an array (identity for ``None``)."""
    z = np.asarray(z, dtype=np.float64)
    return z if activation is None else _np_forward(code(activation), z, 1.0)


def numpy_derivative(activation, z: np.ndarray) -> np.ndarray:
    """act'(z) in float64 over an array (ones for ``None``)."""
    z = np.asarray(z, dtype=np.float64)
    return np.ones_like(z) if activation is None else _np_derivative(code(activation), z, 1.0)
