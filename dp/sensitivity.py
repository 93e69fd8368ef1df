"""Why BatchNorm breaks DP-SGD's privacy analysis and GroupNorm does not, in numbers.

DP-SGD adds noise calibrated to the sensitivity of ``S(D) = Σ_i clip_C(g_i(D))``: when one
sample is added or removed, S moves by at most C — *if* g_i depends on sample i alone.
With BatchNorm in training mode every sample's output, and so its gradient, depends on the
whole batch through the batch statistics, so adding one sample moves every clipped term; the
only bound left is ``(2B + 1)·C`` (B common terms each moving by up to 2C, plus the one
added). GroupNorm normalises within a sample: the coupling is exactly zero.

Per-sample gradients ``g_i`` are gradients of sample i's loss *with the forward pass run on
the whole batch*:

- ``batch_context_grads``: one backward pass per requested sample; exact for any model (the
  reference, used for the coupling measurement and in the tests).
- ``jacobian_grads``: the same numbers for all samples at once with ``torch.func.jacrev``;
  needs functorch support, which torch's BatchNorm has (the gnnumba op does not).
- ``opacus_grads``: Opacus's hooks with our GroupNorm sampler — what DP-SGD actually clips.
  Valid only for models without cross-sample coupling; the coupling measurement (and a test
  against ``batch_context_grads``) shows the GroupNorm model is one.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def _buffers_kept(model):
    """Undo BatchNorm's running-statistics update on exit (only after every backward pass:
    the autograd graph holds the buffers, so they may not change while it is in use)."""
    saved = [b.clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved):
                b.copy_(v)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def batch_context_grads(model, x, y, rows=None) -> torch.Tensor:
    """(len(rows), P): row k is d loss_{rows[k]} / d params, forward run on the whole batch
    in training mode (BatchNorm uses batch statistics). ``rows=None``: every sample.
    Running statistics are left untouched."""
    rows = range(x.shape[0]) if rows is None else list(rows)
    params = _params(model)
    out = []
    with _buffers_kept(model):
        model.train()
        losses = F.cross_entropy(model(x), y, reduction="none")
        for k, i in enumerate(rows):
            gs = torch.autograd.grad(losses[i], params, retain_graph=k + 1 < len(rows))
            out.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(out) if out else torch.zeros(0, sum(p.numel() for p in params))


def jacobian_grads(model, x, y) -> torch.Tensor:
    """(B, P), equal to ``batch_context_grads(model, x, y)``, in one ``jacrev`` call."""
    from torch.func import functional_call, jacrev

    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN updates these in place

    def losses(p, b):
        return F.cross_entropy(functional_call(model, (p, b), (x,)), y, reduction="none")

    model.train()
    jac = jacrev(losses)(params, buffers)
    return torch.cat([jac[k].reshape(x.shape[0], -1) for k in names], 1).detach()


def opacus_grads(model, x, y) -> torch.Tensor:
    """(B, P) per-sample gradients from Opacus's hooks (our sampler for gnnumba GroupNorm)."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    gsm.train()
    with warnings.catch_warnings():
        # "Full backward hook is firing ... no inputs require gradients": expected, the
        # input is data
        warnings.filterwarnings("ignore", message="Full backward hook")
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    gs = torch.cat([p.grad_sample.reshape(x.shape[0], -1) for p in _params(gsm._module)], 1)
    gsm._close()
    return gs.detach()


def has_batchnorm(model) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def all_grads(model, x, y) -> torch.Tensor:
    """Batch-context per-sample gradients of every sample, by the fastest valid method."""
    return jacobian_grads(model, x, y) if has_batchnorm(model) else opacus_grads(model, x, y)


# --------------------------------------------------------------------------- coupling


def coupling(model, x, y, x_new, y_new, max_rows: int = 16) -> dict:
    """Replace sample 0 with ``(x_new, y_new)``: the largest absolute change in the OTHER
    samples' outputs (all of them) and batch-context per-sample gradients (``max_rows`` of
    them, evenly spread; one backward pass each). 0.0 means: no coupling at all."""
    B = int(x.shape[0])
    x2, y2 = x.clone(), y.clone()
    x2[0], y2[0] = x_new, y_new
    with _buffers_kept(model), torch.no_grad():
        model.train()
        dout = (model(x2)[1:] - model(x)[1:]).abs()
    m = min(max_rows, B - 1)
    others = [1 + (k * (B - 1)) // m for k in range(m)]  # m distinct rows, evenly spread
    dg = (batch_context_grads(model, x2, y2, others)
          - batch_context_grads(model, x, y, others)).abs()
    return {"batch": B, "output_change": float(dout.max()) if dout.numel() else 0.0,
            "grad_change": float(dg.max()) if dg.numel() else 0.0, "rows_checked": len(others)}


# --------------------------------------------------------------------------- sensitivity


def clipped_sum(grads: torch.Tensor, clip: float) -> torch.Tensor:
    """Σ_i g_i · min(1, C / (||g_i|| + 1e-6)): Opacus's per-sample clipping, in float64."""
    g = grads.double()
    return (g * (clip / (g.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)).sum(0)


def sensitivity(model, x, y, candidates, clip: float, grads_fn=all_grads) -> dict:
    """Neighbouring batches: D' = (x, y) of size B and D = D' plus one candidate sample.

    Returns the L2 change of the clipped sum for each of ``candidates`` ([(name, x_i, y_i)])
    in ``changes`` and the largest in ``change``, beside C and the batch-coupled bound
    (2B + 1)·C. The largest change over a few candidates is an *empirical lower bound* on
    the sensitivity (the supremum over all datasets and added samples), not the sensitivity
    itself: a worse candidate may exist."""
    B = int(x.shape[0])
    base = clipped_sum(grads_fn(model, x, y), clip)
    changes = {}
    for name, xe, ye in candidates:
        xd = torch.cat([x, xe[None]])
        yd = torch.cat([y, ye.reshape(1)])
        changes[name] = float((clipped_sum(grads_fn(model, xd, yd), clip) - base).norm())
    worst = max(changes.values(), default=0.0)
    return {"batch": B, "change": worst, "changes": changes, "clip": clip,
            "ratio": worst / clip, "ratios": {k: v / clip for k, v in changes.items()},
            "bound": (2 * B + 1) * clip}


def candidates(x_pool, y_pool, seed: int = 0):
    """Extra samples an adversary might add, as (name, x, y): a real digit, and the same
    digit scaled by ±100 (an outlier dominates BatchNorm's batch variance, so every other
    sample's normalisation, and gradient direction, changes)."""
    g = torch.Generator().manual_seed(seed)
    i = int(torch.randint(len(x_pool), (1,), generator=g))
    xe, ye = x_pool[i], y_pool[i]
    return [("real digit", xe, ye), ("digit x100", 100.0 * xe, ye),
            ("digit x-100", -100.0 * xe, ye)]


# --------------------------------------------------------------------------- experiments


def run_coupling(batch_sizes, seed: int = 0, progress=None) -> list:
    """Coupling rows for the BN and GN versions of ``dp.data.cnn`` (same initial weights)."""
    from .data import cnn, digits

    xtr, ytr, _, _ = digits(seed)
    rows = []
    for norm in ("bn", "gn"):
        model = cnn(norm, seed)
        for B in batch_sizes:
            r = coupling(model, xtr[:B], ytr[:B], xtr[-1], ytr[-1])
            rows.append({"norm": norm, **r})
            if progress:
                progress()
    return rows


def run_sensitivity(batch_sizes, clip: float = 0.1, seed: int = 0, progress=None) -> list:
    """Sensitivity rows for both models; C is far below every per-sample gradient norm here
    (about 10-15 at initialisation), so every term is clipped, as in practice."""
    from .data import cnn, digits

    xtr, ytr, _, _ = digits(seed)
    cands = candidates(xtr[-200:], ytr[-200:], seed)
    rows = []
    for norm in ("bn", "gn"):
        model = cnn(norm, seed)
        for B in batch_sizes:
            rows.append({"norm": norm, **sensitivity(model, xtr[:B], ytr[:B], cands, clip)})
            if progress:
                progress()
    return rows
