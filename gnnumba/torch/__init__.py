"""PyTorch bridge: ``import gnnumba.torch``.

* ``GroupNorm`` - drop-in ``torch.nn.GroupNorm`` (plus ``activation="silu"``).
* ``group_norm`` - ``torch.nn.functional.group_norm`` signature (plus ``activation``).
* ``convert_batchnorm`` - swap every BatchNorm in a model for a GroupNorm.

CPU tensors run the Numba CPU kernels on zero-copy NumPy views; CUDA tensors the Numba CUDA
kernels on torch's current stream. Registered as the torch.library custom ops
``gnnumba::group_norm_fwd`` / ``gnnumba::group_norm_bwd`` so ``torch.compile`` works.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # say which extra brings it, not only "No module named 'torch'"
    raise ImportError('gnnumba.torch needs PyTorch, which is not installed: '
                      'pip install "gnnumba[torch]" (the NumPy API, gnnumba.group_norm and '
                      'friends, works without it)') from e

from .convert import convert_batchnorm, group_count
from .module import GroupNorm
from .ops import group_norm

__all__ = ["GroupNorm", "convert_batchnorm", "group_count", "group_norm"]
