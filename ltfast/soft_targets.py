"""Soft targets for the fused cross-entropy family (ltfast issue 15 part 3): mixed (mixup/CutMix)
targets, per-class label smoothing and dense probability targets.

Two ops, separate from the hard-target ``adjusted_cross_entropy`` so that its path stays as fast
as before (csrc/ops/soft_targets/):

- ``torch.ops.ltfast.mixed_cross_entropy``: ``lambda * CE(a, target) + (1 - lambda) * CE(a,
  target_b)`` on one softmax per row (the logits are read once forward and once backward; no
  ``[N, C]`` target), each term reduced as ``F.cross_entropy`` reduces it. Without ``target_b`` it is
  the hard-target loss with a per-class label smoothing ``eps[y]``.
- ``torch.ops.ltfast.probability_cross_entropy``: ``F.cross_entropy`` with a floating ``[N, C]``
  target.

:func:`ltfast.adjusted_cross_entropy`, :func:`ltfast.balanced_softmax_loss` and the ``ltfast.nn``
cross-entropy modules route to these ops when given ``target_b``/``mix_weight``, a floating target,
or a ``[C]`` tensor ``label_smoothing``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _extension, _meta, reference  # noqa: F401  (_meta: the fake kernels of these ops)
from ._dispatch import is_compiling as _is_compiling


def _split_smoothing(label_smoothing) -> tuple[float, Tensor | None]:
    """(scalar eps, per-class eps or None) from a float or a [C] tensor."""
    if isinstance(label_smoothing, Tensor):
        if label_smoothing.dim() == 0:
            return float(label_smoothing), None
        return 0.0, label_smoothing
    return float(label_smoothing), None


def _check_mix_weight(mix_weight, logits: Tensor) -> None:
    """lambda is a probability: a real number or a floating tensor in [0, 1]. Tensor values are
    checked on the CPU only (on CUDA reading them would synchronise the host); Python numbers always,
    except under torch.compile, where comparing a traced float would guard on its value."""
    op = "mixed_cross_entropy"
    if isinstance(mix_weight, Tensor):
        if not mix_weight.is_floating_point():
            raise TypeError(f"{op}: mix_weight must be a floating-point tensor (lambda in [0, 1]), got "
                            f"{mix_weight.dtype}")
        if mix_weight.device.type == "cpu" and not _is_compiling() and mix_weight.numel() and \
                not bool(((mix_weight >= 0) & (mix_weight <= 1)).all()):
            raise ValueError(f"{op}: mix_weight must lie in [0, 1], got values from {float(mix_weight.min())} to "
                             f"{float(mix_weight.max())}")
        return
    if isinstance(mix_weight, bool) or not isinstance(mix_weight, (int, float)):
        raise TypeError(f"{op}: mix_weight must be a float in [0, 1] or a floating tensor, got "
                        f"{type(mix_weight).__name__} {mix_weight!r}")
    if not _is_compiling() and not 0.0 <= mix_weight <= 1.0:
        raise ValueError(f"{op}: mix_weight must lie in [0, 1] (lambda of mixup / CutMix), got {mix_weight!r}")


def _split_mix(mix_weight, logits: Tensor) -> tuple[float, Tensor | None]:
    if mix_weight is None:
        return 1.0, None
    _check_mix_weight(mix_weight, logits)
    if isinstance(mix_weight, Tensor):
        return 1.0, mix_weight
    if _is_compiling():
        # The op's `float mix` would make torch.compile guard on lambda's value, and mixup draws a new
        # lambda every batch: one recompile per batch until FailOnRecompileLimitHit (trial finding 4).
        # A 0-dim tensor on the logits' device is an input of the graph instead; the kernels read it.
        return 1.0, torch.full((), mix_weight, dtype=_dispatch.accumulate_dtype(logits), device=logits.device)
    return float(mix_weight), None


def mixed_cross_entropy(logits: Tensor, target: Tensor, target_b: Tensor | None = None,
                        mix_weight: float | Tensor | None = None, adjustment: Tensor | None = None,
                        target_margin: Tensor | None = None, weight: Tensor | None = None, gamma: float = 0.0,
                        label_smoothing: float | Tensor = 0.0, reduction: str = "mean",
                        ignore_index: int = -100) -> Tensor:
    """Mixed-target (mixup/CutMix) cross-entropy family loss on one softmax per row:
    ``lambda * L(a, target) + (1 - lambda) * L(a, target_b)`` with ``a = logits + adjustment`` and
    ``L`` the loss of :func:`ltfast.adjusted_cross_entropy` (per-class ``weight``, focal ``gamma``,
    ``label_smoothing``).

    - ``mix_weight``: lambda in [0, 1], a float, a 0-dim tensor (one lambda for the batch, on the
      logits' device: read by the kernels, no host synchronisation) or an ``[N]`` tensor (one per
      row). It receives no gradient (mixup draws it), and passing one that requires grad is an
      error. A bool, a string or a number outside [0, 1] is refused (TypeError / ValueError); tensor
      values are range-checked on the CPU only (on CUDA it would synchronise). Under
      ``torch.compile`` a float is passed to the op as a 0-dim tensor, so a new lambda every batch
      does not recompile.
    - Every tensor argument must be on the logits' device (an error names the argument).
    - Each term is reduced as ``F.cross_entropy`` reduces it: ``'mean'`` divides the sum of
      ``lambda_i * l_a,i`` by ``sum_i w_{y_a,i}`` over the rows whose target is not ``ignore_index``
      (their count without weights), and the second term likewise with its own rows, so that for a
      scalar lambda the result is exactly ``lam * F.cross_entropy(z, a, ...) + (1 - lam) *
      F.cross_entropy(z, b, ...)``. ``'none'``: ``lambda_i * l_a,i + (1 - lambda_i) * l_b,i`` (an
      ignored target's term is 0). ``'sum'``: the sum of that.
    - ``label_smoothing``: a float, or a ``[C]`` tensor of per-class eps: the row's eps in each term
      is ``label_smoothing[y]`` of that term's target (MiSLAS's label-aware smoothing), with
      ``F.cross_entropy``'s smoothing formula row by row. Values are checked on CPU tensors; on CUDA
      (the check would synchronise) ``ltfast.nn`` modules check them at construction. A target
      logit of ``-inf`` with smoothing: ``+inf`` in that term, and in the other term (its smoothing
      sums ``-log p`` over every class), as ``F.cross_entropy`` (see
      :func:`ltfast.adjusted_cross_entropy` for the zero-weight case).
    - ``gamma`` (focal, p_y detached as in the survey) applies to each term with its own p_y: both
      terms share the softmax, so this is exactly ``lam * focal(a) + (1 - lam) * focal(b)``.
    - ``target_margin`` (LDAM) is refused with ``target_b``: the margin changes the softmax per
      target, and the two terms would need two softmaxes. Without ``target_b`` it is allowed (a
      single hard target with per-class smoothing).

    The gradient flows to the logits (and to ``adjustment``/``target_margin``) only.
    """
    if target_b is not None and mix_weight is None:
        raise ValueError("mixed_cross_entropy: mix_weight (lambda: a float, a 0-dim tensor or an [N] tensor) is "
                         "required with target_b")
    eps, class_eps = _split_smoothing(label_smoothing)
    _dispatch.check_devices("mixed_cross_entropy", logits, {"target": target, "target_b": target_b,
                                                           "mix_weight": mix_weight, "adjustment": adjustment,
                                                           "target_margin": target_margin, "weight": weight,
                                                           "label_smoothing": class_eps})
    mix, mix_tensor = _split_mix(mix_weight, logits)
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.mixed_cross_entropy(logits, target, target_b, mix_weight, adjustment, target_margin, weight,
                                             gamma, label_smoothing, reduction, ignore_index)
    gamma = float(gamma)
    fast = _dispatch.fast
    if not _is_compiling() and hasattr(fast, "mixed_cross_entropy"):
        loss = fast.mixed_cross_entropy(logits, target, target_b, mix_tensor, mix, adjustment, target_margin, weight,
                                        gamma, eps, class_eps, reduction, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.mixed_cross_entropy.default(logits, target, target_b, mix_tensor, mix, adjustment,
                                                        target_margin, weight, gamma, eps, class_eps, reduction,
                                                        ignore_index)


def probability_cross_entropy(logits: Tensor, target: Tensor, adjustment: Tensor | None = None,
                              weight: Tensor | None = None, label_smoothing: float = 0.0,
                              reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(logits + adjustment, target, weight=weight, label_smoothing=...,
    reduction=...)`` for a floating ``[N, C]`` probability target, fused: ``-sum_c w_c q_c log p_c``
    with ``q = (1 - eps) * target + eps / C`` (weights inside the class sum), ``'mean'`` divides by
    N, as PyTorch does for probability targets. The target is read in its own dtype when it is the
    logits' dtype, else in float32 (float64 for float64 logits). No gradient to the target (an
    error if it requires grad); the gradient flows to the logits and ``adjustment``. Non-finite
    values give what ``F.cross_entropy`` gives: a target entry of ``+inf`` (or an impossible class,
    logit ``-inf``, with probability or smoothing) makes the row ``+inf``, with PyTorch's pattern of
    ``inf`` and ``NaN`` gradients; a NaN anywhere in the row makes it NaN."""
    if isinstance(label_smoothing, Tensor) and label_smoothing.dim() > 0:
        raise ValueError("probability_cross_entropy: a per-class label_smoothing is not defined for probability "
                         "targets (there is no target class to take eps from); smooth the targets instead")
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.probability_cross_entropy(logits, target, adjustment, weight, float(label_smoothing),
                                                   reduction)
    return torch.ops.ltfast.probability_cross_entropy.default(logits, target, adjustment, weight,
                                                              float(label_smoothing), reduction)


def route(logits: Tensor, target: Tensor, target_b, mix_weight, adjustment, target_margin, weight, gamma,
          label_smoothing, reduction: str, ignore_index: int) -> Tensor:
    """The soft-target cases of the cross-entropy family functionals and modules: a floating target
    (probabilities), a second target, or a per-class smoothing tensor."""
    if is_probability(target):
        op = "cross-entropy with probability targets"
        if ignore_index >= 0:  # F.cross_entropy's rule and message (a negative one is the unused default)
            raise RuntimeError("ignore_index is not supported for floating point target")
        if target_b is not None or mix_weight is not None:
            raise ValueError(f"{op}: target_b/mix_weight are for class-index targets; mix probability targets "
                             "directly (lam * t_a + (1 - lam) * t_b)")
        if target_margin is not None:
            raise ValueError(f"{op}: target_margin (LDAM) needs a target class per row; it is not defined for "
                             "probability targets")
        if float(gamma) != 0.0:
            raise ValueError(f"{op}: focal gamma > 0 needs the target class's probability p_y; it is not defined "
                             f"for probability targets, got gamma={gamma}")
        return probability_cross_entropy(logits, target, adjustment, weight, label_smoothing, reduction)
    return mixed_cross_entropy(logits, target, target_b, mix_weight, adjustment, target_margin, weight, gamma,
                               label_smoothing, reduction, ignore_index)


def is_probability(target: Tensor) -> bool:
    """A floating target that is not 1-D (a 1-D float target is a mistyped class-index target: the
    hard-target op names it)."""
    return target.is_floating_point() and target.dim() != 1


def is_soft(target: Tensor, target_b, mix_weight, label_smoothing) -> bool:
    return (target_b is not None or mix_weight is not None or isinstance(label_smoothing, Tensor)
            or is_probability(target))
