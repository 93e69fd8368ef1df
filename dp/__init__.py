"""Differential privacy with gnnumba: GroupNorm is per-sample, BatchNorm is not.

``import dp`` registers, in Opacus, a per-sample gradient sampler (and a ghost-clipping norm
sampler) for ``gnnumba.torch.GroupNorm`` in both its plain and ``activation="silu"`` forms;
the numbers come from ``gnnumba.cpu.per_sample_param_grads``.

``dp.per_sample_grads(x, dy, num_groups, eps=1e-5, *, activation=None, weight=None,
bias=None) -> (grad_weight, grad_bias)`` works on NumPy arrays and torch tensors.
``python -m dp`` runs the demonstration (coupling, sensitivity, DP-SGD on sklearn's digits).
"""

from .per_sample import per_sample_grads
from . import grad_sampler  # noqa: F401  (registration with Opacus runs on import)

__all__ = ["per_sample_grads"]
