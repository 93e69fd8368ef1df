"""CUDA kernels against the float64 reference, in Numba's simulator (or on a real GPU).

The simulator must be chosen before ``numba.cuda`` is imported, so a plain ``pytest`` run
executes this file once more in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``
(``test_simulator_suite``); in the parent process the device tests skip unless a real GPU
is present. Shapes are tiny (the simulator runs every thread in Python) and the launch
configuration is lowered so they still span several blocks and partials per group.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest



from numba import cuda

import gnnumba
from gnnumba import _checks, activations, reference

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
HAVE_GPU = (not SIM) and cuda.is_available()
device = pytest.mark.skipif(not (SIM or HAVE_GPU),
                            reason="no CUDA GPU (the simulator run covers these)")

if SIM or HAVE_GPU:
    import gnnumba.gpu as gc
    from gnnumba.gpu import config, launch, selftest


@pytest.mark.skipif(SIM, reason="this is the simulator run")
def test_simulator_suite():
    """Runs this file under NUMBA_ENABLE_CUDASIM=1 and requires every test to pass."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
         "-p", "no:randomly"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).resolve().parents[1])
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


@pytest.fixture
def small(monkeypatch):
    """The lowered launch configuration of the self-test (several blocks per group)."""
    if SIM:
        for k, v in selftest.SMALL_CONFIG.items():
            monkeypatch.setattr(config, k, v)


def _dev(a, channels_last=False):
    return selftest._device(a, channels_last)


def _permuted(d, axes):
    """A view of device array ``d`` with its axes permuted (Numba's transpose is 2-D only)."""
    if SIM:
        return d.transpose(axes)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(tuple(d.shape[a] for a in axes), tuple(d.strides[a] for a in axes),
                         d.dtype, gpu_data=d.gpu_data)


def _host(a):
    return selftest.to_host(a)


def _inputs(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    return ((rng.standard_normal(shape) * 2 + 3).astype(dtype),
            rng.standard_normal(shape).astype(dtype),
            (rng.standard_normal(C) + 1).astype(dtype),
            rng.standard_normal(C).astype(dtype))


@device
@pytest.mark.parametrize("case", selftest.CASES if (SIM or HAVE_GPU) else [],
                         ids=lambda c: c[0])
def test_against_reference(small, case):
    name, shape, G, dtype, cl, act = case
    errs = selftest.check_case(shape, G, dtype, cl, act)
    tol = selftest.TOL[dtype]
    assert max(errs[:3]) <= tol, errs
    assert max(errs[3:]) <= 10 * tol, errs


@device
def test_selftest_run_reports_every_case(small, monkeypatch):
    """run() reports a forward and a backward line per case, and an exception as a failed
    line (the cases themselves are checked by test_against_reference)."""
    monkeypatch.setattr(selftest, "CASES", selftest.CASES[:1] + [
        ("broken", (2, 6, 5, 7), 4, np.float32, False, None)])  # C=6, G=4: ValueError
    results = selftest.run()
    assert [ok for _, ok, _ in results] == [True, True, False], results
    assert "must be divisible by num_groups" in results[2][0]


@device
@pytest.mark.parametrize("fused_items", [2, 64])  # 2: split path (2 kernels); 64: on-chip
def test_split_and_fused_paths_agree(small, monkeypatch, fused_items):
    if SIM:
        monkeypatch.setattr(config, "FUSED_ITEMS", fused_items)
    x, dy, w, b = _inputs((2, 4, 5, 6))  # group of 2 x 30 = 60 elements
    y, m, r = gc.group_norm_forward(_dev(x), 2, _dev(w), _dev(b), 1e-5, activation="silu")
    yr, mr, rr = selftest.reference_forward(x, 2, w, b, 1e-5, "silu")
    np.testing.assert_allclose(_host(y), yr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_host(r), rr, rtol=1e-5)


@device
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_deterministic(small, cl):
    x, dy, w, b = _inputs((1, 6, 4, 5), seed=3)  # several blocks per group; N=1 for time
    xd, dyd, wd, bd = _dev(x, cl), _dev(dy), _dev(w), _dev(b)
    runs = []
    for _ in range(2):
        y, m, r = gc.group_norm_forward(xd, 3, wd, bd, 1e-5)
        dx, dw, db = gc.group_norm_backward(dyd, xd, m, r, 3, wd, bd)
        runs.append([_host(a) for a in (y, m, r, dx, dw, db)])
    for a, b_ in zip(*runs):
        assert np.array_equal(a, b_)


@device
def test_matches_torch_group_norm(small):
    torch = pytest.importorskip("torch")
    x, dy, w, b = _inputs((2, 6, 3, 4), seed=5)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    yt = torch.nn.functional.group_norm(xt, 3, wt, bt, 1e-5)
    yt.backward(torch.tensor(dy))
    y, m, r = gc.group_norm_forward(_dev(x), 3, _dev(w), _dev(b), 1e-5)
    dx, dw, db = gc.group_norm_backward(_dev(dy), _dev(x), m, r, 3, _dev(w), _dev(b))
    np.testing.assert_allclose(_host(y), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_host(dx), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_host(dw), wt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_host(db), bt.grad.numpy(), rtol=1e-4, atol=1e-5)


@device
def test_no_affine_gives_none_grads_and_per_sample_grads(small):
    x, dy, w, b = _inputs((3, 4, 5))
    y, m, r = gc.group_norm_forward(_dev(x), 2, None, None, 1e-5)
    yr, _, _ = reference.forward(x, 2, None, None, 1e-5)
    np.testing.assert_allclose(_host(y), yr, rtol=1e-5, atol=1e-5)
    dx, dw, db = gc.group_norm_backward(_dev(dy), _dev(x), m, r, 2, None, None)
    assert dw is None and db is None
    dwn, dbn = gc.per_sample_param_grads(_dev(dy), _dev(x), m, r, 2, None, None)
    dxr, _, _, dwnr, dbnr = reference.backward(dy, x, 2)
    np.testing.assert_allclose(_host(dx), dxr, rtol=1e-4, atol=1e-5)
    assert _host(dwn).shape == (3, 4) and _host(dwn).dtype == np.float32
    np.testing.assert_allclose(_host(dwn), dwnr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_host(dbn), dbnr, rtol=1e-4, atol=1e-5)


@device
def test_other_strides_copied_once_and_out_in_place(small):
    x, dy, w, b = _inputs((2, 4, 3, 5))
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2))  # (2, 4, 5, 3) in memory
    xd = _permuted(_dev(xt), (0, 1, 3, 2))  # logical (2, 4, 3, 5), neither layout
    assert launch.DevArray(xd, "x").layout is None
    y, m, r = gc.group_norm_forward(xd, 2, _dev(w), _dev(b), 1e-5)
    yr, _, _ = reference.forward(x, 2, w, b, 1e-5)
    np.testing.assert_allclose(_host(y), yr, rtol=1e-5, atol=1e-5)
    xi = _dev(x)
    out, _, _ = gc.group_norm_forward(xi, 2, _dev(w), _dev(b), 1e-5, out=xi)  # in place
    assert out is xi
    np.testing.assert_allclose(_host(xi), yr, rtol=1e-5, atol=1e-5)


@device
def test_empty_inputs(small):
    y, m, r = gc.group_norm_forward(_dev(np.zeros((0, 4, 3), np.float32)), 2, None, None, 1e-5)
    assert _host(y).shape == (0, 4, 3) and _host(m).shape == (0, 2)
    y, m, r = gc.group_norm_forward(_dev(np.zeros((2, 4, 0), np.float32)), 2, None, None, 1e-5)
    assert _host(y).shape == (2, 4, 0)
    assert np.all(_host(m) == 0) and np.all(np.isnan(_host(r)))  # as the CPU path
    w = _dev(np.ones(4, np.float32))
    for shape in ((2, 4, 0), (0, 4, 3)):  # empty sums are 0
        xd = _dev(np.zeros(shape, np.float32))
        _, m, r = gc.group_norm_forward(xd, 2, None, None, 1e-5)
        dx, dw, db = gc.group_norm_backward(xd, xd, m, r, 2, w, w)
        assert _host(dx).shape == shape
        assert np.array_equal(_host(dw), np.zeros(4)) and np.array_equal(_host(db), np.zeros(4))
        dwn, dbn = gc.per_sample_param_grads(xd, xd, m, r, 2, w, w)
        assert _host(dwn).shape == (shape[0], 4) and not np.any(_host(dbn))


@device
def test_launch_forward_writes_caller_outputs(small):
    x, dy, w, b = _inputs((2, 4, 6))
    y = cuda.device_array(x.shape, np.float32)
    m = cuda.device_array((2, 2), np.float32)
    r = cuda.device_array((2, 2), np.float32)
    assert gc.launch_forward(_dev(x), 2, None, None, 1e-5, None, y, m, r, stream=0) is None
    yr, mr, rr = reference.forward(x, 2, None, None, 1e-5)
    np.testing.assert_allclose(_host(y), yr, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="mean has dtype float64"):
        gc.launch_forward(_dev(x), 2, None, None, 1e-5, None, y,
                          cuda.device_array((2, 2), np.float64), r)


def _message(exc_type, fn):
    with pytest.raises(exc_type) as info:
        fn()
    return str(info.value)


@device
def test_errors_match_cpu_messages(small):
    x, dy, w, b = _inputs((2, 6, 4))
    xd = _dev(x)
    for G, bad_w in [(4, None), (2, np.ones(5, np.float32))]:
        cpu = _message(ValueError, lambda: gnnumba.group_norm(x, G, bad_w))
        gpu = _message(ValueError, lambda: gc.launch_forward(
            xd, G, None if bad_w is None else _dev(bad_w), None, 1e-5, None,
            cuda.device_array(x.shape, np.float32), cuda.device_array((2, G), np.float32),
            cuda.device_array((2, G), np.float32)))
        assert gpu == cpu
    cpu = _message(TypeError, lambda: gnnumba.group_norm(x, 2, w.astype(np.float64)))
    gpu = _message(TypeError, lambda: gc.group_norm_forward(
        xd, 2, _dev(w.astype(np.float64)), None, 1e-5))
    assert gpu == cpu
    with pytest.raises(TypeError, match="not supported"):
        gc.group_norm_forward(_dev(x.astype(np.int32)), 2, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"dy must have the same shape"):
        gc.group_norm_backward(_dev(dy[:1]), xd, *gc.group_norm_forward(xd, 2, None, None,
                                                                        1e-5)[1:], 2, None,
                               None)
    assert "C=6" in _message(ValueError, lambda: _checks.check_num_groups(4, 6))


@device
def test_public_api_dispatches_device_arrays(small):
    x, dy, w, b = _inputs((2, 4, 5))
    y = gnnumba.group_norm(_dev(x), 2, _dev(w), _dev(b))
    np.testing.assert_allclose(_host(y), reference.forward(x, 2, w, b)[0], rtol=1e-5,
                               atol=1e-5)


@device
def test_strided_copy_kernel(small):
    """The kernel that brings arbitrary strides to NCHW on a real GPU (the simulator path
    copies with NumPy), fed directly with a flat span, negative strides included."""
    src = np.arange(60, dtype=np.float32)
    ks = launch._kernels(np.float32, None)
    dst = cuda.to_device(np.zeros(12, np.float32))
    # logical (3, 4) view of src: rows step -20 (start at 40), columns step 3
    launch._launch(ks, "strided_copy", 1, 32, 0, cuda.to_device(src), 40, (-20, 3), dst, 0,
                   (4, 1), (3, 4))
    want = np.array([[40 - 20 * i + 3 * j for j in range(4)] for i in range(3)], np.float32)
    assert np.array_equal(_host(dst).reshape(3, 4), want)


@device
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fused_items", [2, 64])  # split path and on-chip path
def test_large_offset_tiny_variance(small, monkeypatch, cl, fused_items):
    """x = 100 + 0.01*randn, and one element per group (variance 0, rstd = 1/sqrt(eps)):
    folding the mean into the shift (x*a + (b - mean*a)) cancels catastrophically here."""
    if SIM:
        monkeypatch.setattr(config, "FUSED_ITEMS", fused_items)
    rng = np.random.default_rng(11)
    # y is O(1); the float32 mean of 100 + noise is off by ~1e-6, times rstd ~ 100. With one
    # element per group x - mean is exact, so y = beta up to rounding.
    for shape, G, atol in (((2, 4, 3, 5), 2, 1e-3), ((3, 4, 1, 1), 4, 1e-5)):
        x = (100.0 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
        w = (1.0 + 0.1 * rng.standard_normal(shape[1])).astype(np.float32)
        b = rng.standard_normal(shape[1]).astype(np.float32)
        y, m, r = gc.group_norm_forward(_dev(x, cl), G, _dev(w), _dev(b), 1e-5)
        yr, mr, rr = reference.forward(x, G, w, b, 1e-5)
        np.testing.assert_allclose(_host(r), rr, rtol=1e-3)
        np.testing.assert_allclose(_host(y), yr, atol=atol)


@device
def test_workspace_allocator_serves_every_workspace(small):
    """Inside launch.workspace_allocator every workspace comes from the given allocator (the
    torch bridge passes torch's caching allocator), and the results do not change."""
    x, dy, w, b = _inputs((2, 4, 5, 6), seed=7)
    requests = []

    def alloc(shape, dtype):
        requests.append((shape, dtype))
        return cuda.device_array(shape, dtype)

    expected = None
    for use in (False, True):
        ctx = launch.workspace_allocator(alloc) if use else contextlib.nullcontext()
        with ctx:
            y, m, r = gc.group_norm_forward(_dev(x), 2, _dev(w), _dev(b), 1e-5)
            dx, dw, db = gc.group_norm_backward(_dev(dy), _dev(x), m, r, 2, _dev(w), _dev(b))
        got = [_host(a) for a in (y, m, r, dx, dw, db)]
        if expected is None:
            expected = got
            assert not requests
    assert requests, "no workspace was requested from the allocator"
    for a, e in zip(got, expected):
        np.testing.assert_array_equal(a, e)


# --------------------------------------------------------------------------- new paths


def _case(shape, dtype, seed=0, offset=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, dy, w, b


def _rel_err(got, want):
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(_host(got).astype(np.float64) - want))
                 / max(1.0, float(np.max(np.abs(want)))))


@device
@pytest.mark.parametrize("act", list(activations.CODES), ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_every_activation_forward_backward_per_sample(small, act, cl):
    """Forward, backward and per-sample gradients of every activation in the table, both
    layouts, groups spanning several blocks (split path), against the float64 reference."""
    x, dy, w, b = _case((2, 6, 4, 5), np.float32, seed=1)
    xd, dyd, wd, bd = _dev(x, cl), _dev(dy, cl), _dev(w), _dev(b)
    y, m, r = gc.group_norm_forward(xd, 3, wd, bd, 1e-5, activation=act)
    dx, dw, db = gc.group_norm_backward(dyd, xd, m, r, 3, wd, bd, activation=act)
    dwn, dbn = gc.per_sample_param_grads(dyd, xd, m, r, 3, wd, bd, activation=act)
    yr, mr, rr = selftest.reference_forward(x, 3, w, b, 1e-5, act)
    dxr, dwr, dbr, dwnr, dbnr = selftest.reference_backward(dy, x, 3, w, b, 1e-5, act)
    for got, want, tol in [(y, yr, 1e-5), (m, mr, 1e-6), (r, rr, 1e-5), (dx, dxr, 1e-4),
                           (dw, dwr, 1e-4), (db, dbr, 1e-4), (dwn, dwnr, 1e-4),
                           (dbn, dbnr, 1e-4)]:
        assert _rel_err(got, want) <= tol
    # the backward's parameter gradients are the per-sample ones summed over n, in order
    assert np.array_equal(_host(dw), _host(dwn).sum(axis=0, dtype=np.float32))
    assert np.array_equal(_host(db), _host(dbn).sum(axis=0, dtype=np.float32))


@device
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_in_place_on_the_two_launch_path(monkeypatch, cl):
    """y written over x by the statistics-then-apply forward equals the out-of-place y bit
    for bit. The apply blocks once read their group's shift (its first element) from x,
    which another block of the group may already have overwritten in place: on an H100
    every in-place SD-UNet 2x320x64x64 forward came out wrong; here the simulator runs the
    blocks in order, so the second row of a group read y."""
    for k, v in selftest.SMALL_CONFIG.items():  # several blocks per group, GPU or not
        monkeypatch.setattr(config, k, v)
    shape, G = (1, 6, 5, 7), 3
    x, _, w, b = _case(shape, np.float32, offset=300.0)
    layout = launch.CL if cl else launch.NCHW
    steps, _ = launch.forward_plan(1, 6, 35, G, layout, launch.sm_count(),
                                   launch._config_key(), launch.items(np.float32))
    assert len(steps) == 2  # statistics, then apply
    wd, bd = _dev(w), _dev(b)
    xd = _dev(x, cl)
    y = launch.empty(shape, np.float32, layout)
    stats = [cuda.device_array((1, G), np.float32) for _ in range(4)]
    gc.launch_forward(xd, G, wd, bd, 1e-5, None, y, stats[0], stats[1])
    gc.launch_forward(xd, G, wd, bd, 1e-5, None, xd, stats[2], stats[3])  # in place
    assert np.array_equal(_host(xd), _host(y))
    assert np.array_equal(_host(stats[0]), _host(stats[2]))


@device
@pytest.mark.parametrize("path, shape, G, cl, expected", [
    ("fused", (2, 4, 3, 5), 2, False, dict(forward=1, backward=2, per_sample=1)),
    ("split", (1, 6, 5, 7), 3, False, dict(forward=2, backward=3, per_sample=2)),
    ("channels_last", (2, 6, 4, 5), 3, True, dict(forward=2, backward=3, per_sample=2)),
])
def test_launch_counts(small, monkeypatch, path, shape, G, cl, expected):
    """Forward: 1 launch for a group in one block's registers, else 2 (statistics, then
    apply with the partials' merge in its prologue) in both layouts. Backward: a group on
    chip, 2 (x and dy read once for sums and dx, then the sums over n), else 3 (sums,
    merge, dx with the parameter sums); per-sample gradients 1 or 2 (no dx)."""
    for k, v in selftest.SMALL_CONFIG.items():  # the same paths on a GPU as simulated
        monkeypatch.setattr(config, k, v)
    if path == "fused":
        monkeypatch.setattr(config, "FUSED_ITEMS", 64)
    x, dy, w, b = _case(shape, np.float32)
    xd, dyd, wd, bd = _dev(x, cl), _dev(dy, cl), _dev(w), _dev(b)  # copies not counted
    names = []
    real = launch._launch

    def counting(ks, name, *args):
        names.append(name)
        return real(ks, name, *args)

    monkeypatch.setattr(launch, "_launch", counting)
    N, C = shape[:2]
    y = launch.empty(shape, np.float32, launch.CL if cl else launch.NCHW)
    m = cuda.device_array((N, G), np.float32)
    r = cuda.device_array((N, G), np.float32)
    counts = {}
    gc.launch_forward(xd, G, wd, bd, 1e-5, "silu", y, m, r)
    counts["forward"], names[:] = len(names), []
    dx = launch.empty(shape, np.float32, launch.CL if cl else launch.NCHW)
    dwn = cuda.device_array((N, C), np.float32)
    dbn = cuda.device_array((N, C), np.float32)
    gc.launch_backward(dyd, xd, m, r, G, wd, bd, "silu", dx, dwn, dbn,
                       cuda.device_array(C, np.float32), cuda.device_array(C, np.float32))
    counts["backward"], names[:] = len(names), []
    gc.launch_per_sample_param_grads(dyd, xd, m, r, G, wd, bd, "silu", dwn, dbn)
    counts["per_sample"] = len(names)
    assert counts == expected, names
    assert not any(n.startswith("bwd_dx") for n in names)  # per-sample: no dx pass


def _check_backward(x, dy, w, b, G, act, cl=False, tol=1e-4):
    xd, dyd, wd, bd = _dev(x, cl), _dev(dy, cl), _dev(w), _dev(b)
    y, m, r = gc.group_norm_forward(xd, G, wd, bd, 1e-5, activation=act)
    dx, dw, db = gc.group_norm_backward(dyd, xd, m, r, G, wd, bd, activation=act)
    dwn, dbn = gc.per_sample_param_grads(dyd, xd, m, r, G, wd, bd, activation=act)
    dxr, dwr, dbr, dwnr, dbnr = selftest.reference_backward(dy, x, G, w, b, 1e-5, act)
    for got, want in [(dx, dxr), (dw, dwr), (db, dbr), (dwn, dwnr), (dbn, dbnr)]:
        assert _rel_err(got, want) <= tol
    return dx, dw, db, dwn, dbn


@device
@pytest.mark.parametrize("act", list(activations.CODES), ids=str)
def test_on_chip_backward(small, act):
    """NCHW groups that fit one block take bwd_fused_nchw (x and dy read once): 8 channels
    per group summed by 4 teams of 8 lanes in 2 rounds, rows shorter than a team (S = 6),
    against the float64 reference, bit-identical on a repeat."""
    x, dy, w, b = _case((2, 8, 2, 3), np.float32, seed=9)
    if SIM:
        steps, _ = launch.backward_plan(2, 8, 6, 1, launch.NCHW, launch.sm_count(),
                                        launch._config_key(), launch.items(np.float32))
        assert [s[0] for s in steps] == ["bwd_fused_nchw", "bwd_params"]
        assert steps[0][3][-1] == 8  # team width
    first = _check_backward(x, dy, w, b, 1, act)
    again = _check_backward(x, dy, w, b, 1, act)
    for a, a2 in zip(first, again):
        assert np.array_equal(_host(a), _host(a2))


@device
@pytest.mark.parametrize("offset, scale", [(-2e4, 1.0), (7.0, 0.0)], ids=["offset", "constant"])
def test_on_chip_backward_long_rows(small, monkeypatch, offset, scale):
    """Rows longer than the block (S = 40 > 32 threads) on chip, with a large offset, and a
    constant group (dx then is rstd*w*dz - mean of it: finite, exact per-sample dbias)."""
    if SIM:
        monkeypatch.setattr(config, "FUSED_ITEMS", 4)
    x, dy, w, b = _case((2, 2, 40), np.float32, seed=10, offset=offset, scale=scale)
    dx, dw, db, dwn, dbn = _check_backward(x, dy, w, b, 1, "silu", tol=2e-4)
    assert np.all(np.isfinite(_host(dx)))


@device
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fused_items", [2, 64])  # split path and on-chip path
def test_constant_groups_are_exact(small, monkeypatch, cl, fused_items):
    """A constant group has variance exactly 0 (shifted sums, Chan merges of equal means):
    mean is the value, rstd = 1/sqrt(eps), y = beta exactly; also at 1e6 in float32."""
    if SIM:
        monkeypatch.setattr(config, "FUSED_ITEMS", fused_items)
    shape = (2, 6, 4, 5)
    x = np.full(shape, 1e6, np.float32)
    x[1] = -3.25
    b = np.linspace(-1, 1, 6).astype(np.float32)
    w = np.full(6, 2.0, np.float32)
    y, m, r = gc.group_norm_forward(_dev(x, cl), 3, _dev(w), _dev(b), 1e-5)
    assert np.array_equal(_host(m), np.array([[1e6] * 3, [-3.25] * 3], np.float32))
    np.testing.assert_allclose(_host(r), 1 / np.sqrt(1e-5), rtol=1e-6)
    assert np.array_equal(_host(y), np.broadcast_to(b[None, :, None, None], shape))


@device
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("offset", [-3e5])
@pytest.mark.parametrize("min_block", [16, 4096], ids=["blocks", "flushes"])
def test_large_offsets_stay_accurate(small, monkeypatch, cl, offset, min_block):
    """x = offset + randn in float32 across several blocks per group ("blocks"), or in one
    block per group where each thread flushes its shifted sums several times ("flushes"):
    the variance keeps float32 accuracy of the spread (E[x^2] - E[x]^2 would lose it)."""
    if SIM:
        monkeypatch.setattr(config, "MIN_BLOCK_ELEMS", min_block)
    x, dy, w, b = _case((2, 4, 9, 16), np.float32, seed=4, offset=offset, scale=1.0)
    y, m, r = gc.group_norm_forward(_dev(x, cl), 2, _dev(w), _dev(b), 1e-5)
    yr, mr, rr = reference.forward(x, 2, w, b, 1e-5)
    np.testing.assert_allclose(_host(r), rr, rtol=2e-3)
    np.testing.assert_allclose(_host(y), yr, atol=abs(offset) * 2e-6)


@device
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_half_input_parameter_gradients_stay_float32(small, cl):
    """float16 x with float32 parameter-gradient outputs: the sum over n is formed and
    stored in float32, so 4 samples of 48000 each give 192000 (float16 would overflow to
    inf above 65504); the per-sample gradients are float32 too."""
    shape = (4, 2, 4, 4)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float16)
    dy = np.full(shape, 3000, np.float16)
    xd, dyd = _dev(x, cl), _dev(dy, cl)
    _, m, r = gc.group_norm_forward(xd, 1, None, None, 1e-5)
    dx = launch.empty(shape, np.float16, launch.CL if cl else launch.NCHW)
    dw = cuda.device_array(2, np.float32)
    db = cuda.device_array(2, np.float32)
    gc.launch_backward(dyd, xd, m, r, 1, None, None, None, dx, dweight=dw, dbias=db)
    np.testing.assert_array_equal(_host(db), [192000.0, 192000.0])
    _, _, dbr, _, _ = reference.backward(dy, x, 1)
    assert np.all(np.isfinite(_host(dw)))
    with pytest.raises(TypeError, match="dbias has dtype float64, expected float16 or float32"):
        gc.launch_backward(dyd, xd, m, r, 1, None, None, None, dx,
                           dbias=cuda.device_array(2, np.float64))


@device
def test_launch_plans_are_cached(small):
    """Repeat calls of one shape compute the launch geometry once (one plan function per
    direction serves every path; small shapes: the simulator is slow)."""
    x, dy, w, b = _case((1, 4, 3, 5), np.float32)
    launch.forward_plan.cache_clear()
    for _ in range(3):
        _, m, r = gc.group_norm_forward(_dev(x), 2, None, None, 1e-5)
    info = launch.forward_plan.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    launch.backward_plan.cache_clear()
    for _ in range(2):
        gc.group_norm_backward(_dev(dy), _dev(x), m, r, 2, None, None)
    gc.per_sample_param_grads(_dev(dy), _dev(x), m, r, 2)
    info = launch.backward_plan.cache_info()
    assert (info.misses, info.hits) == (1, 2)


@device
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_whole_tiles_and_tails(small, cl, dtype):
    """Rows long enough for whole register tiles (loads without bounds checks) followed by a
    tail (S = 150: NCHW chunks of 64, 64, 22, or 128, 22 for float16's tiles of twice as
    many values; channels-last blocks of 16 or 32 positions and a shorter one), through the
    forward, backward and per-sample kernels."""
    x, dy, w, b = _case((1, 4, 10, 15), dtype, seed=6)
    xd, dyd, wd, bd = _dev(x, cl), _dev(dy, cl), _dev(w), _dev(b)
    y, m, r = gc.group_norm_forward(xd, 2, wd, bd, 1e-5, activation="silu")
    dx, dw, db = gc.group_norm_backward(dyd, xd, m, r, 2, wd, bd, activation="silu")
    dwn, dbn = gc.per_sample_param_grads(dyd, xd, m, r, 2, wd, bd, activation="silu")
    yr, _, rr = selftest.reference_forward(x, 2, w, b, 1e-5, "silu")
    dxr, dwr, dbr, dwnr, dbnr = selftest.reference_backward(dy, x, 2, w, b, 1e-5, "silu")
    f = 1 if dtype == np.float32 else 300  # float16 outputs: rounding of 2**-11
    for got, want, tol in [(y, yr, 1e-5 * f), (r, rr, 1e-5), (dx, dxr, 1e-4 * f),
                           (dw, dwr, 1e-4 * f), (db, dbr, 1e-4 * f), (dwn, dwnr, 1e-4),
                           (dbn, dbnr, 1e-4)]:
        assert _rel_err(got, want) <= tol


@device
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_bfloat16_natively(small, cl):
    """bfloat16 arrays (ml_dtypes) run the kernels directly, accumulating in float32: y and
    dx are bfloat16, mean/rstd and the per-sample gradients float32."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    x, dy, w, b = _case((2, 6, 4, 5), np.float32, seed=8)
    x, dy, w, b = (a.astype(bf16) for a in (x, dy, w, b))
    xd, dyd, wd, bd = _dev(x, cl), _dev(dy, cl), _dev(w), _dev(b)
    y, m, r = gc.group_norm_forward(xd, 3, wd, bd, 1e-5, activation="gelu")
    dx, dw, db = gc.group_norm_backward(dyd, xd, m, r, 3, wd, bd, activation="gelu")
    dwn, dbn = gc.per_sample_param_grads(dyd, xd, m, r, 3, wd, bd, activation="gelu")
    assert _host(y).dtype == bf16 and _host(dx).dtype == bf16 and _host(m).dtype == np.float32
    assert _host(dwn).dtype == np.float32
    f = [a.astype(np.float64) for a in (x, dy, w, b)]
    yr, mr, rr = selftest.reference_forward(f[0], 3, f[2], f[3], 1e-5, "gelu")
    dxr, dwr, dbr, dwnr, dbnr = selftest.reference_backward(f[1], f[0], 3, f[2], f[3], 1e-5,
                                                            "gelu")
    for got, want, tol in [(y, yr, 1e-2), (m, mr, 1e-6), (r, rr, 1e-5), (dx, dxr, 2e-2),
                           (dw, dwr, 2e-2), (dwn, dwnr, 1e-4), (dbn, dbnr, 1e-4)]:
        assert _rel_err(got, want) <= tol
