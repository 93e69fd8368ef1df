"""Numerical robustness of the CPU kernels: constant and near-constant groups, eps = 0,
non-finite values, and property-based differential tests of every path.

Hypothesis runs a short profile by default (CI); ``HYPOTHESIS_PROFILE=long`` runs more
examples."""

import contextlib
import os

import numpy as np
import pytest
from cases import assert_close, make_layout

import gnnumba
from gnnumba import config, reference

hyp = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
from hypothesis import HealthCheck, given, settings  # noqa: E402

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
PROPERTY = settings(max_examples=400 if LONG else 25, deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow])

# config overrides that force a path (small blocks, so small shapes span several of them)
_SMALL = dict(CPU_CHUNK=16, CPU_CL_BLOCK=32)
PATHS = {
    "serial": dict(_SMALL, CPU_SERIAL_MAX_ELEMENTS=1 << 62),
    "fused": dict(_SMALL, CPU_SERIAL_MAX_ELEMENTS=0, CPU_FUSED_MIN_TASKS_PER_THREAD=0,
                  CPU_FUSED_MAX_BYTES=1 << 62),
    "split": dict(_SMALL, CPU_SERIAL_MAX_ELEMENTS=0, CPU_FUSED_MAX_BYTES=-1),
    "default": {},
}


@contextlib.contextmanager
def path_config(path):
    old = {k: getattr(config, k) for k in PATHS[path]}
    try:
        for k, v in PATHS[path].items():
            setattr(config, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(config, k, v)


def _cl(x):
    return make_layout(x, "channels_last")


# --------------------------------------------------------------------------- constant groups


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,G", [((1, 8, 64, 64), 2), ((1, 2, 65536), 1),
                                     ((2, 32, 17, 19), 4)])
def test_constant_groups_have_variance_exactly_zero(shape, G, layout, dtype):
    """Channels-last float32 gave rstd NaN for a constant 1e6 (per-channel float32 block sums,
    a negative M2 never clamped). Every layout and dtype: mean = the value, rstd =
    1/sqrt(eps) exactly, y = bias, dx finite."""
    for value in (1e6, 1.4e4, 300.0, 0.1, -2.5e-3):
        x = make_layout(np.full(shape, value, dtype), layout)
        b = np.arange(shape[1], dtype=dtype)
        y, mean, rstd = gnnumba.group_norm_forward(x, G, None, b)
        np.testing.assert_array_equal(mean, np.full(mean.shape, dtype(value)))
        np.testing.assert_array_equal(rstd, np.full(rstd.shape, 1 / np.sqrt(1e-5), rstd.dtype))
        np.testing.assert_array_equal(y, np.broadcast_to(b.reshape((1, -1) + (1,) * (len(shape)
                                                                              - 2)), shape))
        dx, _, _ = gnnumba.group_norm_backward(x, x, mean, rstd, G, None, b)
        assert np.isfinite(dx).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 8, 64, 64), (1, 2, 65536)])
def test_near_constant_groups_are_stable_float32(shape, layout):
    """Large offset, tiny spread: rstd within 1e-5 of the float64 reference (it was > 1% off
    in channels-last from |x| ~ 1.4e4 on)."""
    rng = np.random.default_rng(0)
    for offset in (1e2, 1.4e4, 1e6):
        for spread in (1e-3, 1.0):
            x = (offset + spread * rng.standard_normal(shape)).astype(np.float32)
            _, _, rstd = gnnumba.group_norm_forward(make_layout(x, layout), 2)
            _, _, rstd_ref = reference.forward(x, 2)
            np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5)


# --------------------------------------------------------------------------- eps = 0


@pytest.mark.parametrize("path", ["serial", "fused", "split", "default"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eps_zero_with_constant_group_gives_inf_nan_like_torch(path, layout):
    """eps = 0 and a zero-variance group raised ZeroDivisionError on the serial path; torch
    gives rstd inf and y NaN there, and normal values elsewhere."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    x[0, :2] = 3.0  # sample 0, group 0 is constant
    with path_config(path):
        y, mean, rstd = gnnumba.group_norm_forward(make_layout(x, layout), 2, eps=0.0)
        xl = make_layout(x, layout)
        dx, _, _ = gnnumba.group_norm_backward(xl, xl, mean, rstd, 2)
    yt = torch.nn.functional.group_norm(torch.from_numpy(x), 2, eps=0.0).numpy()
    assert rstd[0, 0] == np.inf
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yt))
    ok = ~np.isnan(yt)
    np.testing.assert_allclose(y[ok], yt[ok], rtol=1e-4, atol=1e-5)
    assert np.isfinite(dx[1]).all()


# --------------------------------------------------------------------------- properties


@st.composite
def problems(draw):
    G = draw(st.integers(1, 4))
    C = G * draw(st.integers(1, 4))
    N = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))
    shape = (N, C) + spatial
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    kind = draw(st.sampled_from(["normal", "constant", "near-constant", "offset", "denormal",
                                 "non-finite"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    scale = 1.0
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "constant":
        x = np.full(shape, draw(st.sampled_from([0.0, 1.0, -7.5, 1e4, 1e6])))
    elif kind == "near-constant":
        scale = 1e-3
        x = 5.0 + scale * rng.standard_normal(shape)
    elif kind == "offset":
        offset = draw(st.sampled_from([1e3, 1e4, -3e4]))
        x = offset + rng.standard_normal(shape)
        scale = 1.0 / (1.0 + abs(offset) * np.finfo(dtype).eps / 1e-7)  # digits left in x
    elif kind == "denormal":
        x = 1e-40 * rng.standard_normal(shape) if dtype == np.float32 else 1e-310 * \
            rng.standard_normal(shape)
    else:
        x = rng.standard_normal(shape)
        flat = x.reshape(-1)
        for v in draw(st.lists(st.sampled_from([np.inf, -np.inf, np.nan]), min_size=1,
                               max_size=3)):
            flat[rng.integers(flat.size)] = v
    layout = draw(st.sampled_from(["nchw", "channels_last"] if spatial else ["nchw"]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]))
    act = draw(st.sampled_from([None, "silu", "relu", "gelu"]))
    w = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x.astype(dtype), G, layout, eps, act, w, b, dy, kind, scale


def _run(x, G, layout, eps, act, w, b, dy, path):
    with path_config(path):
        xl, dyl = make_layout(x, layout), make_layout(dy, layout)
        y, mean, rstd = gnnumba.group_norm_forward(xl, G, w, b, eps, activation=act)
        grads = gnnumba.group_norm_backward(dyl, xl, mean, rstd, G, w, b, activation=act)
    return (y, mean, rstd) + tuple(grads)


def _close_where_finite(actual, expected, tol, what):
    """Non-finite values where the reference has them (NaN stays in its group), the rest
    close."""
    actual = np.asarray(actual, np.float64)
    bad = ~np.isfinite(expected)
    np.testing.assert_array_equal(np.isnan(actual) | np.isinf(actual), bad, err_msg=what)
    assert_close(np.where(bad, 0, actual), np.where(bad, 0, expected), tol, what)


@PROPERTY
@given(problems())
def test_property_every_path_matches_reference_and_each_other(problem):
    x, G, layout, eps, act, w, b, dy, kind, scale = problem
    paths = ["serial", "fused", "split"] if layout == "nchw" else ["serial", "fused"]
    results = {p: _run(x, G, layout, eps, act, w, b, dy, p) for p in paths}
    first = results[paths[0]]
    for p in paths[1:]:  # all paths of a layout: the same bits
        for a, a2 in zip(first, results[p]):
            np.testing.assert_array_equal(a, a2, err_msg=f"{paths[0]} vs {p}")
    y, mean, rstd, dx, dw, db = first
    y_ref, mean_ref, rstd_ref = reference.forward(x, G, w, b, eps, act)
    dx_ref, dw_ref, db_ref, _, _ = reference.backward(dy, x, G, w, b, eps, act)
    f32 = x.dtype == np.float32
    tol = (2e-5 if f32 else 1e-11) / scale
    gtol = (2e-4 if f32 else 1e-9) / scale
    if kind == "constant":
        np.testing.assert_array_equal(rstd, np.float64(1 / np.sqrt(eps)).astype(rstd.dtype))
    if kind == "non-finite":
        # the reference puts NaN in every group with a non-finite value; only check the
        # pattern of the forward and the finite groups
        _close_where_finite(y, y_ref, tol, "y")
        return
    _close_where_finite(y, y_ref, tol, "y")
    _close_where_finite(dx, dx_ref, gtol, "dx")
    _close_where_finite(dw, dw_ref, gtol, "dweight")
    _close_where_finite(db, db_ref, gtol, "dbias")


# --------------------------------------------------------------------------- activations


def test_float32_exp_of_the_cpu_kernels_is_within_one_ulp():
    """The kernels' vectorisable float32 exp (``gnnumba.cpu.activation.expf``, used by SiLU)
    against the correctly rounded exp, over the whole float32 range and its special values."""
    from numba import njit

    from gnnumba.cpu.activation import expf

    @njit(error_model="numpy")
    def exp_all(a, out):
        for i in range(a.shape[0]):
            out[i] = expf(a[i])

    x = np.concatenate([np.linspace(-110, 95, 400_001, dtype=np.float32),
                        np.random.default_rng(0).standard_normal(100_000).astype(np.float32),
                        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 88.72, -87.4,
                                  -103.9, -104.0], np.float32)])
    got = np.empty_like(x)
    exp_all(x, got)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny)
    ulps = np.abs(got[normal].view(np.int32).astype(np.int64)
                  - want[normal].view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
    tiny = ~normal & np.isfinite(want)  # denormal results and 0: one denormal step at most
    assert np.all(np.abs(got[tiny].astype(np.float64) - want[tiny]) <= 2.0 ** -149)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    assert np.isnan(got[np.isnan(x)]).all() and not np.isnan(got[~np.isnan(x)]).any()
