"""The cross-entropy family modules: :class:`CrossEntropyLoss` (a drop-in ``nn.CrossEntropyLoss``),
Balanced Softmax, logit adjustment, class-weighted CE, LDAM-DRW and focal loss, all on the fused
``adjusted_cross_entropy`` / ``balanced_softmax`` ops, with the soft targets of
ltfast/soft_targets.py (mixup/CutMix, probability targets, per-class label smoothing)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _dispatch, _extension, priors
from .. import soft_targets as _soft
from .._dispatch import is_compiling as _is_compiling
from ..ops import adjusted_cross_entropy, balanced_softmax_loss
from ._base import _check_reduction, _check_smoothing, _ClassVectors


class _CrossEntropyFamilyLoss(_ClassVectors, nn.Module):
    """Shared plumbing: the nn.CrossEntropyLoss arguments and an optional per-class ``weight``.

    Soft targets (ltfast/soft_targets.py), in every subclass where they are meaningful:
    ``forward(input, target, target_b=None, mix_weight=None)`` with ``target_b`` and ``mix_weight``
    (lambda: float, 0-dim or [N] tensor, no gradient) computes the mixup loss ``lam * loss(target) +
    (1 - lam) * loss(target_b)`` on one softmax, each term reduced as nn.CrossEntropyLoss reduces it;
    a floating ``[N, C]`` target is a probability target as in nn.CrossEntropyLoss; and
    ``label_smoothing`` may be a ``[C]`` tensor of per-class eps (the row's eps is eps[target],
    checked to lie in [0, 1] here, kept as the float64 buffer ``class_label_smoothing``).
    ``supports_mixed_targets = True`` marks the modules that accept ``target_b``: a trainer then
    calls ``criterion(logits, y_a, target_b=y_b, mix_weight=lam)``.
    """

    supports_mixed_targets = True

    def __init__(self, weight: Optional[Tensor], ignore_index: int, reduction: str,
                 label_smoothing) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.reduction = _check_reduction(reduction)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float64))
        class_smoothing = None
        if isinstance(label_smoothing, Tensor) and label_smoothing.dim() > 0:
            class_smoothing = label_smoothing.detach().to(torch.float64)
            if class_smoothing.dim() != 1:
                raise ValueError(f"label_smoothing must be a float or a 1-D tensor of per-class values, got shape "
                                 f"{tuple(class_smoothing.shape)}")
            if not bool(((class_smoothing >= 0) & (class_smoothing <= 1)).all()):
                raise ValueError("every per-class label_smoothing must be in [0, 1], got min "
                                 f"{class_smoothing.min().item()} and max {class_smoothing.max().item()}")
            label_smoothing = 0.0
        self.label_smoothing = _check_smoothing(float(label_smoothing))
        self.register_buffer("class_label_smoothing", class_smoothing)
        self._per_class_smoothing = class_smoothing is not None

    def extra_repr(self) -> str:
        smoothing = "per-class" if self._per_class_smoothing else self.label_smoothing
        return (f"num_classes={self.num_classes}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={smoothing}")

    def _soft_loss(self, input: Tensor, target: Tensor, target_b, mix_weight, adjustment: Optional[str] = None,
                   target_margin: Optional[str] = None, weight: Optional[str] = "weight", gamma: float = 0.0) -> Tensor:
        """The soft-target cases (ltfast.soft_targets.route), class vectors named by buffer."""
        vector = self._class_vector
        smoothing = vector("class_label_smoothing", input) if self._per_class_smoothing else self.label_smoothing
        return _soft.route(input, target, target_b, mix_weight, None if adjustment is None else vector(adjustment, input),
                           None if target_margin is None else vector(target_margin, input),
                           None if weight is None else vector(weight, input), gamma, smoothing, self.reduction,
                           self.ignore_index)

    def _weighted_cross_entropy(self, input: Tensor, target: Tensor, target_b, mix_weight) -> Tensor:
        """Cross-entropy of [N, C] logits with the optional ``weight`` buffer and the label smoothing:
        the soft-target cases through ``_soft_loss``, else the fused op (the C entry point in eager mode)."""
        if target_b is not None or mix_weight is not None or self._per_class_smoothing or _soft.is_probability(target):
            return self._soft_loss(input, target, target_b, mix_weight)
        if _extension.AVAILABLE and not _is_compiling():
            loss = _dispatch.fast.adjusted_cross_entropy(input, target, None, None,
                                                     self._eager_class_vector("weight", input), 0.0,
                                                     self.label_smoothing, self.reduction, self.ignore_index)
            if loss is not NotImplemented:
                return loss
        return adjusted_cross_entropy(input, target, weight=self._class_vector("weight", input),
                                      label_smoothing=self.label_smoothing, reduction=self.reduction,
                                      ignore_index=self.ignore_index)

    @property
    def num_classes(self) -> Optional[int]:
        for buffer in self.buffers():
            return buffer.numel()
        return None


class BalancedSoftmaxLoss(_CrossEntropyFamilyLoss):
    """Balanced Softmax (Ren et al. 2020), the survey's PriorCELoss: cross-entropy on
    ``logits + log(pi + 1e-9)`` with pi the training class prior. Predict with the raw logits."""

    def __init__(self, class_counts, *, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__(weight, ignore_index, reduction, label_smoothing)
        self.register_buffer("log_prior", priors.log_prior(class_counts, dtype=torch.float64))

    def forward(self, input: Tensor, target: Tensor, target_b: Optional[Tensor] = None, mix_weight=None) -> Tensor:
        if target_b is not None or mix_weight is not None or self._per_class_smoothing or _soft.is_probability(target):
            return self._soft_loss(input, target, target_b, mix_weight, adjustment="log_prior")
        plain = self._buffers["weight"] is None and self.label_smoothing == 0.0
        if _extension.AVAILABLE and not _is_compiling():
            vector = self._eager_class_vector
            if plain:
                loss = _dispatch.fast.balanced_softmax(input, target, vector("log_prior", input), self.reduction,
                                                   self.ignore_index)
            else:
                loss = _dispatch.fast.adjusted_cross_entropy(input, target, vector("log_prior", input), None,
                                                         vector("weight", input), 0.0, self.label_smoothing,
                                                         self.reduction, self.ignore_index)
            if loss is not NotImplemented:
                return loss
        if plain:
            return balanced_softmax_loss(input, target, self._class_vector("log_prior", input),
                                         self.reduction, self.ignore_index)
        return adjusted_cross_entropy(input, target,
                                      adjustment=self._class_vector("log_prior", input),
                                      weight=self._class_vector("weight", input),
                                      label_smoothing=self.label_smoothing, reduction=self.reduction,
                                      ignore_index=self.ignore_index)


class LogitAdjustedLoss(_CrossEntropyFamilyLoss):
    """Logit-adjusted loss (Menon et al. 2021): cross-entropy on ``logits + tau * log(pi + 1e-9)``.
    ``tau = 1`` is Balanced Softmax."""

    def __init__(self, class_counts, tau: float = 1.0, *, weight: Optional[Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__(weight, ignore_index, reduction, label_smoothing)
        self.tau = float(tau)
        self.register_buffer("adjustment", self.tau * priors.log_prior(class_counts, dtype=torch.float64))

    def forward(self, input: Tensor, target: Tensor, target_b: Optional[Tensor] = None, mix_weight=None) -> Tensor:
        if target_b is not None or mix_weight is not None or self._per_class_smoothing or _soft.is_probability(target):
            return self._soft_loss(input, target, target_b, mix_weight, adjustment="adjustment")
        if _extension.AVAILABLE and not _is_compiling():
            vector = self._eager_class_vector
            loss = _dispatch.fast.adjusted_cross_entropy(input, target, vector("adjustment", input), None,
                                                     vector("weight", input), 0.0, self.label_smoothing,
                                                     self.reduction, self.ignore_index)
            if loss is not NotImplemented:
                return loss
        return adjusted_cross_entropy(input, target,
                                      adjustment=self._class_vector("adjustment", input),
                                      weight=self._class_vector("weight", input),
                                      label_smoothing=self.label_smoothing, reduction=self.reduction,
                                      ignore_index=self.ignore_index)


class WeightedCrossEntropyLoss(_CrossEntropyFamilyLoss):
    """Cross-entropy with per-class weights from the training counts.

    ``scheme="survey"`` (default): the survey's weighted softmax, ``w_c = 1 + ln(n_max / n_c)``
    (seed-methods.md §1.2). ``scheme="effective_number"``: class-balanced weights
    ``(1 - beta) / (1 - beta^n_c)`` normalised to sum to C (Cui et al. 2019). Both reject classes
    with zero samples. The mean divides by ``sum_i w_{y_i}``, as ``nn.CrossEntropyLoss(weight=w)``.
    """

    def __init__(self, class_counts, scheme: str = "survey", beta: float = 0.9999, *,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        if scheme == "survey":
            weight = priors.survey_class_weights(class_counts, dtype=torch.float64)
        elif scheme == "effective_number":
            weight = priors.effective_number_weights(class_counts, beta, dtype=torch.float64)
        else:
            raise ValueError(f"scheme must be 'survey' or 'effective_number', got {scheme!r}")
        super().__init__(weight, ignore_index, reduction, label_smoothing)
        self.scheme = scheme

    def forward(self, input: Tensor, target: Tensor, target_b: Optional[Tensor] = None, mix_weight=None) -> Tensor:
        return self._weighted_cross_entropy(input, target, target_b, mix_weight)


class LDAMLoss(_CrossEntropyFamilyLoss):
    """LDAM with deferred re-weighting (Cao et al. 2019), as the survey's Ensemble-codebase runs it
    (seed-methods.md §1.9): ``s * m_y`` is subtracted from the target logit, with
    ``m_c = max_margin * (n_min / n_c)^(1/4)``, applied to the model's logits as they are (the
    survey's LDAM config has a plain linear classifier; the original LDAM-DRW code scales cosine
    logits by s instead).

    DRW: call :meth:`set_epoch` at the start of every epoch (0-based). From epoch ``drw_epoch`` on,
    the loss uses class-balanced weights with ``beta`` (the survey: ``reweight_epoch=160`` with
    1-based epochs and ``epoch > 160``, i.e. ``drw_epoch=160`` here). ``drw_epoch=None`` never
    re-weights. The current epoch is saved in the ``state_dict``.

    Mixed (mixup) and probability targets are refused with a clear error: the margin is subtracted
    from the target class's logit, so two targets would need two softmaxes
    (``supports_mixed_targets = False``). A per-class ``label_smoothing`` tensor works.

    ``scale_logits=True`` is the original LDAM-DRW form for cosine classifiers,
    ``CE(s * (z - m_y e_y))``: the logits (cosines) are scaled by ``s`` and the margin ``m_y`` itself
    is subtracted from the target cosine, i.e. ``s * m_y`` from the scaled target logit.
    """

    def __init__(self, class_counts, max_margin: float = 0.5, s: float = 30.0,
                 drw_epoch: Optional[int] = None, beta: float = 0.9999, *, scale_logits: bool = False,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__(None, ignore_index, reduction, label_smoothing)
        self.scale_logits = bool(scale_logits)
        self.s = float(s)
        self.max_margin = float(max_margin)
        self.drw_epoch = drw_epoch
        self.beta = float(beta)
        self.epoch = 0
        self.register_buffer("target_margin", self.s * priors.ldam_margins(class_counts, max_margin, dtype=torch.float64))
        self.register_buffer("drw_weight", priors.effective_number_weights(class_counts, beta, dtype=torch.float64))

    supports_mixed_targets = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def reweighting(self) -> bool:
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def get_extra_state(self):
        return {"epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        self.epoch = int(state["epoch"])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, s={self.s}, max_margin={self.max_margin}, drw_epoch={self.drw_epoch}, "
                f"scale_logits={self.scale_logits}")

    def forward(self, input: Tensor, target: Tensor, target_b: Optional[Tensor] = None, mix_weight=None) -> Tensor:
        if self.scale_logits:  # the target_margin buffer already holds s * m: CE(s z - s m_y e_y)
            input = input * self.s
        if target_b is not None or mix_weight is not None or self._per_class_smoothing or _soft.is_probability(target):
            # Per-class smoothing works (one target); mixed and probability targets raise a clear
            # error: the margin is per target class.
            return self._soft_loss(input, target, target_b, mix_weight, target_margin="target_margin",
                                   weight="drw_weight" if self.reweighting else None)
        if _extension.AVAILABLE and not _is_compiling():
            vector = self._eager_class_vector
            loss = _dispatch.fast.adjusted_cross_entropy(input, target, None, vector("target_margin", input),
                                                     vector("drw_weight", input) if self.reweighting else None,
                                                     0.0, self.label_smoothing, self.reduction, self.ignore_index)
            if loss is not NotImplemented:
                return loss
        weight = self._class_vector("drw_weight", input) if self.reweighting else None
        return adjusted_cross_entropy(input, target,
                                      target_margin=self._class_vector("target_margin", input),
                                      weight=weight,
                                      label_smoothing=self.label_smoothing, reduction=self.reduction,
                                      ignore_index=self.ignore_index)


class FocalLoss(_CrossEntropyFamilyLoss):
    """Focal loss ``w_y * (1 - p_y)^gamma * (-log p_y)`` (Lin et al. 2017) as the survey's
    Main-codebase computes it: p_y is detached, so ``(1 - p_y)^gamma`` scales the gradient without
    being differentiated (seed-methods.md §1.7; the survey's create_loss uses gamma = 3, the default
    here is the paper's 2).
    ``weight`` gives per-class alpha weights, with the weighted mean of nn.CrossEntropyLoss."""

    def __init__(self, gamma: float = 2.0, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                 reduction: str = "mean") -> None:
        if not gamma >= 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        super().__init__(weight, ignore_index, reduction, 0.0)
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        # gamma first: the repr used to hide it (a trainer run with SEQL's 0.9 looked like focal).
        return f"gamma={self.gamma}, {super().extra_repr()}"

    def forward(self, input: Tensor, target: Tensor, target_b: Optional[Tensor] = None, mix_weight=None) -> Tensor:
        if target_b is not None or mix_weight is not None or _soft.is_probability(target):
            # Mixed targets: lam * focal(y_a) + (1 - lam) * focal(y_b), each with its own detached p_y
            # on the shared softmax. Probability targets raise a clear error (no p_y).
            return self._soft_loss(input, target, target_b, mix_weight, gamma=self.gamma)
        if _extension.AVAILABLE and not _is_compiling():
            loss = _dispatch.fast.adjusted_cross_entropy(input, target, None, None,
                                                     self._eager_class_vector("weight", input), self.gamma, 0.0,
                                                     self.reduction, self.ignore_index)
            if loss is not NotImplemented:
                return loss
        return adjusted_cross_entropy(input, target, weight=self._class_vector("weight", input),
                                      gamma=self.gamma, reduction=self.reduction, ignore_index=self.ignore_index)


class CrossEntropyLoss(_CrossEntropyFamilyLoss):
    """Drop-in ``nn.CrossEntropyLoss(weight, ignore_index, reduction, label_smoothing)`` on the fused
    op, with the soft-target extensions of the family: ``forward(input, target, target_b=None,
    mix_weight=None)`` for mixup/CutMix, probability targets, and ``label_smoothing`` as a float or a
    per-class ``[C]`` tensor. ``size_average``/``reduce`` (deprecated in PyTorch) are refused.

    Shapes as ``nn.CrossEntropyLoss``: ``[N, C]`` (the fused op's own layout), an unbatched ``[C]``
    input with a 0-dim class target or a ``[C]`` probability target, and ``[N, C, d1, ...]`` with a
    ``[N, d1, ...]`` class target or a probability target of the input's shape: the class dimension
    is moved last and the rest flattened into rows (a copy of the input), and ``reduction='none'``
    gives ``[N, d1, ...]`` (a 0-dim loss for unbatched input); ``'mean'`` averages over every
    element, weighted as PyTorch does. ``target_b`` has the target's shape; ``mix_weight`` is a
    float, a 0-dim tensor or one value per sample ``[N]``."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing=0.0) -> None:
        if size_average is not None or reduce is not None:
            raise ValueError("size_average and reduce are deprecated in nn.CrossEntropyLoss and not supported; "
                             "use reduction='mean', 'sum' or 'none'")
        super().__init__(weight, ignore_index, reduction, label_smoothing)

    def _other_shapes(self, input: Tensor, target: Tensor, target_b, mix_weight) -> Tensor:
        """[C] and [N, C, d1, ...] inputs as rows of [M, C] (see the class docstring)."""
        probability = target.is_floating_point()
        if input.dim() == 1:
            expected = tuple(input.shape) if probability else ()
            if tuple(target.shape) != expected:
                raise ValueError(f"CrossEntropyLoss: an unbatched input of shape {tuple(input.shape)} needs a "
                                 f"{'[C] probability' if probability else '0-dim class-index'} target, got shape "
                                 f"{tuple(target.shape)}")
            rows, flat_target = input.unsqueeze(0), target.unsqueeze(0)
            flat_b = None if target_b is None else target_b.reshape(1)
            flat_mix = mix_weight
            out_shape: tuple = ()
        elif input.dim() >= 3:
            n, c = input.shape[0], input.shape[1]
            spatial = tuple(input.shape[2:])
            expected = tuple(input.shape) if probability else (n, *spatial)
            if tuple(target.shape) != expected:
                raise ValueError(f"CrossEntropyLoss: an input of shape {tuple(input.shape)} needs a "
                                 f"{'probability' if probability else 'class-index'} target of shape {expected}, "
                                 f"got {tuple(target.shape)}")
            rows = input.movedim(1, -1).reshape(-1, c)
            flat_target = target.movedim(1, -1).reshape(-1, c) if probability else target.reshape(-1)
            if target_b is not None and tuple(target_b.shape) != expected:
                raise ValueError(f"CrossEntropyLoss: target_b must have the target's shape {expected}, got "
                                 f"{tuple(target_b.shape)}")
            flat_b = None if target_b is None else target_b.reshape(-1)
            flat_mix = mix_weight
            if isinstance(mix_weight, Tensor) and mix_weight.dim() == 1:  # one lambda per sample -> per element
                if mix_weight.shape[0] != n:
                    raise ValueError(f"CrossEntropyLoss: mix_weight must be a float, a 0-dim tensor or [N = {n}], "
                                     f"got shape {tuple(mix_weight.shape)}")
                flat_mix = mix_weight.view(n, *([1] * len(spatial))).expand(n, *spatial).reshape(-1)
            out_shape = (n, *spatial)
        else:
            raise ValueError("CrossEntropyLoss: input must be [C], [N, C] or [N, C, d1, ...], got a 0-dim tensor")
        loss = self.forward(rows, flat_target, flat_b, flat_mix)
        return loss.reshape(out_shape) if self.reduction == "none" else loss

    def forward(self, input: Tensor, target: Tensor, target_b: Optional[Tensor] = None, mix_weight=None) -> Tensor:
        if input.dim() != 2:
            return self._other_shapes(input, target, target_b, mix_weight)
        return self._weighted_cross_entropy(input, target, target_b, mix_weight)
