"""Drop-in for the survey's ``Main-codebase/loss/WeightedSoftmaxLoss.py`` (seed-methods.md §1.2),
whose ``create_loss()`` returns ``nn.CrossEntropyLoss(weight=w)`` with ``w_c = 1 - ln(pi_c / max_k
pi_k)`` from the hard-coded ImageNet-LT train list. Loaded as a standalone module: absolute imports
only."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import ltfast
from ltfast.compat._common import IGNORE_INDEX, check_logits, check_positive_int, check_target, class_count_list
from ltfast.compat.survey._utils import IMAGENET_LT_TRAIN_TXT, read_label_counts


def survey_weights(counts) -> Tensor:
    """The original's arithmetic: ``prob = FloatTensor([n_c / sum n])``, ``prob / prob.max().item()``,
    then ``-log + 1``, all in float32."""
    num = sum(counts)
    prob = torch.tensor([n / num for n in counts], dtype=torch.float32)
    max_prob = prob.max().item()
    prob = prob / max_prob
    return -prob.log() + 1


class WeightedSoftmaxLoss(nn.Module):
    """``nn.CrossEntropyLoss(weight=w)``, ``w_c = 1 + ln(n_max / n_c)`` computed in float32 as the
    original: the mean divides by ``sum_i w_{y_i}`` (rows with target -100 excluded).

    The original reads ``./data/ImageNet_LT/ImageNet_LT_train.txt`` (relative to the working
    directory) with 1000 classes; ``prior_txt``/``num_classes`` (or keyword-only ``class_counts``)
    replace those, with the original's values as defaults. A class with no training image would get
    an infinite weight in the original (NaN losses); this raises ValueError instead. ``weight`` is a
    float32 buffer, as in ``nn.CrossEntropyLoss`` (same state_dict key); float64 logits work too
    (PyTorch's cross_entropy rejects a float32 weight with float64 logits).
    """

    ignore_index = IGNORE_INDEX
    reduction = "mean"

    def __init__(self, prior_txt=IMAGENET_LT_TRAIN_TXT, num_classes=1000, *, class_counts=None):
        super().__init__()
        if class_counts is not None:
            counts = class_count_list(class_counts, "WeightedSoftmaxLoss", allow_zero=False,
                                      name="class_counts").tolist()
        else:
            num_classes = check_positive_int(num_classes, "num_classes", "WeightedSoftmaxLoss")
            counts = read_label_counts(prior_txt, num_classes, "WeightedSoftmaxLoss")
            empty = [c for c, n in enumerate(counts) if n == 0]
            if empty:
                raise ValueError(f"WeightedSoftmaxLoss: prior_txt {prior_txt!r} has no line for classes {empty[:10]}: "
                                 "their weight 1 + ln(n_max / 0) is infinite (the original gives NaN losses)")
        self.num_classes = len(counts)
        self.register_buffer("weight", survey_weights(counts))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_logits(input, "input", "WeightedSoftmaxLoss", self.num_classes)
        check_target(target, input, "target", "WeightedSoftmaxLoss")
        return ltfast.adjusted_cross_entropy(input, target, weight=self.weight, reduction="mean",
                                             ignore_index=IGNORE_INDEX)


def create_loss(prior_txt=IMAGENET_LT_TRAIN_TXT, num_classes=1000, **kwargs):
    print("Loading Weighted Softmax Loss (ltfast).")
    return WeightedSoftmaxLoss(prior_txt=prior_txt, num_classes=num_classes, **kwargs)
