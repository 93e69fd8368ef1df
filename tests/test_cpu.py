"""The NumPy API on the CPU kernels, against the float64 reference and torch.nn.GroupNorm."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cases import SHAPE_PARAMS, TOL, assert_close, make_layout, random_inputs

import gnnumba
from gnnumba import activations, cpu, reference

DTYPES = [np.float32, np.float64]
ACTIVATIONS = list(activations.NAMES)  # None, silu, relu, gelu


def _layouts(shape):
    return ["nchw", "channels_last", "strided"] if len(shape) >= 3 else ["nchw", "strided"]


def _cases():
    for p in SHAPE_PARAMS:
        shape, _ = p.values
        for layout in _layouts(shape):
            yield pytest.param(*p.values, layout, id=f"{p.id}-{layout}")


CASES = list(_cases())


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G,layout", CASES)
def test_forward_matches_reference(shape, G, layout, dtype, activation, small_blocks):
    x, w, b, _ = random_inputs(shape, dtype)
    xl = make_layout(x, layout)
    y, mean, rstd = gnnumba.group_norm_forward(xl, G, w, b, activation=activation)
    y_ref, mean_ref, rstd_ref = reference.forward(x, G, w, b, activation=activation)
    tol = TOL[dtype]["y"]
    assert y.dtype == dtype and y.shape == shape
    expected_stats_dtype = np.float64 if dtype == np.float64 else np.float32
    assert mean.dtype == expected_stats_dtype and rstd.dtype == expected_stats_dtype
    assert mean.shape == (shape[0], G) and rstd.shape == (shape[0], G)
    assert_close(y, y_ref, tol, "y")
    if np.prod(shape[2:], dtype=int) > 0:
        assert_close(mean, mean_ref, tol, "mean")
        np.testing.assert_allclose(rstd, rstd_ref, rtol=10 * tol)
    # y keeps x's layout (empty arrays have no layout to keep)
    assert gnnumba.api.is_channels_last(y) == gnnumba.api.is_channels_last(xl)
    if layout == "channels_last" and y.size > 0 and np.prod(shape[2:]) > 1:
        assert gnnumba.api.is_channels_last(y)


@pytest.mark.parametrize("shape,G,layout", CASES)
def test_backward_matches_reference(shape, G, layout, small_blocks):
    for dtype in DTYPES:
        for activation in ACTIVATIONS:
            x, w, b, dy = random_inputs(shape, dtype, seed=1)
            xl, dyl = make_layout(x, layout), make_layout(dy, layout)
            _, mean, rstd = gnnumba.group_norm_forward(xl, G, w, b)
            dx, dw, db = gnnumba.group_norm_backward(dyl, xl, mean, rstd, G, w, b,
                                                     activation=activation)
            dx_ref, dw_ref, db_ref, _, _ = reference.backward(dy, x, G, w, b,
                                                              activation=activation)
            tol = TOL[dtype]["grad"]
            what = f"{np.dtype(dtype).name} {activation}"
            assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
            assert_close(dx, dx_ref, tol, "dx " + what)
            assert_close(dw, dw_ref, tol, "dweight " + what)
            assert_close(db, db_ref, tol, "dbias " + what)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,G,layout", CASES)
def test_all_nchw_paths_bit_identical(shape, G, layout, activation, force_path, small_blocks):
    """Serial, fused and split paths do the same arithmetic in the same order, so the path
    chosen (which depends on size and thread count) never changes a bit of the result."""
    x, w, b, dy = random_inputs(shape, np.float32, seed=2)
    xl, dyl = make_layout(x, layout), make_layout(dy, layout)
    results = {}
    for path in ("serial", "fused", "split"):
        force_path(path)
        y, mean, rstd = gnnumba.group_norm_forward(xl, G, w, b, activation=activation)
        grads = gnnumba.group_norm_backward(dyl, xl, mean, rstd, G, w, b, activation=activation)
        results[path] = (y, mean, rstd, *grads)
    for path in ("fused", "split"):
        for a, a2 in zip(results["serial"], results[path]):
            np.testing.assert_array_equal(a, a2)


def _cpu_views(a, layout):
    """3-D kernel views of ``a`` (NCHW (N, C, S) or channels-last (N, S, C))."""
    N, C = a.shape[:2]
    if layout == "channels_last":
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)).reshape(N, -1, C)
    return np.ascontiguousarray(a).reshape(N, C, -1)


KERNEL_CASES = [("nchw", p) for p in ("serial", "fused", "split")] + [
    ("channels_last", "serial"), ("channels_last", "parallel")]
STORAGE = ["float32", "float64", "bfloat16", "float16"]


def _storage_views(a, storage, layout):
    """(kernel view in the storage dtype, the float64 values the kernels see)."""
    if storage in cpu.HALF_BITS:
        torch = pytest.importorskip("torch")
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(getattr(torch, storage))
        bits = t.view(torch.int16).numpy().view(cpu.HALF_BITS[storage])
        return _cpu_views(bits, layout), t.double().numpy()
    a = a.astype(storage)
    return _cpu_views(a, layout), a.astype(np.float64)


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("layout,path", KERNEL_CASES)
def test_per_sample_param_grads_equal_backward_sums(layout, path, storage, monkeypatch,
                                                    small_blocks):
    """cpu.per_sample_param_grads (no dx written) gives the backward's per-sample sums
    bit-for-bit, for every activation, path and storage dtype, and they match the float64
    reference; summed over N they are the backward's dweight/dbias."""
    from gnnumba import config

    if path == "serial":
        monkeypatch.setattr(config, "CPU_SERIAL_MAX_ELEMENTS", 1 << 62)
    elif layout == "nchw":
        monkeypatch.setattr(config, "CPU_FUSED_MIN_TASKS_PER_THREAD", 0)
        monkeypatch.setattr(config, "CPU_FUSED_MAX_BYTES", 1 << 62 if path == "fused" else -1)
    shape, G = (3, 8, 5, 7), 4
    x, w, b, dy = random_inputs(shape, np.float32, seed=6, offset=0.5)
    cl = layout == "channels_last"
    x3, x64 = _storage_views(x, storage, layout)
    dy3, dy64 = _storage_views(dy, storage, layout)
    cdt = cpu.compute_dtype(x3.dtype)
    wc, bc = w.astype(cdt), b.astype(cdt)
    kpath = path if layout == "nchw" else None
    for activation in ACTIVATIONS:
        act = activations.code(activation)
        y3 = np.empty_like(x3)
        mean, rstd = cpu.forward(x3, G, wc, bc, 1e-5, act, y3, cl, path=kpath)
        dx3 = np.empty_like(x3)
        dw_b, db_b = cpu.backward(dy3, x3, mean, rstd, wc, bc, act, dx3, cl, path=kpath)
        dw_p, db_p = cpu.per_sample_param_grads(dy3, x3, mean, rstd, wc, bc, act, cl,
                                                path=kpath)
        what = f"{storage} {activation}"
        np.testing.assert_array_equal(dw_p, dw_b, err_msg=what)
        np.testing.assert_array_equal(db_p, db_b, err_msg=what)
        _, _, _, dw_ref, db_ref = reference.backward(dy64, x64, G, w.astype(cdt), b.astype(cdt),
                                                     1e-5, activation)
        tol = 1e-9 if storage == "float64" else 2e-4
        assert_close(dw_p, dw_ref, tol, "dweight_per_sample " + what)
        assert_close(db_p, db_ref, tol, "dbias_per_sample " + what)
        dw, db = cpu.reduce_params(dw_p, db_p)
        for c in range(shape[1]):  # sums over N in order of n
            s1 = s2 = 0.0
            for n in range(shape[0]):
                s1 += dw_p[n, c]
                s2 += db_p[n, c]
            assert dw[c] == s1 and db[c] == s2


def test_no_affine_gives_none_grads():
    x, _, _, dy = random_inputs((2, 4, 3), np.float32)
    y, mean, rstd = gnnumba.group_norm_forward(x, 2)
    dx, dw, db = gnnumba.group_norm_backward(dy, x, mean, rstd, 2)
    assert dw is None and db is None
    y_ref, _, _ = reference.forward(x, 2)
    dx_ref, *_ = reference.backward(dy, x, 2)
    assert_close(y, y_ref, 2e-5)
    assert_close(dx, dx_ref, 2e-4)


def test_large_mean_offset_float32():
    """x = 100 + 0.01 * randn breaks E[x^2] - E[x]^2 in float32; ours must stay accurate."""
    rng = np.random.default_rng(0)
    x = (100.0 + 0.01 * rng.standard_normal((2, 8, 32, 32))).astype(np.float32)
    for layout in ("nchw", "channels_last"):
        y, mean, rstd = gnnumba.group_norm_forward(make_layout(x, layout), 4)
        y_ref, mean_ref, rstd_ref = reference.forward(x, 4)
        np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-4)
        assert_close(y, y_ref, 1e-3, "y")  # y is O(1); float32 x only holds ~5 digits of noise


def test_large_mean_offset_float64():
    rng = np.random.default_rng(0)
    x = 1e8 + rng.standard_normal((2, 4, 16, 16))
    _, _, rstd = gnnumba.group_norm_forward(x, 2)
    _, _, rstd_ref = reference.forward(x, 2)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-7)


def test_backward_against_finite_differences():
    rng = np.random.default_rng(3)
    shape, G = (2, 4, 3, 2), 2
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal(shape)
    for activation in ACTIVATIONS:
        def loss(x_, w_, b_):
            return float((gnnumba.group_norm(x_, G, w_, b_, activation=activation) * dy).sum())

        _, mean, rstd = gnnumba.group_norm_forward(x, G, w, b)
        dx, dw, db = gnnumba.group_norm_backward(dy, x, mean, rstd, G, w, b,
                                                 activation=activation)
        h = 1e-6
        for arr, grad in ((x, dx), (w, dw), (b, db)):
            num = np.zeros_like(arr)
            for i in np.ndindex(arr.shape):
                old = arr[i]
                arr[i] = old + h
                up = loss(x, w, b)
                arr[i] = old - h
                down = loss(x, w, b)
                arr[i] = old
                num[i] = (up - down) / (2 * h)
            np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- torch oracle


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,G,layout", CASES)
def test_matches_torch_group_norm(shape, G, layout, activation):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b, dy = random_inputs(shape, np.float64, seed=4)
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    bt = torch.from_numpy(b).requires_grad_()
    yt = F.group_norm(xt, G, wt, bt, eps=1e-5)
    if activation is not None:
        yt = getattr(F, activations.TORCH_NAMES[activation])(yt)
    yt.backward(torch.from_numpy(dy))
    xl = make_layout(x, layout)
    y, mean, rstd = gnnumba.group_norm_forward(xl, G, w, b, activation=activation)
    dx, dw, db = gnnumba.group_norm_backward(make_layout(dy, layout), xl, mean, rstd, G, w, b,
                                             activation=activation)
    assert_close(y, yt.detach().numpy(), 1e-10, "y")
    assert_close(dx, xt.grad.numpy(), 1e-9, "dx")
    if x.size == 0:
        # torch gives NaN dweight for empty spatial dims (0 * its NaN rstd); the sum over
        # an empty set is 0, which is what we return
        np.testing.assert_array_equal(dw, 0.0)
        return
    assert_close(dw, wt.grad.numpy(), 1e-9, "dweight")
    assert_close(db, bt.grad.numpy(), 1e-9, "dbias")


# --------------------------------------------------------------------------- properties


def test_repeat_calls_bit_identical():
    x, w, b, dy = random_inputs((4, 32, 20, 20), np.float32)
    first = gnnumba.group_norm_forward(x, 8, w, b)
    first_b = gnnumba.group_norm_backward(dy, x, first[1], first[2], 8, w, b)
    for _ in range(3):
        again = gnnumba.group_norm_forward(x, 8, w, b)
        again_b = gnnumba.group_norm_backward(dy, x, first[1], first[2], 8, w, b)
        for a, a2 in zip(first + first_b, again + again_b):
            np.testing.assert_array_equal(a, a2)


def test_samples_are_independent():
    """GroupNorm never mixes samples: changing sample 1 leaves sample 0 bit-identical."""
    x, w, b, dy = random_inputs((3, 8, 6, 6), np.float32)
    y, mean, rstd = gnnumba.group_norm_forward(x, 4, w, b)
    dx, _, _ = gnnumba.group_norm_backward(dy, x, mean, rstd, 4, w, b)
    x2 = x.copy()
    x2[1] = 1000.0 * np.random.default_rng(9).standard_normal(x2[1].shape)
    y2, mean2, rstd2 = gnnumba.group_norm_forward(x2, 4, w, b)
    dx2, _, _ = gnnumba.group_norm_backward(dy, x2, mean2, rstd2, 4, w, b)
    np.testing.assert_array_equal(y[0], y2[0])
    np.testing.assert_array_equal(dx[0], dx2[0])
    assert not np.array_equal(y[1], y2[1])


def test_inputs_not_modified():
    x, w, b, dy = random_inputs((2, 6, 4, 4), np.float32)
    copies = [a.copy() for a in (x, w, b, dy)]
    _, mean, rstd = gnnumba.group_norm_forward(x, 3, w, b, activation="silu")
    mc, rc = mean.copy(), rstd.copy()
    gnnumba.group_norm_backward(dy, x, mean, rstd, 3, w, b, activation="silu")
    for a, c in zip((x, w, b, dy, mean, rstd), copies + [mc, rc]):
        np.testing.assert_array_equal(a, c)


def test_out_argument_and_in_place():
    x, w, b, _ = random_inputs((2, 6, 4, 4), np.float32)
    expected = gnnumba.group_norm(x, 3, w, b)
    out = np.empty_like(x)
    assert gnnumba.group_norm(x, 3, w, b, out=out) is out
    np.testing.assert_array_equal(out, expected)
    # an out array in another layout is filled correctly too
    out_cl = make_layout(np.zeros_like(x), "channels_last")
    gnnumba.group_norm(x, 3, w, b, out=out_cl)
    np.testing.assert_array_equal(out_cl, expected)
    # in place
    xc = x.copy()
    gnnumba.group_norm(xc, 3, w, b, out=xc)
    np.testing.assert_array_equal(xc, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hypothesis_random_shapes(dtype):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=40, deadline=None, derandomize=True)
    @hyp.given(
        n=st.integers(0, 3),
        g=st.integers(1, 4),
        cpg=st.integers(1, 4),
        spatial=st.lists(st.integers(1, 6), min_size=0, max_size=3),
        layout=st.sampled_from(["nchw", "channels_last", "strided"]),
        activation=st.sampled_from(ACTIVATIONS),
        offset=st.sampled_from([0.0, 10.0]),
    )
    def check(n, g, cpg, spatial, layout, activation, offset):
        shape = (n, g * cpg, *spatial)
        if layout == "channels_last" and len(shape) < 3:
            layout = "nchw"
        x, w, b, dy = random_inputs(shape, dtype, seed=n + g + cpg, offset=offset)
        xl, dyl = make_layout(x, layout), make_layout(dy, layout)
        y, mean, rstd = gnnumba.group_norm_forward(xl, g, w, b, activation=activation)
        dx, dw, db = gnnumba.group_norm_backward(dyl, xl, mean, rstd, g, w, b,
                                                 activation=activation)
        y_ref, _, _ = reference.forward(x, g, w, b, activation=activation)
        dx_ref, dw_ref, db_ref, _, _ = reference.backward(dy, x, g, w, b, activation=activation)
        # float32 with offset 10 holds ~6 digits of each value; scale tolerances with it
        tol = TOL[dtype]
        assert_close(y, y_ref, tol["y"] * (1 + offset), "y")
        assert_close(dx, dx_ref, tol["grad"] * (1 + offset), "dx")
        assert_close(dw, dw_ref, tol["grad"] * (1 + offset), "dw")
        assert_close(db, db_ref, tol["grad"], "db")

    check()


# --------------------------------------------------------------------------- bad input


def _bad_calls():
    x, w, b, dy = random_inputs((2, 12, 3, 3), np.float32)
    _, mean, rstd = gnnumba.group_norm_forward(x, 4, w, b)
    f, bwd = gnnumba.group_norm_forward, gnnumba.group_norm_backward
    return [
        ("C % G", ValueError, "valid group counts for C=12: 1, 2, 3, 4, 6, 12",
         lambda: f(x, 5)),
        ("G < 1", ValueError, "num_groups must be >= 1", lambda: f(x, 0)),
        ("G float", TypeError, "num_groups must be an int", lambda: f(x, 4.0)),
        ("ndim < 2", ValueError, "at least 2 dims", lambda: f(x[0, 0, 0], 1)),
        ("weight shape", ValueError, "weight must have shape (C,) = (12,)",
         lambda: f(x, 4, w[:5], b)),
        ("bias shape", ValueError, "bias must have shape", lambda: f(x, 4, w, b[None])),
        ("eps < 0", ValueError, "eps must be finite and >= 0", lambda: f(x, 4, eps=-1.0)),
        ("eps nan", ValueError, "eps must be finite", lambda: f(x, 4, eps=float("nan"))),
        ("activation", ValueError, "unknown activation 'tanh'",
         lambda: f(x, 4, activation="tanh")),
        ("list input", TypeError, "must be a numpy.ndarray", lambda: f(x.tolist(), 4)),
        ("int dtype", TypeError, "dtype int64", lambda: f(x.astype(np.int64), 4)),
        ("complex", TypeError, "dtype complex64", lambda: f(x.astype(np.complex64), 4)),
        ("float16", TypeError, "dtype float16", lambda: f(x.astype(np.float16), 4)),
        ("mixed dtypes", TypeError, "mixed dtypes", lambda: f(x, 4, w.astype(np.float64))),
        ("weight list", TypeError, "weight must be a numpy.ndarray",
         lambda: f(x, 4, list(w))),
        ("out dtype", TypeError, "out has dtype float64",
         lambda: f(x, 4, out=np.empty(x.shape))),
        ("out shape", ValueError, "out must have the same shape",
         lambda: f(x, 4, out=np.empty((2, 12, 3), np.float32))),
        ("out overlap", ValueError, "partially overlaps",
         lambda: f(x[:, :6], 2, out=x[:, 6:])),
        ("dy shape", ValueError, "dy must have the same shape",
         lambda: bwd(dy[:1], x, mean, rstd, 4)),
        ("dy dtype", TypeError, "dy has dtype float64",
         lambda: bwd(dy.astype(np.float64), x, mean, rstd, 4)),
        ("mean shape", ValueError, "mean must have shape (N, num_groups) = (2, 4)",
         lambda: bwd(dy, x, mean[:, :2], rstd, 4)),
        ("rstd shape", ValueError, "rstd must have shape", lambda: bwd(dy, x, mean, rstd.T, 4)),
        ("bwd C % G", ValueError, "valid group counts", lambda: bwd(dy, x, mean, rstd, 5)),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clearly(case):
    _, exc, message, call = case
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


def test_error_is_value_error_subclass():
    with pytest.raises(gnnumba.GroupNormError):
        gnnumba.group_norm(np.zeros((2, 6), np.float32), 4)


# --------------------------------------------------------------------------- processes, threads


def test_concurrent_calls_from_python_threads():
    """Several Python threads in parallel kernels at once must neither abort nor corrupt
    results (Numba's workqueue layer aborts the process here; gnnumba picks a safe layer).
    Run in a subprocess so an abort is reported instead of killing the test session."""
    code = textwrap.dedent("""
        import numpy as np, numba, gnnumba
        from concurrent.futures import ThreadPoolExecutor
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((4, 32, 24, 24)).astype(np.float32) for _ in range(8)]
        expected = [gnnumba.group_norm(x, 8) for x in xs]
        def work(i):
            x = xs[i % 8]
            for _ in range(5):
                y, m, r = gnnumba.group_norm_forward(x, 8)
                gnnumba.group_norm_backward(x, x, m, r, 8)
            return i % 8, y
        with ThreadPoolExecutor(8) as pool:
            for i, y in pool.map(work, range(32)):
                assert np.array_equal(y, expected[i])
        print("OK", numba.threading_layer())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("OK")
    assert "workqueue" not in proc.stdout


def test_second_process_does_not_recompile():
    """cache=True: a fresh process loads the kernels from Numba's on-disk cache."""
    code = textwrap.dedent("""
        import numpy as np, gnnumba
        from gnnumba import cpu
        x = np.ones((2, 4, 4, 4), np.float32)
        _, m, r = gnnumba.group_norm_forward(x, 2)
        gnnumba.group_norm_backward(x, x, m, r, 2)
        kernels = [*cpu._FWD.values(), *cpu._BWD.values(), cpu.stats.chunk_stats,
                   cpu.stats.row_sums]
        used = [k for k in kernels if k.signatures]
        print(sum(sum(k.stats.cache_misses.values()) for k in used),
              sum(sum(k.stats.cache_hits.values()) for k in used))
    """)
    for _ in range(2):  # the first run may populate the cache
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    misses, hits = map(int, proc.stdout.split())
    assert misses == 0 and hits >= 2


def test_forked_child_after_parallel_use_still_works():
    """A child forked after the parent ran parallel kernels (torch DataLoader workers) must
    not be terminated by GNU OpenMP; it takes the serial kernels and gets the same bits."""
    code = textwrap.dedent("""
        import multiprocessing as mp, numpy as np, gnnumba
        # 4 MiB: large enough for the page pre-touching of outputs (serial in the child)
        x = np.random.default_rng(0).standard_normal((4, 64, 64, 64)).astype(np.float32)
        xc = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        def run():
            out = []
            for a in (x, xc):
                y, m, r = gnnumba.group_norm_forward(a, 32)
                out += [y, *gnnumba.group_norm_backward(a, a, m, r, 32)]
            return out
        parent = run()
        def child(q):
            q.put(all(np.array_equal(a, b) for a, b in zip(run(), parent)))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        p.join(120)
        print(p.exitcode, q.get(timeout=5) if p.exitcode == 0 else None)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "True"], proc.stdout + proc.stderr[-2000:]


# --------------------------------------------------------------------------- half precision


def test_half_storage_conversions_match_torch():
    """_load/_store convert half-precision bits exactly as torch does (round to nearest even,
    NaN stays NaN, infinities and subnormals kept)."""
    torch = pytest.importorskip("torch")
    from numba import njit

    from gnnumba.cpu import storage

    @njit
    def store_all(v, out):
        for i in range(v.shape[0]):
            storage.store(out, i, v[i])

    @njit
    def load_all(bits, out):
        for i in range(bits.shape[0]):
            out[i] = storage.load(bits, i)

    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 8, 20000),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 65519.0, 65520.0, 3e38]])
    v = v.astype(np.float32)
    for name, tdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        bits = np.empty(v.shape, cpu.HALF_BITS[name])
        store_all(v, bits)
        want = torch.from_numpy(v).to(tdt)
        got = torch.from_numpy(bits).view(tdt)
        assert torch.equal(got.isnan(), want.isnan()), name
        ok = ~want.isnan()
        assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16)), name
        back = np.empty(v.shape, np.float32)
        load_all(bits, back)
        np.testing.assert_array_equal(back, want.float().numpy())


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_half_precision_kernels(name, layout, small_blocks):
    """Half tensors run natively on their bits: the result equals the float32 computation on
    the same (rounded) values, up to the rounding of the output."""
    torch = pytest.importorskip("torch")

    tdt = getattr(torch, name)
    shape, G = (2, 8, 5, 7), 4
    x, w, b, dy = random_inputs(shape, np.float32, seed=5, offset=3.0)
    xh, dyh = torch.from_numpy(x).to(tdt), torch.from_numpy(dy).to(tdt)
    x32, dy32 = xh.float().numpy(), dyh.float().numpy()  # the values the kernels see

    def views(t):
        bits = t.view(getattr(torch, "uint16" if name == "bfloat16" else "int16")).numpy()
        if layout == "channels_last":
            return np.ascontiguousarray(np.moveaxis(bits, 1, -1)).reshape(2, 35, 8)
        return np.ascontiguousarray(bits).reshape(2, 8, 35)

    cl = layout == "channels_last"
    x3, dy3 = views(xh), views(dyh)
    y3, dx3 = np.empty_like(x3), np.empty_like(x3)
    wc, bc = w, b  # parameters in the compute dtype (float32), as the bridge passes them
    for act in ACTIVATIONS:
        mean, rstd = cpu.forward(x3, G, wc, bc, 1e-5, activations.code(act), y3, cl)
        dw_ps, db_ps = cpu.backward(dy3, x3, mean, rstd, wc, bc, activations.code(act), dx3, cl)
        y_ref, _, rstd_ref = reference.forward(x32, G, w, b, 1e-5, act)
        dx_ref, _, _, dw_n, db_n = reference.backward(dy32, x32, G, w, b, 1e-5, act)

        def as_nchw(a3):
            t = torch.from_numpy(a3).view(tdt).float().numpy()
            return np.moveaxis(t.reshape(2, 5, 7, 8), -1, 1) if cl else t.reshape(shape)

        ulp = 2.0 ** (-8 if name == "bfloat16" else -11)  # output rounding, relative
        np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5)
        assert_close(as_nchw(y3), y_ref, 2 * ulp, "y")
        # dz is recomputed in float32 (never rounded to half), so only dx's own rounding
        assert_close(as_nchw(dx3), dx_ref, 2 * ulp, f"dx {act}")
        assert_close(dw_ps, dw_n, 1e-3 * ulp, f"dweight_per_sample {act}")
        assert_close(db_ps, db_n, 1e-3 * ulp, f"dbias_per_sample {act}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_outputs_with_mapped_pages(layout, monkeypatch):
    """Outputs of >= config.CPU_PREFAULT_MIN_BYTES (32 MiB; lowered here to keep the test
    small) have their pages touched before the kernels write them (cpu.empty); every
    element must still come from the kernel."""
    from gnnumba import config

    monkeypatch.setattr(config, "CPU_PREFAULT_MIN_BYTES", 4 << 20)
    cpu.pool.release()  # new buffers, not reused ones
    x, w, b, dy = random_inputs((2, 32, 128, 128), np.float32, seed=8)  # 4 MiB
    assert x.nbytes >= config.CPU_PREFAULT_MIN_BYTES
    xl = make_layout(x, layout)
    y, mean, rstd = gnnumba.group_norm_forward(xl, 8, w, b)
    dx, dw, db = gnnumba.group_norm_backward(make_layout(dy, layout), xl, mean, rstd, 8, w, b)
    y_ref, _, _ = reference.forward(x, 8, w, b)
    dx_ref, dw_ref, db_ref, _, _ = reference.backward(dy, x, 8, w, b)
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(dx, dx_ref, 2e-4, "dx")
    assert_close(dw, dw_ref, 2e-4, "dweight")


# --------------------------------------------------------------------------- output pool


def _address(a):
    return (a.data_ptr() if hasattr(a, "data_ptr") else a.__array_interface__["data"][0])


def test_output_pool_reuses_only_freed_buffers():
    """Large outputs come from ``cpu.pool``: a buffer is handed out again only when no array
    or tensor made from it is alive, and then holds the new result."""
    x, w, b, _ = random_inputs((2, 8, 64, 64), np.float32, seed=3)  # 256 KiB outputs
    x2 = x[::-1].copy()
    cpu.pool.release()
    y1 = gnnumba.group_norm(x, 4, w, b)
    y2 = gnnumba.group_norm(x2, 4, w, b)
    assert _address(y1) != _address(y2)  # both alive: never the same memory
    first = _address(y1)
    keep = y1[0]  # a view keeps the buffer in use
    del y1
    y3 = gnnumba.group_norm(x, 4, w, b)
    assert first not in (_address(y3), _address(y2))
    np.testing.assert_array_equal(keep, y3[0])
    del keep, y3
    y4 = gnnumba.group_norm(x2, 4, w, b)  # the first buffer (or the third) is free again
    np.testing.assert_array_equal(y4, y2)
    assert cpu.pool.free_bytes() >= x.nbytes


def test_output_pool_sees_tensors_made_by_dlpack():
    """A torch tensor sharing a pooled buffer (the torch bridge's outputs) keeps it in use."""
    torch = pytest.importorskip("torch")
    import gnnumba.torch as gt

    x = torch.randn(2, 8, 64, 64)
    cpu.pool.release()
    y1 = gt.group_norm(x, 4)
    y2 = gt.group_norm(x * 2, 4)
    assert y1.data_ptr() != y2.data_ptr()
    ptr = y1.data_ptr()
    del y1
    y3 = gt.group_norm(x, 4)
    assert y3.data_ptr() == ptr  # freed, reused, and holding the new result
    torch.testing.assert_close(y3, torch.nn.functional.group_norm(x, 4), rtol=1e-5, atol=1e-5)


def test_output_pool_keeps_a_bounded_amount_of_free_memory(monkeypatch):
    from gnnumba import config

    monkeypatch.setattr(config, "CPU_POOL_MAX_FREE_BYTES", 1 << 20)
    cpu.pool.release()
    for c in (8, 16, 24, 32, 40):  # outputs of 256 KiB .. 1.25 MiB, each freed at once
        x, w, b, _ = random_inputs((1, c, 64, 128), np.float32)
        gnnumba.group_norm(x, 4, w, b)
        assert cpu.pool.free_bytes() <= 1 << 20
    cpu.pool.release()
    assert cpu.pool.free_bytes() == 0
