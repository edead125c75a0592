"""Training configuration: a YAML file (optionally inheriting from another through ``base:``) plus
``key=value`` overrides from the command line, checked against one schema.

``SCHEMA`` is the whole list of knobs, by section: the core keys below, then the keys each loss
(``losses.KEYS``) and each method (``methods/``, its ``config_keys``) declares. Every key has a
default, a type and, where it matters, a check; an unknown key, a wrong type or a bad value raises
``ConfigError`` naming the key, so a typo in a 200-epoch recipe fails at start-up rather than
silently training something else. The cross-key checks are the core's below, each method's
``check`` and each loss's.

    cfg = load_config("configs/fmnist_lt/ce.yaml", ["optim.lr=0.05", "train.out_dir=runs/x"])
    cfg["optim"]["lr"]  # 0.05
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from typing import Any, Iterable, Optional

import yaml

from . import losses, methods, schema
from .errors import ConfigError
from .models import EXPERT_ARCHS, is_expert_arch
from .schema import NoneType, dump

__all__ = ["ConfigError", "SCHEMA", "defaults", "dump", "load_config", "resolve_config_path", "validate"]


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


DATASETS = ("fmnist_lt", "list", "synthetic", "cifar10_lt", "cifar100_lt", "image_folder")
CIFAR_DATASETS = ("cifar10_lt", "cifar100_lt")
# What data.imbalance means for each dataset that reads it (the error names the dataset's use).
IMBALANCE_DATASETS = CIFAR_DATASETS + ("image_folder", "list")
SAMPLERS = ("instance", "class_balanced", "square_root", "progressive")
LOSSES = tuple(losses.LOSSES)
SCHEDULES = ("cosine", "step", "multistep", "constant")
CLASSIFIERS = ("linear",) + methods.classifiers()

# section -> key -> (default, allowed types, check or None, comment). Comments say why, not what.
# The core keys, section by section; then each section's keys of the losses (losses.KEYS) and of the
# methods (their config_keys), appended by _add_keys below.
SCHEMA: dict[str, dict[str, tuple]] = {
    "data": {
        "dataset": ("fmnist_lt", str, schema.choice(*DATASETS),
                    "fmnist_lt: Debian's Fashion-MNIST, long-tailed in memory; list: root + list files "
                    "(ImageNet-LT format) through DALI; synthetic: random in-memory images (tests); "
                    "cifar10_lt / cifar100_lt: the CIFAR python pickles in data.root, long-tailed as LDAM-DRW's "
                    "generator (in memory); image_folder: data.root/train, data.root/test (and data.root/val) "
                    "in ImageFolder layout through DALI"),
        "root": (None, (str, NoneType), None,
                 "image root of the list files; fmnist_lt: its raw-data folder; cifar*_lt: the folder holding "
                 "cifar-10-batches-py/ or cifar-100-python/; image_folder: the folder holding train/ and test/"),
        "train_list": (None, (str, NoneType), None, "list file, '<relative path> <label>' per line"),
        "val_list": (None, (str, NoneType), None, "model selection uses this split only (never test)"),
        "test_list": (None, (str, NoneType), None, "reported numbers come from this split"),
        "ratio": (100.0, (int, float), schema.positive, "imbalance n_max / n_min of fmnist_lt / synthetic"),
        "imbalance": (None, (int, float, NoneType), schema.at_least_one,
                      "imbalance n_max / n_min of cifar10_lt / cifar100_lt (required: 10, 50 or 100 in the papers), "
                      "image_folder and list (null: the training split as it is; R: a deterministic long-tailed "
                      "subsample of it, class 0 the head)"),
        "profile": ("exp", str, schema.choice("exp", "step"),
                    "with data.imbalance: exp n_i = n_max * R^(-i/(C-1)); step: n_max for the first half of the "
                    "classes, n_max / R for the rest"),
        "n_max": (1000, int, schema.positive, "images of the head class (fmnist_lt / synthetic)"),
        "val_per_class": (50, int, schema.non_negative, "balanced validation images per class held out of train"),
        "test_per_class": (50, int, schema.positive, "synthetic only"),
        "num_classes": (None, (int, NoneType), schema.positive,
                        "synthetic: number of classes (null: 10); list: labels must lie in [0, num_classes) "
                        "(null: the largest label of any split + 1)"),
        "allow_empty_classes": (False, bool, None,
                                "list: a class with no training image is an error (a label typo) unless true"),
        "check_files": (True, bool, None,
                        "list: stat every listed image at start-up, in parallel (false for huge sets on slow "
                        "file systems)"),
        "image_size": (28, int, schema.positive, "synthetic only (square images)"),
        "channels": (1, int, schema.positive, "synthetic only"),
        "split_seed": (0, int, None,
                       "seed of the long-tailed subsampling, fixed across training seeds (cifar*_lt: LDAM-DRW's "
                       "np.random.seed, its --rand_number 0; LADE's README runs seed 1)"),
        "sampler": ("instance", str, schema.choice(*SAMPLERS), None),
        "num_samples_cls": (4, int, schema.positive, "class_balanced: consecutive images per drawn class (survey: 4)"),
        "batch_size": (256, int, schema.positive, "global batch, split evenly over the DDP ranks"),
        "eval_batch_size": (256, int, schema.positive, "global batch for validation / test"),
        "backend": ("dali", str, schema.choice("dali", "pil"), "list datasets: DALI pipeline or the PIL baseline"),
        "crop_size": (224, int, schema.positive, None),
        "resize_size": (256, int, schema.positive, "eval: resize, then centre crop crop_size"),
        "color_jitter": (0.4, (int, float), schema.non_negative, "survey: ColorJitter(0.4, 0.4, 0.4, 0)"),
        "num_threads": (None, (int, NoneType), None, "DALI CPU threads (None: the loader's default)"),
        "pad": (4, int, schema.non_negative, "in-memory train augmentation: random crop after zero padding"),
        "flip": (True, bool, None, "in-memory train augmentation: horizontal flip"),
        "mean": (None, (list, NoneType), schema.floats3, "per-channel normalisation (None: the loader's default)"),
        "std": (None, (list, NoneType), schema.floats3, None),
    },
    "model": {
        "arch": ("small_resnet", str, None,
                 "small_resnet (local, for 28x28 / 32x32), a multi-expert model (expert_resnext50_32x4d, "
                 "expert_resnet50, small_expert_resnet: ltfast.train.models.experts) or any torchvision classification "
                 "model, e.g. resnext50_32x4d; resnet20 / resnet32 / resnet44 / resnet56 / resnet110: the CIFAR "
                 "ResNets of LDAM-DRW (ltfast.train.models.resnet_cifar); always from scratch, nothing is downloaded"),
        "width": (32, int, schema.positive, "small_resnet: channels of the first stage (x2, x4 after)"),
        "init_from": (None, (str, NoneType), None,
                      "checkpoint whose model weights start this run (decoupled stage 2: the stage-1 best.pt)"),
        "freeze_backbone": (False, bool, None,
                            "train only the classifier 'fc'; BN stays in train mode as in the survey's cRT"),
        "compile": (False, bool, None, "torch.compile the model"),
        "channels_last": (True, bool, None, "on GPU only"),
        "head": (None, (str, NoneType), None,
                 "dotted name of the classifier module; None: the last nn.Linear with num_classes outputs "
                 "(models.find_head: fc, classifier.6, heads.head, ...)"),
        "classifier": ("linear", str, schema.choice(*CLASSIFIERS),
                       "linear: the architecture's own head; the others are the heads of methods (ltfast.train."
                       f"methods, each documented in its file): {', '.join(CLASSIFIERS[1:])}"),
    },
    "loss": {
        "name": ("ce", str, schema.choice(*LOSSES), "the criterion (ltfast.train.losses.LOSSES); its keys follow"),
    },
    "optim": {
        "epochs": (90, int, schema.positive, None),
        "lr": (0.1, (int, float), schema.positive, "for the global batch"),
        "momentum": (0.9, (int, float), schema.probability, None),
        "weight_decay": (5e-4, (int, float), schema.non_negative, "on every parameter, BN and bias included (survey)"),
        "nesterov": (False, bool, None, None),
        "schedule": ("cosine", str, schema.choice(*SCHEDULES),
                     "cosine: per step from lr to 0 at the end of the last step (no epoch at lr 0)"),
        "warmup_epochs": (0, (int, float), schema.non_negative, "linear warm-up, per step"),
        "milestones": ([], list, schema.milestones, "multistep: 0-based epochs where lr *= gamma"),
        "step_size": (30, int, schema.positive, "step: lr *= gamma every step_size epochs"),
        "gamma": (0.1, (int, float), schema.positive, "step / multistep decay factor"),
        "name": ("sgd", str, schema.choice("sgd", "adamw"), "sgd (momentum, nesterov) or adamw (betas)"),
        "betas": ([0.9, 0.999], list, None, "adamw only"),
        "accumulate": (1, int, schema.positive,
                       "micro-batches per optimizer step (effective batch = data.batch_size x accumulate)"),
        "reference_batch": (None, (int, NoneType), schema.positive,
                            "optim.lr is stated for this batch; the run uses lr x effective batch / reference_batch "
                            "(linear scaling, Goyal et al. 2017). None: lr is used as given"),
    },
    "eval": {
        "every": (1, int, schema.positive, "validate every this many epochs (and after the last)"),
        "many_threshold": (100, int, schema.non_negative, "many-shot: more than this many training images"),
        "few_threshold": (20, int, schema.non_negative, "few-shot: fewer than this many training images"),
        "shot_split": (None, (str, NoneType), None,
                       "file with the many/medium/few classes (the survey's shot_list.npy, bool [3, C], "
                       "or JSON {'many': [...], 'medium': [...], 'few': [...]}); overrides the thresholds"),
        "ua": (None, (int, float, NoneType), None, "upper reference accuracy (%) for RA = top1 / UA"),
        "reported": (None, (dict, NoneType), None, "the survey's numbers for this recipe, copied to the summary"),
    },
    "train": {
        "seed": (0, int, schema.seed, None),
        "out_dir": ("runs/default", str, None, "checkpoints, summary.json and the plot"),
        "resume": (False, (bool, str), None,
                   "true: continue from out_dir/last.pt (error if absent); 'auto': if present; or a path"),
        "stop_after": (None, (int, NoneType), None,
                       "stop after this many epochs of this run (time-limited jobs, interrupt tests)"),
        "device": ("auto", str, schema.device, "auto: cuda when available (rank's LOCAL_RANK), else cpu"),
        "amp": ("auto", str, schema.choice("auto", "bf16", "fp16", "none"),
                "auto: bf16 autocast on GPU, none on CPU; fp16 adds a GradScaler (fp16's 5-bit exponent "
                "underflows gradients below 6e-8 without one)"),
        "threads": (None, (int, NoneType), schema.positive, "CPU threads per rank (None: cores / local ranks)"),
        "progress": (True, bool, None, "tqdm bar on rank 0"),
        "log_every": (20, int, schema.positive, "steps between loss read-outs (each one syncs the device)"),
        "save_checkpoints": (True, bool, None, "last.pt every epoch and best.pt"),
        "plot": (True, bool, None, "per-class accuracy PNG"),
        "seeds": (None, (list, NoneType), None,
                  "run these seeds in turn into out_dir/seed<k>/ and write out_dir/seeds_summary.json (mean, std)"),
        "overwrite": (False, bool, None,
                      "a non-empty out_dir is refused unless train.resume or this; it empties out_dir first"),
        "tensorboard": ("auto", (bool, str), None,
                        "TensorBoard scalars in out_dir/tensorboard: auto = when tensorboard is installed"),
    },
}
TOP_LEVEL = {"name": (None, (str, NoneType), None, "method name for tables"),
             "base": (None, (str, NoneType), None, "YAML this one inherits from (relative to this file)")}


def _add_keys(section: str, keys: dict, owner: str) -> None:
    for key, spec in keys.items():
        if key in SCHEMA[section]:
            raise RuntimeError(f"{section}.{key}: declared by {owner} and already in the schema")
        SCHEMA[section][key] = spec


_add_keys("loss", losses.KEYS, "ltfast.train.losses")
for _section, _keys in methods.config_keys().items():
    _add_keys(_section, _keys, "ltfast.train.methods")


def _expert_arch_checks(cfg: dict) -> None:
    """What a multi-expert model.arch does not take, and what a loss of every expert's logits needs."""
    model, loss = cfg["model"], cfg["loss"]
    expert_arch = is_expert_arch(model["arch"])
    if losses.LOSSES[loss["name"]].expert_logits and not expert_arch:
        raise ConfigError(f"loss.name: {loss['name']} trains each expert on its own logits; model.arch must be a "
                          f"multi-expert architecture ({', '.join(EXPERT_ARCHS)}), got {model['arch']!r}")
    if expert_arch and model["classifier"] not in ("linear", "cosine"):
        raise ConfigError(f"model.classifier: {model['arch']} has one linear or cosine classifier per expert, got "
                          f"{model['classifier']!r}")
    if expert_arch and (model["freeze_backbone"] or model["head"]):
        key = "model.freeze_backbone" if model["freeze_backbone"] else "model.head"
        raise ConfigError(f"{key}: not supported with the multi-expert {model['arch']} (one classifier per expert, "
                          f"linears.0..{model['num_experts'] - 1})")


def _optim_train_checks(cfg: dict) -> None:
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
    _optim_train_checks(cfg)
    methods.check(cfg)
    losses.check_own_keys(cfg["loss"])
    _expert_arch_checks(cfg)
    return cfg


def _cross_checks(cfg: dict) -> None:
    data, optim, loss, evals, train = cfg["data"], cfg["optim"], cfg["loss"], cfg["eval"], cfg["train"]
    if data["dataset"] == "list" and not data["train_list"]:
        raise ConfigError("data.train_list: required when data.dataset is 'list'")
    if data["dataset"] == "list" and not data["test_list"]:
        raise ConfigError("data.test_list: required when data.dataset is 'list'")
    _dataset_checks(data)
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
    losses.check(loss)
    _resume_check(train["resume"])


def _dataset_checks(data: dict) -> None:
    """The keys each dataset needs, and data.imbalance where no dataset reads it (it would be ignored)."""
    dataset = data["dataset"]
    if dataset in CIFAR_DATASETS + ("image_folder",) and not data["root"]:
        where = "cifar-10-batches-py/ or cifar-100-python/" if dataset in CIFAR_DATASETS else "train/ and test/"
        raise ConfigError(f"data.root: required when data.dataset is {dataset!r} (the folder holding {where})")
    if dataset in CIFAR_DATASETS and data["imbalance"] is None:
        raise ConfigError(f"data.imbalance: required when data.dataset is {dataset!r} (n_max / n_min, e.g. 100; "
                          f"1 keeps the balanced set)")
    if data["imbalance"] is not None and dataset not in IMBALANCE_DATASETS:
        raise ConfigError(f"data.imbalance: not read by data.dataset={dataset!r} (its imbalance is data.ratio); "
                          f"data.imbalance applies to {', '.join(IMBALANCE_DATASETS)}")
    if data["profile"] != "exp" and data["imbalance"] is None:
        raise ConfigError("data.profile: needs data.imbalance (the profile of the long-tailed subsample)")


def _normalisation_checks(data: dict) -> None:
    """data.mean / data.std: one entry per channel. Fashion-MNIST is grey (1); a list dataset decodes
    to 1 or 3 channels and takes its channel count from data.mean, so std must match it."""
    mean, std = data["mean"], data["std"]
    if std is not None and not all(v > 0 for v in std):
        raise ConfigError(f"data.std: every entry must be > 0, got {std!r}")
    if mean is not None and std is not None and len(mean) != len(std):
        raise ConfigError(f"data.std: {len(std)} entries but data.mean has {len(mean)} (one per channel)")
    channels = {"fmnist_lt": (1,), "synthetic": (1, data["channels"]), "list": (1, 3), "image_folder": (1, 3),
                "cifar10_lt": (3,), "cifar100_lt": (3,)}[data["dataset"]]
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) not in channels:
            raise ConfigError(f"data.{key}: {len(value)} entries, but data.dataset={data['dataset']!r} has "
                              f"{' or '.join(map(str, sorted(set(channels))))} channel(s)")
    if data["dataset"] in ("list", "image_folder") and (mean is None) != (std is None) and len(mean or std) == 1:
        # The loaders' defaults are ImageNet's 3-channel mean/std: half a grey setting is a mismatch.
        raise ConfigError("data.mean / data.std: give both for grey (1-channel) images")


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
