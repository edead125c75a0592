"""The Main-codebase's ``utils.calculate_prior`` and its list-file counting, reimplemented with the
same semantics and float32 results (seed-methods.md §1, §3.1)."""
from __future__ import annotations

import math
import os
from typing import List

import torch
from torch import Tensor

from ltfast.compat._common import check_positive_int

# The path the original WeightedSoftmaxLoss.py and SEQLLoss.py hard-code (relative to the working
# directory, as in the original).
IMAGENET_LT_TRAIN_TXT = "./data/ImageNet_LT/ImageNet_LT_train.txt"

# The Main-codebase loss files this package replaces (one module each), for def_file. Here rather
# than in the package's __init__, which imports this module: def_file reading it from there was an
# import cycle (ltfast.compat.survey -> _utils -> ltfast.compat.survey).
MODULES = ("SoftmaxLoss", "WeightedSoftmaxLoss", "PriorCELoss", "LADELoss", "SEQLLoss", "FocalLoss")


def read_label_counts(list_file: str, num_classes: int, owner: str, name: str = "prior_txt") -> List[int]:
    """Counts the labels of a list file in the survey's format, one ``<relative path> <label>`` per
    line (the label is the second whitespace-separated field, as ``int(line.split()[1])`` reads it).
    Blank lines are skipped. Labels outside ``[0, num_classes)`` are not counted, as
    ``calculate_prior`` ignores them (it reads ``occur_dict[i]`` for ``i < num_classes`` only)."""
    if not isinstance(list_file, (str, os.PathLike)):
        raise TypeError(f"{owner}: {name} must be a path to a list file, got {type(list_file).__name__}")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"{owner}: {name} {os.fspath(list_file)!r} is not a file (working directory "
                                f"{os.getcwd()!r})")
    counts = [0] * num_classes
    with open(list_file) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                label = int(fields[1])
            except (IndexError, ValueError):
                raise ValueError(f"{owner}: {name} {os.fspath(list_file)!r} line {line_number} is not "
                                 f"'<path> <integer label>': {line.rstrip()!r}") from None
            if 0 <= label < num_classes:
                counts[label] += 1
    return counts


def calculate_prior(num_classes, img_max=None, prior=None, prior_txt=None, reverse=False, return_num=False,
                    *, owner: str = "calculate_prior") -> Tensor:
    """Per-class training counts (``return_num=True``) or the class prior, float32, as the survey's
    ``utils.calculate_prior``:

    - from ``prior_txt``: the number of lines of each label ``0 .. num_classes - 1``. The original
      raises ``KeyError`` for a class with no line; this raises a ``ValueError`` naming them.
    - otherwise the exponential profile ``int(img_max * prior ** (i / (num_classes - 1)))`` for class
      ``i`` (``prior`` is the imbalance factor n_min / n_max, e.g. 0.01; ``reverse`` flips the order),
      truncated to integers like the original.
    """
    num_classes = check_positive_int(num_classes, "num_classes", owner)
    if prior_txt:
        counts = read_label_counts(prior_txt, num_classes, owner)
        missing = [c for c, n in enumerate(counts) if n == 0]
        if missing:
            raise ValueError(f"{owner}: prior_txt {os.fspath(prior_txt)!r} has no line for classes {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} of num_classes = {num_classes} (the original "
                             f"calculate_prior raises KeyError here)")
        img_num_per_cls = [float(n) for n in counts]
    else:
        if img_max is None or prior is None:
            raise ValueError(f"{owner}: give prior_txt (a list file) or both img_max and prior (exponential "
                             f"profile), got img_max={img_max!r}, prior={prior!r}, prior_txt={prior_txt!r}")
        if num_classes < 2:
            raise ValueError(f"{owner}: the img_max/prior profile needs num_classes >= 2, got {num_classes}")
        for name, value in (("img_max", img_max), ("prior", prior)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
        img_num_per_cls = []
        for cls_idx in range(num_classes):
            exponent = ((num_classes - 1 - cls_idx) if reverse else cls_idx) / (num_classes - 1.0)
            img_num_per_cls.append(float(int(img_max * (prior ** exponent))))
        if sum(img_num_per_cls) <= 0:
            raise ValueError(f"{owner}: img_max={img_max!r} and prior={prior!r} give 0 images in every class")
    counts = torch.tensor(img_num_per_cls, dtype=torch.float32)
    return counts if return_num else counts / counts.sum()


def def_file(name: str) -> str:
    """Absolute path of the compat module that replaces ``./loss/<name>.py`` in a Main-codebase YAML
    ``def_file:`` (e.g. ``def_file("PriorCELoss")``)."""
    name = name[:-3] if name.endswith(".py") else name
    if name not in MODULES:
        raise ValueError(f"def_file: name must be one of {sorted(MODULES)}, got {name!r}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")


def log_prior_like_original(prior: Tensor) -> Tensor:
    """``torch.log(prior + 1e-9)`` on the float32 prior, exactly as PriorCELoss/LADELoss compute it."""
    return torch.log(prior.to(torch.float32) + 1e-9)


def prior_buffers(num_classes, img_max, prior, prior_txt, owner: str, class_counts=None):
    """(img_num_per_cls, prior) float32 as the originals' constructors compute them:
    ``calculate_prior(..., return_num=True).float()`` and ``img_num_per_cls / img_num_per_cls.sum()``."""
    if class_counts is not None:
        from ltfast.compat._common import class_count_list
        counts = class_count_list(class_counts, owner, allow_zero=True, name="class_counts").to(torch.float32)
        if counts.numel() != num_classes:
            raise ValueError(f"{owner}: class_counts has {counts.numel()} entries, num_classes is {num_classes}")
    else:
        counts = calculate_prior(num_classes, img_max, prior, prior_txt, return_num=True, owner=owner).float()
    return counts, counts / counts.sum()


__all__ = ["calculate_prior", "read_label_counts", "def_file", "IMAGENET_LT_TRAIN_TXT"]
