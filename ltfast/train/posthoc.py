"""Post-hoc long-tail corrections of a trained classifier (no retraining), on stored features.

- Logit adjustment (Menon et al., ICLR 2021, eq. 3 "post-hoc"): predict ``argmax_c z_c - tau·log pi_c``
  with ``pi`` the training class prior. tau = 1 is the Bayes-optimal correction of a softmax
  trained on the long-tailed prior for the balanced error; the paper tunes tau on held-out data.
- tau-normalisation (Kang et al., ICLR 2020, "Decoupling"): classifier rows ``W_c / ||W_c||^tau``.
  CE on long-tailed data grows the norms of head-class rows; dividing by a power of the norm
  evens out the decision boundaries. As in the authors' code (``tau_normalization.py``, dot
  product of the features with the normalised weights), the bias is dropped.

Both act on one pass of the network: the head's input features ``f`` [N, D] and its weight
``W`` [C, D] / bias give every variant as ``f @ W'^T (+ b) - tau_la·log pi``, so a grid search of
hundreds of (tau_norm, tau_la) pairs costs matrix products, not forward passes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# tau grids for `auto`: logit adjustment's best tau is ~1 (Menon et al. report 1 as a strong default
# and tune in [0, 2]); Kang et al.'s tau-norm optimum on ImageNet-LT was ~0.7, inside [0, 2].
LA_GRID = [round(0.05 * i, 2) for i in range(41)]       # 0, 0.05, ..., 2.0
NORM_GRID = [round(0.1 * i, 1) for i in range(21)]      # 0, 0.1, ..., 2.0


def tau_normalized_weight(weight: Tensor, tau: float) -> Tensor:
    """``W_c / ||W_c||^tau`` row-wise (tau = 0: W unchanged; tau = 1: unit rows)."""
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight / norms.pow(tau)


def logits_from_features(features: Tensor, weight: Tensor, bias: Optional[Tensor], tau_norm: Optional[float]) -> Tensor:
    """The head's logits from its input features; with ``tau_norm`` the weight is normalised and
    the bias dropped (Kang et al.'s code)."""
    if tau_norm is None:
        out = features @ weight.t()
        return out + bias if bias is not None else out
    return features @ tau_normalized_weight(weight, tau_norm).t()


def adjust(logits: Tensor, log_prior: Tensor, tau: Optional[float]) -> Tensor:
    return logits if not tau else logits - tau * log_prior.to(logits)


def balanced_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean per-class accuracy in percent over the classes present in ``labels`` (the selection
    criterion: on a balanced validation split it is top-1; on an unbalanced one it is the number
    the long-tail literature reports)."""
    pred = logits.argmax(1)
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    present = total > 0
    return float((correct[present] / total[present]).mean()) * 100.0


def confusion_matrix(logits_or_pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """int64 [C, C]: row = true class, column = predicted class."""
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def choose(features: Optional[Tensor], logits: Tensor, labels: Tensor, weight: Optional[Tensor],
           bias: Optional[Tensor], log_prior: Tensor, la: Optional[float | str], norm: Optional[float | str],
           la_grid: Sequence[float] = LA_GRID, norm_grid: Sequence[float] = NORM_GRID) -> dict:
    """Picks the `auto` values on a (validation) split by balanced accuracy; fixed values stay.
    Jointly when both are `auto` (they interact: tau-norm already shrinks head-class logits).
    Ties go to the smallest tau (the least change to the model). Returns
    {"logit_adjust", "tau_norm", "score", "plain_score", "grid": [[tau_norm, tau_la, score], ...]}."""
    num_classes = logits.shape[1]
    norms = norm_grid if norm == "auto" else [norm]
    las = la_grid if la == "auto" else [la]
    best, grid = None, []
    for tn in norms:
        base = logits if tn is None else logits_from_features(features, weight, bias, tn)
        for tl in las:
            score = balanced_accuracy(adjust(base, log_prior, tl), labels, num_classes)
            grid.append([tn, tl, score])
            if best is None or score > best[2] + 1e-9:
                best = (tn, tl, score)
    return {"tau_norm": best[0], "logit_adjust": best[1], "score": best[2],
            "plain_score": balanced_accuracy(logits, labels, num_classes), "grid": grid}
