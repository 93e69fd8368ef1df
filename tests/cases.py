"""Labelled test shapes shared by the CPU, CUDA and torch tests: each says what it exercises."""

import numpy as np
import pytest

# (shape, num_groups, label)
SHAPES = [
    ((0, 4, 3, 3), 2, "N=0 (empty batch)"),
    ((2, 4, 0, 3), 2, "empty spatial dim"),
    ((2, 6, 5, 5), 1, "G=1 (LayerNorm)"),
    ((2, 6, 5, 5), 6, "G=C (InstanceNorm)"),
    ((3, 4, 1, 1), 4, "one element per group (variance 0)"),
    ((4, 8), 2, "no spatial dims (N, C)"),
    ((2, 8, 17), 4, "1-D signal"),
    ((2, 4, 3, 5, 6), 2, "3-D volume"),
    ((3, 9, 7, 11), 3, "odd sizes"),
    ((2, 64, 4, 4), 32, "G=32 default"),
    ((1, 4, 45, 47), 2, "large groups, N=1 (several chunks, split path)"),
]

SHAPE_PARAMS = [pytest.param(s, g, id=label) for s, g, label in SHAPES]


def make_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``a`` in another memory layout."""
    if layout == "nchw":
        return np.ascontiguousarray(a)
    if layout == "channels_last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
    if layout == "strided":  # every other element of a twice-as-wide buffer
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    raise ValueError(layout)


def random_inputs(shape, dtype=np.float32, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    w = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, dy


# per-dtype tolerances against the float64 reference: (y, dx and dweight/dbias)
TOL = {np.float32: dict(y=2e-5, grad=2e-4), np.float64: dict(y=1e-11, grad=1e-9)}


def assert_close(actual, expected, tol, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    err = float(np.abs(actual - expected).max()) if expected.size else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.3g} * {scale:.3g}"
