"""Python side of the torch.ops.ltfast ops: fake (meta) kernels and the functionals users call.

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

from . import _extension, reference

_REDUCTIONS = ("none", "mean", "sum")

# ltfast._C's direct entry points, or None without the extension. Tests may replace it to observe
# which path a call takes.
_fast = _extension.fast_entry_points()
_is_compiling = torch.compiler.is_compiling


def _accumulate_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_devices(op: str, logits: Tensor, tensors: dict) -> None:
    """Every tensor argument on the logits' device: a RuntimeError naming the argument and the
    expected device. Cheap (no data read); also run by the fake kernels, which are what runs when
    any argument is a meta tensor."""
    device = logits.device
    for name, tensor in tensors.items():
        if isinstance(tensor, Tensor) and tensor.device != device:
            raise RuntimeError(f"{op}: {name} must be on the same device as logits ({device}), got {tensor.device}")


def _fake_forward(op: str, logits: Tensor, target: Tensor, reduction: str, class_vectors: dict):
    # The C++ checks do not run on fake/meta tensors; these keep torch.compile and meta inputs
    # failing with the same messages.
    torch._check(logits.dim() == 2, lambda: f"{op}: logits must be a 2-D tensor [N, C], got {logits.dim()}-D")
    torch._check(reduction in _REDUCTIONS,
                 lambda: f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0],
                 lambda: f"{op}: target must be a 1-D tensor of N = {logits.shape[0]} elements, got shape "
                         f"{tuple(target.shape)}")
    for name, vector in class_vectors.items():
        if vector is None:
            continue
        torch._check(vector.dim() == 1 and vector.shape[0] == logits.shape[1],
                     lambda: f"{op}: {name} must be a 1-D tensor of C = {logits.shape[1]} elements, got shape "
                             f"{tuple(vector.shape)}")
    for name, tensor in {"target": target, **class_vectors}.items():
        if tensor is not None and tensor.device != logits.device:
            raise RuntimeError(f"{op}: {name} must be on the same device as logits ({logits.device}), "
                               f"got {tensor.device}")
    acc = _accumulate_dtype(logits)
    rows = logits.shape[0]
    loss = logits.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    return loss, logits.new_empty((2, rows), dtype=acc), logits.new_empty((), dtype=acc)


def _fake_expert_checks(op: str, logits: Tensor, target: Tensor, tensors: dict) -> None:
    torch._check(logits.dim() == 3,
                 lambda: f"{op}: logits must be a 3-D tensor [N, E, C] of expert logits, got {logits.dim()}-D")
    torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0],
                 lambda: f"{op}: target must be a 1-D tensor of N = {logits.shape[0]} elements, got shape "
                         f"{tuple(target.shape)}")
    for name, tensor in {"target": target, **tensors}.items():
        if tensor is not None and tensor.device != logits.device:
            raise RuntimeError(f"{op}: {name} must be on the same device as logits ({logits.device}), "
                               f"got {tensor.device}")


def _fake_forward_grad(logits: Tensor, with_grad: bool) -> Tensor:
    """The grad_logits of the forward ops with with_grad (cross-entropy family, multi-expert): computed
    by the CPU kernels only (cross_entropy.h, multi_expert.h)."""
    if with_grad and logits.device.type == "cpu":
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits.new_empty((0,))


def _register() -> None:
    lib = torch.library

    # ---------------------------------------------------------------- balanced_softmax
    @lib.register_fake("ltfast::_balanced_softmax_forward")
    def _(logits, target, log_prior, reduction, ignore_index, with_grad=False):
        return (*_fake_forward("ltfast.balanced_softmax", logits, target, reduction, {"log_prior": log_prior}),
                _fake_forward_grad(logits, with_grad))

    @lib.register_fake("ltfast::_balanced_softmax_backward")
    def _(grad_loss, logits, target, log_prior, row_stats, denominator, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- adjusted_cross_entropy
    @lib.register_fake("ltfast::_adjusted_cross_entropy_forward")
    def _(logits, target, adjustment, target_margin, weight, gamma, label_smoothing, reduction, ignore_index,
          with_grad=False):
        return (*_fake_forward("ltfast.adjusted_cross_entropy", logits, target, reduction,
                               {"adjustment": adjustment, "target_margin": target_margin, "weight": weight}),
                _fake_forward_grad(logits, with_grad))

    @lib.register_fake("ltfast::_adjusted_cross_entropy_backward")
    def _(grad_loss, logits, target, adjustment, target_margin, weight, row_stats, denominator, gamma,
          label_smoothing, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- softmax_equalization_loss
    @lib.register_fake("ltfast::_softmax_equalization_loss_forward")
    def _(logits, target, tail_mask, seed, gamma, reduction, ignore_index, with_grad=False):
        _check_devices("ltfast.softmax_equalization_loss", logits, {"seed": seed})
        return (*_fake_forward("ltfast.softmax_equalization_loss", logits, target, reduction,
                               {"tail_mask": tail_mask}),
                _fake_forward_grad(logits, with_grad))

    @lib.register_fake("ltfast::_softmax_equalization_loss_backward")
    def _(grad_loss, logits, target, tail_mask, seed, row_stats, denominator, gamma, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- equalization_loss (EQL)
    @lib.register_fake("ltfast::_equalization_loss_forward")
    def _(logits, target, tail_mask, reduction, ignore_index):
        loss, _, denominator = _fake_forward("ltfast.equalization_loss", logits, target, reduction,
                                             {"tail_mask": tail_mask})
        return loss, denominator

    @lib.register_fake("ltfast::_equalization_loss_backward")
    def _(grad_loss, logits, target, tail_mask, denominator, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- lade
    @lib.register_fake("ltfast::_lade_forward")
    def _(logits, target, log_prior, ce_weight, alpha, remine_lambda, ignore_index):
        _fake_forward("ltfast.lade", logits, target, "mean", {"log_prior": log_prior})
        acc = _accumulate_dtype(logits)
        # row_stats [2, N], column_stats [4, C] (layouts: csrc/ops/lade/lade.h), num_valid int64.
        return (logits.new_empty((), dtype=acc), logits.new_empty((2, logits.shape[0]), dtype=acc),
                logits.new_empty((4, logits.shape[1]), dtype=acc), logits.new_empty((), dtype=torch.int64))

    @lib.register_fake("ltfast::_lade_backward")
    def _(grad_loss, logits, target, log_prior, row_stats, column_stats, num_valid, ce_weight, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- multi-expert losses
    @lib.register_fake("ltfast::_diverse_expert_loss_forward")
    def _(logits, target, adjustments, reduction, ignore_index, with_grad=False):
        op = "ltfast.diverse_expert_loss"
        _fake_expert_checks(op, logits, target, {"adjustments": adjustments})
        torch._check(adjustments.dim() == 2 and adjustments.shape[0] == logits.shape[1]
                     and adjustments.shape[1] == logits.shape[2],
                     lambda: f"{op}: adjustments must be a 2-D tensor [E = {logits.shape[1]}, C = {logits.shape[2]}], "
                             f"got shape {tuple(adjustments.shape)}")
        torch._check(reduction in _REDUCTIONS,
                     lambda: f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        acc = _accumulate_dtype(logits)
        rows, experts = logits.shape[0], logits.shape[1]
        loss = logits.new_empty((rows,) if reduction == "none" else (), dtype=acc)
        # row_stats [2, N, E], denominator, grad_logits (layouts: csrc/ops/multi_expert/multi_expert.h).
        return (loss, logits.new_empty((2, rows, experts), dtype=acc), logits.new_empty((), dtype=acc),
                _fake_forward_grad(logits, with_grad))

    @lib.register_fake("ltfast::_diverse_expert_loss_backward")
    def _(grad_loss, logits, target, adjustments, row_stats, denominator, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @lib.register_fake("ltfast::_ride_loss_forward")
    def _(logits, target, target_margin, weight, temperature, base_temperature, diversity_factor, ignore_index,
          with_grad=False):
        op = "ltfast.ride_loss"
        vectors = {"target_margin": target_margin, "weight": weight, "temperature": temperature}
        _fake_expert_checks(op, logits, target, vectors)
        for name, vector in vectors.items():
            if vector is not None:
                torch._check(vector.dim() == 1 and vector.shape[0] == logits.shape[2],
                             lambda: f"{op}: {name} must be a 1-D tensor of C = {logits.shape[2]} elements, got "
                                     f"shape {tuple(vector.shape)}")
        acc = _accumulate_dtype(logits)
        # row_stats [2, N, 2E + 1], denominators [3] (layouts: csrc/ops/multi_expert/multi_expert.h).
        return (logits.new_empty((), dtype=acc), logits.new_empty((2, logits.shape[0], 2 * logits.shape[1] + 1),
                                                                   dtype=acc),
                logits.new_empty((3,), dtype=acc), _fake_forward_grad(logits, with_grad))

    @lib.register_fake("ltfast::_ride_loss_backward")
    def _(grad_loss, logits, target, target_margin, weight, temperature, row_stats, denominators, base_temperature,
          diversity_factor, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- sampler draws (ltfast.data)
    @lib.register_fake("ltfast::class_aware_sample")
    def _(class_offsets, members, seed, epoch, start, count, num_samples_cls, epoch_length):
        torch._check(members.device == class_offsets.device,
                     lambda: "ltfast.class_aware_sample: members must be on the same device as class_offsets")
        return members.new_empty((count,))

    @lib.register_fake("ltfast::class_weighted_sample")
    def _(class_cdf, class_offsets, members, seed, epoch, start, count, epoch_length):
        torch._check(class_cdf.shape[0] == class_offsets.shape[0] - 1,
                     lambda: "ltfast.class_weighted_sample: class_cdf must have one entry per class")
        return members.new_empty((count,))


if _extension.AVAILABLE:
    _register()


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
        loss = _fast.balanced_softmax(logits, target, log_prior, reduction, ignore_index)
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
    it is a device-side assert that leaves the CUDA context unusable (see README, "Targets out of
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
        loss = _fast.adjusted_cross_entropy(logits, target, adjustment, target_margin, weight, gamma,
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
        loss = _fast.lade(logits, target, log_prior, alpha, remine_lambda, ignore_index)
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
        loss = _fast.lade_regularizer(logits, target, log_prior, remine_lambda, ignore_index)
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
        loss = _fast.softmax_equalization_loss(logits, target, tail_mask, seed, gamma, reduction, ignore_index)
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
        loss = _fast.equalization_loss(logits, target, tail_mask, reduction, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.equalization_loss.default(logits, target, tail_mask, reduction, ignore_index)


from . import soft_targets as _soft  # noqa: E402  (registers its fake kernels with _fake_forward above)


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
        loss = _fast.diverse_expert_loss(logits, target, adjustments, reduction, ignore_index)
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
        loss = _fast.ride_loss(logits, target, target_margin, weight, temperature, base_temperature,
                               diversity_factor, ignore_index)
        if loss is not NotImplemented:
            return loss
    return torch.ops.ltfast.ride_loss.default(logits, target, target_margin, weight, temperature, base_temperature,
                                              diversity_factor, ignore_index)
