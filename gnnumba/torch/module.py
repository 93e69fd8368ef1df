"""``GroupNorm``: a drop-in ``torch.nn.GroupNorm`` running the gnnumba kernels.

A subclass of ``nn.GroupNorm``, so it has the same attributes, parameters, state_dict keys,
``reset_parameters`` and ``isinstance`` behaviour; only validation and ``forward`` differ.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import _checks
from .ops import _run, check_input


class GroupNorm(nn.GroupNorm):
    """Group Normalization over (N, C, *spatial) input, optionally fused with SiLU.

    Same constructor as ``torch.nn.GroupNorm`` plus ``activation`` (None or "silu":
    ``silu(group_norm(x))`` in one pass). Holds no buffers; loads an ``nn.GroupNorm``
    state dict. float16/bfloat16 input is computed in float32 (see ``gnnumba.torch.ops``).
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
        check_input(input, self.num_channels)
        return _run(input, self.num_groups, self.weight, self.bias, self.eps,
                    self.activation == "silu")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
