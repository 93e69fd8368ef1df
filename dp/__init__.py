"""Differential privacy with gnnumba: GroupNorm is per-sample, BatchNorm is not.

``import dp`` registers, in Opacus, a per-sample gradient sampler (and a ghost-clipping norm
sampler) for ``gnnumba.torch.GroupNorm`` with every activation; the numbers come from
gnnumba's public ``per_sample_param_grads`` kernel.

``dp.per_sample_grads(x, dy, num_groups, eps=1e-5, *, activation=None, weight=None,
bias=None) -> (grad_weight, grad_bias)`` works on NumPy arrays, torch tensors and CUDA arrays.
``python -m dp`` runs the demonstration (coupling, sensitivity, DP-SGD on sklearn's digits).

Optional dependencies: with torch installed, ``import dp`` needs Opacus too (the sampler is
what a torch user imports dp for) and says which extra brings it; without torch, only the
NumPy path exists and ``dp.per_sample_grads`` works on NumPy arrays alone.
"""

from .per_sample import per_sample_grads

EXTRA = 'pip install "gnnumba[dp]"'

try:
    import torch
except ImportError:  # NumPy only: nothing to register
    torch = None

if torch is not None:
    try:
        import opacus  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"dp registers gnnumba's GroupNorm sampler in Opacus, which is not installed: "
            f"{EXTRA} (brings Opacus and scikit-learn). NumPy users without Opacus can call "
            f"gnnumba.per_sample_param_grads, the same kernel.") from e
    from . import grad_sampler  # noqa: F401  (registration with Opacus runs on import)

__all__ = ["per_sample_grads"]
