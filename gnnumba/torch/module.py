"""``GroupNorm``: a drop-in ``torch.nn.GroupNorm`` running the gnnumba kernels.

A subclass of ``nn.GroupNorm``, so it has the same attributes, parameters, state_dict keys,
``reset_parameters`` and ``isinstance`` behaviour; only validation and ``forward`` differ.
Every attribute (``num_groups``, ``eps``, ``activation``, ``weight``, ``bias``) is checked at
each call, so one changed after construction is never trusted (the checks of values seen
before are a dictionary lookup, see ``functional._check_args``).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import _checks
from .functional import _run, checked


class GroupNorm(nn.GroupNorm):
    """Group Normalization over (N, C, *spatial) input, optionally fused with an activation.

    Same constructor as ``torch.nn.GroupNorm`` plus ``activation`` (None, "silu", "relu" or
    "gelu": ``act(group_norm(x))`` in one pass). Holds no buffers; loads an ``nn.GroupNorm``
    state dict. float16/bfloat16 input is computed in float32.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *,
                 activation: Optional[str] = None, bias: bool = True) -> None:
        # validate first: nn.GroupNorm's own message does not list the valid group counts
        _checks.check_num_groups(num_groups, num_channels)
        _checks.check_eps(eps)
        _checks.check_activation(activation)
        kwargs = {} if bias else {"bias": False}  # torch < 2.6 has no ``bias`` argument
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **kwargs)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        G, eps, act = checked(input, self.num_groups, weight, bias, self.eps,
                              self.activation, self.num_channels)
        return _run(input, G, weight, bias, eps, act)

    def _get_name(self) -> str:
        # printed models show which GroupNorm runs (torch's prints as plain "GroupNorm")
        return "gnnumba.torch.GroupNorm"

    def extra_repr(self) -> str:
        base = super().extra_repr()  # torch's own fields, in torch's format
        return base if self.activation is None else f"{base}, activation={self.activation!r}"

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it
        raise RuntimeError(
            "gnnumba.torch.GroupNorm cannot be compiled by torch.jit.script (its kernels are "
            "Numba, not TorchScript). Use torch.jit.trace, torch.compile or torch.export "
            "(all supported), or torch.nn.GroupNorm for a TorchScript model.")
