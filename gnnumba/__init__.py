"""gnnumba: Group Normalization (Wu & He, 2018) as Numba kernels for CPU and CUDA.

Array level: NumPy arrays and any CPU array that speaks DLPack (torch tensors, JAX arrays,
...; read in place, results of the same kind) on the CPU, CUDA arrays on the GPU::

    y = gnnumba.group_norm(x, num_groups, weight, bias)
    y, mean, rstd = gnnumba.group_norm_forward(x, num_groups, weight, bias)
    dx, dweight, dbias = gnnumba.group_norm_backward(dy, x, mean, rstd, num_groups, weight, bias)
    dweight_per_sample, dbias_per_sample = gnnumba.per_sample_param_grads(
        dy, x, mean, rstd, num_groups, weight, bias)

PyTorch: ``import gnnumba.torch`` (a drop-in ``nn.GroupNorm``). Where the kernels live:
``gnnumba/cpu/`` (CPU), ``gnnumba/gpu/`` (CUDA), ``gnnumba/torch/`` (the torch bridge).
"""

from . import _threading  # noqa: F401  (picks a thread-safe Numba threading layer first)
from ._checks import GroupNormError
from .api import group_norm, group_norm_backward, group_norm_forward, per_sample_param_grads
from .warmup import precompile

__all__ = ["GroupNormError", "group_norm", "group_norm_backward", "group_norm_forward",
           "per_sample_param_grads", "precompile"]


def _version() -> str:
    # One place for the version: pyproject.toml, read back from the installed metadata.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gnnumba")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__version__ = _version()
