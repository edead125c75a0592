"""Plain-PyTorch versions of every ltfast loss, written from the survey's code as transcribed in
shared/reference/seed-methods.md §1. They are the test oracle, the baseline of
benchmarks/throughput.py, and the fallback used when ltfast._C is unavailable.

They take the same arguments as the torch.ops.ltfast ops and compute in the dtype PyTorch's type
promotion gives (bfloat16 logits plus a float32 prior compute in float32), as user code would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def balanced_softmax(logits: Tensor, target: Tensor, log_prior: Tensor, reduction: str = "mean",
                     ignore_index: int = -100) -> Tensor:
    """Balanced Softmax (seed-methods.md §1.4, PriorCELoss): cross-entropy on ``logits + log_prior``,
    with log_prior = log(pi + 1e-9) in the survey's code."""
    return F.cross_entropy(logits + log_prior, target, reduction=reduction, ignore_index=ignore_index)


def adjusted_cross_entropy(logits: Tensor, target: Tensor, adjustment: Tensor | None = None,
                           target_margin: Tensor | None = None, weight: Tensor | None = None,
                           gamma: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                           ignore_index: int = -100) -> Tensor:
    """The cross-entropy family (seed-methods.md §1.1, 1.2, 1.7–1.9).

    Adjusted logits ``a = logits + adjustment - target_margin[y] * onehot(y)``; then
    ``F.cross_entropy(a, y, weight, label_smoothing)`` when gamma == 0, else the survey's focal loss
    (Main-codebase/loss/FocalLoss.py): ``w_y * (1 - p_y)^gamma * (-log p_y)`` with p_y detached, so
    the modulating factor gets no gradient, and the weighted mean divides by ``sum w_y``.
    """
    if gamma != 0.0 and label_smoothing != 0.0:
        raise ValueError("adjusted_cross_entropy: gamma > 0 (focal) together with label_smoothing > 0 "
                         "is not supported")
    adjusted = logits if adjustment is None else logits + adjustment
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if target_margin is not None:
        margin = target_margin.to(adjusted.dtype)[safe_target] * valid
        adjusted = adjusted - F.one_hot(safe_target, adjusted.shape[-1]).to(adjusted.dtype) * margin[:, None]
    if weight is not None:
        weight = weight.to(adjusted.dtype)
    if gamma == 0.0:
        return F.cross_entropy(adjusted, target, weight=weight, reduction=reduction,
                               ignore_index=ignore_index, label_smoothing=label_smoothing)
    nll = F.cross_entropy(adjusted, target, reduction="none", ignore_index=ignore_index)
    p_target = torch.exp(-nll).detach()
    row_weight = valid.to(adjusted.dtype)
    if weight is not None:
        row_weight = row_weight * weight[safe_target]
    loss = (1.0 - p_target) ** gamma * nll * row_weight
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / row_weight.sum()
