"""Plain-PyTorch versions of every ltfast loss, written from the survey's code as transcribed in
shared/reference/seed-methods.md §1. They are the test oracle, the baseline of
benchmarks/throughput.py, and the fallback used when ltfast._C is unavailable.

They take the same arguments as the torch.ops.ltfast ops and compute in the dtype PyTorch's type
promotion gives (bfloat16 logits plus a float32 prior compute in float32), as user code would.
"""
from __future__ import annotations

import math

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


def lade_regularizer(logits: Tensor, target: Tensor, log_prior: Tensor, remine_lambda: float = 0.1,
                     ignore_index: int = -100) -> Tensor:
    """LADER, transcribed from the survey's Main-codebase/loss/LADELoss.py (seed-methods.md §1.5):
    C x N masks, mean target logit per class with the 1e-8 term, column logsumexp over the batch with
    the -log(pi + 1e-9) + log(1/C + 1e-9) shift, remine_lambda * S^2, and -sum_c pi_c E_c.
    Ignored rows are dropped first. pi_c = exp(log_prior_c) (see ltfast.lade_loss)."""
    num_classes = logits.shape[1]
    valid = target != ignore_index
    y_pred, target = logits[valid], target[valid]
    prior = log_prior.exp()
    classes = torch.arange(num_classes, device=target.device).view(-1, 1)
    per_cls_pred_spread = y_pred.T * (target == classes)                                      # C x N
    pred_spread = (y_pred - log_prior + math.log(1.0 / num_classes + 1e-9)).T                  # C x N
    num_samples_per_cls = torch.sum(target == classes, -1).float()                            # C
    first_term = torch.sum(per_cls_pred_spread, -1) / (num_samples_per_cls + 1e-8)
    rows = per_cls_pred_spread.size(-1)
    # No row left (N = 0 or all ignored): log-mean-exp over nothing is -inf - log(0) = NaN, as the op
    # returns; math.log(0) raised "math domain error".
    second_term = torch.logsumexp(pred_spread, -1) - (math.log(rows) if rows else -math.inf)
    estim_loss = first_term - second_term - remine_lambda * second_term ** 2
    return -torch.sum(estim_loss * prior)


def lade(logits: Tensor, target: Tensor, log_prior: Tensor, alpha: float = 0.1, remine_lambda: float = 0.1,
         ignore_index: int = -100) -> Tensor:
    """LADE as the survey trains it (lade.yaml): PriorCELoss (weight 1) + alpha * LADELoss."""
    return (balanced_softmax(logits, target, log_prior, "mean", ignore_index)
            + alpha * lade_regularizer(logits, target, log_prior, remine_lambda, ignore_index))


def softmax_equalization_loss(logits: Tensor, target: Tensor, tail_mask: Tensor, gamma: float = 0.9,
                              reduction: str = "mean", ignore_index: int = -100,
                              keep: Tensor | None = None, seed: Tensor | None = None) -> Tensor:
    """SEQL as in the survey's Main-codebase/loss/SEQLLoss.py (seed-methods.md §1.3): a uniform draw
    per (sample, class) element, keep = head | (u > gamma) | target, dropped logits replaced by
    -1e7 (in float32, as the survey's mask is), then cross-entropy. ``keep`` ([N, C] bool) replaces
    the random draw, so a test can replay the mask an ltfast kernel used. ``seed`` (int64 [2], as
    :func:`ltfast.ops.new_seed` draws it) makes the draw a function of the seed (a generator seeded
    from it) instead of torch's global generator: the fallback then gives the same loss for the same
    seed, as the op does (not the op's mask: the kernels hash positions). ``tail_mask`` is read as
    ``!= 0`` (a uint8 2 or 255 is True), as the op reads it."""
    num_classes = logits.shape[1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    is_target = F.one_hot(safe_target, num_classes).bool()
    if keep is None and seed is not None:
        words = [int(v) & 0xFFFFFFFF for v in torch.as_tensor(seed).flatten().tolist()]
        generator = torch.Generator(device=logits.device)
        # torch's CPU generator keeps only the low 32 bits of a seed: fold both words into them.
        mixed = ((words[0] * 0x9E3779B97F4A7C15) ^ (words[-1] * 0xBF58476D1CE4E5B9 + 1)) & (2**64 - 1)
        generator.manual_seed((mixed ^ (mixed >> 32)) & 0xFFFFFFFF)
        keep = torch.rand(logits.shape, device=logits.device, generator=generator) > gamma
    elif keep is None:
        keep = torch.rand(logits.shape, device=logits.device) > gamma
    keep = keep | ~tail_mask.bool()[None, :] | is_target
    masked = torch.where(keep, logits, torch.full_like(logits, -1e7, dtype=torch.promote_types(logits.dtype, torch.float32)))
    return F.cross_entropy(masked, target, reduction=reduction, ignore_index=ignore_index)


def equalization_loss(logits: Tensor, target: Tensor, tail_mask: Tensor, reduction: str = "mean",
                      ignore_index: int = -100) -> Tensor:
    """Sigmoid EQL (Tan et al. 2020): per-class BCE with logits against the one-hot target, the
    negative term of tail classes suppressed (w = 0 where tail_mask[c] != 0 and y = 0, else 1; a
    uint8 mask of 2 or 255 is True, never a factor), summed over classes, and
    for 'mean' divided by the number of non-ignored rows.

    Per element as ltfast.equalization_loss defines it (csrc/common/softmax_math.h,
    eql_element_loss): a suppressed element is exactly 0 (loss and gradient) whatever its logit;
    otherwise ``max(y ? -z : z, 0) + log1p(exp(-|z|)) = -logsigmoid(y ? z : -z)``, which is
    ``F.binary_cross_entropy_with_logits`` for finite z and its limit (0 or +inf) at z = +-inf,
    where PyTorch's formula gives NaN (logsigmoid's gradient is the analytic sigmoid(z) - y there
    too). Ignored rows are exactly 0 too."""
    num_classes = logits.shape[1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    is_target = F.one_hot(safe_target, num_classes).bool()
    suppressed = tail_mask.bool()[None, :] & ~is_target
    dropped = suppressed | ~valid[:, None]
    # Dropped elements never enter the arithmetic (torch.where's gradient to the other branch is an
    # exact 0, even where that branch is NaN).
    z = torch.where(dropped, torch.zeros_like(logits), logits)
    per_element = -F.logsigmoid(torch.where(is_target, z, -z))
    loss = torch.where(dropped, torch.zeros_like(per_element), per_element).sum(1)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


# ---------------------------------------------------------------------------------------------
# Sampler index draws (torch.ops.ltfast.class_aware_sample / class_weighted_sample), in numpy
# uint64 arithmetic, which wraps exactly as the kernels' unsigned integers do. Element by element
# the same counter-based functions as csrc/common/counter_random.h and csrc/ops/sampling/sampling.h,
# vectorised over positions: the test oracle, and the fallback when ltfast._C is unavailable.
_U32 = 0xFFFFFFFF
_CLASS_ORDER_TAG, _MEMBER_ORDER_TAG, _WEIGHTED_TAG = 0x636C6173, 0x6D656D62, 0x77676874


def _hash32(x):
    import numpy as np
    x = np.asarray(x, dtype=np.uint64) & _U32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _U32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _U32
    x ^= x >> np.uint64(16)
    return x


def _mix_key(key, value):
    import numpy as np
    value = np.asarray(value, dtype=np.uint64)
    return _hash32(_hash32(np.asarray(key, dtype=np.uint64) ^ (value & _U32)) ^ (value >> np.uint64(32)))


def _seed_key(seed: int, tag: int):
    return _mix_key(_hash32(tag), seed & 0xFFFFFFFFFFFFFFFF)


def _uniform01(key, counter):
    import numpy as np
    first = _mix_key(key, counter)
    second = _hash32(first ^ np.uint64(0x68E31DA4))
    bits = ((first << np.uint64(21)) ^ (second >> np.uint64(11))) & np.uint64((1 << 53) - 1)
    return bits.astype(np.float64) * (1.0 / 9007199254740992.0)


def _permute(position, n, key):
    """Keyed 4-round Feistel permutation of [0, n) with cycle walking, at the given positions
    (n and key may be arrays of the same length)."""
    import numpy as np
    position = np.asarray(position, dtype=np.uint64)
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), position.shape)
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), position.shape)
    bits = np.ceil(np.log2(np.maximum(n, 1).astype(np.float64))).astype(np.uint64)
    # log2 rounding: fix up so that 2**bits >= n > 2**(bits - 1)
    bits = np.where((np.uint64(1) << bits) < n, bits + np.uint64(1), bits)
    bits = np.maximum(bits, np.uint64(2))
    bits = bits + (bits & np.uint64(1))
    half = bits // np.uint64(2)
    mask = (np.uint64(1) << half) - np.uint64(1)
    round_keys = [_hash32((key + np.uint64(0x9E3779B9 * (r + 1))) & _U32) for r in range(4)]
    x = position.copy()
    todo = n > 1
    while todo.any():
        left, right = x >> half, x & mask
        for r in range(4):
            f = _hash32((right & _U32) ^ round_keys[r]) & mask
            left, right = right, left ^ f
        walked = (left << half) | right
        x = np.where(todo, walked, x)
        todo = todo & (x >= n)
    return np.where(n > 1, x, np.uint64(0))


def _check_sample_range(op: str, start: int, count: int, epoch_length: int) -> None:
    # The ops' argument checks (csrc/ops/sampling/sampling_args.cpp), with the same messages.
    if start < 0:
        raise ValueError(f"ltfast.{op}: start must be >= 0, got {start}")
    if count < 0:
        raise ValueError(f"ltfast.{op}: count must be >= 0, got {count}")
    if start + count > epoch_length:  # Python ints: no overflow
        raise ValueError(f"ltfast.{op}: start + count ({start} + {count}) must not exceed epoch_length "
                         f"({epoch_length})")


def class_aware_sample(class_offsets: Tensor, members: Tensor, seed: int, epoch: int, start: int, count: int,
                       num_samples_cls: int, epoch_length: int) -> Tensor:
    """The survey's ClassAwareSampler as a function of (seed, epoch, position); see
    csrc/ops/sampling/sampling.h for the derivation."""
    import numpy as np
    _check_sample_range("class_aware_sample", start, count, epoch_length)
    offsets = class_offsets.cpu().numpy().astype(np.int64)
    member_array = members.cpu().numpy()
    num_classes = np.uint64(len(offsets) - 1)
    per_class = np.uint64(num_samples_cls)
    groups_per_epoch = np.uint64((epoch_length + num_samples_cls - 1) // num_samples_cls)
    position = np.arange(start, start + count, dtype=np.uint64)
    group = np.uint64(epoch) * groups_per_epoch + position // per_class
    within_group = position % per_class
    class_cycle = group // num_classes
    cls = _permute(group % num_classes, num_classes, _mix_key(_seed_key(seed, _CLASS_ORDER_TAG), class_cycle))
    begin = offsets[cls.astype(np.int64)]
    size = (offsets[cls.astype(np.int64) + 1] - begin).astype(np.uint64)
    draw = class_cycle * per_class + within_group
    class_key = _mix_key(_seed_key(seed, _MEMBER_ORDER_TAG), cls)
    slot = _permute(draw % size, size, _mix_key(class_key, draw // size))
    return torch.from_numpy(member_array[begin + slot.astype(np.int64)].copy()).to(members.device)


def class_weighted_sample(class_cdf: Tensor, class_offsets: Tensor, members: Tensor, seed: int, epoch: int,
                          start: int, count: int, epoch_length: int) -> Tensor:
    """Class by inverse CDF, then a uniform member of it, as a function of (seed, epoch, position)."""
    import numpy as np
    _check_sample_range("class_weighted_sample", start, count, epoch_length)
    cdf = class_cdf.cpu().numpy().astype(np.float64)
    offsets = class_offsets.cpu().numpy().astype(np.int64)
    member_array = members.cpu().numpy()
    key = _seed_key(seed, _WEIGHTED_TAG)
    counter = np.uint64(epoch) * np.uint64(epoch_length) + np.arange(start, start + count, dtype=np.uint64)
    u = _uniform01(key, np.uint64(2) * counter)
    cls = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)
    begin = offsets[cls]
    size = offsets[cls + 1] - begin
    slot = np.minimum((_uniform01(key, np.uint64(2) * counter + np.uint64(1)) * size).astype(np.int64), size - 1)
    return torch.from_numpy(member_array[begin + slot].copy()).to(members.device)


# ---------------------------------------------------------------- soft targets (ltfast/soft_targets.py)
def _smoothed_rows(adjusted: Tensor, target: Tensor, weight: Tensor | None, label_smoothing, gamma: float,
                   ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row loss of one hard-target term and the rows' weights w_y (0 for ignored rows).

    A float label_smoothing: F.cross_entropy(reduction='none') itself (the focal form of
    adjusted_cross_entropy for gamma > 0). A [C] tensor: F.cross_entropy's smoothing formula with the
    row's eps = label_smoothing[y], (1 - eps) * w_y * nll_y + eps / C * sum_c w_c * (-log p_c)."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    row_weight = valid.to(adjusted.dtype) if weight is None else weight.to(adjusted.dtype)[safe_target] * valid
    if not (isinstance(label_smoothing, Tensor) and label_smoothing.dim() > 0):
        eps = float(label_smoothing)
        if gamma != 0.0:
            rows = adjusted_cross_entropy(adjusted, target, weight=weight, gamma=gamma, reduction="none",
                                          ignore_index=ignore_index)
        else:
            rows = F.cross_entropy(adjusted, target, weight=weight, reduction="none", ignore_index=ignore_index,
                                   label_smoothing=eps)
        return rows, row_weight
    eps = label_smoothing.to(adjusted.dtype)[safe_target]
    log_p = F.log_softmax(adjusted, dim=1)
    class_weight = torch.ones_like(adjusted[0]) if weight is None else weight.to(adjusted.dtype)
    nll = F.nll_loss(log_p, target, weight=weight if weight is None else class_weight, reduction="none",
                     ignore_index=ignore_index)                                   # w_y * nll_y, 0 if ignored
    smooth = -(log_p * class_weight).sum(dim=1)                                  # sum_c w_c * (-log p_c)
    rows = (1.0 - eps) * nll + eps / adjusted.shape[1] * smooth
    return torch.where(valid, rows, torch.zeros_like(rows)), row_weight


def mixed_cross_entropy(logits: Tensor, target: Tensor, target_b: Tensor | None = None, mix_weight=None,
                        adjustment: Tensor | None = None, target_margin: Tensor | None = None,
                        weight: Tensor | None = None, gamma: float = 0.0, label_smoothing=0.0,
                        reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Mixup's lambda combination of two plain cross-entropies (ltfast.mixed_cross_entropy):
    ``lam * CE(z + adj, target) + (1 - lam) * CE(z + adj, target_b)``, each term reduced on its own
    (its 'mean' divides by the sum of w_y over its non-ignored rows); lam a float, 0-dim or [N]
    tensor. Without target_b: the single hard-target loss (target_margin allowed)."""
    if isinstance(label_smoothing, Tensor) and label_smoothing.dim() > 0 and gamma != 0.0:
        raise ValueError("mixed_cross_entropy: gamma > 0 together with label smoothing is not supported")
    adjusted = logits if adjustment is None else logits + adjustment
    if target_margin is not None:
        if target_b is not None:
            raise ValueError("mixed_cross_entropy: target_margin cannot be combined with target_b")
        valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        margin = target_margin.to(adjusted.dtype)[safe_target] * valid
        adjusted = adjusted - F.one_hot(safe_target, adjusted.shape[-1]).to(adjusted.dtype) * margin[:, None]
    if target_b is None and mix_weight is not None:
        raise ValueError("mixed_cross_entropy: mix_weight is only meaningful together with target_b")
    terms = [(target, 1.0)]
    if target_b is not None:
        lam = mix_weight if isinstance(mix_weight, Tensor) else torch.tensor(float(mix_weight))
        lam = lam.to(adjusted.dtype).to(adjusted.device)
        terms = [(target, lam), (target_b, 1.0 - lam)]
    total = None
    for term_target, term_lambda in terms:
        rows, row_weight = _smoothed_rows(adjusted, term_target, weight, label_smoothing, gamma, ignore_index)
        rows = rows * term_lambda
        if reduction == "none":
            value = rows
        elif reduction == "sum":
            value = rows.sum()
        else:
            value = rows.sum() / row_weight.sum()
        total = value if total is None else total + value
    return total


def probability_cross_entropy(logits: Tensor, target: Tensor, adjustment: Tensor | None = None,
                              weight: Tensor | None = None, label_smoothing: float = 0.0,
                              reduction: str = "mean") -> Tensor:
    """F.cross_entropy with a probability target [N, C] on ``logits + adjustment``."""
    adjusted = logits if adjustment is None else logits + adjustment
    if weight is not None:
        weight = weight.to(adjusted.dtype)
    return F.cross_entropy(adjusted, target.to(adjusted.dtype), weight=weight, reduction=reduction,
                           label_smoothing=label_smoothing)


def diverse_expert_loss(logits: Tensor, target: Tensor, adjustments: Tensor, reduction: str = "mean",
                        ignore_index: int = -100) -> Tensor:
    """SADE's loss (seed-methods.md §6, Ensemble-codebase ``DiverseExpertLoss``) on expert logits
    ``[N, E, C]``: ``sum_e F.cross_entropy(logits[:, e] + adjustments[e], target)``, each term with the
    given reduction (so ``'none'`` is the per-row sum over experts)."""
    return sum(F.cross_entropy(logits[:, e] + adjustments[e], target, reduction=reduction, ignore_index=ignore_index)
               for e in range(logits.shape[1]))


def ride_loss(logits: Tensor, target: Tensor, target_margin: Tensor | None = None, weight: Tensor | None = None,
              temperature: Tensor | None = None, base_temperature: float = 1.0, diversity_factor: float = -0.2,
              ignore_index: int = -100) -> Tensor:
    """RIDE's loss (seed-methods.md §6 and §1.9, Ensemble-codebase ``RIDELoss``) on expert logits
    ``[N, E, C]``, reduction 'mean': per expert k, the LDAM-DRW cross-entropy of ``logits[:, k]``
    (``target_margin[y]`` subtracted from the target logit, ``weight`` with the weighted mean) plus
    ``diversity_factor * Tbar^2 * KL(pbar || softmax(logits[:, k] / T))`` with ``reduction='batchmean'``,
    ``pbar = softmax(mean_k logits[:, k] / T)`` without gradient, ``T = base_temperature * temperature``
    (or ``base_temperature``) and ``Tbar = mean(T)``. Ignored rows are left out of both terms and of
    the KL's batch size."""
    valid = target != ignore_index
    if temperature is None:
        divisor = base_temperature
        mean_temperature = base_temperature
    else:
        divisor = base_temperature * temperature.to(logits.dtype)
        mean_temperature = divisor.mean()
    with torch.no_grad():
        mean_probability = F.softmax(logits.mean(dim=1) / divisor, dim=-1)
    num_valid = valid.sum()
    loss = 0
    for k in range(logits.shape[1]):
        expert = logits[:, k]
        loss = loss + adjusted_cross_entropy(expert, target, target_margin=target_margin, weight=weight,
                                             ignore_index=ignore_index)
        log_probability = F.log_softmax(expert / divisor, dim=-1)
        kl_rows = F.kl_div(log_probability, mean_probability, reduction="none").sum(-1)
        kl = torch.where(valid, kl_rows, torch.zeros_like(kl_rows)).sum() / num_valid
        loss = loss + diversity_factor * mean_temperature * mean_temperature * kl
    return loss


def reslt_loss(branch_logits: Tensor, target: Tensor, branch_classes: Tensor, beta: float = 0.99,
               epsilon: float = 1e-7, fusion_epsilon: float = 1e-7) -> Tensor:
    """ResLT's loss (Cui et al. 2022, the seed's ``ImageNetTrain_reslt.py``) on the three branches'
    logits ``[N, 3, C]``: ``(1 - beta) F + beta I`` with, for ``l_e(z) = -log(softmax(z)_y + e)``,

    - ``I = sum_k sum_n m[k, y_n] l_epsilon(z_k) / sum_k sum_n m[k, y_n]`` (``branch_classes`` m
      ``[3, C]``: the classes each branch trains on);
    - ``F = mean_n l_fusion_epsilon(z_0 + z_1 + z_2)`` (``fusion_epsilon`` 0: plain cross-entropy,
      the seed's CIFAR scripts)."""
    dtype = torch.promote_types(branch_logits.dtype, torch.float32)

    def nll(logits: Tensor, eps: float) -> Tensor:
        p = torch.softmax(logits.to(dtype), dim=1).gather(1, target.view(-1, 1)).squeeze(1)
        return -torch.log(p + eps) if eps > 0 else F.cross_entropy(logits.to(dtype), target, reduction="none")
    weights = branch_classes.to(dtype)[:, target]  # [3, N]
    branch = torch.stack([nll(branch_logits[:, k], epsilon) for k in range(branch_logits.shape[1])])
    individual = (weights * branch).sum() / weights.sum()
    fused = nll(branch_logits.sum(dim=1), fusion_epsilon).mean()
    return (1.0 - beta) * fused + beta * individual


def paco_loss(similarity: Tensor, labels: Tensor, key_labels: Tensor, sup_logits: Tensor | None = None,
              log_prior: Tensor | None = None, temperature: float = 0.07, alpha: float = 0.05, beta: float = 1.0,
              gamma: float = 1.0, sup_temperature: float = 1.0, base_temperature: float | None = None,
              reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """PaCo's parametric contrastive loss (the survey's ``PaCo-codebase/losses.py``, ``PaCoLoss.forward``)
    on the similarities ``similarity = q @ keys.T`` ``[B, M]`` (the first B keys are the anchors; PaCo:
    keys = [q, k, queue]) and the classifier's ``sup_logits`` ``[B, C]``; the math is in
    csrc/ops/paco/paco.h. Same as the original for every row with a positive; rows whose label is
    ``ignore_index`` or that have no positive (the original: 0 / 0) give 0 and are not counted."""
    dtype = torch.promote_types(similarity.dtype, torch.float32)
    base_temperature = temperature if base_temperature is None else base_temperature
    batch, num_keys = similarity.shape
    valid = labels != ignore_index
    not_self = torch.ones(batch, num_keys, dtype=torch.bool, device=similarity.device)
    not_self[torch.arange(batch), torch.arange(batch)] = False
    key_positive = (labels[:, None] == key_labels[None, :]) & (key_labels != ignore_index)[None, :] & not_self
    columns = [similarity.to(dtype) / temperature]
    positives = [alpha * key_positive.to(dtype)]
    denominator_weights = [gamma * not_self.to(dtype)]
    if sup_logits is not None:
        adjusted = sup_logits.to(dtype) if log_prior is None else sup_logits.to(dtype) + log_prior.to(dtype)
        one_hot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), sup_logits.shape[1]).to(dtype)
        columns.insert(0, adjusted / sup_temperature)
        positives.insert(0, beta * one_hot)
        denominator_weights.insert(0, torch.ones_like(adjusted))
    logits = torch.cat(columns, dim=1)
    mask = torch.cat(positives, dim=1) * valid[:, None]
    weights = torch.cat(denominator_weights, dim=1)
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = shifted - torch.log((torch.exp(shifted) * weights).sum(dim=1, keepdim=True) + 1e-12)
    positive_weight = mask.sum(dim=1)
    counted = positive_weight > 0
    mean_log_prob = (mask * log_prob).sum(dim=1) / torch.where(counted, positive_weight, torch.ones_like(positive_weight))
    per_row = torch.where(counted, -(temperature / base_temperature) * mean_log_prob, torch.zeros_like(mean_log_prob))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / counted.sum()
