"""gnnumba.torch against torch.nn.GroupNorm: forward and every gradient, layouts, dtypes,
autograd, torch.compile, the module contract, errors and thread safety.

The reference is torch's own GroupNorm evaluated in float64 on the same (upcast) inputs, so
half-precision results are judged against the exact answer, not against torch's rounding.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnnumba.torch as gt
from gnnumba import GroupNormError, activations

# (shape, num_groups, layout); layout "cl" = channels-last memory order, "strided" = a
# non-contiguous slice (taken through the copy-once path)
SHAPES = [
    pytest.param((3, 6), 3, "nchw", id="no-spatial"),
    pytest.param((2, 8, 10), 4, "nchw", id="1d"),
    pytest.param((2, 8, 5, 7), 2, "nchw", id="2d-odd-sizes"),
    pytest.param((2, 6, 3, 4, 5), 3, "nchw", id="3d"),
    pytest.param((0, 4, 3, 3), 2, "nchw", id="N=0"),
    pytest.param((2, 4, 0), 2, "nchw", id="empty-spatial"),
    pytest.param((2, 8, 4, 3), 1, "nchw", id="G=1-layernorm-like"),
    pytest.param((2, 8, 4, 3), 8, "nchw", id="G=C-instancenorm-like"),
    pytest.param((2, 3, 1, 1), 3, "nchw", id="one-element-per-group"),
    pytest.param((3, 12, 7, 9), 4, "cl", id="2d-channels-last"),
    pytest.param((2, 6, 3, 2, 5), 2, "cl", id="3d-channels-last"),
    pytest.param((2, 10, 9), 5, "cl", id="1d-channels-last"),
    pytest.param((2, 8, 6, 5), 4, "strided", id="non-contiguous-slice"),
]

# per-dtype tolerance, relative to the largest reference magnitude
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_input(shape, layout, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        wide = shape[:-1] + (2 * shape[-1],)
        x = (torch.randn(wide, generator=g, dtype=torch.float64) * 2 + 0.5)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
        if layout == "cl":
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last, any rank
    return x.to(dtype)


def make_params(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    return w, b


def max_err(actual, expected):
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def close(actual, expected, dtype, what, torch_result=None):
    """Max error within the dtype's tolerance relative to the reference's scale, or at most
    twice the error of torch's own GroupNorm in the same dtype (``torch_result``): in
    degenerate cases such as one element per group, dx is a cancellation of terms of size
    rstd = 1/sqrt(eps) and no float32 implementation gets it to 2e-5."""
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = max_err(actual, expected)
    bound = TOL[dtype] * scale
    if torch_result is not None:
        bound = max(bound, 2 * max_err(torch_result, expected))
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (scale {scale:.3g})"


def reference(x, G, w, b, dy, activation, dtype=torch.float64):
    """torch's (y, dx, dw, db) computed in ``dtype`` (default: float64 on upcast inputs)."""
    x = x.detach().to(dtype).requires_grad_()
    w = None if w is None else w.detach().to(dtype).requires_grad_()
    b = None if b is None else b.detach().to(dtype).requires_grad_()
    y = F.group_norm(x, G, w, b, 1e-5)
    if activation:
        y = getattr(F, activations.TORCH_NAMES[activation])(y)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy.to(dtype)) if y.numel() else [
        torch.zeros_like(t) for t in inputs]
    grads = list(grads)
    dx = grads.pop(0)
    dw = grads.pop(0) if w is not None else None
    db = grads.pop(0) if b is not None else None
    return y.detach(), dx, dw, db


def run_parity(shape, G, layout, dtype, affine, activation):
    x = make_input(shape, layout, dtype).requires_grad_()
    C = shape[1]
    w, b = make_params(C, dtype) if affine else (None, None)
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    y = gt.group_norm(x, G, w, b, activation=activation)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "cl" and x.numel():
        assert y.movedim(1, -1).is_contiguous(), "channels-last in must give channels-last out"
    dy = make_input(shape, "nchw", dtype, seed=7)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = list(torch.autograd.grad(y, inputs, dy)) if y.requires_grad else [
        torch.zeros_like(t) for t in inputs]
    y_ref, dx_ref, dw_ref, db_ref = reference(x, G, w, b, dy, activation)
    y_t, dx_t, dw_t, db_t = reference(x, G, w, b, dy, activation, dtype)
    close(y, y_ref, dtype, "y", y_t)
    close(grads[0], dx_ref, dtype, "dx", dx_t)
    if affine:
        assert grads[1].dtype == dtype and grads[2].dtype == dtype
        close(grads[1], dw_ref, dtype, "dweight", dw_t)
        close(grads[2], db_ref, dtype, "dbias", db_t)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape,G,layout", SHAPES)
def test_parity_fp32_fp64(shape, G, layout, affine):
    for dtype in (torch.float64, torch.float32):
        run_parity(shape, G, layout, dtype, affine, activation=None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,G,layout", [SHAPES[2], SHAPES[4], SHAPES[9], SHAPES[10]])
def test_parity_half(shape, G, layout, dtype):
    run_parity(shape, G, layout, dtype, affine=True, activation=None)


@pytest.mark.parametrize("activation", ["silu", "relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("shape,G,layout", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[9]])
def test_activation_matches_activation_of_group_norm(shape, G, layout, dtype, activation):
    """torch oracle: getattr(F, TORCH_NAMES[name])(F.group_norm(...))."""
    run_parity(shape, G, layout, dtype, affine=True, activation=activation)


@pytest.mark.parametrize("activation", [None, "silu", "relu", "gelu"])
def test_module_activation(activation):
    m = gt.GroupNorm(2, 6, activation=activation)
    nn.init.normal_(m.weight)
    x = make_input((2, 6, 5), "cl")
    ref = F.group_norm(x, 2, m.weight, m.bias)
    if activation:
        ref = getattr(F, activations.TORCH_NAMES[activation])(ref)
    torch.testing.assert_close(m(x), ref)


def test_custom_op_route_matches_eager_route():
    """torch.ops.gnnumba.group_norm_fwd (the route torch.compile takes) gives the same bits as
    the eager route, forward and backward."""
    x = make_input((2, 8, 5, 5), "cl").requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(8, torch.float32))
    dy = make_input((2, 8, 5, 5), "nchw", seed=3)
    y1 = gt.group_norm(x, 4, w, b, activation="silu")
    g1 = torch.autograd.grad(y1, (x, w, b), dy)
    y2 = torch.ops.gnnumba.group_norm_fwd(x, 4, w, b, 1e-5, 1)[0]
    g2 = torch.autograd.grad(y2, (x, w, b), dy)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def test_deterministic_bitwise():
    x = make_input((2, 16, 9, 9), "nchw").requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(16, torch.float32))
    outs = []
    for _ in range(2):
        y = gt.group_norm(x, 4, w, b)
        outs.append((y,) + torch.autograd.grad(y, (x, w, b), torch.ones_like(y)))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 1, 3, 3).to(memory_format=torch.channels_last),  # C=1: both layouts
    lambda: torch.randn(1, 8, 1, 1).to(memory_format=torch.channels_last),  # 1x1 spatial
    lambda: torch.randn(2, 8, 1, 5).to(memory_format=torch.channels_last),  # a size-1 dim
    lambda: torch.randn(2, 8, 3, 1, 2).to(memory_format=torch.channels_last_3d),
    lambda: torch.randn(2, 8, 1).expand(2, 8, 6),                         # zero stride
    lambda: torch.randn(4, 5, 8).permute(0, 2, 1)[:, :, 1:],              # odd strides
    lambda: torch.randn(3, 2, 8, 4).transpose(0, 1),                      # N not outermost
], ids=["C=1-cl", "1x1-cl", "size1-cl", "3d-size1-cl", "expanded", "permuted-slice",
        "batch-transposed"])
def test_unusual_strides(make):
    """Ambiguous or odd strides never lose the kernels' writes (outputs are views) and give
    torch's answer; layouts the kernels take are kept."""
    x = make().requires_grad_()
    C = x.shape[1]
    G = 2 if C % 2 == 0 else 1
    w, b = (p.requires_grad_() for p in make_params(C, torch.float32))
    y = gt.group_norm(x, G, w, b)
    dy = torch.randn(x.shape)
    got = (y,) + torch.autograd.grad(y, (x, w, b), dy)
    y_ref = F.group_norm(x, G, w, b)
    want = (y_ref,) + torch.autograd.grad(y_ref, (x, w, b), dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5)


def test_input_not_modified_and_output_fresh():
    x = make_input((2, 8, 4, 4), "cl")
    before = x.clone()
    y = gt.group_norm(x, 2)
    assert torch.equal(x, before)
    assert y.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------- autograd


def test_needs_input_grad_is_honoured():
    x = make_input((2, 4, 3, 3), "nchw")
    m = gt.GroupNorm(2, 4)
    m(x).sum().backward()  # input needs no grad: only the parameters get one
    assert x.grad is None and m.weight.grad is not None and m.bias.grad is not None
    m.weight.grad = m.bias.grad = None
    m.requires_grad_(False)
    x.requires_grad_()
    m(x).square().sum().backward()
    assert x.grad is not None and m.weight.grad is None and m.bias.grad is None


def test_no_grad_returns_plain_tensor():
    m = gt.GroupNorm(2, 4)
    with torch.no_grad():
        y = m(make_input((2, 4, 3), "nchw"))
    assert not y.requires_grad and y.grad_fn is None


def test_opcheck_custom_ops():
    """torch.library's own checks: schema, fake kernel vs real strides, autograd
    registration and AOT dispatch (what torch.compile relies on)."""
    x = make_input((2, 8, 3, 3), "cl").requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(8, torch.float32))
    torch.library.opcheck(torch.ops.gnnumba.group_norm_fwd.default, (x, 4, w, b, 1e-5, True))
    _, mean, rstd = torch.ops.gnnumba.group_norm_fwd(x, 4, w, b, 1e-5, 1)
    dy = make_input((2, 8, 3, 3), "nchw", seed=2)
    torch.library.opcheck(torch.ops.gnnumba.group_norm_bwd.default,
                          (dy, x.detach(), mean, rstd, w.detach(), None, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_meta_tensors_go_through_the_fake_kernel():
    x = torch.empty(2, 8, 4, 4, device="meta").to(memory_format=torch.channels_last)
    y = gt.GroupNorm(4, 8, device="meta")(x)
    assert y.device.type == "meta" and y.shape == x.shape and y.stride() == x.stride()


# --------------------------------------------------------------------------- module contract


def test_module_matches_nn_groupnorm_attributes_and_state_dict():
    ours, theirs = gt.GroupNorm(4, 8), nn.GroupNorm(4, 8)
    for name in ("num_groups", "num_channels", "eps", "affine"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    assert list(ours.buffers()) == []
    assert isinstance(ours, nn.GroupNorm)
    nn.init.normal_(theirs.weight)
    nn.init.normal_(theirs.bias)
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 8, 5, 5), "nchw")
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.load_state_dict(ours.state_dict())  # and back
    no_affine = gt.GroupNorm(2, 4, affine=False)
    assert no_affine.weight is None and no_affine.bias is None
    assert list(no_affine.state_dict()) == []


def test_module_dtype_device_and_no_bias():
    m = gt.GroupNorm(2, 4, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.weight.device.type == "cpu"
    nb = gt.GroupNorm(2, 4, bias=False)
    assert nb.bias is None and nb.weight is not None
    x = make_input((2, 4, 3), "nchw")
    torch.testing.assert_close(nb(x), F.group_norm(x, 2, nb.weight, None))


def test_pickle_and_deepcopy():
    m = gt.GroupNorm(2, 6, eps=1e-3, activation="silu")
    nn.init.normal_(m.weight)
    x = make_input((2, 6, 4), "nchw")
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone.activation == "silu" and clone.eps == 1e-3
        assert clone.weight.data_ptr() != m.weight.data_ptr()
        torch.testing.assert_close(clone(x), m(x))


def test_repr():
    """torch's fields in torch's format, under a name that says which GroupNorm it is."""
    torch_fields = repr(torch.nn.GroupNorm(2, 4)).removeprefix("GroupNorm")
    assert repr(gt.GroupNorm(2, 4)) == "gnnumba.torch.GroupNorm" + torch_fields
    assert repr(gt.GroupNorm(2, 4, activation="silu")) == (
        "gnnumba.torch.GroupNorm" + torch_fields[:-1] + ", activation='silu')")


def test_module_half_params_and_input():
    m = gt.GroupNorm(2, 4).to(torch.bfloat16)
    x = make_input((2, 4, 3, 3), "nchw", torch.bfloat16).requires_grad_()
    y = m(x)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == m.weight.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- errors


def test_indivisible_groups_raise_at_construction_with_valid_counts():
    with pytest.raises(ValueError, match=r"C=6.*G=4.*1, 2, 3, 6"):
        gt.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        gt.GroupNorm(0, 6)
    with pytest.raises(ValueError, match="unknown activation"):
        gt.GroupNorm(2, 6, activation="tanh")
    with pytest.raises(ValueError, match="eps"):
        gt.GroupNorm(2, 6, eps=-1.0)


def test_wrong_channel_count_at_call():
    m = gt.GroupNorm(2, 4)
    with pytest.raises(ValueError, match=r"expected input with 4 channels.*\(2, 6, 3\)"):
        m(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="at least 2 dims"):
        m(torch.randn(4))


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: gt.group_norm([[1.0, 2.0]], 1), TypeError, "must be a torch.Tensor"),
    (lambda: gt.group_norm(torch.ones(2, 4, dtype=torch.int64), 2), TypeError, "dtype"),
    (lambda: gt.group_norm(torch.ones(2, 4, dtype=torch.complex64), 2), TypeError, "dtype"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 4), ValueError, "valid group counts"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 2.0), TypeError, "num_groups must be an int"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 2, torch.ones(4)), ValueError,
     r"weight must have shape \(C,\) = \(6,\)"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 2, None, torch.ones(6, 1)), ValueError,
     "bias must have shape"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 2, torch.ones(6, dtype=torch.int32)),
     TypeError, "floating-point weight"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 2, torch.ones(6, device="meta")),
     ValueError, "move it"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 2, eps=-1e-5), ValueError, "eps"),
    (lambda: gt.group_norm(torch.ones(2, 6, 3), 2, activation="tanh"), ValueError,
     "unknown activation"),
    (lambda: gt.group_norm(torch.ones(6), 2), ValueError, "at least 2 dims"),
], ids=["list", "int64", "complex", "C%G", "float-G", "weight-shape", "bias-shape",
        "int-weight", "weight-device", "neg-eps", "activation", "1-D"])
def test_bad_input_raises(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
    assert issubclass(GroupNormError, ValueError)


# --------------------------------------------------------------------------- threads


def test_concurrent_calls_from_threads_are_correct():
    """Several Python threads running forward+backward at once (e.g. DataLoader workers)
    get exactly the single-threaded results."""
    m = gt.GroupNorm(4, 16)
    nn.init.normal_(m.weight)
    cases = []
    for i in range(4):
        x = make_input((2, 16, 6 + i, 5), "cl" if i % 2 else "nchw", seed=10 + i)
        x.requires_grad_()
        y = m(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        cases.append((x, y.detach(), gx))
    errors = []

    def work(i):
        try:
            x, y_expected, gx_expected = cases[i]
            for _ in range(15):
                y = m(x)
                (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
                if not (torch.equal(y, y_expected) and torch.equal(gx, gx_expected)):
                    errors.append(f"thread {i}: result differs from the single-thread one")
                    return
        except Exception as e:  # reported below: a thread's exception would be lost
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --------------------------------------------------------------------------- CUDA

# The bridge's CUDA code (dtypes, layouts, workspaces and output buffers it hands to
# gnnumba.gpu.launch) run against the real launch functions and kernels in Numba's CUDA
# simulator, with CPU tensors standing in for CUDA ones. Runs on machines without a GPU.
_SIMULATED_CUDA_SCRIPT = r"""
import torch
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
from gnnumba.torch import ops, ops_cuda
from gnnumba.gpu import config, launch

config.THREADS = 32  # small blocks: several per group even at these sizes
config.CL_MIN_TILE_C = 4

def as_sim(a):
    return FakeCUDAArray(a.numpy()) if isinstance(a, torch.Tensor) else a

def adapt(fn):
    def wrapped(*args, stream=0, **kw):
        assert stream is SENTINEL, "launch must receive the stream the bridge looked up"
        return fn(*map(as_sim, args), **{k: as_sim(v) for k, v in kw.items()})
    return wrapped

SENTINEL = object()
launch.launch_forward = adapt(launch.launch_forward)
launch.launch_backward = adapt(launch.launch_backward)
ops_cuda._numba_stream = lambda device: SENTINEL

for dtype, cl, tol in ((torch.float32, True, 1e-5), (torch.float16, False, 4e-3),
                       (torch.bfloat16, True, 1.6e-2)):
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    dy = torch.randn(2, 8, 3, 5).to(dtype)
    y, mean, rstd = ops_cuda.forward(x, 4, w, b, 1e-5, 1)
    y_cpu, mean_cpu, rstd_cpu = ops._cpu_forward(x, 4, w, b, 1e-5, 1)
    dx, dw, db = ops_cuda.backward(dy, x, mean, rstd, w, b, 1, False)
    dx_cpu, dw_cpu, db_cpu = ops._cpu_backward(dy, x, mean_cpu, rstd_cpu, w, b, 1, False)
    assert y.dtype == dx.dtype == dtype and y.stride() == x.stride() == dx.stride()
    assert mean.dtype == rstd.dtype == torch.float32
    for got, want in ((y, y_cpu), (dx, dx_cpu), (dw, dw_cpu), (db, db_cpu), (mean, mean_cpu)):
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), (dtype, cl, err)
print("simulated CUDA path OK")
"""


def test_cuda_bridge_against_simulated_kernels():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _SIMULATED_CUDA_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "simulated CUDA path OK" in proc.stdout


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16], ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("shape,G,layout", [SHAPES[1], SHAPES[2], SHAPES[3], SHAPES[4],
                                            SHAPES[9], SHAPES[10]])
def test_cuda_parity(shape, G, layout, dtype):
    x = make_input(shape, layout, dtype).cuda().requires_grad_()
    w, b = (p.cuda().requires_grad_() for p in make_params(shape[1], dtype))
    dy = make_input(shape, "nchw", dtype, seed=7).cuda()
    y = gt.group_norm(x, G, w, b, activation="silu")
    if layout == "cl" and x.numel():
        assert y.movedim(1, -1).is_contiguous()
    grads = torch.autograd.grad(y, (x, w, b), dy) if y.numel() else (
        torch.zeros_like(x), torch.zeros_like(w), torch.zeros_like(b))
    y_ref, dx_ref, dw_ref, db_ref = reference(x.cpu(), G, w.cpu(), b.cpu(), dy.cpu(), "silu")
    close(y.cpu(), y_ref, dtype, "y")
    for got, want, what in zip(grads, (dx_ref, dw_ref, db_ref), ("dx", "dweight", "dbias")):
        close(got.cpu(), want, dtype, what)


@cuda
def test_cuda_runs_on_torch_current_stream():
    """Work queued on a side stream is ordered with the kernels: no host sync needed."""
    m = gt.GroupNorm(4, 16).cuda()
    x = torch.randn(8, 16, 32, 32, device="cuda")
    expected = m(x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x2 = x * 1.0  # queued on s, consumed by the GroupNorm on s
        y = m(x2)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, expected)


@cuda
def test_cuda_gradcheck_float64():
    x = make_input((2, 6, 3, 2), "cl", torch.float64).cuda().requires_grad_()
    w, b = (p.cuda().requires_grad_() for p in make_params(6, torch.float64))
    assert torch.autograd.gradcheck(lambda *a: gt.group_norm(a[0], 3, a[1], a[2]), (x, w, b))


@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (0, 4, 3)], ids=["empty spatial", "N=0"])
def test_empty_input_statistics_match_torch(shape):
    """An empty group has mean 0 and no variance: rstd NaN, as torch.native_group_norm."""
    x = torch.randn(shape)
    y, mean, rstd = torch.ops.gnnumba.group_norm_fwd(x, 2, None, None, 1e-5, 0)
    y_t, mean_t, rstd_t = torch.native_group_norm(x, None, None, shape[0], 4,
                                                  int(torch.tensor(shape[2:]).prod()), 2, 1e-5)
    assert y.shape == y_t.shape
    torch.testing.assert_close(mean.float(), mean_t, equal_nan=True)
    torch.testing.assert_close(rstd.float(), rstd_t, equal_nan=True)


def test_parameter_changes_are_always_seen():
    """The CPU path converts parameters for the kernels; no change may be missed: in-place
    updates (optimizer steps), .data replacement, writes through .data."""
    m = gt.GroupNorm(2, 4)
    ref = torch.nn.GroupNorm(2, 4)
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))

    def same(a, b):
        # two float32 implementations agree to a few ulp of the largest output; elementwise
        # rtol fails where (x - mean)*scale + bias cancels (the SGD steps grow the weight)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))

    with torch.no_grad():
        for change in (lambda p: p.mul_(1.5), lambda p: p.add_(0.25),
                       lambda p: setattr(p, "data", torch.randn(4)),
                       lambda p: p.data.__setitem__(0, 3.0)):  # .data: own version counter
            change(m.weight)
            change(m.bias)
            ref.weight.copy_(m.weight)
            ref.bias.copy_(m.bias)
            same(m(x), ref(x))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(2):
        m(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            ref.weight.copy_(m.weight)
            ref.bias.copy_(m.bias)
            same(m(x), ref(x))
