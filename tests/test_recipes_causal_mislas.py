"""The causal TDE and MiSLAS recipes: the ImageNet-LT configs carry the survey's values
(shared/reference/seed-methods.md §1.6, §2.4, §5; the MiSLAS-codebase ImageNet-LT YAMLs), the
Fashion-MNIST-LT ones load, and each ImageNet-LT config runs a few ResNeXt-50 steps end to end on a
tiny JPEG list-file set through the DALI pipeline (stage 2 on that stage 1)."""
import os

import pytest
import torch

from ltfast.train import load_config, train
from ltfast.train.schedule import lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(group, name, overrides=()):
    return load_config(os.path.join(ROOT, "configs", group, f"{name}.yaml"), list(overrides))


def _common(cfg):
    data, model, optim = cfg["data"], cfg["model"], cfg["optim"]
    assert model["arch"] == "resnext50_32x4d" and data["batch_size"] == 256 and data["dataset"] == "list"
    assert (optim["lr"], optim["momentum"], optim["weight_decay"]) == (0.1, 0.9, 5e-4)
    assert cfg["train"]["seed"] == 1


def test_imagenet_lt_causal_recipe():
    cfg = config("imagenet_lt", "causal")
    _common(cfg)
    model = cfg["model"]
    assert (model["classifier"], model["causal_heads"], model["causal_tau"], model["causal_gamma"],
            model["causal_alpha"]) == ("causal", 2, 16.0, 1 / 32, 3.0)
    assert cfg["loss"]["name"] == "ce" and cfg["optim"]["epochs"] == 200 and cfg["optim"]["schedule"] == "cosine"
    assert cfg["data"]["sampler"] == "instance" and cfg["data"]["mixup_alpha"] == 0
    # seed-methods.md §5, De-confound (causal)
    assert cfg["eval"]["reported"]["e90"] == {"top1": 51.8, "ua": 57.7, "ra": 89.8, "many": 63.0, "medium": 48.5,
                                              "few": 31.4}
    assert cfg["eval"]["reported"]["e200"] == {"top1": 51.3, "ua": 57.8, "ra": 88.8, "many": 64.9, "medium": 46.9,
                                               "few": 28.1}


def test_imagenet_lt_mislas_recipes():
    stage1 = config("imagenet_lt", "mislas_stage1")
    _common(stage1)
    assert stage1["data"]["mixup_alpha"] == 0.2 and stage1["loss"]["name"] == "ce"
    assert stage1["optim"]["epochs"] == 200 and stage1["optim"]["schedule"] == "cosine"
    assert stage1["model"]["classifier"] == "linear" and not stage1["model"]["freeze_backbone"]

    stage2 = config("imagenet_lt", "mislas_stage2")
    _common(stage2)
    data, model, loss, optim = stage2["data"], stage2["model"], stage2["loss"], stage2["optim"]
    assert (data["sampler"], data["num_samples_cls"], data["mixup_alpha"]) == ("class_balanced", 4, 0)
    assert model["init_from"].endswith("imagenet_lt/mislas_stage1/best.pt")
    assert model["freeze_backbone"] and model["shift_bn"] and model["learnable_scale"]
    assert (loss["name"], loss["smooth_head"], loss["smooth_tail"], loss["smooth_shape"]) == \
        ("label_aware_smoothing", 0.3, 0.0, "concave")
    assert (optim["epochs"], optim["head_lr_factor"], optim["schedule"], optim["warmup_epochs"]) == (10, 0.05, "cosine", 0)
    assert [lr_factor(e * 10, 10, optim) for e in (0, 5)] == pytest.approx([1.0, 0.5])
    # seed-methods.md §5, MiSLAS
    assert stage2["eval"]["reported"]["e90"] == {"top1": 51.4, "ua": 58.3, "ra": 88.2, "many": 62.1, "medium": 48.9,
                                                 "few": 32.6}
    assert stage2["eval"]["reported"]["e200"] == {"top1": 53.4, "ua": 59.7, "ra": 89.4, "many": 65.3, "medium": 50.6,
                                                  "few": 33.0}
    assert stage2["eval"]["ua"] == 59.7


def test_fmnist_lt_recipes():
    causal = config("fmnist_lt", "causal")
    assert causal["model"]["classifier"] == "causal" and causal["data"]["dataset"] == "fmnist_lt"
    assert config("fmnist_lt", "mislas_stage1")["data"]["mixup_alpha"] == 0.2
    stage2 = config("fmnist_lt", "mislas_stage2")
    assert stage2["model"]["init_from"].endswith("fmnist_lt/mislas_stage1/best.pt") and stage2["model"]["learnable_scale"]
    assert stage2["optim"]["epochs"] == 10 and stage2["optim"]["head_lr_factor"] == 0.05


# ------------------------------------------------------------------- ResNeXt-50 on list-file data

def _tiny_imagenet(root, lists, out_dir):
    return [f"data.root={root}", f"data.train_list={lists['train']}", f"data.val_list={lists['val']}",
            f"data.test_list={lists['test']}", "data.num_threads=1", "data.batch_size=8", "data.eval_batch_size=8",
            "data.crop_size=16", "data.resize_size=18", "optim.epochs=1", "optim.reference_batch=null",
            "train.progress=false", "train.plot=false", f"train.out_dir={out_dir}", "train.device=cpu"]


def test_resnext50_causal_recipe_runs(jpeg_lists, tmp_path):
    root, lists = jpeg_lists
    summary = train(config("imagenet_lt", "causal", _tiny_imagenet(root, lists, tmp_path / "causal")))
    assert summary["status"] == "finished" and summary["test"]["samples"] == 6
    model = torch.load(tmp_path / "causal" / "best.pt", weights_only=True)["model"]
    assert model["fc.weight"].shape == (3, 2048) and model["fc.feature_average"].norm() > 0


def test_resnext50_mislas_recipes_run(jpeg_lists, tmp_path):
    root, lists = jpeg_lists
    first = train(config("imagenet_lt", "mislas_stage1", _tiny_imagenet(root, lists, tmp_path / "s1")))
    assert first["status"] == "finished"
    second = train(config("imagenet_lt", "mislas_stage2", _tiny_imagenet(root, lists, tmp_path / "s2")
                          + [f"model.init_from={tmp_path / 's1' / 'best.pt'}"]))
    assert second["status"] == "finished" and second["test"]["samples"] == 6
    stage1 = torch.load(tmp_path / "s1" / "best.pt", weights_only=True)["model"]
    stage2 = torch.load(tmp_path / "s2" / "last.pt", weights_only=True)["model"]
    assert torch.equal(stage1["conv1.weight"], stage2["conv1.weight"])
    assert stage2["fc.scale.scale"].shape == (3,)
    assert not torch.equal(stage1["bn1.running_mean"], stage2["bn1.running_mean"])        # shift-BN
