"""Drop-in for the survey's ``Main-codebase/loss/SEQLLoss.py`` (softmax equalization loss, "ESQL"
in the survey; seed-methods.md §1.3), backed by the fused ``ltfast.softmax_equalization_loss``.
Loaded as a standalone module by the Main-codebase: absolute imports only."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import ltfast
from ltfast.compat._common import (IGNORE_INDEX, check_logits, check_number, check_positive_int, check_target,
                                   class_count_list)
from ltfast.compat.survey._utils import IMAGENET_LT_TRAIN_TXT, read_label_counts


def head_classes(counts, lambda_n: float) -> Tensor:
    """The original's ``prob[i] > lambda_n`` on ``prob = FloatTensor([n_i / num])``: a float32
    comparison (the 0-d float32 tensor against the Python float, which PyTorch compares in
    float32)."""
    num = sum(counts)
    prob = torch.tensor([n / num for n in counts], dtype=torch.float32)
    return prob > torch.tensor(lambda_n, dtype=torch.float32)


class SEQL(nn.Module):
    """``F.cross_entropy`` (mean) in which every negative logit of a tail class is removed from the
    softmax with probability ``gamma``, drawn independently per (sample, class) element; head classes
    (training frequency ``> lambda_n``, compared in float32 like the original) and the target are
    always kept. The original replaces removed logits by -1e7; the fused op removes them (the same
    softmax, and removed entries get exactly zero gradient, as -1e7 gives).

    The drop decisions come from a counter-based hash seeded from torch's generator (reproducible
    after ``torch.manual_seed``), not from ``torch.rand(N, C)``: the loss has the original's
    distribution but not its exact random draws (docs/migrating.md).

    Constructor: the original's ``gamma``, ``lambda_n``, plus ``prior_txt`` (default: the path the
    original hard-codes, ``./data/ImageNet_LT/ImageNet_LT_train.txt``, relative to the working
    directory), ``num_classes`` (default the original's 1000) and keyword-only ``class_counts``.
    ``gamma`` must lie in [0, 1]. Rows with target -100 are ignored (the original would index the
    one-hot with -100). Buffers: ``class_weight`` (1.0 head, 0.0 tail, as the original's) and
    ``tail_mask``, non-persistent.
    """

    def __init__(self, gamma=0.9, lambda_n=0.00043, prior_txt=None, num_classes=1000, *, class_counts=None):
        super().__init__()
        self.gamma = check_number(gamma, "gamma", "SEQL", low=0.0, high=1.0)
        self.lambda_n = check_number(lambda_n, "lambda_n", "SEQL", low=0.0)
        if class_counts is not None:
            counts = class_count_list(class_counts, "SEQL", allow_zero=True, name="class_counts").tolist()
        else:
            num_classes = check_positive_int(num_classes, "num_classes", "SEQL")
            counts = read_label_counts(prior_txt or IMAGENET_LT_TRAIN_TXT, num_classes, "SEQL")
            if sum(counts) == 0:
                raise ValueError(f"SEQL: prior_txt {prior_txt or IMAGENET_LT_TRAIN_TXT!r} has no label in "
                                 f"[0, {num_classes})")
        self.num_classes = len(counts)
        head = head_classes(counts, self.lambda_n)
        num = float(sum(counts))
        self.register_buffer("prob", torch.tensor([n / num for n in counts], dtype=torch.float32), persistent=False)
        self.register_buffer("class_weight", head.float(), persistent=False)
        self.register_buffer("tail_mask", ~head, persistent=False)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, tail_classes={int(self.tail_mask.sum())}, gamma={self.gamma}, "
                f"lambda_n={self.lambda_n}")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_logits(input, "input", "SEQL", self.num_classes)
        check_target(target, input, "target", "SEQL")
        return ltfast.softmax_equalization_loss(input, target, self.tail_mask, self.gamma, "mean", IGNORE_INDEX)


def create_loss(prior_txt=None, **kwargs):
    """The original ignores ``prior_txt`` and reads its hard-coded path; this one reads ``prior_txt``
    when given (the survey's seql.yaml passes that very path), else the hard-coded one."""
    print("Loading SEQL Loss (ltfast).")
    return SEQL(prior_txt=prior_txt, **kwargs)
