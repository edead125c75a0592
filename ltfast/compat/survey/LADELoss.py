"""Drop-in for the survey's ``Main-codebase/loss/LADELoss.py`` (hyperconnect/LADE): the LADER
regulariser alone (seed-methods.md §1.5), backed by ltfast's fused LADE kernels. The survey's
``lade.yaml`` adds it (``RouteWeightLoss``, weight 0.1) to a PriorCELoss (``PerformanceLoss``);
point both ``def_file:`` entries at ltfast.compat.survey (``def_file("LADELoss")``).

Loaded with ``importlib`` as a standalone module by the Main-codebase: absolute imports only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ltfast.compat._common import check_logits, check_number, check_positive_int, check_target
from ltfast.compat._lader import lader
from ltfast.compat.survey._utils import log_prior_like_original, prior_buffers


class LADELoss(nn.Module):
    """LADER as the original computes it, on ``y_pred`` ``[N, C]`` and ``target`` ``[N]``:

    ``loss = -sum_c pi_c (F_c - S_c - remine_lambda * S_c^2)`` with

    - ``F_c = sum_{i: y_i = c} z_ic / (n_c + 1e-8)``, n_c the batch count of class c (float32, so the
      1e-8 only matters for absent classes, whose F_c is 0);
    - ``S_c = logsumexp_i(z_ic - log(pi_c + 1e-9) + log(1/C + 1e-9)) - log N``: a log-mean-exp over
      the whole batch, for every class, present or not; both logs in float32 like the original;
    - ``pi_c`` (``cls_weight``) the float32 training prior itself (not ``pi_c + 1e-9``).

    ``q_pred`` is accepted and ignored, as in the original. Same constructor as the original plus
    keyword-only ``class_counts``; like the original it needs ``prior_txt`` or ``img_max``/``prior``
    (the original fails with AttributeError without them; this raises ValueError). ``remine_lambda``
    must be >= 0.

    Differences: rows whose target is -100 (``nn.CrossEntropyLoss``'s ignore_index) are left out of
    every term; the original has no ignore_index and would count them in ``S_c`` and ``N``. The
    survey never passes such rows. No ``.cuda()`` in the constructor (non-persistent buffers). The
    loss is float32 for float32/float16/bfloat16 logits (as the original's promotion through the
    float32 prior gives) and float64 for float64.
    """

    def __init__(self, num_classes=10, img_max=None, prior=None, prior_txt=None, remine_lambda=0.1, *,
                 class_counts=None):
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes", "LADELoss")
        if img_max is None and not prior_txt and class_counts is None:
            raise ValueError("LADELoss: give prior_txt (a list file) or img_max and prior (exponential profile); "
                             "the regulariser is weighted by the training prior")
        counts, class_prior = prior_buffers(self.num_classes, img_max, prior, prior_txt, "LADELoss", class_counts)
        self.remine_lambda = check_number(remine_lambda, "remine_lambda", "LADELoss", low=0.0)
        self.register_buffer("img_num_per_cls", counts, persistent=False)
        self.register_buffer("prior", class_prior, persistent=False)
        self.register_buffer("cls_weight", class_prior.clone(), persistent=False)
        self.register_buffer("log_prior", log_prior_like_original(class_prior), persistent=False)
        balanced = torch.tensor(1.0 / self.num_classes).float()
        self.register_buffer("balanced_prior", balanced, persistent=False)
        self.register_buffer("balanced_log_prior", torch.log(balanced + 1e-9), persistent=False)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, remine_lambda={self.remine_lambda}"

    def forward(self, y_pred: Tensor, target: Tensor, q_pred=None) -> Tensor:
        check_logits(y_pred, "y_pred", "LADELoss", self.num_classes)
        check_target(target, y_pred, "target", "LADELoss")
        return lader(y_pred, target, self.log_prior, self.cls_weight, self.balanced_log_prior, self.remine_lambda)


def create_loss(num_classes, img_max=None, prior=None, prior_txt=None, remine_lambda=0.1, **kwargs):
    print("Loading LADELoss (ltfast).")
    return LADELoss(num_classes=num_classes, img_max=img_max, prior=prior, prior_txt=prior_txt,
                    remine_lambda=remine_lambda, **kwargs)
