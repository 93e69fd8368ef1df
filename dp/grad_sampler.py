"""Opacus registration: per-sample gradients (and norms) of ``gnnumba.torch.GroupNorm``.

Opacus looks samplers up by exact class, so the registration names ``gnnumba.torch.GroupNorm``
itself (``register`` can add other GroupNorm-like classes with the same attributes). Both forms
are covered: for ``activation="silu"`` the backprops Opacus hands over are d loss / d output,
i.e. after the SiLU, and the kernel applies silu' to the recomputed pre-activation.

- grad sampler (``grad_sample_mode="hooks"`` and the non-ghost part of fast clipping):
  ``{weight: (N, C), bias: (N, C)}`` from ``dp.per_sample_grads``.
- norm sampler (``grad_sample_mode="ghost"``): the per-sample L2 norms of the same (N, C)
  rows — GroupNorm's parameters are tiny, so materialising them costs nothing and the norms
  are exact.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

from gnnumba.torch import GroupNorm

from .per_sample import per_sample_grads


def _per_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor):
    x = activations[0]
    return per_sample_grads(x, backprops, layer.num_groups, layer.eps,
                            activation=getattr(layer, "activation", None),
                            weight=layer.weight, bias=layer.bias)


def _trainable(layer):
    return [(p, i) for i, p in enumerate((layer.weight, layer.bias))
            if p is not None and p.requires_grad]


def compute_group_norm_grad_sample(layer, activations: List[torch.Tensor],
                                   backprops: torch.Tensor) -> Dict[torch.nn.Parameter,
                                                                    torch.Tensor]:
    """Opacus grad sampler: per-sample weight/bias gradients of a gnnumba GroupNorm."""
    params = _trainable(layer)
    if not params:
        return {}
    grads = _per_sample(layer, activations, backprops)
    return {p: grads[i].to(p.dtype) for p, i in params}


def compute_group_norm_norm_sample(layer, activations: List[torch.Tensor],
                                   backprops: torch.Tensor) -> Dict[torch.nn.Parameter,
                                                                    torch.Tensor]:
    """Opacus norm sampler (ghost clipping): per-sample L2 norm of each parameter's gradient."""
    params = _trainable(layer)
    if not params:
        return {}
    grads = _per_sample(layer, activations, backprops)
    return {p: grads[i].to(p.dtype).norm(2, dim=1) for p, i in params}


def register(cls) -> None:
    """Register both samplers for ``cls`` (exact class; subclasses need their own call)."""
    register_grad_sampler(cls)(compute_group_norm_grad_sample)
    register_norm_sampler(cls)(compute_group_norm_norm_sample)


register(GroupNorm)
