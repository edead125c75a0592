"""Per-class statistics computed from training counts, as the survey's code computes them
(shared/reference/seed-methods.md §1). Every function takes the counts as a list, NumPy array or
tensor of non-negative numbers, one per class, and returns a tensor of the same length, computed in
float64 and returned in ``dtype`` (float32 by default; ``ltfast.nn`` keeps float64 buffers so that
float64 logits see the exact values, and casts them to the accumulation dtype at use).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence, Union

import torch
from torch import Tensor

Counts = Union[Sequence[float], Tensor, "numpy.ndarray"]  # noqa: F821

# The survey's PriorCELoss/LADELoss use log(pi + 1e-9): a class with no training image gets the
# finite log prior log(1e-9) = -20.7 instead of -inf.
LOG_PRIOR_EPS = 1e-9


def as_counts(class_counts: Counts, name: str = "class_counts") -> Tensor:
    """Validates counts and returns them as a float64 CPU tensor."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device="cpu")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence with one count per class, "
                         f"got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {counts.tolist()[:10]}...")
    if counts.sum() <= 0:
        raise ValueError(f"{name} must contain at least one positive count")
    return counts


def _require_positive(counts: Tensor, name: str, what: str) -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} has classes with zero training samples (indices {empty[:10]}); "
                         f"{what} is undefined for them. Drop those classes or give them a count.")


def class_prior(class_counts: Counts, dtype: torch.dtype = torch.float32) -> Tensor:
    """pi_c = n_c / sum_k n_k."""
    counts = as_counts(class_counts)
    return (counts / counts.sum()).to(dtype)


def log_prior(class_counts: Counts, eps: float = LOG_PRIOR_EPS, dtype: torch.dtype = torch.float32) -> Tensor:
    """log(pi_c + eps), the survey's Balanced Softmax / LADE prior (finite for empty classes)."""
    counts = as_counts(class_counts)
    return torch.log(counts / counts.sum() + eps).to(dtype)


def survey_class_weights(class_counts: Counts, dtype: torch.dtype = torch.float32) -> Tensor:
    """Weighted softmax weights w_c = 1 + ln(n_max / n_c) (Main-codebase/loss/WeightedSoftmaxLoss.py).
    Raises for a class with zero samples (its weight would be infinite)."""
    counts = as_counts(class_counts)
    _require_positive(counts, "class_counts", "the weight 1 + ln(n_max / n_c)")
    return (1.0 + torch.log(counts.max() / counts)).to(dtype)


def effective_number_weights(class_counts: Counts, beta: float = 0.9999, dtype: torch.dtype = torch.float32) -> Tensor:
    """Class-balanced weights (Cui et al. 2019) w_c ∝ (1 - beta) / (1 - beta^n_c), normalised to
    sum to C, as the survey's CBLoss and the LDAM-DRW re-weighting compute them."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = as_counts(class_counts)
    _require_positive(counts, "class_counts", "the effective number (1 - beta^n_c) / (1 - beta)")
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights / weights.sum() * counts.numel()).to(dtype)


def ldam_margins(class_counts: Counts, max_margin: float = 0.5, dtype: torch.dtype = torch.float32) -> Tensor:
    """LDAM margins m_c = max_margin * n_c^(-1/4) / max_k n_k^(-1/4) (seed-methods.md §1.9).
    Raises for a class with zero samples (its margin would be infinite)."""
    if not max_margin > 0.0:
        raise ValueError(f"max_margin must be > 0, got {max_margin}")
    counts = as_counts(class_counts)
    _require_positive(counts, "class_counts", "the LDAM margin n_c^(-1/4)")
    inv_quarter = counts.pow(-0.25)
    return (max_margin * inv_quarter / inv_quarter.max()).to(dtype)


# The survey's SEQL threshold (Main-codebase/loss/SEQLLoss.py): a class is "head" if its training
# frequency exceeds 4.3e-4 (on ImageNet-LT: 50 or more of 115,846 images).
SEQL_FREQUENCY_THRESHOLD = 4.3e-4


def tail_classes(class_counts: Counts, lambda_: float = SEQL_FREQUENCY_THRESHOLD,
                 count_threshold: int | None = None) -> Tensor:
    """Bool mask of the "tail" classes of the equalization losses. By frequency, as the survey does:
    tail when n_c / sum_k n_k <= lambda_ (head is strictly above). By count, as the EQL author's
    reference code does, when ``count_threshold`` is given: tail when n_c < count_threshold."""
    counts = as_counts(class_counts)
    if count_threshold is not None:
        mask = counts < count_threshold
    else:
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be a frequency in [0, 1], got {lambda_}")
        mask = ~(counts / counts.sum() > lambda_)
    if counts.numel() > 1 and not bool(mask.any()):
        rule = (f"count_threshold={count_threshold}" if count_threshold is not None
                else f"lambda_={lambda_:g} (tail: training frequency <= lambda_)")
        warnings.warn(f"equalization loss: {rule} marks no class as tail (rarest class: {int(counts.min())} of "
                      f"{int(counts.sum())} images, frequency {float(counts.min() / counts.sum()):.2g}), so the "
                      f"loss is plain cross-entropy. {survey_like_count_threshold(counts)}",
                      LongTailWarning, stacklevel=3)
    return mask


class LongTailWarning(UserWarning):
    """A long-tail setting that silently does nothing on this label set (e.g. no tail class)."""


# On ImageNet-LT (n_max = 1280, 115,846 images) the survey's lambda = 4.3e-4 makes a class tail when
# it has fewer than 50 images: 50 / 1280 = 3.9% of the head class.
SURVEY_TAIL_FRACTION_OF_HEAD = 50 / 1280


def survey_like_count_threshold(class_counts: Counts) -> str:
    """A sentence: the count_threshold that makes tail what the survey's lambda made tail on ImageNet-LT,
    relative to the head class (n_c < 3.9% of n_max), and the classes it selects."""
    counts = as_counts(class_counts)
    threshold = max(1, math.ceil(SURVEY_TAIL_FRACTION_OF_HEAD * int(counts.max())))
    tail = int((counts < threshold).sum())
    if tail == 0:  # the set is less imbalanced than ImageNet-LT's 256: fall back to the rarest classes
        threshold = int(counts.min()) + 1
        tail = int((counts < threshold).sum())
        return (f"No class is as rare relative to the head as the survey's tail (< 3.9% of n_max); "
                f"count_threshold={threshold} would make the {tail} rarest class(es) tail.")
    return (f"count_threshold={threshold} gives the survey's tail relative to the head class (fewer than "
            f"50 of ImageNet-LT's 1280, 3.9% of n_max): {tail} of {counts.numel()} classes here.")


SMOOTHING_SHAPES = ("concave", "linear", "convex", "exp")


def label_aware_smoothing(class_counts: Counts, head: float = 0.3, tail: float = 0.0, shape: str = "concave",
                          power: float | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """MiSLAS's label-aware smoothing (Zhong et al. 2021, ``methods.py::LabelAwareSmoothing``): the
    label-smoothing epsilon of each class, ``tail`` for the rarest class (n_min) and ``head`` for the
    most frequent (n_max), in between by the relative count r_c = (n_c - n_min) / (n_max - n_min):

    - ``concave`` (the authors' default): tail + (head - tail) * sin(pi/2 * r_c);
    - ``linear``: tail + (head - tail) * r_c;
    - ``convex``: head + (head - tail) * sin(3pi/2 + pi/2 * r_c)  (= tail at r=0, head at r=1);
    - ``exp``: tail + (head - tail) * r_c ** power.

    The loss uses the epsilon of each row's target class (``eps[y]``). Raises when every class has
    the same count (the authors' formula divides by n_max - n_min = 0)."""
    if shape not in SMOOTHING_SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SMOOTHING_SHAPES)}, got {shape!r}")
    for name, value in (("head", head), ("tail", tail)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a label-smoothing epsilon in [0, 1], got {value}")
    if shape == "exp" and (power is None or not power > 0):
        raise ValueError(f"power must be > 0 for shape='exp', got {power}")
    if shape != "exp" and power is not None:
        raise ValueError(f"power is only used by shape='exp' (got shape={shape!r}, power={power})")
    counts = as_counts(class_counts)
    n_max, n_min = counts.max(), counts.min()
    if n_max == n_min:
        raise ValueError(f"class_counts are all equal ({int(n_max)}): label-aware smoothing interpolates between "
                         f"the rarest and the most frequent class and needs n_max > n_min")
    relative = (counts - n_min) / (n_max - n_min)
    if shape == "concave":
        eps = tail + (head - tail) * torch.sin(relative * (math.pi / 2))
    elif shape == "linear":
        eps = tail + (head - tail) * relative
    elif shape == "convex":
        eps = head + (head - tail) * torch.sin(1.5 * math.pi + relative * (math.pi / 2))
    else:
        eps = tail + (head - tail) * relative.pow(power)
    return eps.to(dtype)


def inverse_prior(prior: Tensor) -> Tensor:
    """SADE's "inverse prior" (seed-methods.md §6, Ensemble-codebase ``DiverseExpertLoss.inverse_prior``):
    the prior values reassigned by reversed frequency rank, so the most frequent class gets the
    smallest value (not 1 / pi). Ties keep ``torch.sort``'s order, as the original."""
    values, order = torch.sort(prior)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(prior.shape[0], device=prior.device)
    return values[prior.shape[0] - 1 - rank]


def sade_adjustments(class_counts: Counts, tau: float = 2.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """The three SADE experts' logit adjustments ``[3, C]`` (seed-methods.md §6): 0 (long-tailed),
    ``log(pi + 1e-9)`` (uniform) and ``log(pi + 1e-9) - tau * log(pi_inv + 1e-9)`` (inverse long-tailed)."""
    prior = class_prior(class_counts, torch.float64)
    log_p = torch.log(prior + LOG_PRIOR_EPS)
    log_inverse = torch.log(inverse_prior(prior) + LOG_PRIOR_EPS)
    return torch.stack([torch.zeros_like(log_p), log_p, log_p - float(tau) * log_inverse]).to(dtype)


def ride_diversity_temperature(class_counts: Counts, reweight_factor: float = 0.02,
                               dtype: torch.dtype = torch.float64) -> Tensor:
    """RIDE's per-class diversity temperature factors after DRW (seed-methods.md §6):
    ``t_c = (C pi_c f + 1 - f) / max_k (C pi_k f + 1 - f)`` with f = reweight_factor; must be > 0."""
    prior = class_prior(class_counts, torch.float64)
    factors = prior.numel() * prior * reweight_factor + 1.0 - reweight_factor
    factors = factors / factors.max()
    if not bool((factors > 0).all()):
        raise ValueError(f"reweight_factor={reweight_factor} gives diversity temperatures <= 0: C * pi_c * r + 1 - r "
                         f"must be > 0 for every class (the survey uses 0.02)")
    return factors.to(dtype)


def reslt_branch_classes(class_counts: Counts, medium_classes: int, tail_classes: int) -> Tensor:
    """ResLT's three branch class sets (Cui et al. 2022; the seed's ``ImageNetTrain_reslt.py`` and
    ``cifarTrain_reslt_cifar*.py``) as a ``[3, C]`` bool mask: branch 0 (head) trains on every class,
    branch 1 (medium) on the ``medium_classes`` rarest classes, branch 2 (tail) on the ``tail_classes``
    rarest, so the sets are nested (tail within medium within all).

    The seed writes them as slices of one-hot labels on a label order where rarity follows the index:
    ImageNet-LT remaps labels to their ascending-count rank (``np.argsort``) and takes ``[:825]`` /
    ``[:220]``; CIFAR-LT keeps the descending-count order and takes ``[35:100]`` / ``[70:100]``
    (CIFAR-10 ``[2:10]`` / ``[4:10]``). Here the rank comes from the counts: ascending count, and among
    equal counts the higher class index is the rarer, which is what the CIFAR slices select for any
    non-increasing count profile (ties of ImageNet-LT's counts follow NumPy's unstable argsort in the
    seed, an order no other code can reproduce)."""
    counts = as_counts(class_counts)
    num_classes = counts.numel()
    for name, value in (("medium_classes", medium_classes), ("tail_classes", tail_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_classes:
            raise ValueError(f"{name}: must be an int in [1, {num_classes}] (a number of classes), got {value!r}")
    if tail_classes > medium_classes:
        raise ValueError(f"tail_classes ({tail_classes}) must be <= medium_classes ({medium_classes}): the tail "
                         f"branch's classes are the rarest of the medium branch's")
    # sort key: count ascending, then index descending (rarer first); stable sorts on two keys
    index = torch.arange(num_classes)
    by_index = torch.flip(index, [0])
    order = by_index[torch.sort(counts[by_index], stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = index
    return torch.stack([torch.ones(num_classes, dtype=torch.bool), rank < medium_classes, rank < tail_classes])
