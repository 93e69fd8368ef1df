"""PyTorch bridge: ``import gnnumba.torch``.

* ``GroupNorm`` - drop-in ``torch.nn.GroupNorm`` (plus ``activation=``).
* ``group_norm`` - ``torch.nn.functional.group_norm`` signature (plus ``activation=``).
* ``convert_batchnorm`` - swap every BatchNorm in a model for a GroupNorm.

Where things live: ``ops.py`` hands torch tensors to the kernels (CPU and CUDA),
``library.py`` registers the custom ops ``gnnumba::group_norm_fwd`` / ``group_norm_bwd``
(``torch.compile``, ``torch.export``, ``torch.jit.trace``, ONNX), ``autograd.py`` the eager
autograd with its ``torch.func`` rules, ``functional.py`` the checks and the choice of route,
``module.py`` the module.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # say which extra brings it, not only "No module named 'torch'"
    raise ImportError('gnnumba.torch needs PyTorch, which is not installed: '
                      'pip install "gnnumba[torch]" (the NumPy API, gnnumba.group_norm and '
                      'friends, works without it)') from e

from .convert import convert_batchnorm, group_count
from .functional import group_norm
from .module import GroupNorm

__all__ = ["GroupNorm", "convert_batchnorm", "group_count", "group_norm"]
