"""ECE, the reliability diagram and per-class precision / recall / F1 (ltfast.train.calibration):
a hand-computed case, a plain numpy / Python-loop reference on random logits (the reliability-
diagram code's np.digitize rule, no scikit-learn), bin edges, merging, absent classes, errors."""
import math

import numpy as np
import pytest
import torch

from ltfast.train.calibration import (
    ClassificationCounts,
    bin_edges,
    calibration,
    classification_metrics,
    confidence_bins,
    geometric_mean,
    precision_recall_f1,
    reliability_diagram,
    summarize_classification,
)
from ltfast.train.metrics import count_correct, shot_groups, summarize

GROUPS = {"many": torch.tensor([True, False, False]), "medium": torch.tensor([False, True, False]),
          "few": torch.tensor([False, False, True])}


def test_hand_computed_case():
    probs = torch.tensor([[0.9, 0.05, 0.05],    # true 0, predicted 0, confidence 0.9  -> bin 13 (0.867, 0.933]
                          [0.9, 0.05, 0.05],    # true 1, predicted 0, confidence 0.9  -> bin 13
                          [0.2, 0.5, 0.3],      # true 1, predicted 1, confidence 0.5  -> bin 7 (0.467, 0.533]
                          [0.45, 0.3, 0.25]],   # true 2, predicted 0, confidence 0.45 -> bin 6 (0.4, 0.467]
                         dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 2])
    counts = ClassificationCounts.zeros(3).update(probs, target, probabilities=True)
    assert counts.bin_count.sum(0).nonzero().flatten().tolist() == [6, 7, 13]
    assert counts.predicted().tolist() == [3, 1, 0]
    assert counts.pred_bin_count.sum(0).tolist() == counts.bin_count.sum(0).tolist()
    out = summarize_classification(counts, GROUPS)
    # ECE = 2/4 * |0.5 - 0.9| + 1/4 * |1 - 0.5| + 1/4 * |0 - 0.45| = 0.2 + 0.125 + 0.1125
    assert out["ece"] == pytest.approx(43.75)
    assert out["confidence"] == pytest.approx(68.75) and out["accuracy"] == pytest.approx(50.0)
    # precision 1/3, 1, 0 (class 2 never predicted); recall 1, 1/2, 0; F1 1/2, 2/3, 0
    assert out["precision"] == pytest.approx([100 / 3, 100.0, 0.0])
    assert out["recall"] == pytest.approx([100.0, 50.0, 0.0])
    assert out["f1"] == pytest.approx([50.0, 200 / 3, 0.0])
    assert out["macro_precision"] == pytest.approx((1 / 3 + 1) / 3 * 100)
    assert out["macro_recall"] == pytest.approx(50.0)
    assert out["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 3 * 100)
    assert out["gmean_recall"] == 0.0
    # many: class 0's one sample, |1 - 0.9|; medium: class 1's two, 1/2 * 0.9 + 1/2 * 0.5; few: 0.45
    assert (out["many_ece"], out["medium_ece"], out["few_ece"]) == pytest.approx((10.0, 70.0, 45.0))
    assert (out["many_macro_f1"], out["medium_macro_f1"], out["few_macro_f1"]) == \
        pytest.approx((50.0, 200 / 3, 0.0))
    assert (out["many_gmean_recall"], out["medium_gmean_recall"], out["few_gmean_recall"]) == \
        pytest.approx((100.0, 50.0, 0.0))
    assert out["medium_confidence"] == pytest.approx(70.0) and out["medium_accuracy"] == pytest.approx(50.0)
    # By predicted class: class 0 takes samples 1, 2 and 4: 2/3 * |0.5 - 0.9| + 1/3 * |0 - 0.45|;
    # class 1 sample 3: |1 - 0.5|; nothing is predicted as class 2.
    assert out["many_pred_ece"] == pytest.approx((2 / 3 * 0.4 + 1 / 3 * 0.45) * 100)
    assert out["many_pred_confidence"] == pytest.approx(75.0) and out["many_pred_accuracy"] == pytest.approx(100 / 3)
    assert out["medium_pred_ece"] == pytest.approx(50.0) and out["few_pred_ece"] is None
    assert calibration(counts, by="predicted")["ece"] == pytest.approx(out["ece"])
    assert out["bins"]["bin_count"][13] == 2 and out["bins"]["bin_accuracy"][13] == pytest.approx(50.0)
    assert out["bins"]["bin_accuracy"][0] is None


def reference_metrics(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> dict:
    """The reliability-diagram code's calibration (np.digitize(conf, linspace, right=True), per-bin
    means, weighted gaps) and per-class precision / recall / F1 counted in Python loops."""
    confidences = probs.max(axis=1)
    predictions = probs.argmax(axis=1)
    bins = np.linspace(0.0, 1.0, num_bins + 1)
    indices = np.digitize(confidences, bins, right=True)
    ece = 0.0
    for b in range(num_bins):
        selected = np.where(indices == b + 1)[0]
        if len(selected) > 0:
            gap = abs(np.mean(labels[selected] == predictions[selected]) - np.mean(confidences[selected]))
            ece += gap * len(selected) / len(labels)
    if not all((labels == c).any() for c in range(probs.shape[1])):
        return {"ece": ece * 100}  # a subset: per-class values need every class
    num_classes = probs.shape[1]
    precision, recall, f1 = [], [], []
    for c in range(num_classes):
        tp = sum(1 for t, p in zip(labels, predictions) if t == c and p == c)
        fp = sum(1 for t, p in zip(labels, predictions) if t != c and p == c)
        fn = sum(1 for t, p in zip(labels, predictions) if t == c and p != c)
        pr = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn)
        precision.append(pr)
        recall.append(rc)
        f1.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    return {"ece": ece * 100, "precision": [v * 100 for v in precision], "recall": [v * 100 for v in recall],
            "f1": [v * 100 for v in f1], "macro_f1": float(np.mean(f1)) * 100,
            "gmean_recall": float(np.prod(recall)) ** (1 / num_classes) * 100}


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_matches_the_numpy_reference_on_random_logits(temperature):
    generator = torch.Generator().manual_seed(int(temperature * 10))
    num, classes = 3000, 7
    target = torch.randint(0, classes, (num,), generator=generator)
    logits = torch.randn(num, classes, generator=generator, dtype=torch.float64) / temperature
    logits[torch.arange(num), target] += 1.0  # better than chance, so recalls are not 0
    out = classification_metrics(logits, target)
    reference = reference_metrics(torch.softmax(logits, 1).numpy(), target.numpy())
    for key in ("ece", "macro_f1", "gmean_recall"):
        assert out[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-9), key
    for key in ("precision", "recall", "f1"):
        assert out[key] == pytest.approx(reference[key], rel=1e-12), key
    # macro recall is metrics.summarize's top-1; per-group recall its many / medium / few.
    groups = shot_groups(torch.tensor([500, 300, 120, 80, 40, 15, 5]))
    grouped = classification_metrics(logits, target, groups)
    legacy = summarize(*count_correct(logits, target, classes), groups)
    for name in ("many", "medium", "few"):
        assert grouped[f"{name}_macro_recall"] == pytest.approx(legacy[name])
    assert grouped["macro_recall"] == pytest.approx(legacy["top1"])
    # Group ECEs by true and by predicted class: the reference on those samples only.
    probs = torch.softmax(logits, 1).numpy()
    predictions = probs.argmax(1)
    for name, mask in groups.items():
        members = mask.numpy()
        for key, rows in ((f"{name}_ece", members[target.numpy()]), (f"{name}_pred_ece", members[predictions])):
            ece = reference_metrics(probs[rows], target.numpy()[rows])["ece"] if rows.any() else None
            assert grouped[key] == pytest.approx(ece, rel=1e-9, abs=1e-9), key
        rows = members[predictions]
        assert grouped[f"{name}_pred_accuracy"] == pytest.approx((predictions[rows] == target.numpy()[rows]).mean() * 100)


def test_bins_follow_digitize_right_at_the_edges():
    edges = np.linspace(0.0, 1.0, 16)
    assert torch.equal(bin_edges(15), torch.from_numpy(edges))
    # Confidences exactly on an edge and one ulp either side.
    values = np.concatenate([edges[1:], np.nextafter(edges[1:], 0), np.nextafter(edges[1:-1], 1), [1e-9]])
    expected = np.digitize(values, edges, right=True) - 1
    assert confidence_bins(torch.from_numpy(values)).tolist() == expected.tolist()
    assert confidence_bins(torch.tensor([1 / 15 * 7], dtype=torch.float32)).tolist() == \
        (np.digitize(np.float64(np.float32(7 / 15)), edges, right=True) - 1).reshape(1).tolist()


def test_batches_and_ranks_add_up():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1000, 5, generator=generator)
    target = torch.randint(0, 5, (1000,), generator=generator)
    whole = ClassificationCounts.zeros(5).update(logits, target)
    first = ClassificationCounts.zeros(5).update(logits[:300], target[:300])
    second = ClassificationCounts.zeros(5).update(logits[300:], target[300:])
    merged = first.merge(second)
    for mine, reference in zip(merged.tensors(), whole.tensors()):
        if mine.dtype == torch.int64:
            assert torch.equal(mine, reference)
        else:
            torch.testing.assert_close(mine, reference)
    batched = ClassificationCounts.zeros(5)
    for start in range(0, 1000, 128):
        batched.update(logits[start:start + 128], target[start:start + 128])
    assert summarize_classification(batched)["ece"] == pytest.approx(summarize_classification(whole)["ece"])
    assert merged.all_reduce() is merged  # no process group: unchanged
    assert torch.equal(merged.correct(), count_correct(logits, target, 5)[0])


def test_a_class_without_test_samples_is_left_out():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    target = torch.tensor([0, 1, 1])  # class 2 and 3 have no test sample; class 3 is predicted once
    out = classification_metrics(logits, target)
    assert out["recall"][2] is None and out["precision"][3] is None and out["f1"][2] is None
    assert out["recall"][:2] == pytest.approx([100.0, 50.0])
    assert out["macro_recall"] == pytest.approx(75.0)
    assert out["gmean_recall"] == pytest.approx(math.sqrt(0.5) * 100)
    assert out["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2 * 100)  # class 1: P 1, R 1/2
    empty = calibration(ClassificationCounts.zeros(4), torch.tensor([False, False, True, False]))
    assert empty["ece"] is None and empty["samples"] == 0


def test_low_precision_logits_are_calibrated_in_float32():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    half = classification_metrics(logits.bfloat16(), target)
    full = classification_metrics(logits.bfloat16().float(), target)
    assert half["ece"] == full["ece"]


def test_geometric_mean():
    assert geometric_mean(torch.tensor([0.25, 1.0])) == pytest.approx(50.0)
    assert geometric_mean(torch.full((8142,), 0.3)) == pytest.approx(30.0)  # a product would underflow to 0
    assert geometric_mean(torch.tensor([float("nan"), 0.64])) == pytest.approx(64.0)
    assert geometric_mean(torch.tensor([float("nan")])) is None


def test_errors_name_the_argument():
    counts = ClassificationCounts.zeros(3)
    with pytest.raises(ValueError, match=r"logits must be \[N, 3\]"):
        counts.update(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"target must be \[2\]"):
        counts.update(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\)"):
        counts.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        counts.update(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"groups\['many'\] must be a bool mask of the 3 classes"):
        summarize_classification(counts, {"many": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="num_bins must be >= 1"):
        ClassificationCounts.zeros(3, 0)
    with pytest.raises(ValueError, match="by must be 'true' or 'predicted'"):
        calibration(counts, by="label")
    with pytest.raises(ValueError, match="correct must not exceed"):
        precision_recall_f1(torch.tensor([2]), torch.tensor([1]), torch.tensor([2]))


def test_reliability_diagram_png(tmp_path):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(500, 3, generator=generator) * 3
    target = torch.randint(0, 3, (500,), generator=generator)
    counts = ClassificationCounts.zeros(3).update(logits, target)
    path = reliability_diagram(counts, str(tmp_path / "plots" / "reliability.png"), title="test", groups=GROUPS,
                               by="predicted")
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (550, 660)  # 5 x 6 inches at 110 dpi
