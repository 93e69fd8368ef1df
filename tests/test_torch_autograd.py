"""gnnumba.torch under every autograd mode, against torch.nn.GroupNorm: first and second
derivatives (gradcheck / gradgradcheck in float64), forward-mode AD, and the torch.func
transforms (grad, vjp, jvp, jacrev, jacfwd, vmap and vmap(grad) per-sample gradients).

The oracle is the same expression on torch's own ops: act(F.group_norm(...)).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import gnnumba.torch as gt
from gnnumba import activations

ACTS = [None, "silu", "relu", "gelu"]


def torch_gn(x, G, w=None, b=None, activation=None, eps=1e-5):
    y = F.group_norm(x, G, w, b, eps)
    return getattr(F, activations.TORCH_NAMES[activation])(y) if activation else y


def inputs(shape=(2, 6, 3, 2), layout="nchw", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "cl":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b


# --------------------------------------------------------------------------- first order


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gradcheck_float64(layout, activation):
    x, w, b = (t.requires_grad_() for t in inputs(layout=layout))
    assert torch.autograd.gradcheck(
        lambda *a: gt.group_norm(a[0], 3, a[1], a[2], activation=activation), (x, w, b))
    # and through the custom op (the torch.compile route)
    code = activations.code(activation)
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.gnnumba.group_norm_fwd(a[0], 3, a[1], a[2], 1e-5, code)[0],
        (x, w, b))


def test_gradcheck_without_affine():
    x = inputs((3, 4, 5))[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gt.group_norm(t, 2), (x,))


# --------------------------------------------------------------------------- second order


@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
@pytest.mark.parametrize("route", ["eager", "custom-op"])
def test_gradgradcheck_float64(route, activation):
    """Double backward (gradient penalties, MAML, Hessian-vector products) as torch's."""
    x, w, b = (t.requires_grad_() for t in inputs((2, 4, 3)))
    code = activations.code(activation)
    if route == "eager":
        def f(*a):
            return gt.group_norm(a[0], 2, a[1], a[2], activation=activation)
    else:
        def f(*a):
            return torch.ops.gnnumba.group_norm_fwd(a[0], 2, a[1], a[2], 1e-5, code)[0]
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_gradient_penalty_matches_torch():
    """WGAN-GP / R1 style: d/dparams of ||d out / d x||^2, against nn.GroupNorm."""
    x = inputs((3, 8, 4, 4), dtype=torch.float32)[0]
    ours = gt.GroupNorm(4, 8, activation="silu")
    theirs = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        theirs.load_state_dict(ours.state_dict())
    results = []
    for fn, params in ((ours, list(ours.parameters())),
                       (lambda t: F.silu(theirs(t)), list(theirs.parameters()))):
        xi = x.clone().requires_grad_()
        out = fn(xi).pow(2).sum()
        (gx,) = torch.autograd.grad(out, xi, create_graph=True)
        penalty = gx.pow(2).sum()
        results.append(torch.autograd.grad(penalty, params + [xi]))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_first_order_backward_builds_no_graph():
    """Plain backward() takes the kernel route: its gradients carry no graph."""
    x, w, b = (t.requires_grad_() for t in inputs())
    y = gt.group_norm(x, 3, w, b)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.grad_fn is None




PARAM_DTYPES = {  # (weight dtype, bias dtype) or None for a missing parameter
    "same": "x", "float32": (torch.float32, torch.float32), "mixed": (torch.float32, torch.float64),
    "weight only": (torch.float32, None), "bias only": (None, torch.float64),
    "bfloat16 params": (torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("params", PARAM_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_eager_backward_matches_the_backward_kernel_bitwise(layout, dtype, params):
    """The first-order backward reuses its forward's NumPy views and sums the parameter
    gradients straight into their dtype (``ops.cpu_backward_saved``): the same bits as
    ``ops.backward_impl`` from the saved tensors, with torch's conversion of the float64
    sums."""
    from gnnumba.torch import ops

    x, w, b = inputs((3, 8, 5, 3), layout, dtype)
    dtypes = (dtype, dtype) if PARAM_DTYPES[params] == "x" else PARAM_DTYPES[params]
    w = w.to(dtypes[0]) if dtypes[0] is not None else None
    b = b.to(dtypes[1]) if dtypes[1] is not None else None
    dy = inputs((3, 8, 5, 3), layout, dtype, seed=1)[0]
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = gt.group_norm(x, 4, w, b, activation="silu")
    got = torch.autograd.grad(y, leaves, dy)
    _, mean, rstd = ops.forward_impl(x.detach(), 4, w, b, 1e-5, activations.code("silu"))
    dx, dw, db = ops.backward_impl(dy, x.detach(), mean, rstd, w, b, activations.code("silu"))
    want = [dx] + [g.to(p.dtype) for g, p in ((dw, w), (db, b)) if p is not None]
    for g, e in zip(got, want):
        assert g.dtype == e.dtype and g.stride() == e.stride()
        assert torch.equal(g, e)


def test_inplace_change_of_the_saved_input_is_refused():
    """As with torch's own GroupNorm, changing the input in place between forward and
    backward raises instead of giving gradients of other values."""
    base, w, b = (t.requires_grad_() for t in inputs())
    for fn in (F.group_norm, gt.group_norm):
        x = base * 1.0
        y = fn(x, 3, w, b)
        x.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
# --------------------------------------------------------------------------- forward AD


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_ad_tangent_matches_torch(requires_grad, activation):
    x, w, b = inputs(layout="cl")
    tx, tw, tb = (torch.randn_like(t) for t in (x, w, b))
    if requires_grad:
        x.requires_grad_()
    tangents = []
    # torch's own forward AD refuses channels-last input ("view size is not compatible"):
    # its oracle gets NCHW copies
    for fn, xs in ((lambda *a: gt.group_norm(*a, activation=activation), (x, tx)),
                   (lambda *a: torch_gn(*a, activation=activation),
                    (x.contiguous(), tx.contiguous()))):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(*xs), 3, fwAD.make_dual(w, tw), fwAD.make_dual(b, tb))
            tangents.append(fwAD.unpack_dual(y).tangent)
    assert tangents[0] is not None
    torch.testing.assert_close(tangents[0], tangents[1])


def test_gradcheck_forward_ad():
    x, w, b = (t.requires_grad_() for t in inputs())
    assert torch.autograd.gradcheck(lambda *a: gt.group_norm(a[0], 3, a[1], a[2]),
                                    (x, w, b), check_forward_ad=True,
                                    check_backward_ad=True, check_undefined_grad=False)


# --------------------------------------------------------------------------- torch.func


def _both(fn):
    """fn applied to the gnnumba and the torch implementation."""
    return fn(gt.group_norm), fn(lambda *a, **k: torch_gn(*a, **k))


def _assert_same(pair):
    ours, theirs = pair
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_vmap_folds_into_batch(layout):
    x = torch.randn(4, 2, 6, 3, dtype=torch.float64)  # vmapped dim of size 4 over (2, 6, 3)
    if layout == "cl":  # each (2, 6, 3) slice channels-last in memory
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    _, w, b = inputs((2, 6, 3))
    _assert_same(_both(lambda f: vmap(lambda t: f(t, 3, w, b, activation="silu"))(x)))
    _assert_same(_both(lambda f: vmap(lambda t: f(t, 3, w, b), in_dims=1)(x.movedim(0, 1))))
    # folded: the same bits as one call on the (B*N, C, ...) batch
    folded = gt.group_norm(x.reshape(8, 6, 3), 3, w, b).reshape(4, 2, 6, 3)
    assert torch.equal(vmap(lambda t: gt.group_norm(t, 3, w, b))(x), folded)


def test_vmap_runs_the_kernels_once_on_the_folded_batch(monkeypatch):
    """vmap folds into N: one kernel call on (B*N, C, ...), forward and backward."""
    from gnnumba.torch import ops
    calls = []
    for name in ("forward_impl", "backward_impl"):
        real = getattr(ops, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, tuple(a[1 if _name == "backward_impl" else 0].shape)))
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, spy)
    x, w, b = inputs((5, 6, 4))

    def loss(w_, b_, xi):
        return gt.group_norm(xi[None], 3, w_, b_).pow(2).sum()

    vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    assert calls == [("forward_impl", (5, 6, 4)), ("backward_impl", (5, 6, 4))], calls


def test_vmap_over_parameters():
    """Ensembling: a vmapped weight and bias (each member its own affine)."""
    x, _, _ = inputs((2, 6, 3))
    ws, bs = torch.rand(5, 6, dtype=torch.float64) + 0.5, torch.randn(5, 6, dtype=torch.float64)
    _assert_same(_both(lambda f: vmap(lambda w, b: f(x, 3, w, b, activation="gelu"))(ws, bs)))


@pytest.mark.parametrize("activation", [None, "silu"])
def test_grad_and_vjp(activation):
    x, w, b = inputs()

    def loss(f):
        return lambda x_, w_, b_: f(x_, 3, w_, b_, activation=activation).pow(2).sum()

    _assert_same(_both(lambda f: grad(loss(f), argnums=(0, 1, 2))(x, w, b)))
    dy = torch.randn_like(x)
    _assert_same(_both(lambda f: vjp(lambda t: f(t, 3, w, b), x)[1](dy)))


def test_jvp_and_jacobians():
    x, w, b = inputs((2, 4, 3))
    t = torch.randn_like(x)
    _assert_same(_both(lambda f: jvp(lambda x_: f(x_, 2, w, b, activation="silu"), (x,), (t,))))
    _assert_same(_both(lambda f: jacrev(lambda w_: f(x, 2, w_, b))(w)))
    _assert_same(_both(lambda f: jacrev(lambda x_: f(x_, 2, w, b))(x)))
    _assert_same(_both(lambda f: jacfwd(lambda b_: f(x, 2, w, b_, activation="silu"))(b)))


@pytest.mark.parametrize("activation", [None, "silu"])
def test_per_sample_grads_vmap_of_grad(activation):
    """The per-sample gradient recipe (and Opacus' "functorch" mode): vmap(grad(loss)) over
    samples, each seen as a batch of one."""
    x, w, b = inputs((5, 6, 4))
    target = torch.randn_like(x)

    def per_sample(f):
        def loss(w_, b_, xi, ti):
            y = f(xi[None], 3, w_, b_, activation=activation)
            return (y - ti[None]).pow(2).sum()
        return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, x, target)

    ours, theirs = _both(per_sample)
    assert ours[0].shape == (5, 6)
    _assert_same((ours, theirs))


def test_hessian_vector_product():
    x, w, b = inputs((2, 4, 3))
    v = torch.randn_like(w)

    def hvp(f):
        def g(w_):
            return grad(lambda u: f(x, 2, u, b, activation="silu").pow(2).sum())(w_)
        return jvp(g, (w,), (v,))[1]

    _assert_same(_both(hvp))


# --------------------------------------------------------------------------- Opacus modes


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("mode", ["functorch", "ew"])
def test_opacus_transform_modes(mode, activation):
    """The torch side of Opacus' "functorch" (vmap(grad)) and "ew" (ExpandedWeights, a
    tensor subclass on the parameters) modes: per-sample gradients match micro-batches."""
    utils = pytest.importorskip("opacus.utils.per_sample_gradients_utils")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), gt.GroupNorm(4, 8, activation=activation),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 2))
    x = torch.randn(4, 3, 7, 7)
    assert utils.check_per_sample_gradients_are_correct(x, model, grad_sample_mode=mode,
                                                        atol=1e-5, rtol=1e-4)
