"""nn.Module losses: drop-in replacements for ``nn.CrossEntropyLoss`` built from per-class
training counts. ``forward(input, target)`` takes ``[N, C]`` logits and ``[N]`` int64 targets and
accepts ``ignore_index``, ``reduction`` and ``label_smoothing`` with nn.CrossEntropyLoss's meaning.
Priors, margins and weights are float64 buffers: they follow ``.to(device)`` and are saved in the
``state_dict``, and the ops receive them in the logits' accumulation dtype (float64 for float64
logits, float32 otherwise, from a cached copy: see ``_ClassVectors``), so float64 logits see values
exact to float64.

The modules, one file per family: ``cross_entropy`` (CrossEntropyLoss, Balanced Softmax, logit
adjustment, weighted CE, LDAM-DRW, focal), ``equalization`` (SEQL, EQL), ``lade`` (LADE and the DDP
batch gather), ``multi_expert`` (SADE, RIDE, ResLT); ``_base`` holds what they share.
"""
from .cross_entropy import (BalancedSoftmaxLoss, CrossEntropyLoss, FocalLoss, LDAMLoss, LogitAdjustedLoss,
                            WeightedCrossEntropyLoss)
from .equalization import EqualizationLoss, SoftmaxEqualizationLoss
from .lade import LADELoss, gather_batch_with_grad
from .multi_expert import DiverseExpertLoss, ResLTLoss, RIDELoss

__all__ = ["CrossEntropyLoss", "BalancedSoftmaxLoss", "LogitAdjustedLoss", "WeightedCrossEntropyLoss", "LDAMLoss",
           "FocalLoss", "LADELoss", "gather_batch_with_grad", "SoftmaxEqualizationLoss", "EqualizationLoss",
           "DiverseExpertLoss", "RIDELoss", "ResLTLoss"]
