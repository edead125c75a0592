"""LADER (the survey's ``LADELoss.forward``) with the original's exact class weights.

``ltfast.lade_regularizer`` weights class c by ``exp(log_prior_c) = pi_c + 1e-9`` and shifts the
column log-sum-exp by ``log(1/C + 1e-9)`` in float64. The survey's code weights by ``pi_c`` itself and
computes the shift in float32. Both differences are far below float32 training noise but visible in
float64 (e.g. 1e-9 * sum_c E_c ~ 1e-6 on the loss at C = 1000), so the compat class composes the
fused LADE kernels differently: the private forward op supplies the column log-sum-exp of the
logits (the only ``[N, C]`` reduction), the ``[C]`` terms of the original are computed here with its
own constants, and the private backward op receives the original's per-class gradient
coefficients, ``pi_c (1 + 2 lambda S_c)`` and ``pi_c / (n_c + 1e-8)``. The result: the original's
value and gradient at the fused kernels' cost (one read of the logits forward, one read and one
write backward).
"""
from __future__ import annotations


import torch
from torch import Tensor

from ltfast import _extension
from ltfast.compat._common import IGNORE_INDEX


def _accumulate_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _class_terms(logits: Tensor, target: Tensor, num_classes: int, acc: torch.dtype):
    """(sum of the target logits per class, n_c + 1e-8 computed in float32 as the original's
    ``.float()`` counts) over the rows whose target is not ignored. Called after the op has checked
    that every target is in [0, C) or -100, so clamping at 0 only redirects the ignored rows, whose
    contributions are zeroed."""
    valid = (target != IGNORE_INDEX).to(torch.float32)
    safe_target = target.clamp(min=0)
    at_target = logits.detach().gather(1, safe_target[:, None]).view(-1).to(acc) * valid.to(acc)
    target_sum = torch.zeros(num_classes, dtype=acc, device=logits.device).index_add_(0, safe_target, at_target)
    counts = torch.zeros(num_classes, dtype=torch.float32, device=logits.device).index_add_(0, safe_target, valid)
    return target_sum, counts.add_(1e-8).to(acc)


def _lader_terms(column_lse: Tensor, target_sum: Tensor, count_term: Tensor, log_prior: Tensor, prior: Tensor,
                 balanced_log_prior: Tensor, num_rows: Tensor, remine_lambda: float):
    acc = column_lse.dtype
    first = target_sum / count_term
    second = column_lse - log_prior.to(acc) + balanced_log_prior.to(acc) - torch.log(num_rows.to(acc))
    estimate = first - second - remine_lambda * second ** 2
    loss = -torch.sum(estimate * prior.to(acc))
    return loss, second


class _LaderFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, log_prior, prior, balanced_log_prior, remine_lambda):
        acc = _accumulate_dtype(logits)
        lp = log_prior.to(acc)
        # ce_weight 0, alpha 1: the op's own loss value is not used, only its column statistics.
        logits = logits.contiguous()  # once: the op and its backward then read this very tensor
        _, row_stats, stats, num_valid = torch.ops.ltfast._lade_forward(
            logits, target, lp, 0.0, 1.0, float(remine_lambda), IGNORE_INDEX)
        target_sum, count_term = _class_terms(logits, target, logits.shape[1], acc)
        # column_stats rows 0 and 1: column max M_c and log sum_i exp(z_ic - M_c) (csrc/ops/lade/lade.h);
        # the column log-sum-exp is their sum, taken in float64 so L_c keeps its digits at |z| ~ 1e6.
        column_lse = (stats[0].double() + stats[1].double()).to(acc)
        loss, second = _lader_terms(column_lse, target_sum, count_term, log_prior, prior, balanced_log_prior,
                                    num_valid, float(remine_lambda))
        p = prior.to(acc)
        coefficients = torch.stack([stats[0], stats[1], p * (1.0 + 2.0 * remine_lambda * second), p / count_term])
        ctx.save_for_backward(logits, target, lp, row_stats, coefficients, num_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lp, row_stats, coefficients, num_valid = ctx.saved_tensors
        grad = torch.ops.ltfast._lade_backward(grad_loss, logits, target, lp, row_stats, coefficients, num_valid,
                                               0.0, IGNORE_INDEX)
        return grad, None, None, None, None, None


def _lader_reference(logits, target, log_prior, prior, balanced_log_prior, remine_lambda):
    """Plain-PyTorch path (used when ltfast._C is not built): the same terms with autograd."""
    acc = _accumulate_dtype(logits)
    valid = target != IGNORE_INDEX
    rows = logits[valid].to(acc)
    _, count_term = _class_terms(logits, target, logits.shape[1], acc)
    valid_target = target[valid]
    target_sum = torch.zeros(logits.shape[1], dtype=acc, device=logits.device).index_add(
        0, valid_target, rows.gather(1, valid_target[:, None]).squeeze(1))
    column_lse = torch.logsumexp(rows, 0)
    num_rows = torch.tensor(float(rows.shape[0]), dtype=acc, device=logits.device)
    loss, _ = _lader_terms(column_lse, target_sum, count_term, log_prior, prior, balanced_log_prior, num_rows,
                           float(remine_lambda))
    return loss


def lader(logits: Tensor, target: Tensor, log_prior: Tensor, prior: Tensor, balanced_log_prior: Tensor,
          remine_lambda: float) -> Tensor:
    """``-sum_c prior_c (F_c - S_c - remine_lambda S_c^2)`` with ``F_c`` the mean target logit of class
    c (sum / (n_c + 1e-8)), ``S_c = logsumexp_i(z_ic - log_prior_c + balanced_log_prior) - log N``
    (rows with target -100 excluded). Returned in float32 (float64 for float64 logits)."""
    if not _extension.AVAILABLE:
        _extension.warn_fallback_once()
        return _lader_reference(logits, target, log_prior, prior, balanced_log_prior, remine_lambda)
    return _LaderFunction.apply(logits, target, log_prior, prior, balanced_log_prior, float(remine_lambda))
