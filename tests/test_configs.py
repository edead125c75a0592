"""Every recipe in configs/ loads, and the ImageNet-LT ones carry the survey's values
(shared/reference/seed-methods.md §2 recipes, §5 reported numbers)."""
import glob
import os
import re

import pytest

from ltfast.train.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")))
METHODS = ["ce", "weighted_ce", "seql", "balanced_softmax", "lade", "ldam_drw", "crt"]

# seed-methods.md §5, transcribed: (Acc, UA, RA, head, middle, tail) at 90 and at 200 epochs.
REPORTED = {
    "ce": ("Softmax", (45.5, 57.3, 79.4, 66.5, 39.0, 8.6), (46.8, 57.8, 81.0, 66.9, 40.4, 12.6)),
    "weighted_ce": ("Weighted Softmax", (47.9, 57.3, 83.6, 66.3, 42.2, 15.6), (49.1, 57.8, 84.9, 57.9, 46.2, 34.0)),
    "seql": ("ESQL (SEQL)", (47.3, 57.3, 82.5, 62.5, 44.0, 15.7), (48.0, 57.8, 83.0, 63.1, 44.6, 17.2)),
    "balanced_softmax": ("Balanced Softmax", (50.8, 57.3, 88.7, 61.7, 48.0, 29.9), (51.2, 57.8, 88.6, 62.4, 47.7, 32.1)),
    "lade": ("LADE", (51.5, 57.8, 89.1, 62.2, 48.6, 31.8), (51.6, 57.8, 89.3, 63.1, 47.7, 32.7)),
    "ldam_drw": ("LDAM", (51.1, 57.3, 89.2, 62.3, 47.4, 32.5), (51.1, 57.8, 88.4, 60.0, 49.2, 31.9)),
    "crt": ("Decouple-IB-CRT", (49.9, 57.3, 87.1, 62.6, 46.2, 26.7), (50.3, 58.1, 86.6, 64.2, 46.1, 26.0)),
}
SEED_METHODS = os.path.join(ROOT, "..", "shared", "reference", "seed-methods.md")


def imagenet(method):
    return load_config(os.path.join(ROOT, "configs", "imagenet_lt", f"{method}.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg["data"]["batch_size"] % 4 == 0   # splits over 1, 2 or 4 ranks


@pytest.mark.parametrize("group", ["imagenet_lt", "fmnist_lt", "cifar10_lt", "cifar100_lt"])
def test_every_method_has_a_recipe(group):
    for method in METHODS:
        cfg = load_config(os.path.join(ROOT, "configs", group, f"{method}.yaml"))
        assert cfg["name"] and cfg["train"]["out_dir"].endswith(f"{group}/{method}")


@pytest.mark.parametrize("method", METHODS)
def test_imagenet_lt_common_recipe(method):
    cfg = imagenet(method)
    data, model, optim = cfg["data"], cfg["model"], cfg["optim"]
    assert model["arch"] == "resnext50_32x4d"
    assert data["dataset"] == "list" and data["backend"] == "dali"
    assert data["batch_size"] == 256 and data["batch_size"] // 4 == 64        # 64 per GPU on 4 GPUs
    assert (optim["lr"], optim["momentum"], optim["weight_decay"]) == (0.1, 0.9, 5e-4)
    assert (data["crop_size"], data["resize_size"], data["color_jitter"]) == (224, 256, 0.4)
    assert "ImageNet_LT_val" in data["val_list"] and "ImageNet_LT_test" in data["test_list"]
    assert (cfg["eval"]["many_threshold"], cfg["eval"]["few_threshold"]) == (100, 20)
    assert cfg["train"]["seed"] == 1
    if method != "crt":
        assert optim["epochs"] == 200 and data["sampler"] == "instance"
        assert not model["freeze_backbone"] and model["init_from"] is None
        # 90-epoch column by override, with the cosine recipes
        if method != "ldam_drw":
            assert load_config(os.path.join(ROOT, "configs", "imagenet_lt", f"{method}.yaml"),
                               ["optim.epochs=90"])["optim"]["epochs"] == 90


@pytest.mark.parametrize("method", ["ce", "weighted_ce", "seql", "balanced_softmax", "lade"])
def test_imagenet_lt_cosine_methods(method):
    optim = imagenet(method)["optim"]
    assert optim["schedule"] == "cosine" and optim["warmup_epochs"] == 0


def test_imagenet_lt_losses():
    assert imagenet("ce")["loss"]["name"] == "ce"
    assert imagenet("weighted_ce")["loss"]["name"] == "weighted_ce"
    seql = imagenet("seql")["loss"]
    assert (seql["name"], seql["gamma"], seql["lambda_"], seql["count_threshold"]) == ("seql", 0.9, 4.3e-4, None)
    assert imagenet("balanced_softmax")["loss"]["name"] == "balanced_softmax"
    lade = imagenet("lade")["loss"]
    assert (lade["name"], lade["alpha"], lade["remine_lambda"], lade["gather_batch"]) == ("lade", 0.1, 0.1, True)


def test_imagenet_lt_ldam_drw():
    cfg = imagenet("ldam_drw")
    loss, optim = cfg["loss"], cfg["optim"]
    assert (loss["name"], loss["s"], loss["max_margin"], loss["beta"], loss["drw_epoch"]) == \
        ("ldam_drw", 30.0, 0.5, 0.9999, 160)
    assert (optim["schedule"], optim["milestones"], optim["gamma"], optim["warmup_epochs"]) == \
        ("multistep", [120, 160], 0.1, 5)
    assert optim["epochs"] == 200


def test_imagenet_lt_crt_stage2():
    cfg = imagenet("crt")
    data, model, optim = cfg["data"], cfg["model"], cfg["optim"]
    assert (data["sampler"], data["num_samples_cls"]) == ("class_balanced", 4)
    assert model["freeze_backbone"] and model["init_from"].endswith("imagenet_lt/ce/best.pt")
    assert cfg["loss"]["name"] == "ce"
    assert (optim["epochs"], optim["lr"], optim["schedule"]) == (10, 0.1, "multistep")
    from ltfast.train.schedule import lr_factor
    # The survey's effective lr: 0.1 (epochs 1-2), 0.01 (3-5), 1e-3 (6-8), 1e-4 (9-10).
    lrs = [optim["lr"] * lr_factor(e * 10, 10, optim) for e in range(10)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4])


@pytest.mark.parametrize("method", METHODS)
def test_imagenet_lt_reported_numbers(method):
    cfg = imagenet(method)
    _, e90, e200 = REPORTED[method]
    keys = ("top1", "ua", "ra", "many", "medium", "few")
    assert cfg["eval"]["reported"]["e90"] == dict(zip(keys, e90))
    assert cfg["eval"]["reported"]["e200"] == dict(zip(keys, e200))
    assert cfg["eval"]["ua"] == e200[1]                     # configs run 200 epochs


@pytest.mark.skipif(not os.path.exists(SEED_METHODS), reason="shared/reference/seed-methods.md not present")
def test_transcription_matches_seed_methods():
    text = open(SEED_METHODS, encoding="utf-8").read()
    for method, (row_name, e90, e200) in REPORTED.items():
        row = re.search(r"^\|\s*\w+\s*\|\s*" + re.escape(row_name) + r"\s*\|(.*)\|\s*$", text, re.M)
        assert row, row_name
        values = [float(v) for v in row.group(1).split("|")]
        acc90, ua90, ra90, acc200, ua200, ra200, h90, m90, t90, h200, m200, t200 = values
        assert e90 == (acc90, ua90, ra90, h90, m90, t90)
        assert e200 == (acc200, ua200, ra200, h200, m200, t200)


def test_fmnist_lt_recipes():
    for method in METHODS:
        cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt", f"{method}.yaml"))
        assert cfg["data"]["dataset"] == "fmnist_lt" and cfg["model"]["arch"] == "small_resnet"
        assert cfg["optim"]["momentum"] == 0.9 and cfg["optim"]["weight_decay"] == 5e-4
    crt = load_config(os.path.join(ROOT, "configs", "fmnist_lt", "crt.yaml"))
    assert crt["model"]["freeze_backbone"] and crt["data"]["sampler"] == "class_balanced"
    assert crt["optim"]["epochs"] == 10 and crt["optim"]["milestones"] == [2, 5, 8]


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lrr=0.1", "optim.lrr"),
    ("optim.schedule=linear", "optim.schedule"),
    ("data.sampler=balanced", "data.sampler"),
    ("loss.name=focal_loss", "loss.name"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=64.5", "data.batch_size"),
    ("model.compile=1", "model.compile"),
    ("optim.milestones=[5,3]", "optim.milestones"),
    ("optim.epochs=2", "optim.milestones"),        # LDAM's milestones 120/160 must move with epochs
    ("loss.beta=1.0", "loss.beta"),
    ("eval.ua=120", "eval.ua"),
    ("bogus.key=1", "bogus"),
    ("lr=1", "lr"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(os.path.join(ROOT, "configs", "imagenet_lt", "ldam_drw.yaml"), [override])


def test_overrides_parse_yaml_and_inherit(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt", "lade.yaml"),
                      ["optim.lr=1", "eval.ua=null", "optim.milestones=[3, 5]", "name=x"])
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["optim"]["milestones"] == [3, 5] and cfg["name"] == "x"
    assert cfg["loss"]["name"] == "lade" and cfg["data"]["dataset"] == "fmnist_lt"   # from _base.yaml
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("optim: {lr: fast}\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("data: {dataset: list}\n")
    with pytest.raises(ConfigError, match="data.train_list"):
        load_config(str(tmp_path / "d.yaml"))
    (tmp_path / "e.yaml").write_text("model: {freeze_backbone: true}\n")
    with pytest.raises(ConfigError, match="model.freeze_backbone"):
        load_config(str(tmp_path / "e.yaml"))


FMNIST_METHODS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "fmnist_lt", "*.yaml"))
                        if not os.path.basename(p).startswith("_"))
# The method keys of a recipe: what the fmnist_lt and CIFAR files must agree on (the rest is the dataset's).
METHOD_KEYS = {"loss": None, "model": ("classifier", "freeze_backbone", "learnable_scale", "shift_bn", "causal_heads",
                                       "causal_tau", "causal_gamma", "tau_norm", "ncm_features", "num_experts",
                                       "reduce_dimension", "expert_scale", "bbn"),
               "data": ("sampler", "num_samples_cls", "mixup_alpha"), "optim": ("nesterov", "head_lr_factor")}
# Methods whose CIFAR configs follow the method's own CIFAR scripts instead of LDAM-DRW's recipe (their
# values are checked where the method is tested).
OWN_CIFAR_RECIPE = {"reslt": "tests/test_reslt.py::test_reslt_configs", "paco": "tests/test_paco.py::test_cifar_configs"}


@pytest.mark.parametrize("group", ["cifar10_lt", "cifar100_lt"])
@pytest.mark.parametrize("method", FMNIST_METHODS)
def test_cifar_lt_recipes(group, method):
    """configs/cifar*_lt: every fmnist_lt method with the same method keys, on LDAM-DRW's CIFAR recipe."""
    cfg = load_config(os.path.join(ROOT, "configs", group, f"{method}.yaml"))
    fmnist = load_config(os.path.join(ROOT, "configs", "fmnist_lt", f"{method}.yaml"))
    data, optim = cfg["data"], cfg["optim"]
    assert data["dataset"] == group and data["imbalance"] == 100 and data["profile"] == "exp"
    assert (data["pad"], data["flip"], data["split_seed"]) == (4, True, 0)
    assert data["mean"] == [0.4914, 0.4822, 0.4465] and data["std"] == [0.2023, 0.1994, 0.2010]
    if method in OWN_CIFAR_RECIPE:
        assert cfg["train"]["out_dir"] == f"runs/{group}/{method}" and cfg["name"] == fmnist["name"]
        assert cfg["loss"]["name"] == fmnist["loss"]["name"] and data["batch_size"] == 128
        return
    assert data["batch_size"] == 128 and optim["momentum"] == 0.9 and optim["weight_decay"] == 2e-4
    assert cfg["train"]["out_dir"] == f"runs/{group}/{method}" and cfg["name"] == fmnist["name"]
    for section, keys in METHOD_KEYS.items():
        for key in keys or [k for k in fmnist[section] if k not in ("drw_epoch", "count_threshold")]:
            assert cfg[section][key] == fmnist[section][key], f"{section}.{key}"
    expert = cfg["model"]["arch"] == "small_expert_resnet"
    assert expert == (method in ("ride", "sade")) and (expert or cfg["model"]["arch"] == "resnet32")
    if method == "bbn":  # BBN's own CIFAR recipe (configs/cifar10.yaml): x0.01 from 1-based epochs 120 and 160
        assert (optim["epochs"], optim["lr"], optim["warmup_epochs"]) == (200, 0.1, 5)
        assert (optim["schedule"], optim["milestones"], optim["gamma"]) == ("multistep", [119, 159], 0.01)
    elif not cfg["model"]["init_from"]:  # stage 1: LDAM-DRW's 200 epochs, lr 0.1, 5 warm-up, x0.01 at 160 / 180
        assert (optim["epochs"], optim["lr"], optim["warmup_epochs"]) == (200, 0.1, 5)
        assert (optim["schedule"], optim["milestones"], optim["gamma"]) == ("multistep", [160, 180], 0.01)
    else:
        assert cfg["model"]["init_from"].startswith(f"runs/{group}/")
    if cfg["loss"]["drw_epoch"] is not None:
        assert cfg["loss"]["drw_epoch"] == 160


@pytest.mark.parametrize("group, classes, arch", [("places_lt", 365, "resnet152"), ("inat2018", 8142, "resnet50")])
@pytest.mark.parametrize("method", ["ce", "balanced_softmax", "crt"])
def test_places_lt_and_inat_recipes(group, classes, arch, method):
    cfg = load_config(os.path.join(ROOT, "configs", group, f"{method}.yaml"))
    data, model = cfg["data"], cfg["model"]
    assert data["dataset"] == "list" and data["num_classes"] == classes and model["arch"] == arch
    assert data["train_list"] and data["test_list"] and data["val_list"]
    if method == "crt":
        assert model["freeze_backbone"] and model["init_from"] == f"runs/{group}/ce/best.pt"
        assert data["sampler"] == "class_balanced" and cfg["optim"]["epochs"] == 10
    elif group == "places_lt":  # LADE's: from an ImageNet checkpoint, backbone lr 0.001, classifier 0.1
        assert model["init_from"] and cfg["optim"]["lr"] == 0.001 and cfg["optim"]["head_lr_factor"] == 100.0
        assert cfg["optim"]["epochs"] == 30 and cfg["data"]["batch_size"] == 128
    else:  # LADE's: from scratch, batch 256, lr 0.1, weight decay 1e-4, cosine, 200 epochs; val = test
        assert model["init_from"] is None and data["val_list"] == data["test_list"]
        assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["optim"]["epochs"]) == (0.1, 1e-4, 200)
        assert cfg["data"]["batch_size"] == 256 and cfg["optim"]["schedule"] == "cosine"
