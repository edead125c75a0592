"""Drop-in for the survey's ``Main-codebase/loss/FocalLoss.py`` (seed-methods.md §1.7), backed by
the fused ``ltfast.adjusted_cross_entropy(gamma=...)``. Loaded as a standalone module: absolute
imports only."""
from __future__ import annotations

from torch import Tensor, nn

import ltfast
from ltfast.compat._common import IGNORE_INDEX, check_number, check_target


class FocalLoss(nn.Module):
    """``-(1 - p_t)^gamma * log p_t`` per row, mean (``size_average=True``) or sum, with ``p_t``
    **detached** as in the original (``pt = logpt.detach().exp()``): the factor scales the gradient
    but is not differentiated (the Lin et al. paper differentiates it).

    As the original, ``input`` may be ``[N, C, d1, ...]``; it is flattened to ``[N * d1 * ..., C]``.
    ``alpha`` must be None: the original accepts it and fails with ``assert False`` in forward; this
    raises ValueError in the constructor. ``gamma`` must be >= 0 (the original accepts negative values,
    which give infinite losses at p_t = 1). Rows with target -100 are left out (the original would
    fail to gather them).
    """

    def __init__(self, gamma=0, alpha=None, size_average=True):
        super().__init__()
        self.gamma = check_number(gamma, "gamma", "FocalLoss", low=0.0)
        if alpha is not None:
            raise ValueError(f"FocalLoss: alpha must be None (the original asserts False for any alpha), got {alpha!r}")
        self.alpha = alpha
        self.size_average = bool(size_average)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, size_average={self.size_average}"

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if not isinstance(input, Tensor) or input.dim() < 2:
            raise ValueError(f"FocalLoss: input must be a tensor [N, C] or [N, C, d1, ...], got "
                             f"{getattr(input, 'shape', type(input).__name__)}")
        if input.dim() > 2:
            input = input.reshape(input.size(0), input.size(1), -1).transpose(1, 2).reshape(-1, input.size(1))
        if not isinstance(target, Tensor):
            raise TypeError(f"FocalLoss: target must be an int64 tensor, got {type(target).__name__}")
        target = target.reshape(-1)
        check_target(target, input, "target", "FocalLoss")
        return ltfast.adjusted_cross_entropy(input, target, gamma=self.gamma,
                                             reduction="mean" if self.size_average else "sum",
                                             ignore_index=IGNORE_INDEX)


def create_loss():
    return FocalLoss(gamma=3.0)
