"""Drop-in for the survey's ``Main-codebase/loss/PriorCELoss.py`` (hyperconnect/LADE's "LADE-CE",
i.e. Balanced Softmax; seed-methods.md §1.4), backed by the fused ``ltfast.balanced_softmax_loss``.

YAML: ``def_file: <path printed by python -c "import ltfast.compat.survey as s; print(s.def_file('PriorCELoss'))">``.
This file is loaded with ``importlib`` as a standalone module by the Main-codebase, so it uses
absolute imports only.
"""
from __future__ import annotations

from torch import Tensor, nn

import ltfast
from ltfast.compat._common import IGNORE_INDEX, check_logits, check_positive_int, check_target
from ltfast.compat.survey._utils import log_prior_like_original, prior_buffers


class PriorCELoss(nn.Module):
    """``F.cross_entropy(x + log(prior + 1e-9), y)`` (mean over the rows whose target is not -100),
    with ``prior = n_c / sum_k n_k`` in float32 from ``calculate_prior(num_classes, img_max, prior,
    prior_txt)``: the counts of a list file, or the exponential profile
    ``int(img_max * prior ** (c / (C - 1)))``. ``log(prior + 1e-9)`` is computed in float32 exactly as
    the original does, so an empty class gets the finite log prior log(1e-9).

    Same constructor as the original, plus keyword-only ``class_counts`` (counts given directly).
    Differences: no ``.cuda()`` in the constructor (the tensors are non-persistent buffers that follow
    ``.to()``/``.cuda()``; the state_dict stays empty, like the original's); float16/bfloat16 logits
    give the loss in the logits dtype (the original promotes to float32 through the float32 prior).
    """

    def __init__(self, num_classes, img_max=None, prior=None, prior_txt=None, *, class_counts=None):
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes", "PriorCELoss")
        counts, class_prior = prior_buffers(self.num_classes, img_max, prior, prior_txt, "PriorCELoss", class_counts)
        self.register_buffer("img_num_per_cls", counts, persistent=False)
        self.register_buffer("prior", class_prior, persistent=False)
        self.register_buffer("log_prior", log_prior_like_original(class_prior), persistent=False)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        check_logits(x, "x", "PriorCELoss", self.num_classes)
        check_target(y, x, "y", "PriorCELoss")
        return ltfast.balanced_softmax_loss(x, y, self.log_prior, "mean", IGNORE_INDEX)


def create_loss(num_classes, img_max=None, prior=None, prior_txt=None, **kwargs):
    print("Loading PriorCELoss Loss (ltfast).")
    return PriorCELoss(num_classes=num_classes, img_max=img_max, prior=prior, prior_txt=prior_txt, **kwargs)
