"""Every way a model with gnnumba GroupNorm is traced, compiled and shipped, against
torch.nn.GroupNorm: torch.jit.trace (with and without grad), torch.compile, torch.export,
ONNX (dynamo and legacy exporters, run by onnxruntime) and torch.jit.script's clear refusal.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnnumba.torch as gt
from gnnumba import activations


def model(activation="silu", seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), gt.GroupNorm(4, 8, activation=activation),
                      nn.Conv2d(8, 4, 1), gt.GroupNorm(2, 4))
    with torch.no_grad():
        for gn in (m[1], m[3]):
            gn.weight.uniform_(0.5, 1.5)
            gn.bias.normal_()
    return m.eval()


def torch_twin(m):
    """The same network on torch.nn.GroupNorm (and the activation as a separate module)."""
    layers = []
    for layer in m:
        if isinstance(layer, gt.GroupNorm):
            gn = nn.GroupNorm(layer.num_groups, layer.num_channels, layer.eps)
            gn.load_state_dict(layer.state_dict())
            layers.append(gn)
            if layer.activation:
                layers.append(getattr(nn, {"silu": "SiLU", "relu": "ReLU",
                                           "gelu": "GELU"}[layer.activation])())
        else:
            layers.append(layer)
    return nn.Sequential(*layers).eval()


# --------------------------------------------------------------------------- jit.trace


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_records_an_op_not_a_constant(grad):
    m = model()
    a, b = torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 5)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, a, check_trace=False)
    assert "gnnumba::group_norm_fwd" in str(traced.inlined_graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(b), m(b))  # another input, another shape
        torch.testing.assert_close(traced(b), torch_twin(m)(b), rtol=1e-5, atol=1e-5)
    assert not torch.equal(traced(b)[:2, :, :5, :5], traced(a)[:, :, :5, :5])
    # and it trains: gradients flow through the recorded op
    x = b.clone().requires_grad_()
    traced(x).square().sum().backward()
    assert x.grad is not None and m[1].weight.grad is not None


# --------------------------------------------------------------------------- compile / export


def test_torch_compile_fullgraph():
    """One small compile (aot_eager: dynamo + AOTAutograd + the fake kernel, without the slow
    C++ codegen of inductor)."""
    m = model().train()
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    y_eager = m(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, list(m.parameters()) + [x]):
        torch.testing.assert_close(g, p.grad)


def test_torch_export_keeps_the_op():
    m = model()
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(m, (x,))
    assert "gnnumba.group_norm_fwd" in str(ep.graph)
    b = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ep.module()(b), m(b))
    ep2 = ep.run_decompositions()  # the default table keeps the op
    torch.testing.assert_close(ep2.module()(b), m(b))


# --------------------------------------------------------------------------- ONNX


def _onnx_ops(proto):
    return [(n.domain, n.op_type) for n in proto.graph.node]


def _run_onnxruntime(proto, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("activation", [None, "silu", "relu", "gelu"])
@pytest.mark.parametrize("opset", [None, 21], ids=["default-opset", "opset21"])
def test_onnx_dynamo_export_is_standard_and_runs(opset, activation):
    pytest.importorskip("onnxscript")
    m = model(activation)
    x = torch.randn(2, 3, 6, 6)
    kwargs = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False, **kwargs)
    ops = _onnx_ops(program.model_proto)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops  # no custom domain
    if opset == 21:
        assert sum(op == "GroupNormalization" for _, op in ops) == 2, ops
    b = torch.randn(2, 3, 6, 6)  # another input (the exported shapes are static)
    torch.testing.assert_close(_run_onnxruntime(program.model_proto, b), torch_twin(m)(b),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_onnx_legacy_export_is_a_real_graph(grad):
    onnx = pytest.importorskip("onnx")
    m = model()
    x = torch.randn(2, 3, 6, 6)
    f = io.BytesIO()
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), f, dynamo=False)
    proto = onnx.load_from_string(f.getvalue())
    ops = _onnx_ops(proto)
    # a graph of the input (a constant output would have no input), of standard operators
    assert len(proto.graph.input) == 1
    assert sum(op in ("InstanceNormalization", "GroupNormalization") for _, op in ops) == 2, ops
    assert all(domain == "" for domain, _ in ops), ops
    b = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(_run_onnxruntime(proto, b), torch_twin(m)(b),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- jit.script


def test_jit_script_refuses_clearly():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match=r"gnnumba.*torch\.jit\.trace.*torch\.compile"):
            torch.jit.script(model())


def test_activation_codes_are_the_table():
    """The op schema's ``act`` is the code of gnnumba.activations (one table)."""
    x = torch.randn(2, 4, 3)
    for name, code in activations.CODES.items():
        y = torch.ops.gnnumba.group_norm_fwd(x, 2, None, None, 1e-5, code)[0]
        ref = F.group_norm(x, 2)
        if name:
            ref = getattr(F, activations.TORCH_NAMES[name])(ref)
        torch.testing.assert_close(y, ref)
