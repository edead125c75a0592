"""Training configuration: a YAML file (optionally inheriting from another through ``base:``) plus
``key=value`` overrides from the command line, checked against one schema.

The schema below is the whole list of knobs. Every key has a default, a type and, where it matters,
a check; an unknown key, a wrong type or a bad value raises ``ConfigError`` naming the key, so a typo
in a 200-epoch recipe fails at start-up rather than silently training something else.

    cfg = load_config("configs/fmnist_lt/ce.yaml", ["optim.lr=0.05", "train.out_dir=runs/x"])
    cfg["optim"]["lr"]  # 0.05
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from typing import Any, Callable, Iterable, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the offending key."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads ``1e-3`` / ``5E+4`` as floats: YAML 1.1 (PyYAML) requires a
    dot in a float, so ``optim.lr=1e-3`` became the string '1e-3' and was rejected as "not a float"."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_load(text, where: str):
    """YAML with the float rule above; a syntax error is a ConfigError naming ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None


NoneType = type(None)

DATASETS = ("fmnist_lt", "list", "synthetic")
SAMPLERS = ("instance", "class_balanced", "square_root", "progressive")
LOSSES = ("ce", "weighted_ce", "seql", "balanced_softmax", "lade", "ldam_drw", "focal", "logit_adjusted",
          "label_aware_smoothing", "sade", "ride")
EXPERT_LOSSES = ("sade", "ride")  # train each expert on its own logits: need a multi-expert model.arch
SCHEDULES = ("cosine", "step", "multistep", "constant")
CLASSIFIERS = ("linear", "cosine", "causal", "lws", "ncm", "tau_norm")


def _positive(value) -> Optional[str]:
    return None if value > 0 else "must be > 0"


def _non_negative(value) -> Optional[str]:
    return None if value >= 0 else "must be >= 0"


def _probability(value) -> Optional[str]:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _seql_gamma(value) -> Optional[str]:
    return None if 0 <= value <= 1 else "must be in [0, 1] (SEQL's drop probability; focal's exponent is loss.focal_gamma)"


def _beta(value) -> Optional[str]:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _choice(*choices) -> Callable[[Any], Optional[str]]:
    def check(value):
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


def _milestones(value) -> Optional[str]:
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in value):
        return "must be a list of epoch numbers (ints >= 0)"
    return None if list(value) == sorted(value) else "must be increasing"


def _floats3(value) -> Optional[str]:
    if value is None:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "must be a list of numbers"
    return None if len(value) in (1, 3) else "must have 1 (grey) or 3 (RGB) entries"


def _seed(value) -> Optional[str]:
    # numpy.random.seed takes [0, 2**32); the trainer seeds numpy with train.seed itself.
    return None if 0 <= value < 2**32 else "must be in [0, 2**32) (numpy's seed range)"


def _tau_norm(value) -> Optional[str]:
    if value == "auto" or (not isinstance(value, (str, bool)) and value >= 0):
        return None
    return "must be auto or a number >= 0"


def _device(value) -> Optional[str]:
    if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
        return None
    return "must be auto, cpu, cuda, cuda:<index> or mps"


# section -> key -> (default, allowed types, check or None, comment). Comments say why, not what.
SCHEMA: dict[str, dict[str, tuple]] = {
    "data": {
        "dataset": ("fmnist_lt", str, _choice(*DATASETS),
                    "fmnist_lt: Debian's Fashion-MNIST, long-tailed in memory; list: root + list files "
                    "(ImageNet-LT format) through DALI; synthetic: random in-memory images (tests)"),
        "root": (None, (str, NoneType), None, "image root of the list files; fmnist_lt: its raw-data folder"),
        "train_list": (None, (str, NoneType), None, "list file, '<relative path> <label>' per line"),
        "val_list": (None, (str, NoneType), None, "model selection uses this split only (never test)"),
        "test_list": (None, (str, NoneType), None, "reported numbers come from this split"),
        "ratio": (100.0, (int, float), _positive, "imbalance n_max / n_min of fmnist_lt / synthetic"),
        "n_max": (1000, int, _positive, "images of the head class (fmnist_lt / synthetic)"),
        "val_per_class": (50, int, _non_negative, "balanced validation images per class held out of train"),
        "test_per_class": (50, int, _positive, "synthetic only"),
        "num_classes": (None, (int, NoneType), _positive,
                        "synthetic: number of classes (null: 10); list: labels must lie in [0, num_classes) "
                        "(null: the largest label of any split + 1)"),
        "allow_empty_classes": (False, bool, None,
                                "list: a class with no training image is an error (a label typo) unless true"),
        "check_files": (True, bool, None,
                        "list: stat every listed image at start-up, in parallel (false for huge sets on slow "
                        "file systems)"),
        "image_size": (28, int, _positive, "synthetic only (square images)"),
        "channels": (1, int, _positive, "synthetic only"),
        "split_seed": (0, int, None, "seed of the long-tailed subsampling, fixed across training seeds"),
        "sampler": ("instance", str, _choice(*SAMPLERS), None),
        "num_samples_cls": (4, int, _positive, "class_balanced: consecutive images per drawn class (survey: 4)"),
        "batch_size": (256, int, _positive, "global batch, split evenly over the DDP ranks"),
        "eval_batch_size": (256, int, _positive, "global batch for validation / test"),
        "backend": ("dali", str, _choice("dali", "pil"), "list datasets: DALI pipeline or the PIL baseline"),
        "crop_size": (224, int, _positive, None),
        "resize_size": (256, int, _positive, "eval: resize, then centre crop crop_size"),
        "color_jitter": (0.4, (int, float), _non_negative, "survey: ColorJitter(0.4, 0.4, 0.4, 0)"),
        "num_threads": (None, (int, NoneType), None, "DALI CPU threads (None: the loader's default)"),
        "pad": (4, int, _non_negative, "in-memory train augmentation: random crop after zero padding"),
        "flip": (True, bool, None, "in-memory train augmentation: horizontal flip"),
        "mean": (None, (list, NoneType), _floats3, "per-channel normalisation (None: the loader's default)"),
        "std": (None, (list, NoneType), _floats3, None),
    },
    "model": {
        "arch": ("small_resnet", str, None,
                 "small_resnet (local, for 28x28 / 32x32), a multi-expert model (expert_resnext50_32x4d, "
                 "expert_resnet50, small_expert_resnet: ltfast.train.experts) or any torchvision classification "
                 "model, e.g. resnext50_32x4d; always from scratch, nothing is downloaded"),
        "width": (32, int, _positive, "small_resnet: channels of the first stage (x2, x4 after)"),
        "init_from": (None, (str, NoneType), None,
                      "checkpoint whose model weights start this run (decoupled stage 2: the stage-1 best.pt)"),
        "freeze_backbone": (False, bool, None,
                            "train only the classifier 'fc'; BN stays in train mode as in the survey's cRT"),
        "compile": (False, bool, None, "torch.compile the model"),
        "channels_last": (True, bool, None, "on GPU only"),
    },
    "loss": {
        "name": ("ce", str, _choice(*LOSSES), None),
        "alpha": (0.1, (int, float), _non_negative, "LADE: weight of the LADER term (survey 0.1)"),
        "remine_lambda": (0.1, (int, float), _non_negative, "LADE: lambda of the regularised DV bound"),
        "gather_batch": (False, bool, None,
                         "LADE under DDP: compute LADER on the all-gathered global batch, as the survey's "
                         "DataParallel did"),
        "gamma": (0.9, (int, float), _seql_gamma, "SEQL: drop probability of tail negatives (survey 0.9)"),
        "focal_gamma": (2.0, (int, float), _non_negative, "focal: the exponent (Lin et al. 2017: 2)"),
        "lambda_": (4.3e-4, (int, float), _probability, "SEQL: tail = training frequency <= lambda_"),
        "count_threshold": (None, (int, NoneType), None, "SEQL: tail = fewer training images than this"),
        "max_margin": (0.5, (int, float), _positive, "LDAM: largest margin"),
        "s": (30.0, (int, float), _positive, "LDAM: scale of the margin"),
        "ldam_scale_logits": (False, bool, None,
                              "LDAM: the original CE(s*(z - m e_y)) for cosine classifiers (model.classifier=cosine)"),
        "drw_epoch": (None, (int, NoneType), None, "LDAM: 0-based epoch from which DRW re-weights"),
        "beta": (0.9999, (int, float), _beta, "LDAM-DRW / effective-number weights"),
        "tau": (1.0, (int, float), None, "logit_adjusted: tau"),
    },
    "optim": {
        "epochs": (90, int, _positive, None),
        "lr": (0.1, (int, float), _positive, "for the global batch"),
        "momentum": (0.9, (int, float), _probability, None),
        "weight_decay": (5e-4, (int, float), _non_negative, "on every parameter, BN and bias included (survey)"),
        "nesterov": (False, bool, None, None),
        "schedule": ("cosine", str, _choice(*SCHEDULES),
                     "cosine: per step from lr to 0 at the end of the last step (no epoch at lr 0)"),
        "warmup_epochs": (0, (int, float), _non_negative, "linear warm-up, per step"),
        "milestones": ([], list, _milestones, "multistep: 0-based epochs where lr *= gamma"),
        "step_size": (30, int, _positive, "step: lr *= gamma every step_size epochs"),
        "gamma": (0.1, (int, float), _positive, "step / multistep decay factor"),
    },
    "eval": {
        "every": (1, int, _positive, "validate every this many epochs (and after the last)"),
        "many_threshold": (100, int, _non_negative, "many-shot: more than this many training images"),
        "few_threshold": (20, int, _non_negative, "few-shot: fewer than this many training images"),
        "shot_split": (None, (str, NoneType), None,
                       "file with the many/medium/few classes (the survey's shot_list.npy, bool [3, C], "
                       "or JSON {'many': [...], 'medium': [...], 'few': [...]}); overrides the thresholds"),
        "ua": (None, (int, float, NoneType), None, "upper reference accuracy (%) for RA = top1 / UA"),
        "reported": (None, (dict, NoneType), None, "the survey's numbers for this recipe, copied to the summary"),
    },
    "train": {
        "seed": (0, int, _seed, None),
        "out_dir": ("runs/default", str, None, "checkpoints, summary.json and the plot"),
        "resume": (False, (bool, str), None,
                   "true: continue from out_dir/last.pt (error if absent); 'auto': if present; or a path"),
        "stop_after": (None, (int, NoneType), None,
                       "stop after this many epochs of this run (time-limited jobs, interrupt tests)"),
        "device": ("auto", str, _device, "auto: cuda when available (rank's LOCAL_RANK), else cpu"),
        "amp": ("auto", str, _choice("auto", "bf16", "none"), "auto: bf16 autocast on GPU, none on CPU"),
        "threads": (None, (int, NoneType), _positive, "CPU threads per rank (None: cores / local ranks)"),
        "progress": (True, bool, None, "tqdm bar on rank 0"),
        "log_every": (20, int, _positive, "steps between loss read-outs (each one syncs the device)"),
        "save_checkpoints": (True, bool, None, "last.pt every epoch and best.pt"),
        "plot": (True, bool, None, "per-class accuracy PNG"),
    },
}
TOP_LEVEL = {"name": (None, (str, NoneType), None, "method name for tables"),
             "base": (None, (str, NoneType), None, "YAML this one inherits from (relative to this file)")}


# Research options (issue 13 §2): kept in one block so that they read together.
SCHEMA["model"].update({
    "head": (None, (str, NoneType), None,
             "dotted name of the classifier module; None: the last nn.Linear with num_classes outputs "
             "(models.find_head: fc, classifier.6, heads.head, ...)"),
    "classifier": ("linear", str, _choice(*CLASSIFIERS),
                   "cosine: the head becomes normalize(x) @ normalize(W) (LDAM-DRW's NormedLinear; multi-expert "
                   "archs: every expert's head, times model.expert_scale, the survey's use_norm); causal: the "
                   "multi-head normalised classifier with TDE at test time (ltfast.train.causal); decoupled "
                   "stage 2 on model.init_from (ltfast.train.decoupled): lws (learnable per-class scale of the "
                   "frozen classifier's logits), ncm (nearest class mean, no training), tau_norm (W_c / "
                   "||W_c||^tau, no training)"),
    "tau_norm": ("auto", (str, int, float), _tau_norm,
                 "classifier=tau_norm: tau, or auto = the best of 0, 0.1, ..., 2 on the validation split"),
    "ncm_features": ("cl2n", str, _choice("cl2n", "l2n"),
                     "classifier=ncm: cl2n = centred on the training-feature mean, then L2-normalised "
                     "(classifier-balancing's default); l2n = L2-normalised only"),
})
SCHEMA["optim"].update({
    "name": ("sgd", str, _choice("sgd", "adamw"), "sgd (momentum, nesterov) or adamw (betas)"),
    "betas": ([0.9, 0.999], list, None, "adamw only"),
    "accumulate": (1, int, _positive,
                   "micro-batches per optimizer step (effective batch = data.batch_size x accumulate)"),
    "reference_batch": (None, (int, NoneType), _positive,
                        "optim.lr is stated for this batch; the run uses lr x effective batch / reference_batch "
                        "(linear scaling, Goyal et al. 2017). None: lr is used as given"),
})
SCHEMA["train"].update({
    "amp": ("auto", str, _choice("auto", "bf16", "fp16", "none"),
            "auto: bf16 autocast on GPU, none on CPU; fp16 adds a GradScaler (fp16's 5-bit exponent "
            "underflows gradients below 6e-8 without one)"),
    "seeds": (None, (list, NoneType), None,
              "run these seeds in turn into out_dir/seed<k>/ and write out_dir/seeds_summary.json (mean, std)"),
    "overwrite": (False, bool, None,
                  "a non-empty out_dir is refused unless train.resume or this; it empties out_dir first"),
    "tensorboard": ("auto", (bool, str), None,
                    "TensorBoard scalars in out_dir/tensorboard: auto = when tensorboard is installed"),
})

# Multi-expert models and losses (issue 14: RIDE / SADE, the survey's Ensemble-codebase, seed-methods.md §6).
SCHEMA["model"].update({
    "num_experts": (3, int, _positive, "multi-expert archs (expert_resnext50_32x4d, small_expert_resnet): experts"),
    "reduce_dimension": (True, bool, None,
                         "multi-expert archs: narrower expert stages (ResNeXt-50: layer3 192 / layer4 384 planes, "
                         "feature 1536; small_expert_resnet: 3w instead of 4w), as the survey's configs"),
    "expert_scale": (30.0, (int, float), _positive,
                     "multi-expert archs with model.classifier=cosine: logits = s * cosine (survey s = 30)"),
})
SCHEMA["loss"].update({
    "sade_tau": (2.0, (int, float), None, "SADE: weight of the inverse prior for the third expert (survey 2)"),
    "base_temperature": (1.0, (int, float), _positive, "RIDE: diversity temperature before DRW"),
    "diversity_factor": (-0.2, (int, float), None, "RIDE: weight of the KL diversity term (negative: diverse)"),
    "reweight_factor": (0.02, (int, float), _probability,
                        "RIDE: per-class diversity temperature C pi_c r + 1 - r after DRW (survey 0.02)"),
})


def _expert_checks(cfg: dict) -> None:
    from .experts import EXPERT_ARCHS
    model, loss = cfg["model"], cfg["loss"]
    expert_arch = model["arch"] in EXPERT_ARCHS
    if loss["name"] in EXPERT_LOSSES and not expert_arch:
        raise ConfigError(f"loss.name: {loss['name']} trains each expert on its own logits; model.arch must be a "
                          f"multi-expert architecture ({', '.join(EXPERT_ARCHS)}), got {model['arch']!r}")
    if loss["name"] == "sade" and model["num_experts"] != 3:
        raise ConfigError(f"model.num_experts: SADE has exactly 3 experts (long-tailed, uniform, inverse), got "
                          f"{model['num_experts']}")
    if expert_arch and model["classifier"] not in ("linear", "cosine"):
        raise ConfigError(f"model.classifier: {model['arch']} has one linear or cosine classifier per expert, got "
                          f"{model['classifier']!r}")
    if expert_arch and (model["freeze_backbone"] or model["head"]):
        key = "model.freeze_backbone" if model["freeze_backbone"] else "model.head"
        raise ConfigError(f"{key}: not supported with the multi-expert {model['arch']} (one classifier per expert, "
                          f"linears.0..{model['num_experts'] - 1})")


# Issue 15: causal TDE (seed-methods.md §1.6) and MiSLAS (§2.4), kept together.
SCHEMA["model"].update({
    "causal_heads": (2, int, _positive, "causal: K heads the feature is split into (survey 2)"),
    "causal_tau": (16.0, (int, float), _positive, "causal: logit scale tau (survey 16)"),
    "causal_gamma": (0.03125, (int, float), _non_negative, "causal: w / (||w|| + gamma) (survey 1/32)"),
    "causal_alpha": (3.0, (int, float), _non_negative,
                     "causal: TDE strength at test time (survey 3); 0 = plain normalised logits"),
    "learnable_scale": (False, bool, None,
            "a learnable per-class scale on the head's logits (MiSLAS stage 2's LearnableWeightScaling)"),
    "shift_bn": (True, bool, None,
                 "with freeze_backbone: the frozen backbone stays in train mode, so BN re-estimates its "
                 "statistics on the stage-2 batches (cRT, MiSLAS 'shift_bn'); false: backbone in eval mode"),
})
SCHEMA["data"].update({
    "mixup_alpha": (0.0, (int, float), _non_negative,
                    "mixup: lambda ~ Beta(alpha, alpha) per batch (MiSLAS stage 1: 0.2); 0 = off"),
})
SCHEMA["loss"].update({
    "smooth_head": (0.3, (int, float), _probability, "label_aware_smoothing: epsilon of the most frequent class"),
    "smooth_tail": (0.0, (int, float), _probability, "label_aware_smoothing: epsilon of the rarest class"),
    "smooth_shape": ("concave", str, _choice("concave", "linear", "convex", "exp"),
                     "label_aware_smoothing: epsilon against the class count (MiSLAS default concave)"),
    "smooth_power": (None, (int, float, NoneType), _positive, "label_aware_smoothing: exponent of shape 'exp'"),
})
SCHEMA["optim"].update({
    "head_lr_factor": (1.0, (int, float), _positive,
                       "the classifier's lr is this times the lr (MiSLAS stage 2: 0.05; its learnable scale "
                       "keeps the full lr)"),
})


# loss keys read by some losses only: a value other than the default with another loss.name used to be
# ignored without a word (trial finding 9d); left at the default, they stay harmless for every loss.
LOSS_KEY_USERS = {
    "smooth_head": ("label_aware_smoothing",), "smooth_tail": ("label_aware_smoothing",),
    "smooth_shape": ("label_aware_smoothing",), "smooth_power": ("label_aware_smoothing",),
    "sade_tau": ("sade",),
    "diversity_factor": ("ride",), "base_temperature": ("ride",), "reweight_factor": ("ride",),
}


def _unused_loss_keys(cfg: dict) -> None:
    loss = cfg["loss"]
    for key, users in LOSS_KEY_USERS.items():
        if loss["name"] not in users and loss[key] != SCHEMA["loss"][key][0]:
            raise ConfigError(f"loss.{key}: only used by loss.name={' / '.join(users)}, but loss.name is "
                              f"{loss['name']!r} (set to {loss[key]!r}; remove it or change loss.name)")


def _causal_mislas_checks(cfg: dict) -> None:
    model, loss = cfg["model"], cfg["loss"]
    _unused_loss_keys(cfg)
    if not model["shift_bn"] and not model["freeze_backbone"]:
        raise ConfigError("model.shift_bn: false only applies to a frozen backbone (model.freeze_backbone=true)")
    if model["learnable_scale"] and model["classifier"] in ("causal", "lws", "ncm", "tau_norm"):
        raise ConfigError(f"model.learnable_scale: not with model.classifier={model['classifier']} (causal: the TDE "
                          "logits are not a plain head; lws has its own scale; ncm and tau_norm train nothing)")
    if (loss["smooth_shape"] == "exp") != (loss["smooth_power"] is not None):
        raise ConfigError("loss.smooth_power: required with loss.smooth_shape=exp, and only used by it "
                          f"(got shape {loss['smooth_shape']!r}, power {loss['smooth_power']!r})")


def _research_checks(cfg: dict) -> None:
    optim, train = cfg["optim"], cfg["train"]
    betas = optim["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {betas!r}")
    if optim["nesterov"] and optim["name"] == "sgd" and optim["momentum"] <= 0:
        raise ConfigError("optim.nesterov: needs optim.momentum > 0")
    seeds = train["seeds"]
    if seeds is not None:
        if not seeds or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in seeds):
            raise ConfigError(f"train.seeds: must be a non-empty list of ints >= 0, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"train.seeds: repeated seed in {seeds!r}")
    if train["overwrite"] and train["resume"] is not False:
        raise ConfigError("train.overwrite: contradicts train.resume (overwrite starts afresh, resume continues)")
    if train["tensorboard"] not in (True, False, "auto"):
        raise ConfigError(f"train.tensorboard: must be true, false or auto, got {train['tensorboard']!r}")
    _decoupled_checks(cfg)


def _decoupled_checks(cfg: dict) -> None:
    """model.classifier = lws / ncm / tau_norm: stage 2 of a decoupled run (ltfast.train.decoupled)."""
    model, data = cfg["model"], cfg["data"]
    kind = model["classifier"]
    if kind in ("lws", "ncm", "tau_norm") and not model["init_from"]:
        raise ConfigError(f"model.classifier: {kind} is a decoupled stage 2 and needs model.init_from (the "
                          f"stage-1 checkpoint, e.g. runs/fmnist_lt/ce/best.pt)")
    if kind == "lws" and not model["freeze_backbone"]:
        raise ConfigError("model.classifier: lws trains only the per-class scale of the stage-1 classifier; "
                          "set model.freeze_backbone=true")
    if kind != "tau_norm" and model["tau_norm"] != "auto":
        raise ConfigError(f"model.tau_norm: only used by model.classifier=tau_norm (got model.classifier={kind!r})")
    if kind != "ncm" and model["ncm_features"] != SCHEMA["model"]["ncm_features"][0]:
        raise ConfigError(f"model.ncm_features: only used by model.classifier=ncm (got model.classifier={kind!r})")
    no_val = not data["val_list"] if data["dataset"] == "list" else data["val_per_class"] == 0
    if kind == "tau_norm" and model["tau_norm"] == "auto" and no_val:
        raise ConfigError("model.tau_norm: auto chooses tau on the validation split, and this config has none "
                          "(data.val_list, or data.val_per_class > 0); give a number instead")


def defaults() -> dict:
    cfg = {section: {key: copy.deepcopy(spec[0]) for key, spec in keys.items()} for section, keys in SCHEMA.items()}
    cfg["name"] = None
    return cfg


def _merge(base: dict, update: dict) -> dict:
    """Section-wise merge: a child YAML changes only the keys it names (eval.reported is replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "reported":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"base: circular inheritance through {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = _yaml_load(f, path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        parent = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
        data = _merge(parent, data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.05' -> (['optim', 'lr'], 0.05); the value is parsed as YAML ('null', '[1, 2]', 'true')."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _yaml_load(raw, key.strip()) if raw.strip() else None


def _set(cfg: dict, path: list[str], value: Any) -> None:
    node = cfg
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{'.'.join(path)}: unknown config key (no section {part!r})")
        node = node[part]
    node[path[-1]] = value


def validate(cfg: dict) -> dict:
    """Checks every key against SCHEMA (names, types, values, cross-key rules); returns cfg."""
    for key in cfg:
        if key not in SCHEMA and key not in TOP_LEVEL:
            raise ConfigError(f"{key}: unknown config section (known: {', '.join(list(SCHEMA) + list(TOP_LEVEL))})")
    if not isinstance(cfg.get("name"), (str, NoneType)):
        raise ConfigError(f"name: must be a string, got {cfg['name']!r}")
    for section, keys in SCHEMA.items():
        values = cfg.get(section)
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a mapping, got {values!r}")
        for key in values:
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown config key (known in {section}: {', '.join(keys)})")
        for key, (_, types, check, _) in keys.items():
            value = values[key]
            types = types if isinstance(types, tuple) else (types,)
            # bool is an int in Python; a YAML 'true' for a number is a mistake, not a 1.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = " or ".join("null" if t is NoneType else t.__name__ for t in types)
                raise ConfigError(f"{section}.{key}: must be {names}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{key}: must be finite, got {value!r}")
            if check is not None and value is not None:
                problem = check(value)
                if problem:
                    raise ConfigError(f"{section}.{key}: {problem}, got {value!r}")
    _cross_checks(cfg)
    _research_checks(cfg)
    _causal_mislas_checks(cfg)
    _expert_checks(cfg)
    return cfg


def _cross_checks(cfg: dict) -> None:
    data, optim, loss, evals, train = cfg["data"], cfg["optim"], cfg["loss"], cfg["eval"], cfg["train"]
    if data["dataset"] == "list" and not data["train_list"]:
        raise ConfigError("data.train_list: required when data.dataset is 'list'")
    if data["dataset"] == "list" and not data["test_list"]:
        raise ConfigError("data.test_list: required when data.dataset is 'list'")
    for key in ("milestones",):
        late = [m for m in optim[key] if m >= optim["epochs"]]
        if late:
            raise ConfigError(f"optim.{key}: {late} not below optim.epochs = {optim['epochs']} "
                              f"(scale the milestones when changing the number of epochs)")
    if optim["schedule"] == "multistep" and not optim["milestones"]:
        raise ConfigError("optim.milestones: required when optim.schedule is 'multistep'")
    # warm-up as long as the run is allowed: `--config fmnist_lt/ce optim.epochs=1` (a smoke run of a
    # recipe with 1 warm-up epoch) must not need a second override
    if optim["warmup_epochs"] > optim["epochs"]:
        raise ConfigError(f"optim.warmup_epochs: must not exceed optim.epochs = {optim['epochs']}")
    if loss["drw_epoch"] is not None and not 0 <= loss["drw_epoch"] < optim["epochs"]:
        raise ConfigError(f"loss.drw_epoch: must be in [0, optim.epochs = {optim['epochs']}), got "
                          f"{loss['drw_epoch']} (scale it when changing the number of epochs)")
    if evals["few_threshold"] > evals["many_threshold"] + 1:
        raise ConfigError("eval.few_threshold: must not exceed eval.many_threshold + 1")
    if train["resume"] == "":
        raise ConfigError("train.resume: empty path (true, false, auto or a checkpoint path)")
    if cfg["model"]["freeze_backbone"] and not cfg["model"]["init_from"]:
        raise ConfigError("model.freeze_backbone: needs model.init_from (a stage-1 checkpoint); "
                          "a frozen random backbone is almost certainly a mistake")
    if evals["ua"] is not None and not 0 < evals["ua"] <= 100:
        raise ConfigError(f"eval.ua: must be an accuracy in (0, 100], got {evals['ua']}")
    _normalisation_checks(data)
    _loss_key_checks(loss)
    _resume_check(train["resume"])


def _normalisation_checks(data: dict) -> None:
    """data.mean / data.std: one entry per channel. Fashion-MNIST is grey (1); a list dataset decodes
    to 1 or 3 channels and takes its channel count from data.mean, so std must match it."""
    mean, std = data["mean"], data["std"]
    if std is not None and not all(v > 0 for v in std):
        raise ConfigError(f"data.std: every entry must be > 0, got {std!r}")
    if mean is not None and std is not None and len(mean) != len(std):
        raise ConfigError(f"data.std: {len(std)} entries but data.mean has {len(mean)} (one per channel)")
    channels = {"fmnist_lt": (1,), "synthetic": (1, data["channels"]), "list": (1, 3)}[data["dataset"]]
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) not in channels:
            raise ConfigError(f"data.{key}: {len(value)} entries, but data.dataset={data['dataset']!r} has "
                              f"{' or '.join(map(str, sorted(set(channels))))} channel(s)")
    if data["dataset"] == "list" and (mean is None) != (std is None) and len(mean or std) == 1:
        # The loaders' defaults are ImageNet's 3-channel mean/std: half a grey setting is a mismatch.
        raise ConfigError("data.mean / data.std: give both for grey (1-channel) images")


def _loss_key_checks(loss: dict) -> None:
    # loss.gamma was shared by SEQL (a drop probability, 0.9) and focal (an exponent): focal silently
    # trained with 0.9 instead of the paper's 2. Each has its own key now.
    if loss["name"] == "focal" and loss["gamma"] != SCHEMA["loss"]["gamma"][0]:
        raise ConfigError(f"loss.gamma: is SEQL's drop probability; the focal exponent is loss.focal_gamma "
                          f"(got loss.gamma={loss['gamma']})")
    if loss["name"] != "focal" and loss["focal_gamma"] != SCHEMA["loss"]["focal_gamma"][0]:
        raise ConfigError(f"loss.focal_gamma: only used by loss.name=focal (got loss.name={loss['name']!r})")


def _resume_check(resume) -> None:
    """A string that is not 'auto' must be a checkpoint path; 'atuo' used to fail only after the data
    had been loaded, as a FileNotFoundError."""
    if not isinstance(resume, str) or resume == "auto" or os.path.exists(resume):
        return
    hint = " (did you mean 'auto'?)" if difflib.get_close_matches(resume.lower(), ["auto", "true"], 1, 0.5) else ""
    raise ConfigError(f"train.resume: {resume!r} is not true, false, auto or an existing checkpoint file{hint}")


def config_dirs() -> list[str]:
    """Where recipe names resolve: the configs shipped inside the installed package
    (``ltfast/configs``, copied there by setup.py's build_py), then the source tree's ``configs/``
    (editable installs, a checkout on PYTHONPATH)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = [os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")]
    return [d for d in dirs if os.path.isdir(d)]


def resolve_config_path(name: str) -> str:
    """``--config`` value -> YAML path. An existing file wins (a local path always works, relative to
    the working directory); otherwise ``imagenet_lt/lade`` (or ``imagenet_lt/lade.yaml``, or
    ``configs/imagenet_lt/lade.yaml`` typed from outside a checkout) names a shipped recipe."""
    if os.path.isfile(name):
        return name
    stem = name[len("configs/"):] if name.startswith("configs/") else name
    candidates = [stem] if stem.endswith((".yaml", ".yml")) else [stem + ".yaml", stem]
    for folder in config_dirs():
        for candidate in candidates:
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    shipped = sorted(os.path.relpath(os.path.join(d, f), folder)[:-5] for folder in config_dirs()[:1]
                     for d, _, files in os.walk(folder) for f in files
                     if f.endswith(".yaml") and not f.startswith("_"))
    raise FileNotFoundError(f"config file not found: {name} (neither a file nor a shipped recipe; shipped: "
                            f"{', '.join(shipped) or 'none found'})")


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- YAML file (and its ``base:`` chain) <- ``key=value`` overrides, then validated.
    Relative paths inside the YAML (data root / lists, init_from, shot_split) stay relative to the
    working directory, as on the command line."""
    cfg = defaults()
    if path is not None:
        cfg = _merge(cfg, _read_yaml(resolve_config_path(path)))
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] not in TOP_LEVEL:
            raise ConfigError(f"{keys[0]}: overrides name section.key, e.g. optim.lr=0.05")
        _set(cfg, keys, value)
    cfg.pop("base", None)
    # Ints are fine where floats are expected (lr: 1); store them as floats so the summary is uniform.
    for section, keys in SCHEMA.items():
        for key, (default, _, _, _) in keys.items():
            value = cfg.get(section, {}).get(key)
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                cfg[section][key] = float(value)
    return validate(cfg)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
