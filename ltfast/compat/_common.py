"""Helpers shared by the compat modules: argument checks and per-class statistics computed with
the very arithmetic (dtype and order of operations) of the survey's code, so that the buffers hold
bit-identical values to the originals' tensors."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ltfast import priors

IGNORE_INDEX = -100  # nn.CrossEntropyLoss's default, used by every original


def check_positive_int(value, name: str, owner: str) -> int:
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_number(value, name: str, owner: str, *, low: Optional[float] = None, low_open: bool = False,
                 high: Optional[float] = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}") from None
    bad = not math.isfinite(number)
    if low is not None:
        bad = bad or (number <= low if low_open else number < low)
    if high is not None:
        bad = bad or number > high
    if bad:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        raise ValueError(f"{owner}: {name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, "
                         f"got {value!r}")
    return number


def class_count_list(cls_num_list, owner: str, *, allow_zero: bool, name: str = "cls_num_list") -> Tensor:
    """cls_num_list as a float64 CPU tensor (numpy's float64, as the originals' ``np.array``)."""
    if isinstance(cls_num_list, Tensor):
        counts = cls_num_list.detach().to("cpu", torch.float64)
    else:
        try:
            counts = torch.as_tensor(list(cls_num_list) if not hasattr(cls_num_list, "shape") else cls_num_list,
                                     dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{owner}: {name} must be a sequence of per-class training counts, got "
                            f"{type(cls_num_list).__name__}") from None
    try:
        counts = priors.as_counts(counts, name)  # the same checks as ltfast.nn's class_counts
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None
    if not allow_zero:
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{owner}: {name} has classes with no training sample (indices {empty[:10]}); the "
                             "original's per-class margin/weight is infinite for them (NaN losses). Give every "
                             "class a count >= 1.")
    return counts


def effective_number_weights(counts: Tensor, beta: float = 0.9999) -> Tensor:
    """The Ensemble-codebase's class-balanced weights, as its numpy code computes them:
    ``(1 - beta) / (1 - beta ** n_c)``, normalised to sum to C, in float64, then float32."""
    effective_num = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts)
    weights = (1.0 - beta) / effective_num
    weights = weights / weights.sum() * counts.numel()
    return weights.to(torch.float32)


def check_logits(logits, name: str, owner: str, num_classes: Optional[int] = None) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{owner}: {name} must be a tensor of logits, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{owner}: {name} must be a 2-D tensor [N, C], got shape {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"{owner}: {name} has {logits.shape[1]} classes (shape {tuple(logits.shape)}), but the "
                         f"loss was built for num_classes = {num_classes}")


def check_target(target, logits: Tensor, name: str, owner: str) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{owner}: {name} must be an int64 tensor of class indices, got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{owner}: {name} must be a 1-D tensor of N = {logits.shape[0]} class indices, got shape "
                         f"{tuple(target.shape)}")
