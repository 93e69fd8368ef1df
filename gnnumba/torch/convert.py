"""``convert_batchnorm``: replace every BatchNorm in a model with a gnnumba ``GroupNorm``.

Batch statistics leak information across samples (a problem for differential privacy) and
break down at small batch sizes; GroupNorm has neither problem. The group count is the
largest one that divides C, is at most ``max_groups`` and keeps at least 2 channels per group
when C > 1. Opacus's own fix uses ``gcd(32, C)``, which turns C=16 into InstanceNorm (one
channel per group); here C=16 gives 8 groups.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .module import GroupNorm


def group_count(num_channels: int, max_groups: int = 32) -> int:
    """Largest G <= max_groups dividing num_channels with >= 2 channels per group (C > 1).

    >>> [group_count(c) for c in (1, 3, 16, 64, 96)]
    [1, 1, 8, 32, 32]
    """
    if num_channels <= 1:
        return 1
    for g in range(min(max_groups, num_channels // 2), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def _check_max_groups(max_groups) -> int:
    if isinstance(max_groups, bool) or not isinstance(max_groups, numbers.Integral):
        raise TypeError(f"max_groups must be an int, got {type(max_groups).__name__}")
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    return int(max_groups)


def _to_group_norm(bn: _BatchNorm, max_groups: int) -> GroupNorm:
    C = bn.num_features
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"{type(bn).__name__} has not seen an input yet, so its channel "
                         "count is unknown; run one forward pass before convert_batchnorm")
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    gn = GroupNorm(group_count(C, max_groups), C, eps=bn.eps, affine=bn.affine, **factory)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


def convert_batchnorm(module: nn.Module, *, max_groups: int = 32) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` in ``module`` (in place)
    with a gnnumba ``GroupNorm``, carrying affine, eps, the learned weight/bias, device and
    dtype (running statistics have no GroupNorm counterpart and are dropped).

    Returns ``module``, or the new ``GroupNorm`` when ``module`` itself is a BatchNorm.
    A BatchNorm shared by several parents becomes one shared GroupNorm.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    max_groups = _check_max_groups(max_groups)
    return _convert(module, max_groups, {})


def _convert(module: nn.Module, max_groups: int, done: dict) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    if isinstance(module, _BatchNorm):
        new = _to_group_norm(module, max_groups)
    else:
        new = module
        # _modules, not named_children(): the latter yields a shared child only once, and
        # every slot holding it must be replaced
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            converted = _convert(child, max_groups, done)
            if converted is not child:
                setattr(module, name, converted)
    done[id(module)] = new
    return new
