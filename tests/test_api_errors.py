"""Every bad input to the array-level API: the exception class and a message that names the
problem and the fix; and nothing the caller passed is modified, by any function, whether it
succeeds or raises."""

import numpy as np
import pytest

import gnnumba
from gnnumba import cases

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

SHAPE, G = (2, 4, 3, 5), 2


def _arrays(dtype=np.float32):
    x, w, b, dy = cases.inputs(SHAPE, dtype, seed=2)
    _, mean, rstd = gnnumba.group_norm_forward(x, G, w, b)
    return x, w, b, dy, mean, rstd


class _DLPackOnly:
    """A DLPack producer that is nothing else (no array interface): like an array of a
    library gnnumba has never heard of."""

    def __init__(self, t, device=(1, 0)):
        self._t, self._device = t, device

    def __dlpack__(self, **kw):
        return self._t.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._device


class _Named(_DLPackOnly):
    """A DLPack producer that also says its dtype."""

    @property
    def dtype(self):
        return self._t.dtype


def _cases():
    x, w, b, dy, mean, rstd = _arrays()
    t = torch.from_numpy(x)
    j = jnp.asarray(x)
    fwd, bwd, psg = (gnnumba.group_norm_forward, gnnumba.group_norm_backward,
                     gnnumba.per_sample_param_grads)
    buf = np.zeros(x.size + 8, np.float32)
    out_over_w = buf[:x.size].reshape(SHAPE)
    shifted = np.concatenate([x.ravel(), [0.0]]).astype(np.float32)  # x and out one apart
    big_endian = x.astype(">f4")
    masked = np.ma.masked_array(x, mask=np.zeros(SHAPE, bool))
    return [
        # what is accepted
        ("list", TypeError, "must be a numpy.ndarray, a CPU array that speaks DLPack",
         lambda: fwd(x.tolist(), G)),
        ("object", TypeError, "got object", lambda: fwd(object(), G)),
        ("weight list", TypeError, "weight must be a numpy.ndarray",
         lambda: fwd(x, G, list(w))),
        ("dy list", TypeError, "dy must be a numpy.ndarray", lambda: bwd(x.tolist(), x, mean,
                                                                          rstd, G)),
        ("masked array", TypeError, "masked array", lambda: fwd(masked, G)),
        ("big-endian", TypeError, "non-native byte order", lambda: fwd(big_endian, G)),
        # dtypes
        ("numpy float16", TypeError, "dtype float16, which is not supported; use one of "
         "float32, float64", lambda: fwd(x.astype(np.float16), G)),
        ("torch int64", TypeError, "x has dtype int64", lambda: fwd(t.long(), G)),
        ("torch complex", TypeError, "dtype complex64", lambda: fwd(t.to(torch.complex64), G)),
        ("jax int32", TypeError, "x has dtype int32", lambda: fwd(j.astype(jnp.int32), G)),
        ("torch mean float16", TypeError, "mean has dtype float16",
         lambda: bwd(t, t, torch.from_numpy(mean).half(), torch.from_numpy(rstd), G)),
        ("mixed dtypes torch", TypeError, "mixed dtypes",
         lambda: fwd(t, G, torch.from_numpy(w).double())),
        ("unreadable DLPack dtype", TypeError, "has a DLPack dtype, which NumPy cannot read",
         lambda: fwd(_DLPackOnly(t.bfloat16()), G)),
        ("unreadable named dtype", TypeError, "has dtype torch.bfloat16, which NumPy cannot",
         lambda: fwd(_Named(t.bfloat16()), G)),
        # kinds
        ("torch x, numpy weight", TypeError, "weight is a numpy array but x is a torch array",
         lambda: fwd(t, G, w)),
        ("numpy x, torch bias", TypeError, "bias is a torch array but x is a numpy array",
         lambda: fwd(x, G, None, torch.from_numpy(b))),
        ("jax x, torch dy", TypeError, "dy is a torch array but x is a jax array",
         lambda: bwd(torch.from_numpy(dy), j, jnp.asarray(mean), jnp.asarray(rstd), G)),
        ("numpy x, jax mean", TypeError, "mean is a jax array but x is a numpy array",
         lambda: psg(dy, x, jnp.asarray(mean), rstd, G)),
        ("jax out", TypeError, "jax arrays are immutable", lambda: fwd(j, G, out=j)),
        ("numpy x, torch out", TypeError, "out is a torch array but x is a numpy array",
         lambda: fwd(x, G, out=torch.empty(SHAPE))),
        # devices
        ("torch meta device", TypeError, "device meta",
         lambda: fwd(torch.empty(SHAPE, device="meta"), G)),
        ("DLPack CUDA device", TypeError, "DLPack device type 2 (CUDA)",
         lambda: fwd(_DLPackOnly(t, device=(2, 0)), G)),
        ("jax traced", TypeError, "traced JAX value",
         lambda: jax.jit(lambda a: gnnumba.group_norm(a, G))(j)),
        # out
        ("out overlaps weight", ValueError, "out shares memory with weight",
         lambda: fwd(x, G, buf[:4], out=out_over_w)),
        ("out overlaps bias", ValueError, "out shares memory with bias",
         lambda: fwd(x, G, w, buf[4:8], out=out_over_w)),
        ("out overlaps x", ValueError, "partially overlaps x",
         lambda: fwd(shifted[:-1].reshape(SHAPE), G, out=shifted[1:].reshape(SHAPE))),
        ("out read-only", ValueError, "read-only", lambda: fwd(x, G, out=np.broadcast_to(
            np.zeros(1, np.float32), SHAPE))),
        ("out dtype", TypeError, "out has dtype float64", lambda: fwd(x, G, out=x.astype(
            np.float64))),
        ("torch out dtype", TypeError, "out has dtype bfloat16",
         lambda: fwd(t, G, out=t.bfloat16())),
        # shapes and values
        ("num_groups float tensor", TypeError, "num_groups must be an int",
         lambda: fwd(x, torch.tensor(2.0))),
        ("num_groups bool", TypeError, "num_groups must be an int", lambda: fwd(x, True)),
        ("C % G", ValueError, "valid group counts for C=4: 1, 2, 4", lambda: fwd(x, 3)),
        ("1-D", ValueError, "at least 2 dims", lambda: fwd(x[0, 0, 0], 1)),
        ("weight shape", ValueError, "weight must have shape (C,) = (4,)",
         lambda: fwd(t, G, torch.ones(5))),
        ("dy shape", ValueError, "dy must have the same shape as x",
         lambda: psg(dy[:1], x, mean, rstd, G)),
        ("mean shape", ValueError, "mean must have shape (N, num_groups) = (2, 2)",
         lambda: psg(dy, x, mean[:, :1], rstd, G)),
        ("eps", ValueError, "eps must be finite and >= 0", lambda: fwd(x, G, eps=-1.0)),
        ("activation", ValueError, "unknown activation 'tanh'; supported: None, 'silu'",
         lambda: psg(dy, x, mean, rstd, G, activation="tanh")),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_bad_input_message(case):
    _, exc, message, call = case
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


def test_out_sharing_nothing_but_x_itself_is_fine():
    x, w, b, *_ = _arrays()
    want = gnnumba.group_norm(x, G, w, b)
    xc = x.copy()
    assert gnnumba.group_norm(xc, G, w, b, out=xc) is xc
    assert np.array_equal(xc, want)


# --------------------------------------------------------------------------- nothing modified


def _snapshot(args):
    return [np.array(a.detach().numpy() if isinstance(a, torch.Tensor) else a, copy=True)
            if a is not None and not isinstance(a, (int, str)) else a for a in args]


def _same(before, after):
    for b, a in zip(before, after):
        if isinstance(b, np.ndarray):
            a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_no_function_modifies_its_inputs(kind, layout, activation):
    x, w, b, dy, mean, rstd = (cases.lay_out(a, layout) if a.ndim == 4 else a
                               for a in _arrays())
    if kind == "torch":
        x, w, b, dy, mean, rstd = (torch.from_numpy(a) for a in (x, w, b, dy, mean, rstd))
    calls = [
        (gnnumba.group_norm, (x, G, w, b)),
        (gnnumba.group_norm_forward, (x, G, w, b)),
        (gnnumba.group_norm_backward, (dy, x, mean, rstd, G, w, b)),
        (gnnumba.per_sample_param_grads, (dy, x, mean, rstd, G, w, b)),
    ]
    for fn, args in calls:
        before = _snapshot(args)
        fn(*args, activation=activation)
        _same(before, args)


def test_failing_calls_modify_nothing():
    """A call that raises (here: bad shapes found late, after other arguments passed) leaves
    every argument, ``out`` included, as it was."""
    x, w, b, dy, mean, rstd = _arrays()
    out = np.full(SHAPE, 7.0, np.float32)
    args = (x, w, b, dy, mean, rstd, out)
    before = _snapshot(args)
    with pytest.raises(ValueError):
        gnnumba.group_norm(x, G, w, b[:3], out=out)
    with pytest.raises(ValueError):
        gnnumba.group_norm_backward(dy, x, mean, rstd[:, :1], G, w, b)
    with pytest.raises(ValueError):
        gnnumba.per_sample_param_grads(dy, x, mean, rstd, G, w[:3], b)
    _same(before, args)
