"""The array-level API with every kind of CPU array: NumPy, torch (four dtypes, NCHW and
channels_last) and JAX, through all four functions, against the float64 reference.

Also: results come back as the input's kind, inputs are read in place (zero-copy), ``out=``
writes in place, and the per-sample parameter gradients add up to the backward's.
"""

import numpy as np
import pytest

import gnnumba
from gnnumba import _checks, cases, cpu, reference

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

ACTIVATIONS = list(cases.ACTIVATIONS)  # the activation table's names
SHAPE, G = (2, 8, 5, 6), 4


def _torch(a64, dtype, layout):
    t = torch.from_numpy(np.ascontiguousarray(a64)).to(getattr(torch, dtype))
    if layout == "channels_last" and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _jax(a64, dtype):
    return jnp.asarray(a64, dtype=getattr(jnp, dtype))


def _np(a64, dtype, layout):
    return cases.lay_out(a64.astype(dtype), layout if a64.ndim > 1 else "nchw")


def _f64(a) -> np.ndarray:
    """Any kind's array as float64 NumPy (a copy)."""
    if isinstance(a, torch.Tensor):
        return a.detach().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _maker(kind, dtype, layout):
    if kind == "torch":
        return lambda a: _torch(a, dtype, layout)
    if kind == "jax":
        return lambda a: _jax(a, dtype)
    return lambda a: _np(a, dtype, layout)


def _type_of(kind):
    return {"numpy": np.ndarray, "torch": torch.Tensor, "jax": jax.Array}[kind]


KIND_PARAMS = (
    [pytest.param("numpy", d, lay, id=f"numpy-{d}-{lay}") for d in ("float32", "float64")
     for lay in ("nchw", "channels_last")]
    + [pytest.param("torch", d, lay, id=f"torch-{d}-{lay}")
       for d in ("float32", "float64", "float16", "bfloat16") for lay in ("nchw", "channels_last")]
    + [pytest.param("jax", d, "nchw", id=f"jax-{d}")
       for d in ("float32", "float64", "float16", "bfloat16")]
)


@pytest.fixture
def x64_jax():
    """JAX keeps float64 only with x64 enabled; scoped to the test."""
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind,dtype,layout", KIND_PARAMS)
def test_every_kind_through_the_four_functions(kind, dtype, layout, activation, x64_jax):
    make = _maker(kind, dtype, layout)
    x64, w64, b64, dy64 = cases.inputs(SHAPE, np.float64, seed=3, distribution="offset")
    x, w, b, dy = make(x64), make(w64), make(b64), make(dy64)
    # the reference sees the inputs as rounded to the dtype: only gnnumba's arithmetic counts
    xr, wr, br, dyr = _f64(x), _f64(w), _f64(b), _f64(dy)
    y_ref, mean_ref, rstd_ref = reference.forward(xr, G, wr, br, activation=activation)
    dx_ref, dw_ref, db_ref, dw_ps_ref, db_ps_ref = reference.backward(
        dyr, xr, G, wr, br, activation=activation)
    tol = cases.TOLERANCE[dtype]
    acc = _checks.accumulation_dtype(dtype).name

    y, mean, rstd = gnnumba.group_norm_forward(x, G, w, b, activation=activation)
    for a in (y, mean, rstd):
        assert isinstance(a, _type_of(kind))
    assert str(y.dtype).removeprefix("torch.") == dtype
    assert str(mean.dtype).removeprefix("torch.") == acc == str(rstd.dtype).removeprefix("torch.")
    if kind == "torch":
        assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert cases.scaled_error(_f64(y), y_ref) <= tol["y"]
    assert cases.scaled_error(_f64(mean), mean_ref) <= tol["y"]
    assert np.abs(_f64(rstd) / rstd_ref - 1).max() <= tol["y"]  # relative
    assert np.array_equal(_f64(gnnumba.group_norm(x, G, w, b, activation=activation)), _f64(y))

    dx, dw, db = gnnumba.group_norm_backward(dy, x, mean, rstd, G, w, b, activation=activation)
    for a in (dx, dw, db):
        assert isinstance(a, _type_of(kind)) and str(a.dtype).removeprefix("torch.") == dtype
    assert cases.scaled_error(_f64(dx), dx_ref) <= tol["grad"]
    assert cases.scaled_error(_f64(dw), dw_ref) <= tol["grad"]
    assert cases.scaled_error(_f64(db), db_ref) <= tol["grad"]

    dw_ps, db_ps = gnnumba.per_sample_param_grads(dy, x, mean, rstd, G, w, b,
                                                  activation=activation)
    for a in (dw_ps, db_ps):
        assert isinstance(a, _type_of(kind)) and str(a.dtype).removeprefix("torch.") == acc
        assert tuple(a.shape) == SHAPE[:2]
    assert cases.scaled_error(_f64(dw_ps), dw_ps_ref) <= tol["grad"]
    assert cases.scaled_error(_f64(db_ps), db_ps_ref) <= tol["grad"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_per_sample_grads_sum_to_backward_float64(layout, activation):
    """Summed over N in order, the per-sample gradients are the backward's dweight/dbias to
    the last bit (float64: both come from the same per-sample sums)."""
    x, w, b, dy = (cases.lay_out(a, layout) if a.ndim > 1 else a
                   for a in cases.inputs((3, 8, 4, 5), np.float64, seed=4))
    _, mean, rstd = gnnumba.group_norm_forward(x, 2, w, b)
    _, dw, db = gnnumba.group_norm_backward(dy, x, mean, rstd, 2, w, b, activation=activation)
    dw_ps, db_ps = gnnumba.per_sample_param_grads(dy, x, mean, rstd, 2, w, b,
                                                  activation=activation)
    assert dw_ps.dtype == np.float64 and db_ps.dtype == np.float64
    sum_w, sum_b = dw_ps[0].copy(), db_ps[0].copy()
    for n in range(1, 3):
        sum_w += dw_ps[n]
        sum_b += db_ps[n]
    assert np.array_equal(sum_w, dw) and np.array_equal(sum_b, db)


def test_per_sample_grads_float32_without_parameters():
    """No weight/bias: the gradients of the implicit ones (weight 1, bias 0), float32."""
    x, _, _, dy = cases.inputs((2, 6, 7), np.float32, seed=5)
    _, mean, rstd = gnnumba.group_norm_forward(x, 3)
    dw_ps, db_ps = gnnumba.per_sample_param_grads(dy, x, mean, rstd, 3)
    _, _, _, dw_ref, db_ref = reference.backward(dy, x, 3)
    assert dw_ps.dtype == np.float32 and db_ps.dtype == np.float32
    assert cases.scaled_error(_f64(dw_ps), dw_ref) <= cases.TOLERANCE["float32"]["grad"]
    assert cases.scaled_error(_f64(db_ps), db_ref) <= cases.TOLERANCE["float32"]["grad"]


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)], ids=["N=0", "empty-spatial"])
def test_empty_input_every_kind(shape):
    for x in (np.zeros(shape, np.float32), torch.zeros(shape), jnp.zeros(shape)):
        y, mean, rstd = gnnumba.group_norm_forward(x, 2)
        assert type(y) is type(x) and tuple(y.shape) == shape
        dx, _, _ = gnnumba.group_norm_backward(x, x, mean, rstd, 2)
        dw_ps, db_ps = gnnumba.per_sample_param_grads(x, x, mean, rstd, 2)
        assert tuple(dx.shape) == shape and tuple(dw_ps.shape) == shape[:2]
        assert not np.any(_f64(dw_ps)) and not np.any(_f64(db_ps))


# --------------------------------------------------------------------------- zero-copy


def _record_kernel_pointers(monkeypatch):
    """Wrap cpu.forward to record the addresses of the x and y arrays the kernels get."""
    seen = {}
    real = cpu.forward

    def spy(x3, num_groups, weight, bias, eps, act, y3, channels_last, path=None):
        seen["x"] = x3.__array_interface__["data"][0]
        seen["y"] = y3.__array_interface__["data"][0]
        return real(x3, num_groups, weight, bias, eps, act, y3, channels_last, path)

    monkeypatch.setattr(cpu, "forward", spy)
    return seen


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_input_read_in_place_and_out_written_in_place(monkeypatch, layout):
    seen = _record_kernel_pointers(monkeypatch)
    x64 = cases.values("normal", (4, 64, 64, 64), seed=1)  # 4 MiB of float32
    t = _torch(x64, "float32", layout)
    y = gnnumba.group_norm(t, 32)
    assert seen["x"] == t.data_ptr()  # the kernels read the tensor's own memory
    assert seen["y"] == y.data_ptr()  # and the returned tensor is what they wrote
    want = y.clone()
    ret = gnnumba.group_norm(t, 32, out=t)  # in place
    assert ret is t and seen["y"] == t.data_ptr() == seen["x"]
    assert torch.equal(t, want)
    out = torch.empty_like(t)
    assert gnnumba.group_norm(want, 32, out=out) is out and seen["y"] == out.data_ptr()


def test_jax_input_read_in_place_and_output_a_view(monkeypatch):
    seen = _record_kernel_pointers(monkeypatch)
    j = jnp.asarray(cases.values("normal", (4, 64, 64, 64), seed=1), dtype=jnp.float32)
    y = gnnumba.group_norm(j, 32)
    assert seen["x"] == j.unsafe_buffer_pointer()
    assert seen["y"] == y.unsafe_buffer_pointer()  # 64-byte aligned output: JAX took a view


def test_torch_requires_grad_input_is_read_detached():
    t = torch.randn(2, 4, 3, requires_grad=True)
    y = gnnumba.group_norm(t, 2)
    assert not y.requires_grad
    assert np.array_equal(y.numpy(), gnnumba.group_norm(t.detach().numpy(), 2))


@pytest.mark.parametrize("num_groups", [np.array(4), np.int64(4), "torch"],
                         ids=["0-d ndarray", "numpy int", "0-d tensor"])
def test_num_groups_as_0d_array_or_tensor(num_groups):
    num_groups = torch.tensor(4) if isinstance(num_groups, str) else num_groups
    x = cases.inputs((2, 8, 3), np.float32)[0]
    assert np.array_equal(gnnumba.group_norm(x, num_groups), gnnumba.group_norm(x, 4))


def test_default_parameter_cache_is_bounded():
    for C in range(1, 200):
        gnnumba.group_norm(np.ones((1, C), np.float32), 1)
    assert cpu._default_param.cache_info().currsize <= 64


def test_numpy_subclass_memmap_accepted(tmp_path):
    x = cases.inputs((2, 4, 5), np.float32)[0]
    m = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                  shape=x.shape)
    m[...] = x
    y = gnnumba.group_norm(m, 2)
    assert type(y) is np.ndarray and np.array_equal(y, gnnumba.group_norm(x, 2))


def test_numpy_alone_imports_and_runs_without_torch_jax_or_array_api_compat():
    """The NumPy route needs neither the frameworks nor array-api-compat: with all three made
    unimportable, gnnumba imports and computes, and NumPy arrays never import them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('torch', 'jax', 'array_api_compat'): sys.modules[m] = None\n"
        "import numpy as np, gnnumba\n"
        "x = np.ones((2, 4, 3), np.float32)\n"
        "y, m, r = gnnumba.group_norm_forward(x, 2)\n"
        "gnnumba.per_sample_param_grads(x, x, m, r, 2)\n"
        "try:\n"
        "    gnnumba.group_norm([[1.0]], 1)\n"
        "except TypeError as e:\n"
        "    assert 'must be a numpy.ndarray' in str(e)\n"
        "print('ok', float(y.sum()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "ok 0.0"


def test_cuda_arrays_go_to_the_cuda_backend(monkeypatch):
    """A CUDA array is handed to gnnumba.gpu with the validated group count and activation
    (the kernels themselves are tested in test_cuda*.py)."""
    import gnnumba.api as api

    class FakeCuda:
        shape = (2, 4, 3)

    calls = []

    class Backend:
        def per_sample_param_grads(self, *args, **kw):
            calls.append(("psg", args, kw))
            return "psg"

        def group_norm_backward(self, *args, **kw):
            calls.append(("bwd", args, kw))
            return "bwd"

    monkeypatch.setattr(api, "_is_cuda_array", lambda a: isinstance(a, FakeCuda))
    monkeypatch.setattr(api, "_cuda_backend", lambda: Backend())
    x = FakeCuda()
    assert gnnumba.per_sample_param_grads(x, x, "m", "r", np.int64(2),
                                          activation="relu") == "psg"
    assert calls[-1][1][4] == 2 and type(calls[-1][1][4]) is int
    assert calls[-1][2] == {"activation": "relu"}
    assert gnnumba.group_norm_backward(x, x, "m", "r", 2) == "bwd"
    with pytest.raises(ValueError, match="valid group counts"):
        gnnumba.per_sample_param_grads(x, x, "m", "r", 3)


class _DLPackOnly:
    """An array of a library gnnumba knows nothing about: only the DLPack protocol."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, **kw):
        return self._t.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_any_dlpack_producer_is_read_in_place(monkeypatch):
    """A producer array_api_compat has no namespace for: read zero-copy, NumPy results."""
    seen = _record_kernel_pointers(monkeypatch)
    t = torch.from_numpy(cases.inputs((2, 8, 3, 3), np.float32)[0])
    y, mean, rstd = gnnumba.group_norm_forward(_DLPackOnly(t), 4)
    assert seen["x"] == t.data_ptr()
    assert type(y) is np.ndarray and mean.dtype == np.float32
    assert np.array_equal(y, gnnumba.group_norm(t.numpy(), 4))


def test_float16_from_an_unknown_dlpack_producer():
    t = torch.from_numpy(cases.inputs((2, 4, 6), np.float32)[0]).half()
    y = gnnumba.group_norm(_DLPackOnly(t), 2)
    assert type(y) is np.ndarray and y.dtype == np.float16
    assert np.array_equal(y, gnnumba.group_norm(t, 2).numpy())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_numpy_fast_path_matches_the_general_path(layout):
    """A plain NumPy call takes a cached plan (api._numpy_plan); the same call through the
    general path (``out=``) gives the same bits, and changing num_groups, eps or the
    activation between calls on one shape is never served a stale plan."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 12, 5, 7)).astype(np.float32) * 3 + 40
    if layout == "channels_last":
        x = np.moveaxis(np.moveaxis(x, 1, -1).copy(), -1, 1)
    w = rng.random(12).astype(np.float32) + 0.5
    b = rng.standard_normal(12).astype(np.float32)
    for G, eps, act in ((3, 1e-5, None), (4, 1e-5, None), (4, 0.5, None), (4, 0.5, "gelu"),
                        (12, 1e-5, "relu")):
        fast, mean, rstd = gnnumba.group_norm_forward(x, G, w, b, eps, activation=act)
        general = np.empty_like(x)
        gnnumba.group_norm(x, G, w, b, eps, activation=act, out=general)
        assert fast.strides == x.strides and mean.dtype == rstd.dtype == np.float32
        np.testing.assert_array_equal(fast, general)
        y_ref, _, rstd_ref = reference.forward(x, G, w, b, eps, act)
        np.testing.assert_allclose(fast, y_ref, atol=2e-5 * max(1.0, np.abs(y_ref).max()))
        np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5)
    with pytest.raises(ValueError, match="num_groups"):
        gnnumba.group_norm(x, 5, w, b)  # a cached shape still validates a new G
