"""The functionals users call, over the torch.ops.ltfast ops (their fake kernels: ltfast/_meta.py;
the path a call takes: ltfast/_dispatch.py).

The schemas and the CPU/CUDA kernels are in csrc/, and so are autograd and autocast
(csrc/autograd/*_autograd.cpp), so that a call costs no Python beyond the functional itself. Each
public loss op is a composite over a private forward op returning ``(loss, row_stats,
denominator)``, whose autograd saves only the per-row softmax statistics ``row_stats`` ``[2, N]``
(row max m and ``log sum exp(a - m)``, in the accumulation dtype; see
csrc/ops/cross_entropy/cross_entropy.h) and the scalar denominator, and calls a private backward
op. The logits are made contiguous once, before the private forward op, so that the tensor autograd
saves is the one the kernels read (no second copy in backward). The backward is first-order only:
differentiating a gradient taken with ``create_graph=True`` raises an error naming the op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _extension, _meta, reference  # noqa: F401  (_meta: the fake kernels of these ops)
from . import soft_targets as _soft
from ._dispatch import is_compiling as _is_compiling


def balanced_softmax_loss(logits: Tensor, target: Tensor, log_prior: Tensor, reduction: str = "mean",
                          ignore_index: int = -100, *, target_b: Tensor | None = None,
                          mix_weight: float | Tensor | None = None) -> Tensor:
    """Balanced Softmax loss: exactly ``F.cross_entropy(logits + log_prior, target, reduction=...,
    ignore_index=...)``, fused (one pass forward, one backward, only ``[N]`` saved).

    Args:
        logits: ``[N, C]`` float32/float16/bfloat16/float64, any strides.
        target: ``[N]`` int64 class indices in ``[0, C)`` or ``ignore_index``. Out of range: an
            ``IndexError`` naming the row on the CPU; on CUDA a device-side assert (no host
            synchronisation to check first), which leaves the CUDA context unusable, as
            ``F.cross_entropy`` does.
        log_prior: ``[C]`` log class prior, e.g. :func:`ltfast.priors.log_prior` of the training counts.
        reduction: ``'mean'`` (over non-ignored rows), ``'sum'`` or ``'none'`` (``[N]``).
        ignore_index: rows with this target contribute 0 and are not counted in the mean.

    Soft targets (see ltfast/soft_targets.py): ``target_b`` and ``mix_weight`` (mixup/CutMix)
    give ``lam * loss(target) + (1 - lam) * loss(target_b)`` on one softmax; a floating ``[N, C]``
    ``target`` is a probability target as in ``F.cross_entropy``.

    Returns the loss in the logits dtype (float32 under autocast).
    """
    if target_b is not None or mix_weight is not None or _soft.is_probability(target):
        return _soft.route(logits, target, target_b, mix_weight, log_prior, None, None, 0.0, 0.0, reduction,
                           ignore_index)
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.balanced_softmax(logits, target, log_prior, reduction, ignore_index)
    if not _is_compiling():
        loss = _dispatch.fast.balanced_softmax(logits, target, log_prior, reduction, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.balanced_softmax.default(logits, target, log_prior, reduction, ignore_index)


def adjusted_cross_entropy(logits: Tensor, target: Tensor, adjustment: Tensor | None = None,
                           target_margin: Tensor | None = None, weight: Tensor | None = None,
                           gamma: float = 0.0, label_smoothing: float | Tensor = 0.0, reduction: str = "mean",
                           ignore_index: int = -100, *, target_b: Tensor | None = None,
                           mix_weight: float | Tensor | None = None) -> Tensor:
    """The fused cross-entropy family on adjusted logits
    ``a = logits + adjustment - target_margin[y] * onehot(y)``:

    - ``adjustment`` ``[C]``: additive per-class bias (``tau * log_prior`` for logit adjustment,
      ``log_prior`` for Balanced Softmax);
    - ``target_margin`` ``[C]``: subtracted from the target logit only (LDAM: ``s * m_y``);
    - ``weight`` ``[C]``: per-class weights, mean divided by ``sum_i w_{y_i}`` as in PyTorch;
    - ``gamma``: focal modulation ``(1 - p_y)^gamma``. As in the survey's FocalLoss
      (Main-codebase/loss/FocalLoss.py, seed-methods.md §1.7), p_y is detached, so the factor scales
      the gradient but is not differentiated (the Lin et al. paper differentiates it);
    - ``label_smoothing``: as in ``F.cross_entropy``; cannot be combined with ``gamma > 0``. A target
      logit of ``-inf`` with smoothing gives ``+inf`` (``NaN`` for a zero target weight) and
      PyTorch's finite gradient, as ``F.cross_entropy``; the one difference: when another class is
      ``-inf`` too and has weight 0, PyTorch's ``0 * inf`` is ``NaN`` where ltfast gives ``+inf``.

    With every option left at its default this is ``F.cross_entropy(logits, target)``.

    Soft targets (ltfast/soft_targets.py, their own fused ops): ``target_b`` with ``mix_weight``
    (mixup/CutMix, :func:`ltfast.soft_targets.mixed_cross_entropy`), ``label_smoothing`` as a ``[C]``
    tensor (per-class eps, eps[y] per row), and a floating ``[N, C]`` ``target`` (probabilities,
    :func:`ltfast.soft_targets.probability_cross_entropy`; ``ignore_index`` unused, ``target_margin``
    and ``gamma`` refused).

    A target outside ``[0, C)`` that is not ``ignore_index`` raises ``IndexError`` on the CPU; on CUDA
    it is a device-side assert that leaves the CUDA context unusable (see docs/ops.md, "Targets out of
    range"). The same holds for every ltfast loss.
    """
    if target_b is not None or mix_weight is not None or type(label_smoothing) is not float or \
            target.is_floating_point():
        if _soft.is_soft(target, target_b, mix_weight, label_smoothing):
            return _soft.route(logits, target, target_b, mix_weight, adjustment, target_margin, weight, gamma,
                               label_smoothing, reduction, ignore_index)
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.adjusted_cross_entropy(logits, target, adjustment, target_margin, weight, gamma,
                                                label_smoothing, reduction, ignore_index)
    gamma = float(gamma)
    label_smoothing = float(label_smoothing)
    if not _is_compiling():
        loss = _dispatch.fast.adjusted_cross_entropy(logits, target, adjustment, target_margin, weight, gamma,
                                                     label_smoothing, reduction, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.adjusted_cross_entropy.default(logits, target, adjustment, target_margin, weight,
                                                           gamma, label_smoothing, reduction, ignore_index)


def lade_loss(logits: Tensor, target: Tensor, log_prior: Tensor, alpha: float = 0.1, remine_lambda: float = 0.1,
              ignore_index: int = -100) -> Tensor:
    """LADE loss of the survey's code (seed-methods.md §1.5): PriorCE (Balanced Softmax, mean over the
    non-ignored rows) plus ``alpha`` times the LADER regulariser, a scalar.

    ``LADER = -sum_c pi_c (F_c - S_c - remine_lambda * S_c^2)`` with ``F_c`` the mean target logit of
    class c in the batch (0 when c is absent: ``/(n_c + 1e-8)``) and
    ``S_c = log mean_i exp(z_ic - log_prior_c + log(1/C + 1e-9))`` over the batch rows, so classes
    absent from the batch still contribute through S_c. ``pi_c = exp(log_prior_c)``: with
    ``log_prior = log(pi + 1e-9)`` (:func:`ltfast.priors.log_prior`) that is ``pi_c + 1e-9``, where the
    survey's code weights by ``pi_c`` itself (a difference of 1e-9 per class). Rows with
    ``ignore_index`` are left out of every term, including the batch size in S_c.

    The batch is the one passed in: under DDP, see ``ltfast.nn.LADELoss(gather_batch=True)``.
    """
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.lade(logits, target, log_prior, alpha, remine_lambda, ignore_index)
    alpha = float(alpha)
    remine_lambda = float(remine_lambda)
    if not _is_compiling():
        loss = _dispatch.fast.lade(logits, target, log_prior, alpha, remine_lambda, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.lade.default(logits, target, log_prior, alpha, remine_lambda, ignore_index)


def lade_regularizer(logits: Tensor, target: Tensor, log_prior: Tensor, remine_lambda: float = 0.1,
                     ignore_index: int = -100) -> Tensor:
    """The LADER regulariser alone (the survey's ``LADELoss.forward``), see :func:`lade_loss`."""
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.lade_regularizer(logits, target, log_prior, remine_lambda, ignore_index)
    remine_lambda = float(remine_lambda)
    if not _is_compiling():
        loss = _dispatch.fast.lade_regularizer(logits, target, log_prior, remine_lambda, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.lade_regularizer.default(logits, target, log_prior, remine_lambda, ignore_index)


def new_seed(device) -> Tensor:
    """Two int64 keys for the counter-based drop decisions of SEQL, drawn from torch's generator on
    ``device`` (reproducible after ``torch.manual_seed``; no host synchronisation)."""
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=device)


def softmax_equalization_loss(logits: Tensor, target: Tensor, tail_mask: Tensor, gamma: float = 0.9,
                              reduction: str = "mean", ignore_index: int = -100,
                              seed: Tensor | None = None) -> Tensor:
    """Softmax equalization loss as the survey's code computes it (Main-codebase/loss/SEQLLoss.py,
    seed-methods.md §1.3): cross-entropy in which every negative logit of a tail class
    (``tail_mask[c]``) is removed from the softmax with probability ``gamma``, independently per
    (sample, class) element; head classes and the target are always kept, and removed entries get
    exactly zero gradient. The survey replaces them by -1e7; ltfast removes them, which is the same
    softmax without the risk of NaN.

    The drop decisions come from a counter-based hash of ``seed`` (int64 [2], drawn with
    :func:`new_seed` from torch's generator when not given) and each element's position: nothing is
    stored, backward recomputes them, and the same seed gives the same loss and gradients.
    """
    if seed is None:
        seed = new_seed(logits.device)
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.softmax_equalization_loss(logits, target, tail_mask, gamma, reduction, ignore_index,
                                                    seed=seed)
    gamma = float(gamma)
    if not _is_compiling():
        loss = _dispatch.fast.softmax_equalization_loss(logits, target, tail_mask, seed, gamma, reduction,
                                                        ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.softmax_equalization_loss.default(logits, target, tail_mask, seed, gamma, reduction,
                                                              ignore_index)


def equalization_loss(logits: Tensor, target: Tensor, tail_mask: Tensor, reduction: str = "mean",
                      ignore_index: int = -100) -> Tensor:
    """Equalization loss, sigmoid form (Tan et al., CVPR 2020, with E(r) = 1 for classification):
    ``sum_c w_ic * BCE(z_ic, onehot(y_i)_c)`` with ``w_ic = 0`` for the negative term of a tail
    class (``tail_mask[c]``) and 1 otherwise; ``'mean'`` divides by the number of non-ignored rows,
    as the EQL code divides the class-summed loss by the number of samples.

    Per element (the same rule on every backend and in :func:`ltfast.reference.equalization_loss`):

    - a suppressed element (``w_ic = 0``) contributes exactly 0 to the loss and to the gradient,
      even when its logit is NaN or infinite;
    - otherwise the loss is ``F.binary_cross_entropy_with_logits(z, y)`` for finite or NaN ``z``,
      and its limit for ``z = +-inf``: 0 when the logit agrees with the label (``y = 0, z = -inf``
      or ``y = 1, z = +inf``), ``+inf`` when it contradicts it. (PyTorch returns NaN for three of
      these four cases; ltfast returns the limits.) The gradient is ``sigmoid(z) - y``, which is
      what PyTorch returns at +-inf too, and NaN for a NaN logit.
    """
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.equalization_loss(logits, target, tail_mask, reduction, ignore_index)
    if not _is_compiling():
        loss = _dispatch.fast.equalization_loss(logits, target, tail_mask, reduction, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.equalization_loss.default(logits, target, tail_mask, reduction, ignore_index)



def diverse_expert_loss(logits: Tensor, target: Tensor, adjustments: Tensor, reduction: str = "mean",
                        ignore_index: int = -100) -> Tensor:
    """SADE's multi-expert loss (the survey's ``DiverseExpertLoss``, seed-methods.md §6), fused: for
    expert logits ``[N, E, C]`` and per-expert adjustments ``[E, C]``,
    ``sum_e F.cross_entropy(logits[:, e] + adjustments[e], target, reduction=..., ignore_index=...)``.

    ``'none'`` gives the per-row sum over experts ``[N]``; ``'mean'`` divides the sum by the number of
    non-ignored rows (each expert's mean, summed). One pass over each row's ``E x C`` logits forward
    and one backward; only ``[2, N, E]`` row statistics are saved. SADE's three experts use the
    adjustments ``0``, ``log(pi + 1e-9)`` and ``log(pi + 1e-9) - tau * log(pi_inv + 1e-9)``
    (:class:`ltfast.nn.DiverseExpertLoss` builds them). Only ``logits`` is differentiable.

    On the CPU, when ``logits`` requires grad, the forward also writes the gradient (from the
    exponentials it has just computed, while the row is in cache) and backward hands it out when the
    upstream gradient is exactly 1: two passes over the logits instead of three. The gradient tensor
    then exists from the forward on, instead of from the backward on. Other upstream gradients, a
    second backward and CUDA run the backward kernel.
    """
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.diverse_expert_loss(logits, target, adjustments, reduction, ignore_index)
    if not _is_compiling():
        loss = _dispatch.fast.diverse_expert_loss(logits, target, adjustments, reduction, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.diverse_expert_loss.default(logits, target, adjustments, reduction, ignore_index)


def ride_loss(logits: Tensor, target: Tensor, target_margin: Tensor | None = None, weight: Tensor | None = None,
              temperature: Tensor | None = None, base_temperature: float = 1.0, diversity_factor: float = -0.2,
              ignore_index: int = -100) -> Tensor:
    """RIDE's multi-expert loss (the survey's Ensemble-codebase ``RIDELoss``, seed-methods.md §6 and
    §1.9), fused, reduction ``'mean'`` only (a scalar), for expert logits ``[N, E, C]``:

    ``sum_k [LDAM-DRW CE(z_k) + diversity_factor * Tbar^2 * KL(pbar || softmax(z_k / T))]``

    - the CE subtracts ``target_margin[y]`` (``s * m_y``) from the target logit and, with ``weight``,
      takes PyTorch's weighted mean (divided by ``sum_i w_{y_i}``);
    - ``T_c = base_temperature * temperature_c`` (``base_temperature`` alone without ``temperature``),
      ``Tbar = mean_c T_c``;
    - ``pbar = softmax(mean_k z_k / T)`` carries no gradient. The original uses the model's
      ``output_logits``, which the survey's expert models compute as that mean;
    - KL is ``F.kl_div(..., reduction='batchmean')``: summed, divided by the number of non-ignored rows.

    Rows with ``ignore_index`` leave both terms. Only ``logits`` is differentiable. One pass over
    each row's ``E x C`` logits forward and one backward; on the CPU the forward also writes the
    gradient when ``logits`` requires grad, as :func:`diverse_expert_loss` does (the softmaxes'
    exponentials are then computed once, not twice). ``temperature`` values must be > 0 and
    ``base_temperature`` a finite number > 0 (ValueError); ``temperature`` is checked on the CPU
    only: on CUDA reading it would synchronise the host (:class:`ltfast.nn.RIDELoss` checks its
    temperatures at construction).
    """
    if isinstance(base_temperature, bool) or not isinstance(base_temperature, (int, float)) or \
            not 0.0 < float(base_temperature) < float("inf"):
        raise ValueError(f"ride_loss: base_temperature must be a finite number > 0, got {base_temperature!r}")
    base_temperature = float(base_temperature)
    diversity_factor = float(diversity_factor)
    if temperature is not None and temperature.device.type == "cpu" and not _is_compiling() and \
            temperature.numel() and not bool((temperature > 0).all()):
        raise ValueError(f"ride_loss: temperature must be > 0 for every class, got a minimum of "
                         f"{float(temperature.min())}")
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.ride_loss(logits, target, target_margin, weight, temperature, base_temperature,
                                   diversity_factor, ignore_index)
    if not _is_compiling():
        loss = _dispatch.fast.ride_loss(logits, target, target_margin, weight, temperature, base_temperature,
                                        diversity_factor, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.ride_loss.default(logits, target, target_margin, weight, temperature, base_temperature,
                                              diversity_factor, ignore_index)


def paco_loss(similarity: Tensor, labels: Tensor, key_labels: Tensor, sup_logits: Tensor | None = None,
              log_prior: Tensor | None = None, temperature: float = 0.07, alpha: float = 0.05, beta: float = 1.0,
              gamma: float = 1.0, sup_temperature: float = 1.0, base_temperature: float | None = None,
              reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """PaCo's parametric contrastive loss (Cui et al. 2021; the survey's ``PaCo-codebase/losses.py``),
    fused: the math is in csrc/ops/paco/paco.h.

    Args:
        similarity: ``[B, M]`` ``q @ keys.T`` (not yet divided by ``temperature``); the first B keys
            are the anchors themselves (PaCo: keys = [q, k, queue], M = 2B + K).
        labels: ``[B]`` int64 anchor labels; key_labels: ``[M]`` int64 key labels.
        sup_logits: ``[B, C]`` classifier logits (None: SupCon, no class columns).
        log_prior: ``[C]`` added to ``sup_logits`` (PaCo: ``log(pi + 1e-9)``).
        temperature, base_temperature: T (moco-t) and T_base (default T); the loss is scaled by T / T_base.
        alpha, beta, gamma: key positives' weight, the class positive's weight, key columns' weight
            in the denominator. sup_temperature: the original's ``supt``.
        reduction: 'mean' (over counted rows), 'sum' or 'none'.
        ignore_index: anchors with this label give 0 and are not counted; keys with it are never positive.

    Labels out of ``[0, C)`` (other than ``ignore_index``) with ``sup_logits``: an ``IndexError`` naming the
    row on the CPU. Differentiable in ``similarity`` and ``sup_logits`` (first order; ``log_prior`` is a
    constant). Returns the loss in the similarity's dtype (float32 under autocast).
    """
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return reference.paco_loss(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha, beta,
                                   gamma, sup_temperature, base_temperature, reduction, ignore_index)
    if not _is_compiling():
        loss = _dispatch.fast.paco_loss(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha,
                                        beta, gamma, sup_temperature, base_temperature, reduction, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.paco_loss.default(similarity, labels, key_labels, sup_logits, log_prior, temperature,
                                              alpha, beta, gamma, sup_temperature, base_temperature, reduction,
                                              ignore_index)
