"""Stand-ins for two classes that other branches of issue 15 provide; REPLACED AT MERGE.

- ``CrossEntropyLoss``: what ``ltfast.nn.CrossEntropyLoss`` (soft-targets branch, fused op) will be:
  ``nn.CrossEntropyLoss``'s arguments with ``label_smoothing`` a float or a per-class ``[C]`` tensor
  (row i smooths with ``label_smoothing[target_i]``) and ``forward(input, target, target_b=None,
  mix_weight=None)`` for mixup. Here in plain PyTorch; ``weight`` is not supported (MiSLAS does not
  use it). ``ltfast.train.mislas.label_aware_smoothing_loss`` picks ``ltfast.nn.CrossEntropyLoss``
  as soon as it exists, so this class is then unused and can be deleted.
- ``LearnableWeightScaling``: the decoupled branch's ``ltfast.train.decoupled.LearnableWeightScaling``
  (used when that module exists).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with per-class label smoothing, as MiSLAS's ``LabelAwareSmoothing``:
    ``(1 - e_y) * (-log p_y) + e_y * mean_c(-log p_c)`` per row with ``e_y = label_smoothing[y]``
    (for a float, exactly ``F.cross_entropy(..., label_smoothing=e)``)."""

    supports_mixed_targets = True

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: Union[float, Tensor] = 0.0) -> None:
        super().__init__()
        if weight is not None:
            raise ValueError("weight: not supported by the plain-PyTorch stand-in (ltfast._mislas_pending)")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        smoothing = torch.as_tensor(label_smoothing, dtype=torch.float32)
        if smoothing.dim() > 1 or not torch.isfinite(smoothing).all() or (smoothing < 0).any() or (smoothing > 1).any():
            raise ValueError(f"label_smoothing must be a float or a [C] tensor with values in [0, 1], got "
                             f"{label_smoothing!r}")
        self.register_buffer("label_smoothing", smoothing)
        self.ignore_index, self.reduction = ignore_index, reduction

    def _rows(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if input.dim() != 2:
            raise ValueError(f"input must be [N, C] logits, got shape {tuple(input.shape)}")
        if self.label_smoothing.dim() == 1 and self.label_smoothing.numel() != input.shape[1]:
            raise ValueError(f"label_smoothing has {self.label_smoothing.numel()} entries, the logits "
                             f"{input.shape[1]} classes")
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        log_p = F.log_softmax(input.float(), dim=1)
        nll = -log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
        smooth = -log_p.mean(dim=1)
        eps = self.label_smoothing[safe] if self.label_smoothing.dim() == 1 else self.label_smoothing
        return torch.where(valid, (1 - eps) * nll + eps * smooth, torch.zeros_like(nll)), valid

    def forward(self, input: Tensor, target: Tensor, target_b: Optional[Tensor] = None,
                mix_weight: Optional[Tensor] = None) -> Tensor:
        rows, valid = self._rows(input, target)
        if target_b is not None:
            if mix_weight is None:
                raise ValueError("mix_weight: required with target_b (the weight of target)")
            rows_b, valid_b = self._rows(input, target_b)
            lam = torch.as_tensor(mix_weight, dtype=rows.dtype, device=rows.device)
            rows, valid = lam * rows + (1 - lam) * rows_b, valid & valid_b
        if self.reduction == "none":
            return rows.to(input.dtype)
        total = rows.sum()
        if self.reduction == "sum":
            return total.to(input.dtype)
        return (total / valid.sum()).to(input.dtype)


class LearnableWeightScaling(nn.Module):
    """Per-class learnable scale of the logits, ``s_c * z_c``, initialised to 1 (MiSLAS /
    classifier-balancing LWS)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        self.learned_norm = nn.Parameter(torch.ones(1, num_classes))

    def forward(self, logits: Tensor) -> Tensor:
        return logits * self.learned_norm
