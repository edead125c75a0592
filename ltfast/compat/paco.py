"""Drop-in for ``PaCoLoss`` of the survey's ``PaCo-codebase/losses.py`` (parametric contrastive
learning, Cui et al. 2021; seed-methods.md §2.4), backed by the fused ``ltfast.paco_loss``.

In ``paco_lt.py`` replace ``from losses import PaCoLoss`` by ``from ltfast.compat.paco import
PaCoLoss``: same constructor, ``cal_weight_for_classes(cls_num_list)`` and ``forward(features, labels,
sup_logits)``. Only the similarity matmul ``features[:B] @ features.T`` stays outside the kernel (it is
cuBLAS/MKL's job); the ``[B, C + N]`` logits, masks and softmax of the original are never built.

Differences from the original, all deliberate:

- any device (the original moves its class prior to ``cuda`` and fails on the CPU); the prior is a
  non-persistent buffer that follows ``.to(device)``;
- an anchor without any positive (possible only with ``beta = 0``, or without ``sup_logits``) gives 0
  and is left out of the mean, where the original's 0 / 0 makes the whole loss NaN; anchors labelled
  -100 are ignored likewise (the original's one-hot fails on them);
- ``sup_logits=None`` drops the class columns (SupCon with PaCo's weights; the original fails);
- ``mask`` is refused: the original overwrites it with the label mask, so a caller passing one
  would silently get something else.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

import ltfast
from ltfast.compat._common import IGNORE_INDEX, check_number, check_positive_int, class_count_list

_OWNER = "PaCoLoss"


class PaCoLoss(nn.Module):
    """PaCo's loss on ``features = [q, k, queue]`` (``N = 2B + K`` rows, L2-normalised by the model) with
    ``labels`` ``[N]`` and the classifier's ``sup_logits`` ``[B, num_classes]``::

        -(temperature / base_temperature) * mean_i  sum_col m_ic log softmax_w(l_i)_col / sum_col m_ic

    on ``l_i = [(sup_logits_i + log(pi + 1e-9)) / supt, q_i . features / temperature]``, with positives
    ``beta`` on the label's class column and ``alpha`` on every other feature of the same label, and
    ``gamma`` weighting the feature columns in the softmax's denominator (the anchor itself excluded).
    ``cal_weight_for_classes(cls_num_list)`` must run first when ``sup_logits`` is given (the prior pi)."""

    def __init__(self, alpha, beta=1.0, gamma=1.0, supt=1.0, temperature=1.0, base_temperature=None, K=128,
                 num_classes=1000):
        super().__init__()
        self.alpha = check_number(alpha, "alpha", _OWNER, low=0.0)
        self.beta = check_number(beta, "beta", _OWNER, low=0.0)
        self.gamma = check_number(gamma, "gamma", _OWNER, low=0.0)
        self.supt = check_number(supt, "supt", _OWNER, low=0.0, low_open=True)
        self.temperature = check_number(temperature, "temperature", _OWNER, low=0.0, low_open=True)
        self.base_temperature = (self.temperature if base_temperature is None else
                                 check_number(base_temperature, "base_temperature", _OWNER, low=0.0, low_open=True))
        if isinstance(K, bool) or not isinstance(K, numbers.Integral) or int(K) < 0:
            raise ValueError(f"{_OWNER}: K (the MoCo queue length) must be an integer >= 0, got {K!r}")
        self.K = int(K)
        self.num_classes = check_positive_int(num_classes, "num_classes", _OWNER)
        # The original's self.weight [1, C] (float32 pi) and the log(pi + 1e-9) it adds to sup_logits.
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("log_prior", None, persistent=False)

    def cal_weight_for_classes(self, cls_num_list):
        counts = class_count_list(cls_num_list, _OWNER, allow_zero=True)
        if counts.numel() != self.num_classes:
            raise ValueError(f"{_OWNER}: cls_num_list must have num_classes = {self.num_classes} counts, got "
                             f"{counts.numel()}")
        # float32 as the original's torch.Tensor(cls_num_list); the same arithmetic, so the same bits.
        counts = counts.to(torch.float32).view(1, self.num_classes)
        weight = counts / counts.sum()
        self.weight = weight if self.weight is None else weight.to(self.weight.device)  # a buffer follows .to()
        self.log_prior = torch.log(self.weight + 1e-9).view(-1)

    def forward(self, features, labels=None, sup_logits=None, mask=None, epoch=None):
        if mask is not None:
            raise ValueError(f"{_OWNER}: mask is not supported: the original ignores it (it rebuilds the mask from "
                             "labels), so passing one would silently be ignored; pass labels instead")
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError(f"{_OWNER}: features must be a 2-D tensor [N = 2B + K, D] ([q, k, queue]), got "
                             f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        if labels is None:
            raise ValueError(f"{_OWNER}: labels [N] (the labels of q, k and the queue) are required")
        labels = labels.contiguous().view(-1)
        num_features = features.shape[0]
        if labels.shape[0] != num_features:
            raise ValueError(f"{_OWNER}: labels must have N = {num_features} elements (one per row of features), got "
                             f"shape {tuple(labels.shape)}")
        batch = (num_features - self.K) // 2
        if batch < 1:
            raise ValueError(f"{_OWNER}: features has N = {num_features} rows, too few for K = {self.K}: expected "
                             f"N = 2B + K with B >= 1 anchors")
        similarity = torch.matmul(features[:batch], features.T)
        log_prior = None
        if sup_logits is not None:
            if sup_logits.dim() != 2 or sup_logits.shape != (batch, self.num_classes):
                raise ValueError(f"{_OWNER}: sup_logits must be [B = {batch}, num_classes = {self.num_classes}], got "
                                 f"shape {tuple(sup_logits.shape)}")
            if self.log_prior is None:
                raise RuntimeError(f"{_OWNER}: call cal_weight_for_classes(cls_num_list) before forward with "
                                   "sup_logits (the class prior it adds to them), as the original requires")
            log_prior = self.log_prior.to(similarity.device)
            if sup_logits.dtype != similarity.dtype:  # e.g. a float32 head next to a bfloat16 matmul
                common = torch.promote_types(sup_logits.dtype, similarity.dtype)
                similarity, sup_logits = similarity.to(common), sup_logits.to(common)
        return ltfast.paco_loss(similarity, labels[:batch], labels, sup_logits, log_prior,
                                temperature=self.temperature, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                                sup_temperature=self.supt, base_temperature=self.base_temperature, reduction="mean",
                                ignore_index=IGNORE_INDEX)
