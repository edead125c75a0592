"""The trainer end to end on a tiny synthetic long-tailed set (CPU, seconds): summary and files,
exact resume, decoupled stage 2, and a 2-process gloo DDP run whose all-reduced test metrics equal a
single-process evaluation of the same weights."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_support import free_port, leave_worker, leave_worker_after_error, set_torchrun_environment
from ltfast.train import load_config, train
from ltfast.train import metrics
from ltfast.train.checkpoint import load_model_weights
from ltfast.train.data import build_data
from ltfast.train.engine import evaluate
from ltfast.train.models import build_model

# 7 classes, 64 .. 6 training images (ratio ~10): many {0}, medium {1..4}, few {5, 6}
TINY = ["data.dataset=synthetic", "data.num_classes=7", "data.n_max=128", "data.ratio=10", "data.image_size=12",
        "data.channels=1", "data.val_per_class=4", "data.test_per_class=15", "data.batch_size=32",
        "data.eval_batch_size=16", "data.pad=1", "data.mean=[0.5]", "data.std=[0.25]",
        "model.width=8", "optim.epochs=3", "optim.lr=0.05", "optim.warmup_epochs=1", "train.progress=false",
        "eval.many_threshold=100", "eval.few_threshold=20"]


def tiny(tmp_path, *extra):
    return load_config(None, TINY + [f"train.out_dir={tmp_path}"] + list(extra))


def test_train_writes_summary_plot_and_checkpoints(tmp_path):
    summary = train(tiny(tmp_path, "loss.name=balanced_softmax"))
    for name in ("summary.json", "per_class.png", "last.pt", "best.pt", "config.yaml"):
        assert (tmp_path / name).exists(), name
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    test = on_disk["test"]
    assert test["samples"] == 7 * 15 and len(test["per_class"]) == 7
    assert (test["many_classes"], test["medium_classes"], test["few_classes"]) == (1, 4, 2)
    assert on_disk["class_counts"][0] == 128 and on_disk["class_counts"][-1] == 12
    assert len(on_disk["history"]) == 3 and on_disk["selection"].startswith("best validation")
    assert 1 <= on_disk["best_epoch"] <= 3
    assert summary["test"]["top1"] == pytest.approx(test["top1"])


def _final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "last.pt"), weights_only=True)


@pytest.mark.parametrize("loss", ["seql", "ldam_drw"])
def test_resume_is_exact(tmp_path, loss):
    # SEQL draws a seed from the global generator every step (RNG state must be restored); LDAM-DRW
    # switches its weights at drw_epoch (loss state and schedule position must be restored).
    extra = ["loss.name=" + loss, "loss.count_threshold=50", "loss.drw_epoch=1", "optim.epochs=3"]
    train(tiny(tmp_path / "full", *extra))
    stopped = train(tiny(tmp_path / "cut", *extra, "train.stop_after=1"))
    assert stopped["status"] == "stopped" and stopped["epoch"] == 1
    resumed = train(tiny(tmp_path / "cut", *extra, "train.resume=true"))
    full, cut = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut")
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    for a, b in zip(full["optimizer"]["state"].values(), cut["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert full["state"]["best_epoch"] == cut["state"]["best_epoch"]
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["test"]["per_class"] == resumed["test"]["per_class"]


def test_resume_true_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.resume"):
        train(tiny(tmp_path, "train.resume=true"))


def test_decoupled_stage2_trains_only_the_classifier(tmp_path):
    train(tiny(tmp_path / "stage1", "optim.epochs=1", "optim.warmup_epochs=0"))
    stage1 = torch.load(tmp_path / "stage1" / "best.pt", weights_only=True)["model"]
    summary = train(tiny(tmp_path / "stage2", f"model.init_from={tmp_path / 'stage1' / 'best.pt'}",
                         "model.freeze_backbone=true", "data.sampler=class_balanced", "optim.epochs=2",
                         "optim.schedule=multistep", "optim.milestones=[1]", "optim.warmup_epochs=0"))
    stage2 = torch.load(tmp_path / "stage2" / "last.pt", weights_only=True)["model"]
    assert summary["status"] == "finished"
    assert not torch.equal(stage1["fc.weight"], stage2["fc.weight"])
    assert torch.equal(stage1["stem.0.weight"], stage2["stem.0.weight"])        # frozen
    assert torch.equal(stage1["layer3.conv2.weight"], stage2["layer3.conv2.weight"])
    # the model stays in train mode: BN statistics are re-estimated on the balanced batches
    assert not torch.equal(stage1["stem.1.running_mean"], stage2["stem.1.running_mean"])


def _ddp_worker(rank, world, port, overrides):
    set_torchrun_environment(rank, world, port)
    try:
        train(load_config(None, overrides))
    finally:
        leave_worker_after_error()
    leave_worker()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_metrics_equal_single_process(tmp_path):
    # LADE with gather_batch exercises the all-gather inside the loss too; the 105 test images split
    # 53 / 52 over the ranks, in batches of 8 with a partial last batch.
    overrides = TINY + [f"train.out_dir={tmp_path}", "loss.name=lade", "loss.gather_batch=true",
                        "optim.epochs=2", "train.seed=3"]
    mp.spawn(_ddp_worker, args=(2, free_port(), overrides), nprocs=2, join=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    assert summary["test"]["samples"] == 105

    # Single process, the same weights (best.pt, the ones the DDP run tested), the whole test set.
    cfg = load_config(None, overrides)
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    model = build_model("small_resnet", 7, 1, 8)
    load_model_weights(model, str(tmp_path / "best.pt"))
    correct, total = evaluate(model, data["test_loader"], 7, torch.device("cpu"))
    assert correct.tolist() == summary["test"]["correct"]
    assert total.tolist() == summary["test"]["total"]
    single = metrics.summarize(correct, total, metrics.shot_groups(summary["class_counts"]))
    for key in ("top1", "many", "medium", "few", "per_class"):
        assert single[key] == summary["test"][key], key
    # the calibration / precision tables are all-reduced too: the same bins and ECE as one process
    from ltfast.train.calibration import summarize_classification
    from ltfast.train.engine import evaluate_split
    result = evaluate_split(model, data["test_loader"], 7, torch.device("cpu"), calibrate=True)
    calibrated = summarize_classification(result.classification, metrics.shot_groups(summary["class_counts"]))
    assert calibrated["bins"]["bin_count"] == summary["test"]["bins"]["bin_count"]
    assert calibrated["f1"] == pytest.approx(summary["test"]["f1"], abs=1e-9)
    for key in ("ece", "confidence", "macro_f1", "gmean_recall", "many_ece", "many_macro_f1"):
        assert calibrated[key] == pytest.approx(summary["test"][key], abs=1e-9), key


def test_list_file_dataset_trains_through_the_dali_pipeline(tmp_path):
    # Any root + list files: no code change between the in-memory set and JPEGs on disk.
    pytest.importorskip("nvidia.dali")
    from ltfast.data import write_jpeg_folder
    from ltfast.train.data import load_datasets
    sets = load_datasets(load_config(None, TINY)["data"])       # the synthetic set, written as JPEGs
    lists = {split: write_jpeg_folder(sets[split], str(tmp_path / "jpegs"), split) for split in ("train", "val", "test")}
    summary = train(load_config(None, [
        "data.dataset=list", f"data.root={tmp_path / 'jpegs'}", f"data.train_list={lists['train']}",
        f"data.val_list={lists['val']}", f"data.test_list={lists['test']}", "data.backend=dali",
        "data.crop_size=12", "data.resize_size=12", "data.mean=[0.5]", "data.std=[0.25]", "data.num_threads=1",
        "data.batch_size=32", "data.eval_batch_size=16", "model.width=8", "optim.epochs=1", "optim.warmup_epochs=0",
        "train.progress=false", f"train.out_dir={tmp_path / 'run'}"]))
    assert summary["test"]["samples"] == 7 * 15
    assert summary["class_counts"] == sets["class_counts"]
