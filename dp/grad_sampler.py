"""Opacus registration: per-sample gradients (and norms) of ``gnnumba.torch.GroupNorm``.

Opacus looks samplers up by exact class, so the registration names ``gnnumba.torch.GroupNorm``
itself (``register`` can add other GroupNorm-like classes with the same attributes). Every
activation is covered: with ``activation=`` set, the backprops Opacus hands over are
d loss / d output, i.e. after the activation, and the kernel applies act' to the recomputed
pre-activation.

channels_last: gnnumba keeps ``torch.channels_last`` input in that layout, so a model that
uses it reaches Opacus with channels_last activations. Opacus 1.6's ``Conv2d`` sampler
computes wrong per-sample gradients on such input (with or without GroupNorm; gnnumba's own
sampler is right), so the first channels_last input seen here warns once.

- grad sampler (``grad_sample_mode="hooks"`` and the non-ghost part of fast clipping):
  ``{weight: (N, C), bias: (N, C)}`` from ``dp.per_sample_grads``.
- norm sampler (``grad_sample_mode="ghost"``): the per-sample L2 norms of the same (N, C)
  rows — GroupNorm's parameters are tiny, so materialising them costs nothing and the norms
  are exact.
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import torch
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

from gnnumba.torch import GroupNorm

from .per_sample import per_sample_grads


CHANNELS_LAST_WARNING = (
    "dp: a gnnumba GroupNorm received channels_last input under Opacus. Opacus 1.6's Conv2d "
    "per-sample gradients are wrong on channels_last input (gnnumba's GroupNorm sampler is "
    "not affected): convert the model and its inputs to torch.contiguous_format for DP "
    "training, or check with opacus.utils.per_sample_gradients_utils."
    "check_per_sample_gradients_are_correct. This warning is shown once.")
_warned_channels_last = False


def _warn_channels_last(x: torch.Tensor) -> None:
    global _warned_channels_last
    if _warned_channels_last or x.dim() < 3 or x.is_contiguous():
        return
    # (N, spatial..., C) order: what torch.channels_last(_3d) gives
    if x.movedim(1, -1).is_contiguous():
        _warned_channels_last = True
        warnings.warn(CHANNELS_LAST_WARNING, UserWarning, stacklevel=3)


def _per_sample(layer, activations: List[torch.Tensor], backprops: torch.Tensor):
    x = activations[0]
    _warn_channels_last(x)
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
