"""The equalization losses: softmax equalization (SEQL, the survey's "ESQL") and the sigmoid
equalization loss (EQL), with tail classes from the training counts."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import _dispatch, _extension, priors
from .._dispatch import is_compiling as _is_compiling
from ..ops import equalization_loss, new_seed, softmax_equalization_loss
from ._base import _check_reduction


class SoftmaxEqualizationLoss(nn.Module):
    """Softmax equalization loss (SEQL, "ESQL" in the survey) as the survey trains it: each negative
    logit of a tail class is removed from the softmax with probability ``gamma`` per (sample, class)
    element (see :func:`ltfast.softmax_equalization_loss`). Tail classes: training frequency
    ``<= lambda_`` (the survey's 4.3e-4), or ``n_c < count_threshold`` when that is given (the EQL
    author's reference code). Every call draws a new seed from torch's generator on the input's
    device, so runs are reproducible after ``torch.manual_seed``."""

    def __init__(self, class_counts, gamma: float = 0.9, lambda_: float = priors.SEQL_FREQUENCY_THRESHOLD, *,
                 count_threshold: Optional[int] = None, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be a probability in [0, 1], got {gamma}")
        self.gamma = float(gamma)
        self.ignore_index = int(ignore_index)
        self.reduction = _check_reduction(reduction)
        self.register_buffer("tail_mask", priors.tail_classes(class_counts, lambda_, count_threshold))

    def extra_repr(self) -> str:
        return (f"num_classes={self.tail_mask.numel()}, tail_classes={int(self.tail_mask.sum())}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        tail_mask = self._buffers["tail_mask"]
        seed = None
        if _extension.AVAILABLE and not _is_compiling():
            seed = new_seed(input.device)
            loss = _dispatch.fast.softmax_equalization_loss(input, target, tail_mask, seed, self.gamma, self.reduction,
                                                        self.ignore_index)
            if loss is not NotImplemented:
                return loss
        return softmax_equalization_loss(input, target, tail_mask, self.gamma, self.reduction, self.ignore_index,
                                         seed=seed)


class EqualizationLoss(nn.Module):
    """Equalization loss (Tan et al., CVPR 2020), sigmoid form: per-class binary cross-entropy with
    the negative term of tail classes suppressed (see :func:`ltfast.equalization_loss`). Tail
    classes as in :class:`SoftmaxEqualizationLoss` (frequency ``<= lambda_``, default the survey's
    SEQL threshold, or ``n_c < count_threshold``)."""

    def __init__(self, class_counts, lambda_: float = priors.SEQL_FREQUENCY_THRESHOLD, *,
                 count_threshold: Optional[int] = None, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.reduction = _check_reduction(reduction)
        self.register_buffer("tail_mask", priors.tail_classes(class_counts, lambda_, count_threshold))

    def extra_repr(self) -> str:
        return f"num_classes={self.tail_mask.numel()}, tail_classes={int(self.tail_mask.sum())}"

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        tail_mask = self._buffers["tail_mask"]
        if _extension.AVAILABLE and not _is_compiling():
            loss = _dispatch.fast.equalization_loss(input, target, tail_mask, self.reduction, self.ignore_index)
            if loss is not NotImplemented:
                return loss
        return equalization_loss(input, target, tail_mask, self.reduction, self.ignore_index)
