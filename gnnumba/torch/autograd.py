"""Eager autograd for the kernels, composable with every torch transform.

``GroupNormFunction`` runs the forward kernel; its backward runs the backward kernel. Written
in the ``setup_context`` style with ``vmap`` and ``jvp`` rules, so that besides plain
``backward()`` it works under forward-mode AD and ``torch.func`` (``grad``, ``vjp``, ``jvp``,
``jacrev``, ``jacfwd``, ``vmap`` and their nestings, e.g. per-sample gradients
``vmap(grad(f))``):

* ``vmap``: GroupNorm treats samples independently, so a vmapped dim folds into N: the
  kernels run once on the (B*N, C, ...) batch and the result is unfolded (exact, and as
  fast as one big call). A vmapped weight or bias (model ensembling) normalises on the
  kernels and applies the per-batch affine and activation in torch ops.
* ``jvp`` (forward-mode AD): the tangent from the composite torch implementation
  (``library.composite``) with ``torch.func.jvp``.
* gradients that must themselves be differentiable (``create_graph=True``: double backward,
  gradient penalties, Hessian-vector products) or that are taken under a ``torch.func``
  transform go through ``BackwardFunction``: its forward is the backward kernel (returning
  per-sample weight/bias gradients, which is what a vmapped ``grad`` needs), its own backward
  and jvp are those of the composite. Only this slower route builds a graph; a first-order
  ``backward()`` calls the kernel directly, as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import library, ops

_interpreter_stack = torch._C._functorch.peek_interpreter_stack


def _fold(t: Tensor, bdim, B: int) -> Tensor:
    """(B, N, ...) with the vmapped dim first (expanded when unbatched), folded to (B*N, ...)."""
    t = t.movedim(bdim, 0) if bdim is not None else t.expand((B,) + tuple(t.shape))
    return t.reshape((B * t.shape[1],) + tuple(t.shape[2:]))


def _unfold(t: Tensor, B: int) -> Tensor:
    return t.reshape((B, t.shape[0] // B) + tuple(t.shape[1:]))


def _param_as(p, bdim, x_dim: int, B: int):
    """A (C,) parameter (or its vmapped (B, C) stack) shaped to broadcast against
    (B, N, C, *spatial); None stays None."""
    if p is None:
        return None
    p = p.movedim(bdim, 0) if bdim is not None else p.unsqueeze(0)
    return p.reshape((p.shape[0], 1, p.shape[1]) + (1,) * (x_dim - 2))


def _backward(ctx, dy):
    """Gradients for (x, num_groups, weight, bias, eps, act) from the saved tensors."""
    x, mean, rstd, weight, bias = ctx.saved_tensors
    return _grads(ctx, dy, x, mean, rstd, weight, bias)


def _grads(ctx, dy, x, mean, rstd, weight, bias):
    """The backward kernel, or, when the gradients must be differentiable or are taken under
    a transform, ``BackwardFunction``."""
    G, eps, act = ctx.args
    need = ctx.needs_input_grad
    if torch.is_grad_enabled() or _interpreter_stack() is not None:
        dx, dw, db = BackwardFunction.apply(dy, x, mean, rstd, weight, bias, G, eps, act)
        dw = dw.sum(0) if need[2] else None
        db = db.sum(0) if need[3] else None
    else:
        dx, dw, db = ops.backward_impl(dy, x, mean, rstd, weight, bias, act)
    return (dx if need[0] else None, None,
            dw.to(weight.dtype) if need[2] else None,
            db.to(bias.dtype) if need[3] else None, None, None)


class EagerFunction(torch.autograd.Function):
    """y = GroupNorm(x) for plain eager autograd (no transform, no forward-mode AD).

    The same as ``GroupNormFunction`` in the older ``forward(ctx, ...)`` style, because
    torch binds the arguments of a ``setup_context``-style Function with
    ``inspect.signature`` at every call: measured 29 us against 13 us per forward at
    1x32x8x8. Transforms need the ``setup_context`` style, so they get the other one.

    On CPU the forward keeps its NumPy views and float64 statistics (``ops.CpuSaved``) for a
    first-order backward; x, weight and bias are still saved as tensors, so that torch's
    check for in-place changes between forward and backward applies."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, act):
        ctx.args = (num_groups, eps, act)
        ctx.cpu = None
        if not x.is_cuda:
            y, ctx.cpu = ops.cpu_forward_saved(x, num_groups, weight, bias, eps, act)
            if ctx.cpu is not None:
                ctx.save_for_backward(x, weight, bias)
                return y
        y, mean, rstd = ops.forward_impl(x, num_groups, weight, bias, eps, act)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.cpu
        if saved is None:
            return _backward(ctx, dy)
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled() or _interpreter_stack() is not None:
            mean, rstd = ops.cpu_saved_stats(saved)
            return _grads(ctx, dy, x, mean, rstd, weight, bias)
        need = ctx.needs_input_grad
        dx, dw, db = ops.cpu_backward_saved(dy, saved, ctx.args[2],
                                            weight.dtype if need[2] else None,
                                            bias.dtype if need[3] else None)
        return dx if need[0] else None, None, dw, db, None, None


class GroupNormFunction(torch.autograd.Function):
    """(y, mean, rstd) = GroupNorm(x) on the kernels; mean/rstd are not differentiable."""

    @staticmethod
    def forward(x, num_groups, weight, bias, eps, act):
        return ops.forward_impl(x, num_groups, weight, bias, eps, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, num_groups, weight, bias, eps, act = inputs
        _y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.save_for_forward(x, weight, bias)
        ctx.args = (num_groups, eps, act)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        return _backward(ctx, dy)

    @staticmethod
    def jvp(ctx, x_t, _g_t, w_t, b_t, _eps_t, _act_t):
        x, weight, bias = ctx.saved_tensors
        G, eps, act = ctx.args
        primals, tangents = _present((x, x_t), (weight, w_t), (bias, b_t))

        def f(*p):
            x_, w_, b_ = _rebuild(p, weight, bias)
            return library.composite(x_, G, w_, b_, eps, act)

        return _jvp(f, primals, tangents), None, None

    @staticmethod
    def vmap(info, in_dims, x, num_groups, weight, bias, eps, act):
        xd, _, wd, bd, _, _ = in_dims
        B = info.batch_size
        xf = _fold(x, xd, B)
        if wd is None and bd is None:
            y, mean, rstd = GroupNormFunction.apply(xf, num_groups, weight, bias, eps, act)
            return (_unfold(y, B), _unfold(mean, B), _unfold(rstd, B)), (0, 0, 0)
        # per-batch parameters: normalise on the kernels, then the affine and activation
        xhat, mean, rstd = GroupNormFunction.apply(xf, num_groups, None, None, eps, 0)
        z = _unfold(xhat, B)
        w = _param_as(weight, wd, x.dim(), B)
        b = _param_as(bias, bd, x.dim(), B)
        if w is not None:
            z = z * w
        if b is not None:
            z = z + b
        f = library.activation(act)
        y = f(z) if f is not None else z
        return (y, _unfold(mean, B), _unfold(rstd, B)), (0, 0, 0)


def _jvp(f, primals, tangents):
    """J·t of f at primals by two reverse passes (the "double vjp" trick: the vjp u -> J^T u
    is linear in u, and its own vjp with cotangent t is J·t). ``torch.func.jvp`` cannot be
    used here: a jvp rule runs inside a forward-mode AD level, and torch does not nest
    those."""
    out, vjp_f = torch.func.vjp(f, *primals)
    u0 = torch.zeros_like(out) if isinstance(out, Tensor) else tuple(map(torch.zeros_like, out))
    _, vjp_g = torch.func.vjp(lambda u: vjp_f(u), u0)
    (jt,) = vjp_g(tangents)
    return jt


def _present(*pairs):
    """(primals, tangents) of the tensors that are present, zero tangents where missing."""
    primals, tangents = [], []
    for p, t in pairs:
        if p is not None:
            primals.append(p)
            tangents.append(torch.zeros_like(p) if t is None else t)
    return tuple(primals), tuple(tangents)


def _rebuild(p, weight, bias):
    """(x, weight, bias) from the present ones in ``p`` (order x, weight, bias)."""
    p = list(p)
    x = p.pop(0)
    w = p.pop(0) if weight is not None else None
    b = p.pop(0) if bias is not None else None
    return x, w, b


def _per_sample_composite(dy, x, weight, bias, G, eps, act):
    """(dx, dweight_per_sample, dbias_per_sample) in torch ops, differentiable: the composite
    with the parameters expanded to one row per sample, whose gradients are per sample."""
    N, C = x.shape[0], x.shape[1]
    w_n = (weight if weight is not None else x.new_ones(())).expand(N, C)
    b_n = (bias if bias is not None else x.new_zeros(())).expand(N, C)
    shape = (N, C) + (1,) * (x.dim() - 2)

    def f(x_, w_, b_):
        z = library.composite(x_, G, None, None, eps, 0) * w_.reshape(shape) + b_.reshape(shape)
        a = library.activation(act)
        return a(z) if a is not None else z

    _, vjp = torch.func.vjp(f, x, w_n, b_n)
    return vjp(dy)


class BackwardFunction(torch.autograd.Function):
    """(dx, dweight_per_sample, dbias_per_sample) on the backward kernel, differentiable
    (through the composite) and vmappable (folding into N)."""

    @staticmethod
    def forward(dy, x, mean, rstd, weight, bias, num_groups, eps, act):
        # per-sample gradients stay in the accumulation dtype until the caller's sum
        return ops.backward_impl(dy, x, mean, rstd, weight, bias, act, per_sample=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, x, mean, rstd, weight, bias, num_groups, eps, act = inputs
        ctx.save_for_backward(dy, x, weight, bias)
        ctx.save_for_forward(dy, x, weight, bias)
        ctx.args = (num_groups, eps, act)

    @staticmethod
    def _function(ctx):
        dy, x, weight, bias = ctx.saved_tensors
        G, eps, act = ctx.args
        primals = tuple(t for t in (dy, x, weight, bias) if t is not None)

        def f(*p):
            p = list(p)
            dy_, x_ = p.pop(0), p.pop(0)
            w_ = p.pop(0) if weight is not None else None
            b_ = p.pop(0) if bias is not None else None
            return _per_sample_composite(dy_, x_, w_, b_, G, eps, act)

        return f, primals, (weight, bias)

    @staticmethod
    def backward(ctx, ddx, ddw, ddb):
        f, primals, (weight, bias) = BackwardFunction._function(ctx)
        outs, vjp = torch.func.vjp(f, *primals)
        cot = tuple(torch.zeros_like(o) if c is None else c.to(o.dtype)
                    for o, c in zip(outs, (ddx, ddw, ddb)))
        grads = list(vjp(cot))
        g_dy, g_x = grads.pop(0), grads.pop(0)
        g_w = grads.pop(0) if weight is not None else None
        g_b = grads.pop(0) if bias is not None else None
        return g_dy, g_x, None, None, g_w, g_b, None, None, None

    @staticmethod
    def jvp(ctx, dy_t, x_t, _m_t, _r_t, w_t, b_t, _g_t, _eps_t, _act_t):
        f, primals, (weight, bias) = BackwardFunction._function(ctx)
        tangents = [t if t is not None else torch.zeros_like(p)
                    for p, t in zip(primals, [dy_t, x_t] + [w_t] * (weight is not None)
                                    + [b_t] * (bias is not None))]
        dx_t, dw_t, db_t = _jvp(f, primals, tuple(tangents))
        sdt = ops.stats_dtype(primals[1])
        return dx_t, dw_t.to(sdt), db_t.to(sdt)

    @staticmethod
    def vmap(info, in_dims, dy, x, mean, rstd, weight, bias, num_groups, eps, act):
        dyd, xd, md, rd, wd, bd = in_dims[:6]
        B = info.batch_size
        if wd is not None or bd is not None:  # per-batch parameters: the composite, vmapped
            dims = (dyd, xd) + ((wd,) if weight is not None else ()) + \
                ((bd,) if bias is not None else ())

            def f(dy_, x_, *p):
                w_, b_ = _rebuild((None,) + p, weight, bias)[1:]
                return _per_sample_composite(dy_, x_, w_, b_, num_groups, eps, act)

            args = (dy, x) + tuple(t for t in (weight, bias) if t is not None)
            dx, dw, db = torch.vmap(f, in_dims=dims)(*args)
            sdt = ops.stats_dtype(x)
            return (dx, dw.to(sdt), db.to(sdt)), (0, 0, 0)
        out = BackwardFunction.apply(_fold(dy, dyd, B), _fold(x, xd, B), _fold(mean, md, B),
                                     _fold(rstd, rd, B), weight, bias, num_groups, eps, act)
        return tuple(_unfold(t, B) for t in out), (0, 0, 0)
