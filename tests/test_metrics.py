"""Per-class and many/medium/few metrics against hand-computed cases."""
import json
import math

import pytest
import torch

from ltfast.train import metrics


def test_count_correct_from_logits_and_predictions():
    target = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    correct, total = metrics.count_correct(pred, target, 4)
    assert correct.tolist() == [1, 1, 2, 0]
    assert total.tolist() == [2, 1, 3, 0]
    logits = torch.nn.functional.one_hot(pred, 4).float()
    assert [t.tolist() for t in metrics.count_correct(logits, target, 4)] == [[1, 1, 2, 0], [2, 1, 3, 0]]


def test_per_class_accuracy_nan_for_absent_class():
    acc = metrics.per_class_accuracy(torch.tensor([1, 1, 2, 0]), torch.tensor([2, 1, 3, 0]))
    assert acc[:3].tolist() == [0.5, 1.0, pytest.approx(2 / 3)]
    assert math.isnan(acc[3])


def test_shot_groups_thresholds():
    # many: > 100, medium: 20..100 inclusive, few: < 20 (survey Ensemble test.py)
    groups = metrics.shot_groups([101, 100, 20, 19, 1000, 5])
    assert groups["many"].tolist() == [True, False, False, False, True, False]
    assert groups["medium"].tolist() == [False, True, True, False, False, False]
    assert groups["few"].tolist() == [False, False, False, True, False, True]


def test_summarize_hand_computed():
    # 4 classes, train counts 500 / 50 / 50 / 5: many {0}, medium {1, 2}, few {3}
    groups = metrics.shot_groups([500, 50, 50, 5])
    correct = torch.tensor([9, 5, 2, 1])
    total = torch.tensor([10, 10, 10, 10])
    out = metrics.summarize(correct, total, groups, ua=50.0)
    assert out["top1"] == pytest.approx((90 + 50 + 20 + 10) / 4)       # 42.5
    assert out["micro"] == pytest.approx(17 / 40 * 100)
    assert out["many"] == pytest.approx(90.0)
    assert out["medium"] == pytest.approx(35.0)                          # mean of 50 and 20
    assert out["few"] == pytest.approx(10.0)
    assert out["ra"] == pytest.approx(42.5 / 50 * 100)                   # RA = Acc / UA
    assert out["per_class"] == pytest.approx([90.0, 50.0, 20.0, 10.0])
    assert (out["many_classes"], out["medium_classes"], out["few_classes"]) == (1, 2, 1)
    assert out["samples"] == 40


def test_summarize_unbalanced_split_top1_is_class_mean():
    groups = metrics.shot_groups([500, 5])
    out = metrics.summarize(torch.tensor([90, 0]), torch.tensor([90, 10]), groups)
    assert out["top1"] == pytest.approx(50.0)   # mean per-class accuracy, not 90 % micro accuracy
    assert out["micro"] == pytest.approx(90.0)


def test_summarize_empty_group_and_absent_class():
    groups = metrics.shot_groups([500, 400])   # no medium, no few classes
    out = metrics.summarize(torch.tensor([1, 0]), torch.tensor([1, 0]), groups)
    assert out["medium"] is None and out["few"] is None
    assert out["top1"] == pytest.approx(100.0)   # the class with no test sample does not count
    assert out["per_class"][1] is None


def test_shot_split_files(tmp_path):
    import numpy as np
    table = np.zeros((3, 4), dtype=bool)
    table[0, [0]] = table[1, [1, 3]] = table[2, [2]] = True
    np.save(tmp_path / "shot_list.npy", table)
    groups = metrics.shot_groups([1, 1, 1, 1], split_file=str(tmp_path / "shot_list.npy"))
    assert groups["medium"].tolist() == [False, True, False, True]
    (tmp_path / "split.json").write_text(json.dumps({"many": [0], "medium": [1, 3], "few": [2]}))
    groups = metrics.shot_groups([1, 1, 1, 1], split_file=str(tmp_path / "split.json"))
    assert groups["few"].tolist() == [False, False, True, False]
    (tmp_path / "bad.json").write_text(json.dumps({"many": [0, 1], "medium": [1, 3], "few": [2]}))
    with pytest.raises(ValueError, match="exactly one group"):
        metrics.shot_groups([1, 1, 1, 1], split_file=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"shape \[3, 5\]"):
        metrics.shot_groups([1] * 5, split_file=str(tmp_path / "shot_list.npy"))


def test_plot_writes_png(tmp_path):
    groups = metrics.shot_groups([500, 50, 5])
    path = metrics.plot_per_class([90.0, None, 10.0], [50, 500, 5], groups, str(tmp_path / "p.png"), "t",
                                  ["a", "b", "c"])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
