"""Long-tail evaluation (seed-methods.md §4): per-class correct/total counts, top-1, many / medium /
few-shot accuracy, UA / RA, and the per-class accuracy plot.

Everything starts from two int64 vectors per split, ``correct[C]`` and ``total[C]``. They are the
only thing ranks exchange (one all-reduce), so a DDP evaluation equals a single-process one exactly;
averaging per-rank accuracies would not (ranks see different class mixes).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

SHOTS = ("many", "medium", "few")


def count_correct(logits_or_pred: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class (correct, total) int64 vectors of one batch. Accepts [N, C] logits or [N] predictions."""
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    target = target.long()
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[pred == target], minlength=num_classes)
    return correct.long(), total.long()


def all_reduce_counts(correct: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """Sums the per-class vectors over the ranks (no-op outside an initialised process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([correct, total])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        correct, total = both[0], both[1]
    return correct, total


def per_class_accuracy(correct: Tensor, total: Tensor) -> Tensor:
    """Accuracy of every class in [0, 1], float64; NaN for a class with no evaluation sample."""
    correct, total = correct.double().cpu(), total.double().cpu()
    return torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, float("nan")))


def shot_groups(train_counts: Sequence[int] | Tensor, many_threshold: int = 100, few_threshold: int = 20,
                split_file: Optional[str] = None) -> dict[str, Tensor]:
    """Bool masks of the many / medium / few-shot classes. Thresholds (survey, Ensemble test.py):
    many > 100 training images, few < 20, medium in between (20..100 inclusive). ``split_file``
    replaces the rule: the survey's ``shot_list.npy`` (bool [3, C]: many, medium, few) or a JSON file
    ``{"many": [class ids], "medium": [...], "few": [...]}``."""
    counts = torch.as_tensor(train_counts).long().cpu()
    if split_file is None:
        many = counts > many_threshold
        few = counts < few_threshold
        return {"many": many, "medium": ~many & ~few, "few": few}
    num_classes = counts.numel()
    if split_file.endswith(".npy"):
        import numpy as np
        table = torch.as_tensor(np.load(split_file)).bool()
        if table.shape != (3, num_classes):
            raise ValueError(f"eval.shot_split: {split_file} must hold a bool array of shape [3, {num_classes}] "
                             f"(many, medium, few), got {tuple(table.shape)}")
        groups = dict(zip(SHOTS, table))
    else:
        with open(split_file) as f:
            lists = json.load(f)
        if set(lists) != set(SHOTS):
            raise ValueError(f"eval.shot_split: {split_file} must have exactly the keys {SHOTS}, got {sorted(lists)}")
        groups = {}
        for name in SHOTS:
            ids = torch.as_tensor(lists[name], dtype=torch.long)
            if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
                raise ValueError(f"eval.shot_split: {split_file}: {name} has class ids outside [0, {num_classes})")
            groups[name] = torch.zeros(num_classes, dtype=torch.bool).index_fill_(0, ids, True)
    overlap = groups["many"].int() + groups["medium"].int() + groups["few"].int()
    if (overlap != 1).any():
        raise ValueError(f"eval.shot_split: {split_file}: every class must be in exactly one group")
    return groups


def _mean(values: Tensor) -> Optional[float]:
    values = values[~torch.isnan(values)]
    return None if values.numel() == 0 else float(values.mean()) * 100.0


def summarize(correct: Tensor, total: Tensor, groups: dict[str, Tensor], ua: Optional[float] = None) -> dict:
    """Metrics of one split, in percent.

    - ``top1``: mean per-class accuracy (balanced accuracy). On a balanced test set (ImageNet-LT's,
      Fashion-MNIST's) it equals the survey's top-1 (micro) accuracy; on an unbalanced one it is the
      number that does not reward predicting head classes.
    - ``micro``: correct / total over all samples.
    - ``many`` / ``medium`` / ``few``: mean per-class accuracy over the classes of that group, as the
      survey's ``shot_acc`` (None for an empty group).
    - ``ra``: top1 / ua * 100 when ``ua`` (the upper reference accuracy, %) is given.
    - ``per_class``: accuracy of every class (None where the split has no sample of it).
    """
    acc = per_class_accuracy(correct, total)
    out = {"top1": _mean(acc),
           "micro": float(correct.sum()) / max(int(total.sum()), 1) * 100.0,
           "samples": int(total.sum())}
    for name in SHOTS:
        out[name] = _mean(acc[groups[name].cpu()])
        out[f"{name}_classes"] = int(groups[name].sum())
    if ua is not None:
        out["ua"] = float(ua)
        out["ra"] = None if out["top1"] is None else out["top1"] / float(ua) * 100.0
    out["per_class"] = [None if torch.isnan(a) else float(a) * 100.0 for a in acc]
    return out


def plot_per_class(per_class: Sequence[Optional[float]], train_counts: Sequence[int], groups: dict[str, Tensor],
                   path: str, title: str = "", class_names: Optional[Sequence[str]] = None) -> str:
    """PNG of per-class accuracy (bars) against training class size (line, log scale), classes sorted
    by size (head left), with the many / medium / few bands shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.as_tensor(train_counts).long()
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    acc = [float("nan") if per_class[c] is None else per_class[c] for c in order]
    sizes = [int(counts[c]) for c in order]
    num = len(order)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.35 * num)), 4.0), dpi=110)
    colors = {"many": "#dbe9f6", "medium": "#fdebd0", "few": "#f5d5d5"}
    for name in SHOTS:
        members = [i for i, c in enumerate(order) if bool(groups[name][c])]
        if members:
            # Sorted by size, the groups defined by thresholds are contiguous; a split file's may not be.
            for i in members:
                ax.axvspan(i - 0.5, i + 0.5, color=colors[name], lw=0)
            ax.text(sum(members) / len(members), 101, f"{name} ({len(members)})", ha="center", va="bottom",
                    fontsize=8)
    ax.bar(range(num), acc, width=0.8 if num <= 200 else 1.0, color="#3a6ea5")
    ax.set_ylim(0, 108)
    ax.set_xlim(-0.5, num - 0.5)
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("classes sorted by training images")
    if class_names is not None and num <= 40:
        ax.set_xticks(range(num), [class_names[c] for c in order], rotation=45, ha="right", fontsize=7)
    size_ax = ax.twinx()
    size_ax.plot(range(num), sizes, color="#c0392b", lw=1.5, marker="." if num <= 100 else None)
    size_ax.set_yscale("log")
    size_ax.set_ylabel("training images", color="#c0392b")
    if title:
        ax.set_title(title, fontsize=10, pad=14)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
