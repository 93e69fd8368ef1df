"""The torch.library custom ops: what graphs record (``torch.compile``, ``torch.export``,
``torch.jit.trace``) and what exporters translate.

* ``gnnumba::group_norm_fwd(x, num_groups, weight, bias, eps, act) -> (y, mean, rstd)``
* ``gnnumba::group_norm_bwd(dy, x, mean, rstd, weight, bias, act) -> (dx, dweight, dbias)``

``act`` is the activation's code from ``gnnumba.activations`` (0 none, 1 silu, 2 relu,
3 gelu), so one op carries every activation. Each op has a fake kernel (shapes and strides
for FakeTensor/meta tracing) and autograd; the forward op also has a decomposition into
standard aten ops (``aten.group_norm`` and the activation), registered in torch's global
decomposition table, which ``torch.onnx.export(dynamo=True)`` consults for ops it cannot
translate: the ONNX graph then holds standard operators (``GroupNormalization`` from opset 21,
torch's own InstanceNormalization form below it) and runs anywhere, no gnnumba needed.
``torch.export.export`` keeps the op itself (``ep.run_decompositions()`` with the default
table also keeps it).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import activations
from . import ops

_TORCH_ACTIVATION = {activations.CODES[name]: getattr(F, torch_name)
                     for name, torch_name in activations.TORCH_NAMES.items()}


def composite(x: Tensor, G: int, weight, bias, eps: float, act: int) -> Tensor:
    """``act(F.group_norm(...))`` in torch ops: differentiable to any order and under every
    transform. The reference the kernels match, and the route for what the kernels do not
    serve (second derivatives, tensor subclasses, legacy ONNX export, export decomposition)."""
    y = F.group_norm(x, G, weight, bias, eps)
    return _TORCH_ACTIVATION[act](y) if act else y


def activation(act: int):
    """The torch function of an activation code (None for 0)."""
    return _TORCH_ACTIVATION.get(act)


def _param_grad(g: Tensor, p: Optional[Tensor], x: Tensor) -> Tensor:
    return g.to(p.dtype if p is not None else x.dtype)


@torch.library.custom_op("gnnumba::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, act: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm forward: (y, mean, rstd), mean/rstd of shape (N, num_groups)."""
    return ops.forward_impl(x, num_groups, weight, bias, eps, act)


@group_norm_fwd.register_fake
def _(x, num_groups, weight, bias, eps, act):
    sdt = ops.stats_dtype(x)
    stats = (x.shape[0], num_groups)
    y = ops.empty_like_layout(*ops.in_fast_layout(x))
    return y, x.new_empty(stats, dtype=sdt), x.new_empty(stats, dtype=sdt)


@torch.library.custom_op("gnnumba::group_norm_bwd", mutates_args=())
def group_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor,
                   weight: Optional[Tensor], bias: Optional[Tensor], act: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm backward: (dx, dweight, dbias); dweight/dbias are returned (zeros) even
    for a missing parameter so the op has a fixed signature."""
    dx, dw, db = ops.backward_impl(dy, x, mean, rstd, weight, bias, act)
    return dx, _param_grad(dw, weight, x), _param_grad(db, bias, x)


@group_norm_bwd.register_fake
def _(dy, x, mean, rstd, weight, bias, act):
    C = x.shape[1]
    return (ops.empty_like_layout(*ops.in_fast_layout(x)),
            x.new_empty(C, dtype=weight.dtype if weight is not None else x.dtype),
            x.new_empty(C, dtype=bias.dtype if bias is not None else x.dtype))


def _fwd_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, act = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act


def _fwd_backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: a gradient that is itself differentiable (double backward),
        # from the composite; the kernels' gradient would have no graph
        return (_composite_grads(dy, x, ctx.num_groups, weight, bias, ctx.eps, ctx.act, need)
                + (None, None))
    dx, dw, db = torch.ops.gnnumba.group_norm_bwd(dy, x, mean, rstd, weight, bias, ctx.act)
    return (dx if need[0] else None, None, dw if need[2] else None,
            db if need[3] else None, None, None)


def _composite_grads(dy, x, G, weight, bias, eps, act, need):
    """(dx, None, dweight, dbias) of the composite, differentiable (create_graph)."""
    inputs = [t for t, n in ((x, need[0]), (weight, need[2]), (bias, need[3]))
              if n and t is not None]
    with torch.enable_grad():
        y = composite(x, G, weight, bias, eps, act)
        grads = list(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    out = []
    for t, n in ((x, need[0]), (None, False), (weight, need[2]), (bias, need[3])):
        out.append(grads.pop(0) if n and t is not None else None)
    return tuple(out)


group_norm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _decompose_fwd(x, num_groups, weight, bias, eps, act):
    """Standard aten ops for the exporters. The statistics are recomputed in the same way
    only for graphs that use them (exported inference graphs do not: dead code)."""
    y = composite(x, num_groups, weight, bias, eps, act)
    xg = x.reshape(x.shape[0], num_groups, -1).to(ops.stats_dtype(x))
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    return y, mean, torch.rsqrt(var + eps)


torch._decomp.register_decomposition(torch.ops.gnnumba.group_norm_fwd.default)(_decompose_fwd)
