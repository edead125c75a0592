"""python -m ltfast.evaluate and the post-hoc corrections (ltfast.train.posthoc): the math on hand
cases, and the CLI end to end on a one-epoch run of the tiny synthetic set (CPU, seconds)."""
import json
import re
import os

import pytest
import torch

from ltfast.train import load_config, posthoc, train
from ltfast.train.evaluation import main

from test_train import TINY


# ------------------------------------------------------------------------------------------ math

def test_tau_normalized_weight_rows():
    weight = torch.tensor([[3.0, 4.0], [0.6, 0.8]])                   # norms 5 and 1
    assert torch.equal(posthoc.tau_normalized_weight(weight, 0.0), weight)
    unit = posthoc.tau_normalized_weight(weight, 1.0)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2))
    half = posthoc.tau_normalized_weight(weight, 0.5)                 # 5 / 5^0.5 = sqrt(5)
    assert half.norm(dim=1).tolist() == pytest.approx([5 ** 0.5, 1.0])


def test_logits_from_features_equal_the_linear_head():
    head = torch.nn.Linear(6, 4)
    features = torch.randn(9, 6)
    with torch.no_grad():
        assert torch.allclose(posthoc.logits_from_features(features, head.weight, head.bias, None), head(features),
                              atol=1e-6)
        # tau-norm drops the bias (Kang et al.'s code); tau = 0 is then the bias-free product
        assert torch.allclose(posthoc.logits_from_features(features, head.weight, head.bias, 0.0),
                              features @ head.weight.t(), atol=1e-6)


def test_logit_adjustment_and_confusion_matrix_by_hand():
    log_prior = torch.log(torch.tensor([0.9, 0.1]))
    logits = torch.tensor([[3.0, 0.0], [0.5, 0.0]])
    # tau = 1 moves 2.197 = log(0.9 / 0.1) of margin from class 0 to class 1: only the 0.5 row flips
    assert posthoc.adjust(logits, log_prior, 1.0).argmax(1).tolist() == [0, 1]
    assert torch.equal(posthoc.adjust(logits, log_prior, None), logits)
    confusion = posthoc.confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_auto_tau_recovers_a_prior_shift():
    # Logits of a balanced-optimal scorer plus log(prior): the shift CE learns on long-tailed data.
    # Logit adjustment with tau = 1 removes it exactly; auto must choose a tau near 1 and restore
    # the balanced accuracy.
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([1000.0, 300.0, 100.0, 30.0, 10.0])
    log_prior = torch.log(counts / counts.sum())
    labels = torch.arange(5).repeat_interleave(200)
    clean = torch.randn(1000, 5, generator=gen) + 2.0 * torch.nn.functional.one_hot(labels, 5)
    shifted = clean + log_prior
    chosen = posthoc.choose(None, shifted, labels, None, None, log_prior, "auto", None)
    assert 0.7 <= chosen["logit_adjust"] <= 1.3 and chosen["tau_norm"] is None
    assert chosen["score"] > chosen["plain_score"] + 10
    assert chosen["score"] >= posthoc.balanced_accuracy(clean, labels, 5) - 2


def test_auto_tau_norm_on_grown_head_norms():
    # Head classes with large weight norms (what CE grows): tau-norm must pick tau > 0.
    gen = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=1)
    weight = directions * torch.tensor([[8.0], [4.0], [1.0], [0.5]])
    labels = torch.arange(4).repeat_interleave(100)
    features = 3 * directions[labels] + torch.randn(400, 16, generator=gen)
    logits = features @ weight.t()
    chosen = posthoc.choose(features, logits, labels, weight, None, torch.zeros(4), None, "auto")
    assert chosen["tau_norm"] > 0.5 and chosen["logit_adjust"] is None
    assert chosen["score"] > chosen["plain_score"]


# ---------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    train(load_config(None, TINY + [f"train.out_dir={out}", "optim.epochs=2"]))
    return out


def test_evaluate_run_folder_matches_the_trainer(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--out", str(tmp_path / "plain")]) == 0
    result = json.loads((tmp_path / "plain" / "evaluation.json").read_text())
    trained = json.loads((run_dir / "summary.json").read_text())
    plain = result["results"]["plain"]
    # same weights (best.pt), same test split: the very counts the trainer reported
    assert plain["correct"] == trained["test"]["correct"] and plain["total"] == trained["test"]["total"]
    assert plain["top1"] == pytest.approx(trained["test"]["top1"])
    confusion = torch.tensor(plain["confusion"])
    assert confusion.shape == (7, 7) and confusion.sum(1).tolist() == plain["total"]
    assert confusion.diagonal().tolist() == plain["correct"]
    assert result["checkpoint"].endswith("best.pt") and result["head"] == "fc" and "posthoc" not in result["results"]
    for name in ("confusion.png", "per_class.png"):
        assert (tmp_path / "plain" / name).stat().st_size > 1000
    assert "plain" in capsys.readouterr().out


def test_evaluate_posthoc_auto_is_chosen_on_validation(run_dir, tmp_path, capsys):
    out = tmp_path / "la"
    assert main([str(run_dir), "--logit-adjust", "auto", "--tau-norm", "0.5", "--out", str(out), "--no-plot"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    chosen = result["posthoc"]
    assert chosen["selected_on"] == "val" and chosen["tau_norm"] == 0.5
    assert chosen["logit_adjust"] in posthoc.LA_GRID
    assert len(chosen["grid"]) == len(posthoc.LA_GRID)              # tau_norm fixed: one row per tau
    assert max(s for _, _, s in chosen["grid"]) == pytest.approx(chosen["val_score"])
    assert "posthoc" in result["results"] and not (out / "confusion.png").exists()
    assert "chosen on the validation split" in capsys.readouterr().out


def test_evaluate_fixed_tau_checkpoint_file_and_val_split(run_dir, tmp_path):
    out = tmp_path / "val"
    assert main([str(run_dir / "last.pt"), "--split", "val", "--logit-adjust", "1", "--out", str(out),
                 "--no-plot"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["split"] == "val" and result["samples"] == 7 * 4
    assert result["posthoc"]["logit_adjust"] == 1.0 and result["posthoc"]["selected_on"] is None


def test_evaluate_list_file(run_dir, tmp_path):
    from ltfast.data import write_jpeg_folder
    from ltfast.train.data import load_datasets
    sets = load_datasets(load_config(None, TINY)["data"])
    listed = write_jpeg_folder(sets["test"], str(tmp_path / "jpegs"), "test")
    out = tmp_path / "list"
    assert main([str(run_dir), "--list", listed, "--root", str(tmp_path / "jpegs"), "--out", str(out), "--no-plot",
                 "data.backend=pil", "data.crop_size=12", "data.resize_size=12"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["split"] == "list-" + os.path.splitext(os.path.basename(listed))[0]
    assert result["samples"] == 7 * 15


def test_evaluate_errors(run_dir, tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    # auto needs a validation split
    assert main([str(run_dir), "--logit-adjust", "auto", "data.val_per_class=0", "--out", str(tmp_path / "x")]) == 2
    assert "validation split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run_dir), "--logit-adjust", "-1"])


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_evaluate_refuses_a_code_running_checkpoint(run_dir, tmp_path, capsys):
    _Payload.marker = tmp_path / "ran"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    torch.save({"model": _Payload()}, bad / "best.pt")
    assert main([str(bad)]) == 2          # one error line, not a traceback (trial finding 9f)
    assert re.search(r"ltfast.evaluate: error: refusing to load .*best.pt.*nothing in it was run",
                     capsys.readouterr().err)
    assert not _Payload.marker.exists()
