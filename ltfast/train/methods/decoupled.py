"""Decoupled stage 2 (Kang et al., ICLR 2020, "Decoupling Representation and Classifier"): on the
backbone of a stage-1 checkpoint (``model.init_from``), re-balance only the classifier.

``model.classifier`` picks the method; each is a recipe of ``python -m ltfast.train`` whose
checkpoint ``python -m ltfast.evaluate`` reads like any other:

- ``lws``, learnable weight scaling: logits ``s_c · (W_c·f + b_c)``. ``W``, ``b`` and the whole
  backbone stay frozen; only the per-class scale ``s`` (init 1) trains, on class-balanced batches.
  classifier-balancing's ``TauNormClassifier.py`` (its LWS module) and ``cls_lws.yaml``: 5 epochs,
  ClassAwareSampler with 4 images per class, cosine lr, SGD with weight decay on ``s`` too; the
  stage-1 classifier is loaded (their load_model skips only a DotProductClassifier). The model stays
  in train mode, so BN statistics are re-estimated on the balanced batches, as in their code and
  the survey's cRT (seed-methods.md §2.2).
- ``ncm``, nearest class mean, no training: the class means of the training set's features
  (evaluation transform, model in eval mode, as their ``get_knncentroids``), logits
  ``-||f̂ - c_k||²``. ``model.ncm_features``: ``cl2n`` (default, their ``--feat_type``): f̂ =
  normalize(f - mean of all training features); ``l2n``: f̂ = normalize(f). Their class means are
  the means of the normalised features and are not re-normalised; neither are these.
- ``tau_norm``, tau-normalisation, no training: rows ``W_c / ||W_c||^tau`` and the bias dropped (as
  their ``tau_norm.py``), tau the best of 0, 0.1, ..., 2 on the validation split (their script
  prints the 21 values on each split; choosing on val is ours, the test set is never looked at), or
  ``model.tau_norm`` when a number. The checkpoint holds the normalised ``fc.weight`` and a zero
  ``fc.bias``: a plain linear model equal to the tau-normalised one.

The no-training stages evaluate the validation split once (reported as the run's validation score)
and the test split once, and write ``best.pt``, ``summary.json`` (with ``decoupled``: the chosen
tau and the validation curve, or the NCM settings) and ``history.jsonl`` like a trained run.
Everything is DDP-aware: features are computed on each rank's shard and only sums and per-class
counts are all-reduced.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .. import metrics, posthoc, schema
from ..data import make_loader
from ..distributed import all_reduce_sum
from ..errors import ConfigError
from ..models import find_head, replace_head
from .base import Method


# ------------------------------------------------------------------------------------------ modules

class LearnableWeightScaling(nn.Module):
    """``logits * scale``, one learnable scale per class (init 1): LWS's rescaling of a classifier's
    outputs (Kang et al. 2020; MiSLAS stage 2 uses the same module). ``scale`` is a parameter, so it
    is in the state_dict and in ``model.parameters()``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"LearnableWeightScaling: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(num_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"LearnableWeightScaling: logits have {logits.shape[-1]} classes in their last "
                             f"dimension, the module was built for {self.num_classes}")
        return logits * self.scale

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class ScaledLinear(nn.Linear):
    """The LWS head: ``lws(x @ W^T + b)``. An ``nn.Linear`` (so the head rule finds it and a stage-1
    ``fc.weight`` / ``fc.bias`` keep their names) plus ``lws.scale``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.lws = LearnableWeightScaling(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lws(super().forward(x))


class NearestClassMean(nn.Module):
    """NCM head: ``-||f̂ - c_k||²`` for every class k (squared Euclidean distance, larger is nearer),
    f̂ the transformed input feature (see the module docstring). ``centroids`` [C, D],
    ``feature_mean`` [D] and ``has_centroid`` [C] are buffers (in the checkpoint); a class without
    training images has no centroid and gets logit -inf."""

    is_classifier_head = True

    def __init__(self, in_features: int, out_features: int, features: str = "cl2n") -> None:
        super().__init__()
        if features not in ("cl2n", "l2n"):
            raise ValueError(f"NearestClassMean: features must be 'cl2n' or 'l2n', got {features!r}")
        self.in_features, self.out_features, self.features = in_features, out_features, features
        self.register_buffer("centroids", torch.zeros(out_features, in_features))
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("has_centroid", torch.zeros(out_features, dtype=torch.bool))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.features == "cl2n":
            x = x - self.feature_mean
        return nn.functional.normalize(x, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: distances between unit vectors differ in the 3rd-4th
        # digit for close classes, below bf16's 8-bit mantissa
        with torch.autocast(x.device.type, enabled=False):
            x = self.transform(x)
            c = self.centroids.float()
            # ||x - c||² = ||x||² + ||c||² - 2 x·c: one matrix product instead of an [N, C, D] difference
            distance = x.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1) - 2 * (x @ c.t())
        return (-distance).masked_fill(~self.has_centroid, float("-inf"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, features={self.features}"


# ------------------------------------------------------------------------------------------- heads

def _linear_head(model: nn.Module, num_classes: int, name: Optional[str], kind: str):
    head_name, head = find_head(model, num_classes, name)
    if type(head) is not nn.Linear:
        raise ConfigError(f"model.classifier: {kind} needs a plain nn.Linear classifier from stage 1, but "
                          f"{head_name} is a {type(head).__name__}")
    return head_name, head


def use_lws_classifier(model: nn.Module, num_classes: int, name: Optional[str] = None) -> str:
    """Replaces the linear head by a ``ScaledLinear`` holding the same weight and bias, frozen; only
    ``lws.scale`` requires grad. Call after loading the stage-1 weights and freezing the backbone."""
    head_name, head = _linear_head(model, num_classes, name, "lws")
    scaled = ScaledLinear(head.in_features, head.out_features, head.bias is not None)
    scaled.to(head.weight.device)
    with torch.no_grad():
        scaled.weight.copy_(head.weight)
        if head.bias is not None:
            scaled.bias.copy_(head.bias)
    for param in (scaled.weight, scaled.bias):
        if param is not None:
            param.requires_grad_(False)
    replace_head(model, scaled, name, num_classes)
    return head_name


def use_ncm_classifier(model: nn.Module, num_classes: int, name: Optional[str] = None,
                       features: str = "cl2n") -> NearestClassMean:
    """Replaces the linear head by an (empty) ``NearestClassMean`` of the same shape."""
    _, head = _linear_head(model, num_classes, name, "ncm")
    ncm = NearestClassMean(head.in_features, head.out_features, features).to(head.weight.device)
    replace_head(model, ncm, name, num_classes)
    return ncm


def build_classifier(model: nn.Module, mcfg: dict, num_classes: int) -> None:
    """The head structure a ``model.classifier`` checkpoint was saved with (``ltfast.evaluate``,
    resume): lws wraps the linear head, ncm replaces it; tau_norm's checkpoint is a plain linear one."""
    if mcfg["classifier"] == "lws":
        use_lws_classifier(model, num_classes, mcfg["head"])
    elif mcfg["classifier"] == "ncm":
        use_ncm_classifier(model, num_classes, mcfg["head"], mcfg["ncm_features"])


def effective_linear(head: nn.Module) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(weight, bias) of the affine map the head computes, float32 on the CPU; (None, None) when it
    is not affine (cosine, NCM). LWS folds in: ``s_c (W_c f + b_c) = (s_c W_c) f + s_c b_c``."""
    if not isinstance(head, nn.Linear):
        return None, None
    weight = head.weight.detach().float().cpu()
    bias = head.bias.detach().float().cpu() if head.bias is not None else None
    if isinstance(head, ScaledLinear):
        scale = head.lws.scale.detach().float().cpu()
        weight = weight * scale[:, None]
        bias = bias * scale if bias is not None else None
    return weight, bias


# ---------------------------------------------------------------------------------------- features

@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Module, loader, device, autocast=contextlib.nullcontext,
                memory_format=torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32, labels [N]) of this rank's shard of ``loader``: the input of
    ``head``, the model in eval mode (BN running statistics, no dropout)."""
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().float()))
    was_training = model.training
    labels = []
    try:
        model.eval()
        for images, batch_labels in loader:
            with autocast():
                model(images.to(device, non_blocking=True).contiguous(memory_format=memory_format))
            labels.append(batch_labels.to(device).long())
    finally:
        hook.remove()
        model.train(was_training)
    if captured and captured[0].dim() != 2:
        raise ValueError(f"the classifier's input is {captured[0].dim()}-dimensional; NCM and tau-norm need "
                         f"[N, features] vectors")
    width = head.in_features
    features = torch.cat(captured) if captured else torch.zeros(0, width, device=device)
    return features, (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device))


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str = "cl2n") -> dict:
    """NCM statistics over all ranks' shards: {"feature_mean" [D], "centroids" [C, D], "counts" [C]}.
    Sums in float64 (115,846 ImageNet-LT features of 2048 values each)."""
    features = features.double()
    count = all_reduce_sum(torch.tensor([features.shape[0]], dtype=torch.float64, device=features.device))
    total = all_reduce_sum(features.sum(0))
    mean = total / count.clamp_min(1)
    transformed = features - mean if kind == "cl2n" else features
    transformed = nn.functional.normalize(transformed, dim=1)
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, transformed)
    counts = torch.bincount(labels, minlength=num_classes).double()
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    return {"feature_mean": mean.float(), "centroids": (sums / counts.clamp_min(1)[:, None]).float(),
            "counts": counts.long()}


def choose_tau_norm(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    num_classes: int, fixed=None) -> dict:
    """tau-normalisation on (validation) features, over all ranks' shards: the balanced top-1 of
    every tau of ``posthoc.NORM_GRID`` (and of ``fixed`` when given) and of the unchanged head; the
    best tau (ties: the smallest, the least change) unless ``fixed``. Same criterion and grid as
    ``ltfast.evaluate --tau-norm auto`` (``posthoc.choose``), with per-class counts all-reduced."""

    def score(logits):
        correct, total = metrics.count_correct(logits, labels, num_classes)
        correct, total = metrics.all_reduce_counts(correct, total)
        present = total > 0
        return float((correct[present].double() / total[present].double()).mean()) * 100.0

    weight, bias = weight.to(features), bias.to(features) if bias is not None else None
    taus = sorted(set(posthoc.NORM_GRID) | ({float(fixed)} if fixed is not None else set()))
    curve = [[tau, score(posthoc.logits_from_features(features, weight, bias, tau))] for tau in taus]
    if fixed is not None:
        chosen = next(s for t, s in curve if t == float(fixed))
        tau = float(fixed)
    else:
        tau, chosen = curve[0]
        for t, s in curve[1:]:
            if s > chosen + 1e-9:
                tau, chosen = t, s
    return {"tau": tau, "val_top1": chosen, "val_curve": curve,
            "val_plain_top1": score(posthoc.logits_from_features(features, weight, bias, None)),
            "selected_on": None if fixed is not None else "val"}


# ---------------------------------------------------------------------------------------- methods

def _fit_ncm(model: nn.Module, data: dict, cfg: dict, run) -> dict:
    """Nearest class mean on the training set as the evaluation sees images (no augmentation, each
    image once, sharded over the ranks)."""
    mcfg, num_classes = cfg["model"], len(data["class_counts"])
    head_name, head = _linear_head(model, num_classes, mcfg["head"], "ncm")
    plain = make_loader(data, "train", cfg["data"], sampler=None, batch_size=cfg["data"]["eval_batch_size"] // run.world,
                        device=run.device, train=False, seed=cfg["train"]["seed"], rank=run.rank, world=run.world)
    features, labels = head_inputs(model, head, plain, run.device, run.autocast, run.memory_format)
    stats = class_means(features, labels, num_classes, mcfg["ncm_features"])
    ncm = use_ncm_classifier(model, num_classes, mcfg["head"], mcfg["ncm_features"])
    ncm.centroids.copy_(stats["centroids"])
    ncm.feature_mean.copy_(stats["feature_mean"])
    ncm.has_centroid.copy_(stats["counts"] > 0)
    info = {"method": "ncm", "features": mcfg["ncm_features"], "distance": "squared euclidean",
            "train_images": int(stats["counts"].sum()), "head": head_name}
    selection = f"no training: nearest class mean ({mcfg['ncm_features']}) of {info['train_images']} training images"
    return {"info": info, "selection": selection}


def _fit_tau_norm(model: nn.Module, data: dict, cfg: dict, run) -> dict:
    """tau-normalisation of the stage-1 classifier, tau chosen on the validation split or given."""
    mcfg, num_classes = cfg["model"], len(data["class_counts"])
    head_name, head = _linear_head(model, num_classes, mcfg["head"], "tau_norm")
    if data["val_loader"] is None and mcfg["tau_norm"] == "auto":
        raise ConfigError("model.tau_norm: auto needs a validation split")
    weight = head.weight.detach().float()
    bias = head.bias.detach().float() if head.bias is not None else None
    fixed = None if mcfg["tau_norm"] == "auto" else mcfg["tau_norm"]
    if data["val_loader"] is not None:
        features, labels = head_inputs(model, head, data["val_loader"], run.device, run.autocast, run.memory_format)
        info = choose_tau_norm(features, labels, weight, bias, num_classes, fixed)
    else:
        info = {"tau": float(fixed), "val_top1": None, "val_curve": None, "val_plain_top1": None,
                "selected_on": None}
    with torch.no_grad():
        head.weight.copy_(posthoc.tau_normalized_weight(weight, info["tau"]))
        if head.bias is not None:
            head.bias.zero_()  # Kang et al.'s tau_norm.py scores features @ W'^T: no bias
    info = {"method": "tau_norm", **info, "head": head_name}
    how = "chosen on the validation split" if info["selected_on"] else "given"
    selection = f"no training: tau-normalised classifier, tau {info['tau']:g} ({how})"
    if info["val_curve"]:
        curve = ", ".join(f"{t:g}: {s:.2f}" for t, s in info["val_curve"])
        run.log(f"tau-norm validation top-1 by tau: {curve}; plain classifier {info['val_plain_top1']:.2f}")
    return {"info": info, "selection": selection}


def _needs_stage_one(cfg: dict, kind: str) -> None:
    if not cfg["model"]["init_from"]:
        raise ConfigError(f"model.classifier: {kind} is a decoupled stage 2 and needs model.init_from (the "
                          f"stage-1 checkpoint, e.g. runs/fmnist_lt/ce/best.pt)")


class ClassifierRetraining(Method):
    """cRT and every frozen-backbone stage 2 (``model.freeze_backbone``): the classifier retrains on
    the stage-1 backbone; ``model.shift_bn`` says whether the frozen backbone's BN layers keep
    re-estimating their statistics (train mode, the survey's cRT and MiSLAS) or not (eval mode)."""
    name = "crt"
    summary = "classifier re-training on a frozen stage-1 backbone (Kang et al. 2020)"
    config_keys = {"model": {
        "shift_bn": (True, bool, None,
                     "with freeze_backbone: the frozen backbone stays in train mode, so BN re-estimates its "
                     "statistics on the stage-2 batches (cRT, MiSLAS 'shift_bn'); false: backbone in eval mode"),
    }}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["freeze_backbone"]

    @classmethod
    def check(cls, cfg: dict) -> None:
        if not cfg["model"]["shift_bn"] and not cfg["model"]["freeze_backbone"]:
            raise ConfigError("model.shift_bn: false only applies to a frozen backbone (model.freeze_backbone=true)")

    def on_epoch_start(self, model: nn.Module, head_name: str, epoch: int) -> None:
        # After model.train(): with shift_bn false, everything but the head goes back to eval mode
        # (BN uses and keeps the stage-1 running statistics), as MiSLAS's authors' model.eval().
        if self.cfg["model"]["shift_bn"]:
            return
        head = model.get_submodule(head_name)
        model.eval()
        head.train()


class LearnableWeightScalingMethod(Method):
    """``model.classifier=lws``: the frozen stage-1 classifier's logits times a learnable per-class scale."""
    name = "lws"
    summary = "learnable weight scaling of the stage-1 classifier (Kang et al. 2020)"
    classifiers = ("lws",)

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["classifier"] == "lws"

    @classmethod
    def check(cls, cfg: dict) -> None:
        if cls.enabled(cfg):
            _needs_stage_one(cfg, "lws")
            if not cfg["model"]["freeze_backbone"]:
                raise ConfigError("model.classifier: lws trains only the per-class scale of the stage-1 classifier; "
                                  "set model.freeze_backbone=true")

    def adapt(self, model: nn.Module, num_classes: int, stage: str) -> None:
        use_lws_classifier(model, num_classes, self.cfg["model"]["head"])  # only its per-class scale trains


class NearestClassMeanMethod(Method):
    """``model.classifier=ncm``: no training; the class means of the stage-1 features."""
    name = "ncm"
    summary = "nearest class mean classifier on the stage-1 features, no training (Kang et al. 2020)"
    classifiers = ("ncm",)
    config_keys = {"model": {
        "ncm_features": ("cl2n", str, schema.choice("cl2n", "l2n"),
                         "classifier=ncm: cl2n = centred on the training-feature mean, then L2-normalised "
                         "(classifier-balancing's default); l2n = L2-normalised only"),
    }}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["classifier"] == "ncm"

    @classmethod
    def check(cls, cfg: dict) -> None:
        model = cfg["model"]
        if cls.enabled(cfg):
            _needs_stage_one(cfg, "ncm")
        elif model["ncm_features"] != cls.config_keys["model"]["ncm_features"][0]:
            raise ConfigError(f"model.ncm_features: only used by model.classifier=ncm (got model.classifier="
                              f"{model['classifier']!r})")

    def adapt(self, model: nn.Module, num_classes: int, stage: str) -> None:
        # training builds the head in fit(); a rebuilt run gets the (empty) head its checkpoint fills
        if stage == "rebuild":
            use_ncm_classifier(model, num_classes, self.cfg["model"]["head"], self.cfg["model"]["ncm_features"])

    def fit(self, model: nn.Module, data: dict, run) -> dict:
        return {"label": "ncm", **_fit_ncm(model, data, self.cfg, run)}


class TauNormalisation(Method):
    """``model.classifier=tau_norm``: no training; the stage-1 classifier's rows divided by ||W_c||^tau."""
    name = "tau_norm"
    summary = "tau-normalised stage-1 classifier, no training (Kang et al. 2020)"
    classifiers = ("tau_norm",)
    config_keys = {"model": {
        "tau_norm": ("auto", (str, int, float), schema.tau_norm,
                     "classifier=tau_norm: tau, or auto = the best of 0, 0.1, ..., 2 on the validation split"),
    }}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["classifier"] == "tau_norm"

    @classmethod
    def check(cls, cfg: dict) -> None:
        model, data = cfg["model"], cfg["data"]
        if not cls.enabled(cfg):
            if model["tau_norm"] != "auto":
                raise ConfigError(f"model.tau_norm: only used by model.classifier=tau_norm (got model.classifier="
                                  f"{model['classifier']!r})")
            return
        _needs_stage_one(cfg, "tau_norm")
        no_val = not data["val_list"] if data["dataset"] == "list" else data["val_per_class"] == 0
        if model["tau_norm"] == "auto" and no_val:
            raise ConfigError("model.tau_norm: auto chooses tau on the validation split, and this config has none "
                              "(data.val_list, or data.val_per_class > 0); give a number instead")

    def fit(self, model: nn.Module, data: dict, run) -> dict:
        return {"label": "tau_norm", **_fit_tau_norm(model, data, self.cfg, run)}
