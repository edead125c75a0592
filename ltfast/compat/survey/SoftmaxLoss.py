"""Drop-in for the survey's ``Main-codebase/loss/SoftmaxLoss.py`` (seed-methods.md §1.1), whose
``create_loss()`` returns ``nn.CrossEntropyLoss()``: here the same loss through the fused
``ltfast.adjusted_cross_entropy``. Loaded as a standalone module: absolute imports only."""
from __future__ import annotations

from torch import Tensor, nn

import ltfast
from ltfast.compat._common import IGNORE_INDEX, check_logits, check_target


class SoftmaxLoss(nn.Module):
    """``nn.CrossEntropyLoss()`` with its defaults: mean over the rows whose target is not -100.
    (The original file has no class; ``create_loss()`` returns ``nn.CrossEntropyLoss()``.)"""

    ignore_index = IGNORE_INDEX
    reduction = "mean"

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_logits(input, "input", "SoftmaxLoss")
        check_target(target, input, "target", "SoftmaxLoss")
        return ltfast.adjusted_cross_entropy(input, target, reduction="mean", ignore_index=IGNORE_INDEX)


def create_loss():
    print("Loading Softmax Loss (ltfast).")
    return SoftmaxLoss()
