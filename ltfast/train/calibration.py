"""Calibration and per-class classification metrics for long-tailed evaluation: expected
calibration error (ECE) and its reliability diagram, per-class precision / recall / F1, macro-F1
and the geometric mean of per-class recall, each with many / medium / few-shot breakdowns.

As in ``ltfast.train.metrics``, everything is computed from count vectors that batches (and DDP
ranks) simply add: per true class ``c`` and confidence bin ``b``, ``bin_count[c, b]`` samples,
``bin_correct[c, b]`` of them right and ``bin_confidence[c, b]`` the sum of their confidences
(float64), and the same three per PREDICTED class (``pred_bin_*``). Per-class correct / total /
predicted are row sums, so no [C, C] confusion matrix is kept (iNaturalist's 8,142 classes would
need 530 MB).

Definitions (all results in percent, like ``metrics.summarize``):

- confidence = max softmax probability, prediction = its argmax (``torch.argmax``: the first
  maximum on ties).
- 15 equal-width bins: bin b (0-based) holds confidences in ``(e_b, e_{b+1}]`` with
  ``e = np.linspace(0, 1, 16)``, i.e. ``np.digitize(conf, e, right=True) - 1``, the rule of Guo et
  al. 2017's ``_ECELoss`` and of the reliability-diagram code MiSLAS uses (a confidence is never
  0 after a softmax).
- ``ece = 100 * sum_b (n_b / N) * |acc_b - conf_b|`` with n_b samples in bin b, acc_b their
  accuracy, conf_b their mean confidence; empty bins add nothing. ``confidence``: mean confidence,
  ``accuracy``: micro accuracy of the same samples (confidence > accuracy: over-confident).
- For a class c with ``support_c`` test samples (> 0): ``recall_c = TP_c / support_c``,
  ``precision_c = TP_c / predicted_c`` (0 when nothing is predicted as c: scikit-learn's
  ``zero_division`` result), ``f1_c = 2 P R / (P + R)`` (0 when P + R = 0). A class without test
  samples has NaN for all three (None in the summary) and is left out of every average.
- ``macro_precision`` / ``macro_recall`` / ``macro_f1``: plain means over the classes with test
  samples (macro_recall is ``metrics.summarize``'s top-1, the balanced accuracy).
- ``gmean_recall = (prod_c recall_c) ** (1 / C')`` over those C' classes: 0 as soon as one class
  is never recognised, which is the point of reporting it on a long tail.
- Breakdowns ``many_*`` / ``medium_*`` / ``few_*``: the same averages over the classes of the
  group (``metrics.shot_groups`` masks); the group's ``ece`` / ``confidence`` / ``accuracy`` use
  the test samples whose TRUE class is in the group, ``pred_ece`` / ``pred_confidence`` /
  ``pred_accuracy`` the samples PREDICTED as one of its classes (pred_accuracy is then the
  group's micro precision). The two views differ on a long tail: a tail image taken for a head
  class with high confidence counts against the tail group's ``ece`` and the head group's
  ``pred_ece``. None for a group without samples. Over all classes both views give the same ECE.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

NUM_BINS = 15


def bin_edges(num_bins: int = NUM_BINS) -> Tensor:
    """float64 [num_bins + 1]: ``np.linspace(0, 1, num_bins + 1)`` (the references' edges, bit for bit)."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    return torch.from_numpy(np.linspace(0.0, 1.0, num_bins + 1))


def confidence_bins(confidence: Tensor, num_bins: int = NUM_BINS) -> Tensor:
    """int64 bin index of every confidence: b such that ``e_b < conf <= e_{b+1}`` (compared in float64)."""
    inner = bin_edges(num_bins)[1:-1].to(confidence.device)
    return torch.bucketize(confidence.double(), inner, right=False)


@dataclass
class ClassificationCounts:
    """Additive state of one evaluation: [C, B] calibration bins by true class and [C] predictions."""
    bin_count: Tensor       # int64 [C, B]
    bin_correct: Tensor     # int64 [C, B]
    bin_confidence: Tensor  # float64 [C, B]: sum of max-softmax confidences
    pred_bin_count: Tensor       # int64 [C, B], by predicted class
    pred_bin_correct: Tensor     # int64 [C, B]
    pred_bin_confidence: Tensor  # float64 [C, B]

    @classmethod
    def zeros(cls, num_classes: int, num_bins: int = NUM_BINS, device="cpu") -> ClassificationCounts:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        bin_edges(num_bins)  # checks num_bins
        def table(dtype=torch.int64):
            return torch.zeros(num_classes, num_bins, dtype=dtype, device=device)
        return cls(table(), table(), table(torch.float64), table(), table(), table(torch.float64))

    @property
    def num_classes(self) -> int:
        return self.bin_count.shape[0]

    @property
    def num_bins(self) -> int:
        return self.bin_count.shape[1]

    def update(self, logits: Tensor, target: Tensor, probabilities: bool = False) -> ClassificationCounts:
        """Adds a batch: ``logits`` [N, C] (softmax taken here, in float32 at least) or, with
        ``probabilities=True``, probabilities already; ``target`` [N] class indices."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [N, {self.num_classes}], got {tuple(logits.shape)}")
        target = target.to(self.bin_count.device).long()
        if target.shape != (logits.shape[0],):
            raise ValueError(f"target must be [{logits.shape[0]}], got {tuple(target.shape)}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"target must lie in [0, {self.num_classes}), got [{int(target.min())}, "
                             f"{int(target.max())}]")
        values = logits.detach().to(self.bin_count.device)
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()  # a bf16 softmax would put every confidence on a 1/128 grid
        probs = values if probabilities else torch.softmax(values, dim=1)
        confidence, prediction = probs.max(dim=1)
        if not bool(torch.isfinite(confidence).all()):
            raise ValueError("logits: a row has a NaN or infinite value (its confidence would fall in no bin)")
        bins = confidence_bins(confidence, self.num_bins)
        size = self.num_classes * self.num_bins
        right = prediction == target
        for by, count, correct, confidence_sum in ((target, self.bin_count, self.bin_correct, self.bin_confidence),
                                                   (prediction, self.pred_bin_count, self.pred_bin_correct,
                                                    self.pred_bin_confidence)):
            cell = by * self.num_bins + bins
            count += torch.bincount(cell, minlength=size).view_as(count)
            correct += torch.bincount(cell[right], minlength=size).view_as(correct)
            confidence_sum += torch.bincount(cell, weights=confidence.double(), minlength=size).view_as(confidence_sum)
        return self

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.bin_count, self.bin_correct, self.bin_confidence, self.pred_bin_count, self.pred_bin_correct,
                self.pred_bin_confidence)

    def merge(self, other: ClassificationCounts) -> ClassificationCounts:
        """Sum of two states (the result of evaluating both sets of samples)."""
        return ClassificationCounts(*(mine + theirs for mine, theirs in zip(self.tensors(), other.tensors())))

    def all_reduce(self) -> ClassificationCounts:
        """Sums the state over the ranks in place (no-op outside an initialised process group)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in self.tensors():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return self

    # per-class vectors
    def correct(self) -> Tensor:
        return self.bin_correct.sum(1)

    def support(self) -> Tensor:
        return self.bin_count.sum(1)

    def predicted(self) -> Tensor:
        return self.pred_bin_count.sum(1)


def calibration(counts: ClassificationCounts, classes: Tensor | None = None, by: str = "true") -> dict:
    """ECE (%), mean confidence (%), accuracy (%) and the per-bin table of the samples whose true
    (``by="true"``) or predicted (``by="predicted"``) class is in the bool mask ``classes`` (all
    when None). None values when there is no sample."""
    if by not in ("true", "predicted"):
        raise ValueError(f"by must be 'true' or 'predicted', got {by!r}")
    tables = counts.tensors()[:3] if by == "true" else counts.tensors()[3:]
    rows = slice(None) if classes is None else torch.as_tensor(classes, dtype=torch.bool, device=counts.bin_count.device)
    n_b = tables[0][rows].sum(0).double().cpu()
    right_b = tables[1][rows].sum(0).double().cpu()
    conf_b = tables[2][rows].sum(0).cpu()
    total = float(n_b.sum())
    filled = n_b > 0
    acc = torch.where(filled, right_b / n_b.clamp_min(1), torch.full_like(n_b, float("nan")))
    mean_conf = torch.where(filled, conf_b / n_b.clamp_min(1), torch.full_like(n_b, float("nan")))
    if total == 0:
        ece = confidence = accuracy = None
    else:
        ece = float(((n_b / total) * (acc - mean_conf).abs())[filled].sum()) * 100.0
        confidence = float(conf_b.sum()) / total * 100.0
        accuracy = float(right_b.sum()) / total * 100.0
    return {"ece": ece, "confidence": confidence, "accuracy": accuracy, "samples": int(total),
            "bin_edges": bin_edges(counts.num_bins).tolist(), "bin_count": n_b.long().tolist(),
            "bin_accuracy": [None if math.isnan(v) else v * 100.0 for v in acc.tolist()],
            "bin_confidence": [None if math.isnan(v) else v * 100.0 for v in mean_conf.tolist()]}


def precision_recall_f1(correct: Tensor, support: Tensor, predicted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class precision, recall and F1 in [0, 1], float64 [C] (module docstring: 0 for an
    undefined precision or F1, NaN for every value of a class without test samples)."""
    tp, n, p = correct.double().cpu(), support.double().cpu(), predicted.double().cpu()
    if not (tp.shape == n.shape == p.shape) or tp.dim() != 1:
        raise ValueError(f"correct, support and predicted must be [C] vectors, got {tuple(tp.shape)}, "
                         f"{tuple(n.shape)}, {tuple(p.shape)}")
    if bool((tp > n).any()) or bool((tp > p).any()):
        raise ValueError("correct must not exceed support or predicted for any class")
    nan = torch.full_like(tp, float("nan"))
    recall = torch.where(n > 0, tp / n.clamp_min(1), nan)
    precision = torch.where(p > 0, tp / p.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300),
                     torch.zeros_like(tp))
    absent = n == 0
    return precision.masked_fill(absent, float("nan")), recall, f1.masked_fill(absent, float("nan"))


def _mean_percent(values: Tensor) -> float | None:
    values = values[~torch.isnan(values)]
    return None if values.numel() == 0 else float(values.mean()) * 100.0


def geometric_mean(values: Tensor) -> float | None:
    """``(prod v) ** (1 / n)`` of the non-NaN values in [0, 1], in percent; 0 if one is 0 (a log
    would be -inf), None if there is none. Computed as exp(mean(log v)) in float64 so 8,142 recalls
    of 0.3 do not underflow a product."""
    values = values.double()
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return None
    if bool((values <= 0).any()):
        return 0.0
    return float(torch.exp(torch.log(values).mean())) * 100.0


def _nullable(values: Tensor) -> list:
    return [None if math.isnan(v) else v * 100.0 for v in values.tolist()]


def summarize_classification(counts: ClassificationCounts, groups: dict | None = None) -> dict:
    """Flat dict of the module docstring's metrics, in percent: ``ece``, ``confidence``,
    ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``, ``gmean_recall``, the
    per-class lists ``precision`` / ``recall`` / ``f1`` (None for a class without test samples) and,
    for every group of ``groups`` (``metrics.shot_groups`` masks), the same scalars and
    ``pred_ece`` / ``pred_confidence`` / ``pred_accuracy`` prefixed ``many_`` / ``medium_`` /
    ``few_``. ``bins``: the overall reliability table."""
    precision, recall, f1 = precision_recall_f1(counts.correct(), counts.support(), counts.predicted())

    def scalars(mask: Tensor | None) -> dict:
        select = slice(None) if mask is None else mask.bool().cpu()
        calib = calibration(counts, mask)
        values = {"ece": calib["ece"], "confidence": calib["confidence"], "accuracy": calib["accuracy"],
                  "macro_precision": _mean_percent(precision[select]), "macro_recall": _mean_percent(recall[select]),
                  "macro_f1": _mean_percent(f1[select]), "gmean_recall": geometric_mean(recall[select])}
        if mask is not None:
            by_prediction = calibration(counts, mask, by="predicted")
            values.update(pred_ece=by_prediction["ece"], pred_confidence=by_prediction["confidence"],
                          pred_accuracy=by_prediction["accuracy"])
        return values, calib

    overall, calib = scalars(None)
    out = dict(overall)
    out["num_bins"] = counts.num_bins
    for name, mask in (groups or {}).items():
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (counts.num_classes,):
            raise ValueError(f"groups[{name!r}] must be a bool mask of the {counts.num_classes} classes, "
                             f"got shape {tuple(mask.shape)}")
        for key, value in scalars(mask)[0].items():
            out[f"{name}_{key}"] = value
    out.update(precision=_nullable(precision), recall=_nullable(recall), f1=_nullable(f1),
               bins={k: calib[k] for k in ("bin_edges", "bin_count", "bin_accuracy", "bin_confidence")})
    return out


def reliability_diagram(counts: ClassificationCounts, path: str, title: str = "",
                        groups: dict | None = None, by: str = "true") -> str:
    """PNG: accuracy per confidence bin (bars) against the diagonal of perfect calibration, the gap
    to each bin's mean confidence shaded, the ECE in the legend; below, the share of samples per
    bin. With ``groups`` the bin accuracies of the samples whose true (``by="true"``) or predicted
    (``by="predicted"``) class is in each group are drawn as lines: a line under the diagonal is
    over-confidence (e.g. head-class predictions, ``by="predicted"``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calib = calibration(counts)
    edges = np.asarray(calib["bin_edges"]) * 100.0
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.array([np.nan if v is None else v for v in calib["bin_accuracy"]])
    conf = np.array([np.nan if v is None else v for v in calib["bin_confidence"]])
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.0, 6.0), dpi=110, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 100], [0, 100], ls="--", color="#777777", lw=1, label="perfect calibration")
    ax.bar(centers, np.nan_to_num(acc), width=width * 0.95, color="#3a6ea5", edgecolor="#1f3f63",
           label="accuracy" + ("" if calib["ece"] is None else f" (ECE {calib['ece']:.2f}%)"))
    filled = ~np.isnan(acc)
    ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width * 0.95, color="#e74c3c",
           alpha=0.35, edgecolor="#c0392b", label="gap to mean confidence")
    colors = {"many": "#2c7a2c", "medium": "#d68910", "few": "#8e44ad"}
    for name, mask in (groups or {}).items():
        group = calibration(counts, torch.as_tensor(mask, dtype=torch.bool), by)
        values = np.array([np.nan if v is None else v for v in group["bin_accuracy"]])
        if np.isfinite(values).any():
            ece = "" if group["ece"] is None else f", ECE {group['ece']:.1f}%"
            ax.plot(centers, values, marker="o", ms=3, lw=1.2, color=colors.get(name, None),
                    label=f"{'predicted' if by == 'predicted' else 'true'} {name}-shot{ece}")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=10)
    total = max(calib["samples"], 1)
    hist.bar(centers, np.asarray(calib["bin_count"]) / total * 100.0, width=width * 0.95, color="#7f8c8d")
    hist.set_xlabel("confidence (max softmax probability, %)")
    hist.set_ylabel("samples (%)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def classification_metrics(logits: Tensor, target: Tensor, groups: dict | None = None,
                           num_bins: int = NUM_BINS) -> dict:
    """``summarize_classification`` of one [N, C] logit tensor (a convenience for small sets)."""
    counts = ClassificationCounts.zeros(logits.shape[1], num_bins).update(logits.cpu(), target.cpu())
    return summarize_classification(counts, groups)

