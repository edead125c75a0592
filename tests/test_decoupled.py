"""Decoupled stage 2 (ltfast.train.methods.decoupled): LWS, NCM and tau-normalisation. The math on hand-sized
cases, each recipe end to end on the tiny synthetic set (CPU, seconds) and through
``python -m ltfast.evaluate``, the config checks, the new recipes' values against the seed and
classifier-balancing, and a few-step ResNeXt-50 run of every new ImageNet-LT config on tiny list-file
data."""
import json
import math
import os
import re

import pytest
import torch
from torch import nn

from ltfast.train import load_config, posthoc, train
from ltfast.train.config import ConfigError
from ltfast.train.methods.decoupled import (LearnableWeightScaling, NearestClassMean, ScaledLinear, build_classifier,
                                    choose_tau_norm, class_means, effective_linear, use_lws_classifier)
from ltfast.train.evaluation import main as evaluate_main
from ltfast.train.models import find_head, freeze_backbone

from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_METHODS = os.path.join(ROOT, "..", "shared", "reference", "seed-methods.md")


# ------------------------------------------------------------------------------------------- LWS

def test_learnable_weight_scaling_multiplies_each_class():
    lws = LearnableWeightScaling(3)
    assert lws.scale.tolist() == [1.0, 1.0, 1.0] and lws.scale.requires_grad
    with torch.no_grad():
        lws.scale.copy_(torch.tensor([2.0, 0.5, -1.0]))
    logits = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 8.0, 0.5]])
    assert lws(logits).tolist() == [[2.0, 1.0, -3.0], [-8.0, 4.0, -0.5]]
    with pytest.raises(ValueError, match="4 classes.*built for 3"):
        lws(torch.zeros(2, 4))
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            LearnableWeightScaling(bad)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_lws_head_trains_only_the_scale_and_round_trips():
    model = _mlp()
    stage1 = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_backbone(model, None, 3)
    assert use_lws_classifier(model, 3) == "2"
    head = model[2]
    assert isinstance(head, ScaledLinear) and find_head(model, 3)[0] == "2"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["2.lws.scale"]
    x = torch.randn(6, 4)
    with torch.no_grad():
        head.lws.scale.copy_(torch.tensor([3.0, 0.25, 1.5]))
        hidden = torch.relu(x @ stage1["0.weight"].t() + stage1["0.bias"])
        plain = hidden @ stage1["2.weight"].t() + stage1["2.bias"]
        assert torch.allclose(model(x), plain * torch.tensor([3.0, 0.25, 1.5]), atol=1e-6)
        # the scale folded into an affine map: what ltfast.evaluate's tau-norm / logit adjustment see
        weight, bias = effective_linear(head)
        assert torch.allclose(hidden @ weight.t() + bias, model(x), atol=1e-6)
    # one SGD step (weight decay as the recipe) moves the scale and nothing else
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, weight_decay=5e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    opt.step()
    after = model.state_dict()
    assert [k for k in after if not torch.equal(after[k], before[k])] == ["2.lws.scale"]
    # checkpoint round trip: the structure rebuilt from the config takes the state dict, same outputs
    rebuilt = _mlp(seed=1)
    build_classifier(rebuilt, {"classifier": "lws", "head": None, "ncm_features": "cl2n"}, 3)
    rebuilt.load_state_dict(after)
    assert torch.equal(rebuilt[2].lws.scale, after["2.lws.scale"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(RuntimeError, match="lws.scale"):
        _mlp().load_state_dict(after)          # a plain model refuses the LWS checkpoint


# ------------------------------------------------------------------------------------------- NCM

# Zero-mean 2-d training features: class 0 along +x, class 1 along +y, class 2 at (-3, -2); class 3 empty.
TRAIN_FEATURES = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0], [0.0, 1.0], [-3.0, -2.0], [-3.0, -2.0]])
TRAIN_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def _hand_logits(x):
    """-||x/|x| - c_k||^2 with the l2n centroids (1, 0), (0, 1), (-3, -2)/sqrt(13) (unit vectors, so
    the distance is 2 - 2 cos), and -inf for the empty class 3."""
    unit = x / x.norm(dim=1, keepdim=True)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-3 / math.sqrt(13), -2 / math.sqrt(13)]])
    return torch.cat([-(2 - 2 * unit @ centroids.t()), torch.full((x.shape[0], 1), float("-inf"))], 1)


@pytest.mark.parametrize("kind, shift", [("l2n", (0.0, 0.0)), ("cl2n", (0.0, 0.0)), ("cl2n", (5.0, -7.0))])
def test_ncm_by_hand(kind, shift):
    # cl2n centres on the mean of all training features: shifting every feature (train and test) by
    # the same vector changes nothing, and on zero-mean data it is l2n.
    shift = torch.tensor(shift)
    stats = class_means(TRAIN_FEATURES + shift, TRAIN_LABELS, 4, kind)
    assert stats["counts"].tolist() == [2, 2, 2, 0]
    if kind == "cl2n":
        assert torch.allclose(stats["feature_mean"], shift, atol=1e-6)
    ncm = NearestClassMean(2, 4, kind)
    ncm.centroids.copy_(stats["centroids"])
    ncm.feature_mean.copy_(stats["feature_mean"])
    ncm.has_centroid.copy_(stats["counts"] > 0)
    test = torch.tensor([[3.0, 1.0], [-0.5, 2.0], [-1.0, -1.0], [1.0, -4.0]])
    logits = ncm(test + shift)
    assert torch.allclose(logits, _hand_logits(test), atol=1e-5)
    assert logits.argmax(1).tolist() == [0, 1, 2, 2]          # (1, -4) is nearer (-3, -2)/sqrt 13 than (1, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):         # distances stay float32 under autocast
        assert torch.equal(ncm(test + shift), logits)
    assert set(NearestClassMean(2, 4).state_dict()) == {"centroids", "feature_mean", "has_centroid"}


def test_ncm_l2n_is_not_centred():
    # the same shifted features without centring: every feature points mostly along (5, -7)
    stats = class_means(TRAIN_FEATURES + torch.tensor([5.0, -7.0]), TRAIN_LABELS, 4, "l2n")
    assert not torch.allclose(stats["centroids"][:3], class_means(TRAIN_FEATURES, TRAIN_LABELS, 4, "l2n")["centroids"][:3])
    with pytest.raises(ValueError, match="features must be 'cl2n' or 'l2n'"):
        NearestClassMean(2, 4, "un")


# -------------------------------------------------------------------------------------- tau-norm

def _tau_case():
    # head class 0 with ||W_0|| = 4, tail class 1 with ||W_1|| = 1. Class-1 images (0.45, 1) are
    # right when 4^(1 - tau) 0.45 < 1 (tau > 0.42); class-0 images (1, 0.55) when 4^(1 - tau) > 0.55
    # (tau < 1.43). So balanced top-1 is 100 for tau in 0.5 .. 1.4, else 50.
    weight = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    bias = torch.tensor([0.0, 10.0])         # dropped by tau-norm; with it, everything is class 1
    features = torch.tensor([[1.0, 0.55]] * 3 + [[0.45, 1.0]] * 2)
    labels = torch.tensor([0, 0, 0, 1, 1])
    return features, labels, weight, bias


def test_tau_norm_choice_by_hand():
    features, labels, weight, bias = _tau_case()
    chosen = choose_tau_norm(features, labels, weight, bias, 2)
    curve = dict((round(t, 1), s) for t, s in chosen["val_curve"])
    assert sorted(curve) == posthoc.NORM_GRID
    assert all(curve[t] == (100.0 if 0.5 <= t <= 1.4 else 50.0) for t in curve), curve
    assert chosen["tau"] == 0.5 and chosen["val_top1"] == 100.0 and chosen["selected_on"] == "val"
    assert chosen["val_plain_top1"] == 50.0
    # the same choice as `python -m ltfast.evaluate --tau-norm auto` makes (posthoc.choose)
    logits = features @ weight.t() + bias
    auto = posthoc.choose(features, logits, labels, weight, bias, torch.zeros(2), None, "auto")
    assert (auto["tau_norm"], auto["score"], auto["plain_score"]) == (0.5, 100.0, 50.0)
    fixed = choose_tau_norm(features, labels, weight, bias, 2, fixed=0.25)
    assert (fixed["tau"], fixed["val_top1"], fixed["selected_on"]) == (0.25, 50.0, None)
    assert [0.25, 50.0] in fixed["val_curve"]


# ---------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("decoupled") / "ce"
    train(load_config(None, TINY + [f"train.out_dir={out}", "optim.epochs=2"]))
    return out


def _stage2(stage1, out, kind, *extra):
    return load_config(None, TINY + [f"train.out_dir={out}", f"model.init_from={stage1 / 'best.pt'}",
                                     f"model.classifier={kind}"] + list(extra))


def _evaluate_matches_trainer(run, tmp_path, *args):
    out = tmp_path / "eval"
    assert evaluate_main([str(run), "--out", str(out), "--no-plot", *args]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    trained = json.loads((run / "summary.json").read_text())
    assert result["results"]["plain"]["correct"] == trained["test"]["correct"]
    assert result["results"]["plain"]["total"] == trained["test"]["total"]
    return result, trained


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_lws_stage_end_to_end(stage1, tmp_path):
    run = tmp_path / "lws"
    summary = train(_stage2(stage1, run, "lws", "model.freeze_backbone=true", "data.sampler=class_balanced",
                            "optim.epochs=2", "optim.warmup_epochs=0"))
    assert summary["status"] == "finished" and summary["best_epoch"] in (1, 2)
    before, after = _weights(stage1 / "best.pt"), _weights(run / "last.pt")
    assert set(after) == set(before) | {"fc.lws.scale"}
    learned = [k for k in before if "running" not in k and "num_batches" not in k and not torch.equal(before[k], after[k])]
    assert learned == []                               # backbone and fc weight / bias frozen
    assert not torch.equal(after["fc.lws.scale"], torch.ones(7))
    assert "fc.lws.scale" in _weights(run / "best.pt")
    result, _ = _evaluate_matches_trainer(run, tmp_path)
    assert result["head"] == "fc"


def test_ncm_stage_end_to_end(stage1, tmp_path):
    from ltfast.train.evaluation import collect
    from ltfast.train.models import build_model
    from ltfast.train.checkpoint import load_model_weights
    from ltfast.train.data import build_data
    run = tmp_path / "ncm"
    cfg = _stage2(stage1, run, "ncm")
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["selection"].startswith("no training: nearest class mean")
    assert summary["decoupled"]["method"] == "ncm" and summary["decoupled"]["train_images"] == sum(summary["class_counts"])
    assert json.loads((run / "history.jsonl").read_text().splitlines()[0])["val_top1"] == summary["decoupled"]["val_top1"]
    saved = _weights(run / "best.pt")
    # the class means, recomputed independently: stage-1 features of every training image, centred, normalised
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    from ltfast.train.data import make_loader
    model = build_model("small_resnet", 7, 1, 8)
    load_model_weights(model, str(stage1 / "best.pt"))
    plain = make_loader(data, "train", cfg["data"], sampler=None, batch_size=50, device=torch.device("cpu"), train=False,
                        seed=0)
    got = collect(model, plain, model.fc, torch.device("cpu"))
    features = got["features"].double()
    assert features.shape[0] == sum(summary["class_counts"])
    mean = features.mean(0)
    unit = (features - mean) / (features - mean).norm(dim=1, keepdim=True)
    expected = torch.stack([unit[got["labels"] == c].mean(0) for c in range(7)]).float()
    assert torch.allclose(saved["fc.centroids"], expected, atol=1e-5)
    assert torch.allclose(saved["fc.feature_mean"], mean.float(), atol=1e-5)
    result, _ = _evaluate_matches_trainer(run, tmp_path)
    with pytest.raises(ConfigError, match="--tau-norm: the head fc is a NearestClassMean"):
        from ltfast.train.evaluation import build_parser, evaluate_run
        evaluate_run(build_parser().parse_args([str(run), "--tau-norm", "1", "--out", str(tmp_path / "x")]))


def test_tau_norm_stage_end_to_end(stage1, tmp_path):
    run = tmp_path / "tau"
    summary = train(_stage2(stage1, run, "tau_norm"))
    chosen = summary["decoupled"]
    assert summary["status"] == "finished" and chosen["selected_on"] == "val"
    assert [t for t, _ in chosen["val_curve"]] == posthoc.NORM_GRID
    assert chosen["val_top1"] == max(s for _, s in chosen["val_curve"])
    assert chosen["tau"] == next(t for t, s in chosen["val_curve"] if s == chosen["val_top1"])   # smallest best
    before, after = _weights(stage1 / "best.pt"), _weights(run / "best.pt")
    assert torch.allclose(after["fc.weight"], posthoc.tau_normalized_weight(before["fc.weight"], chosen["tau"]))
    assert torch.equal(after["fc.bias"], torch.zeros(7))
    assert torch.equal(after["stem.0.weight"], before["stem.0.weight"])
    _evaluate_matches_trainer(run, tmp_path)
    # the recipe and `ltfast.evaluate --tau-norm auto` on the stage-1 run choose the same tau on val
    out = tmp_path / "posthoc"
    assert evaluate_main([str(stage1), "--tau-norm", "auto", "--out", str(out), "--no-plot"]) == 0
    posthoc_choice = json.loads((out / "evaluation.json").read_text())["posthoc"]
    assert posthoc_choice["tau_norm"] == chosen["tau"]
    assert posthoc_choice["val_score"] == pytest.approx(chosen["val_top1"])


def test_tau_norm_fixed_without_checkpoints(stage1, tmp_path):
    summary = train(_stage2(stage1, tmp_path / "fixed", "tau_norm", "model.tau_norm=0.5", "train.save_checkpoints=false"))
    assert summary["decoupled"]["tau"] == 0.5 and summary["decoupled"]["selected_on"] is None
    assert not (tmp_path / "fixed" / "best.pt").exists() and (tmp_path / "fixed" / "summary.json").exists()


# ------------------------------------------------------------------------------------------ configs

FMNIST = os.path.join(ROOT, "configs", "fmnist_lt")
IMAGENET = os.path.join(ROOT, "configs", "imagenet_lt")


@pytest.mark.parametrize("recipe, override, key", [
    ("lws", "model.freeze_backbone=false", "model.classifier: lws trains only the per-class scale"),
    ("ncm", "model.init_from=null", "model.classifier: ncm is a decoupled stage 2 and needs model.init_from"),
    ("tau_norm", "model.tau_norm=-1", "model.tau_norm: must be auto or a number >= 0"),
    ("tau_norm", "model.tau_norm=best", "model.tau_norm: must be auto or a number >= 0"),
    ("tau_norm", "model.tau_norm=true", "model.tau_norm: must be str or int or float"),
    ("tau_norm", "data.val_per_class=0", "model.tau_norm: auto chooses tau on the validation split"),
    ("ce", "model.tau_norm=0.5", "model.tau_norm: only used by model.classifier=tau_norm"),
    ("ce", "model.ncm_features=l2n", "model.ncm_features: only used by model.classifier=ncm"),
    ("ncm", "model.ncm_features=un", "model.ncm_features: must be one of"),
    ("ce", "model.classifier=knn", "model.classifier: must be one of"),
])
def test_config_errors_name_the_key(recipe, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(os.path.join(FMNIST, f"{recipe}.yaml"), [override])
    assert load_config(os.path.join(FMNIST, "tau_norm.yaml"), ["data.val_per_class=0", "model.tau_norm=1"])


def test_stage2_on_a_cosine_stage1_is_refused(tmp_path):
    model = _mlp()
    from ltfast.train.models import use_cosine_classifier
    use_cosine_classifier(model, 3)
    with pytest.raises(ConfigError, match="lws needs a plain nn.Linear classifier.*CosineLinear"):
        use_lws_classifier(model, 3)


def _imagenet(name, *overrides):
    return load_config(os.path.join(IMAGENET, f"{name}.yaml"), list(overrides))


def test_imagenet_lt_lws_ncm_tau_norm_recipes():
    lws = _imagenet("lws")
    assert (lws["model"]["classifier"], lws["model"]["freeze_backbone"]) == ("lws", True)
    assert lws["model"]["init_from"].endswith("imagenet_lt/ce/best.pt")
    assert (lws["data"]["sampler"], lws["data"]["num_samples_cls"], lws["data"]["batch_size"]) == ("class_balanced", 4, 256)
    # cls_lws.yaml: 5 epochs, cosine, lr 0.2 for 512 = 0.1 for 256, momentum 0.9, wd 5e-4
    assert (lws["optim"]["epochs"], lws["optim"]["schedule"], lws["optim"]["lr"]) == (5, "cosine", 0.1)
    assert (lws["optim"]["momentum"], lws["optim"]["weight_decay"], lws["loss"]["name"]) == (0.9, 5e-4, "ce")
    ncm = _imagenet("ncm")
    assert (ncm["model"]["classifier"], ncm["model"]["ncm_features"]) == ("ncm", "cl2n")
    tau = _imagenet("tau_norm")
    assert (tau["model"]["classifier"], tau["model"]["tau_norm"]) == ("tau_norm", "auto")
    for cfg in (ncm, tau):
        assert cfg["model"]["init_from"].endswith("imagenet_lt/ce/best.pt") and cfg["data"]["val_list"]
    for name in ("lws", "ncm", "tau_norm"):
        cfg = load_config(os.path.join(FMNIST, f"{name}.yaml"))
        assert cfg["model"]["classifier"] == name and cfg["model"]["init_from"] == "runs/fmnist_lt/ce/best.pt"


@pytest.mark.parametrize("sampler", ["class_balanced", "square_root", "progressive"])
def test_imagenet_lt_sampler_stage1_and_crt(sampler):
    stage1, ce = _imagenet(f"ce_{sampler}"), _imagenet("ce")
    assert stage1["data"]["sampler"] == sampler and stage1["data"]["num_samples_cls"] == 4
    for section in ("model", "loss", "optim"):                 # the survey's CE recipe otherwise
        assert stage1[section] == ce[section], section
    crt, base = _imagenet(f"crt_{sampler}"), _imagenet("crt")
    assert crt["model"]["init_from"] == f"runs/imagenet_lt/ce_{sampler}/best.pt"
    assert crt["model"]["init_from"] == os.path.join(stage1["train"]["out_dir"], "best.pt")
    assert {**crt["model"], "init_from": None} == {**base["model"], "init_from": None}
    for section in ("data", "loss", "optim"):                  # cls_crt.yaml unchanged
        assert crt[section] == base[section], section


def _seed_text():
    if not os.path.exists(SEED_METHODS):
        pytest.skip("shared/reference/seed-methods.md not present")
    return open(SEED_METHODS, encoding="utf-8").read()


@pytest.mark.parametrize("sampler, row_name", [("class_balanced", "Decouple-CB-CRT"), ("square_root", "Decouple-SR-CRT"),
                                               ("progressive", "Decouple-PB-CRT")])
def test_crt_reported_numbers_match_seed_methods(sampler, row_name):
    row = re.search(r"^\|\s*\w+\s*\|\s*" + re.escape(row_name) + r"\s*\|(.*)\|\s*$", _seed_text(), re.M)
    acc90, ua90, ra90, acc200, ua200, ra200, h90, m90, t90, h200, m200, t200 = map(float, row.group(1).split("|"))
    cfg = _imagenet(f"crt_{sampler}")
    keys = ("top1", "ua", "ra", "many", "medium", "few")
    assert cfg["eval"]["reported"]["e90"] == dict(zip(keys, (acc90, ua90, ra90, h90, m90, t90)))
    assert cfg["eval"]["reported"]["e200"] == dict(zip(keys, (acc200, ua200, ra200, h200, m200, t200)))
    assert cfg["eval"]["ua"] == ua200


def test_lws_ncm_reported_numbers_match_the_survey_fig3():
    # seed-methods.md §5: "| Softmax | 46.8 / 50.2 / 50.2 / 50.8 | ..." columns Joint / NCM / cRT / LWS
    row = re.search(r"^\s*\|\s*Softmax\s*\|((?:\s*[\d.]+ / [\d.]+ / [\d.]+ / [\d.]+\s*\|){4})\s*$", _seed_text(), re.M)
    cells = [[float(v) for v in cell.split("/")] for cell in row.group(1).strip(" |").split("|")]
    for name, column in (("ncm", 1), ("lws", 3)):
        top1, many, medium, few = (cell[column] for cell in cells)
        assert _imagenet(name)["eval"]["reported"]["e200"] == {"top1": top1, "many": many, "medium": medium, "few": few}


# ------------------------------------------------------------------ ResNeXt-50 on tiny list-file data

NEW_IMAGENET_CONFIGS = ["ce_class_balanced", "ce_square_root", "ce_progressive", "crt_class_balanced",
                        "crt_square_root", "crt_progressive", "lws", "ncm", "tau_norm"]
# 4 classes of 8, 5, 3, 2 RGB 16x16 images (one step of 16), 2 per class for val and test. ResNeXt-50
# takes 16x16 (stages at 4, 2, 1, 1 pixels): a step costs ~1/4 of one at 32x32 (3.5-7 s on the shared
# 2-core machine at batch 16).
LIST_DATA = ["data.dataset=synthetic", "data.num_classes=4", "data.n_max=8", "data.ratio=4", "data.image_size=16",
             "data.channels=3", "data.val_per_class=2", "data.test_per_class=2"]


@pytest.fixture(scope="module")
def list_data(tmp_path_factory):
    pytest.importorskip("nvidia.dali")
    from ltfast.data import write_jpeg_folder
    from ltfast.train.data import load_datasets
    root = tmp_path_factory.mktemp("list_data")
    sets = load_datasets(load_config(None, LIST_DATA)["data"])
    lists = {split: write_jpeg_folder(sets[split], str(root / "jpegs"), split) for split in ("train", "val", "test")}
    stage1 = root / "stage1"
    overrides = _list_overrides(root, lists) + [f"train.out_dir={stage1}", "optim.epochs=1"]
    train(_imagenet("ce_class_balanced", *overrides))      # the stage 1 every stage 2 below starts from
    return root, lists, stage1 / "best.pt"


def _list_overrides(root, lists):
    return [f"data.root={root / 'jpegs'}", f"data.train_list={lists['train']}", f"data.val_list={lists['val']}",
            f"data.test_list={lists['test']}", "data.crop_size=16", "data.resize_size=16", "data.num_threads=1",
            "data.batch_size=16", "data.eval_batch_size=8", "train.progress=false", "train.plot=false",
            "train.tensorboard=false"]


@pytest.mark.parametrize("name", NEW_IMAGENET_CONFIGS[1:])
def test_imagenet_lt_config_runs_resnext50_on_list_files(list_data, tmp_path, name):
    root, lists, stage1 = list_data
    extra = _list_overrides(root, lists) + [f"train.out_dir={tmp_path / name}", "optim.epochs=1",
                                            "train.save_checkpoints=false"]
    cfg = _imagenet(name)
    if cfg["model"]["init_from"]:
        extra.append(f"model.init_from={stage1}")
    if cfg["optim"]["schedule"] == "multistep":
        extra.insert(0, "optim.milestones=[0]")            # cRT's [2, 5, 8] scaled to one epoch
    summary = train(_imagenet(name, *extra))
    assert summary["status"] == "finished" and summary["test"]["samples"] == 8
    assert summary["config"]["model"]["arch"] == "resnext50_32x4d" and summary["class_counts"] == [8, 5, 3, 2]
    if name in ("ncm", "tau_norm"):
        assert summary["decoupled"]["method"] == name and summary["history"][0]["epoch"] == 0


# ------------------------------------------------------------------------------------------- DDP

def _ddp_stage2_worker(rank, world, port, runs):
    from ddp_support import leave_worker, leave_worker_after_error, set_torchrun_environment
    set_torchrun_environment(rank, world, port)
    try:
        for overrides in runs:
            train(load_config(None, overrides))
    finally:
        leave_worker_after_error()
    leave_worker()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ncm_and_tau_norm_under_ddp_equal_one_process(stage1, tmp_path):
    # 2 gloo ranks each see half of the training / validation images; the class means, the tau curve
    # and the test counts must be those of one process over everything.
    import torch.multiprocessing as mp
    from ddp_support import free_port
    runs = {kind: _stage2(stage1, tmp_path / f"ddp_{kind}", kind, "train.plot=false") for kind in ("ncm", "tau_norm")}
    overrides = [TINY + [f"train.out_dir={tmp_path / f'ddp_{kind}'}", f"model.init_from={stage1 / 'best.pt'}",
                         f"model.classifier={kind}", "train.plot=false"] for kind in runs]
    mp.spawn(_ddp_stage2_worker, args=(2, free_port(), overrides), nprocs=2, join=True)
    for kind, cfg in runs.items():
        cfg["train"]["out_dir"] = str(tmp_path / f"one_{kind}")
        single = train(cfg)
        ddp = json.loads((tmp_path / f"ddp_{kind}" / "summary.json").read_text())
        assert ddp["world_size"] == 2 and ddp["test"]["correct"] == single["test"]["correct"]
        one, two = _weights(tmp_path / f"one_{kind}" / "best.pt"), _weights(tmp_path / f"ddp_{kind}" / "best.pt")
        for key in one:
            assert torch.allclose(one[key].float(), two[key].float(), atol=1e-5), key
        if kind == "tau_norm":
            assert ddp["decoupled"]["val_curve"] == single["decoupled"]["val_curve"]     # from integer counts
