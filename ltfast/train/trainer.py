"""The trainer: one code path for a laptop CPU and for torchrun on GPUs.

    summary = train(load_config("configs/fmnist_lt/balanced_softmax.yaml"))

Reading order: ``train`` (the loop) calls ``setup_distributed``, ``build_data``, ``build_loss``,
``evaluate`` and the checkpoint helpers below it. DDP is on when torchrun's WORLD_SIZE > 1 (NCCL on
GPU, gloo on CPU); ``data.batch_size`` is the global batch, split evenly over the ranks. Every rank
runs the same code; only rank 0 prints, saves and plots.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import ltfast

from . import checkpoint, decoupled, metrics, mislas
from .causal import FeatureAverageUpdater
from .config import ConfigError, dump
from .experts import EXPERT_ARCHS, count_expert_correct, expert_fields, expert_summaries, loss_input, split_output
from .models import find_head, freeze_backbone, model_from_config
from .optimization import Stepper, autocast_fp16, build_optimizer, load_init_weights, make_scaler, scaled_lr
from .runlog import History, prepare_out_dir, progress_enabled, record_outputs, run_seeds, val_fields
from .schedule import lr_factor


# --------------------------------------------------------------------------------------------- DDP

def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises the process group from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, device


def _broadcast_buffers(model: nn.Module) -> None:
    # DDP broadcasts rank 0's BN running statistics at the start of every training forward, so after
    # the last step each rank holds its own; evaluate and save rank 0's everywhere.
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


# -------------------------------------------------------------------------------------------- data

def _synthetic_split(per_class: list[int], data: dict, seed: int):
    """Random uint8 images with a per-class template, so a model can learn them (tests, benchmarks)."""
    from ltfast.data.datasets import InMemoryDataset
    gen = torch.Generator().manual_seed(seed)
    shape = (data["channels"], data["image_size"], data["image_size"])
    templates = torch.rand((len(per_class),) + shape, generator=torch.Generator().manual_seed(data["split_seed"]))
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(per_class)])
    noise = torch.rand((labels.numel(),) + shape, generator=gen)
    images = ((0.6 * templates[labels] + 0.4 * noise) * 255).to(torch.uint8)
    return InMemoryDataset(images, labels)


def load_datasets(data: dict) -> dict:
    """{"train", "val" (or None), "test", "class_counts", "class_names", "in_memory"} from the config."""
    from ltfast.data import datasets
    if data["dataset"] == "fmnist_lt":
        kwargs = {"root": data["root"]} if data["root"] else {}
        lt = datasets.fashion_mnist_lt(ratio=data["ratio"], n_max=data["n_max"], val_per_class=data["val_per_class"],
                                       seed=data["split_seed"], **kwargs)
        return {"train": lt["train"], "val": lt["val"] if data["val_per_class"] else None, "test": lt["test"],
                "class_counts": [int(c) for c in lt["class_counts"]], "class_names": list(lt["class_names"]),
                "in_memory": True}
    if data["dataset"] == "synthetic":
        num_classes = data["num_classes"] or 10
        counts = datasets.long_tailed_counts(data["n_max"], num_classes, data["ratio"])
        seed = data["split_seed"]
        val = (_synthetic_split([data["val_per_class"]] * num_classes, data, seed + 1)
               if data["val_per_class"] else None)
        return {"train": _synthetic_split(counts, data, seed), "val": val,
                "test": _synthetic_split([data["test_per_class"]] * num_classes, data, seed + 2),
                "class_counts": list(counts), "class_names": None, "in_memory": True}
    train = datasets.read_list_file(data["train_list"], data["root"])
    val = datasets.read_list_file(data["val_list"], data["root"]) if data["val_list"] else None
    test = datasets.read_list_file(data["test_list"], data["root"])
    num_classes = _check_list_splits(data, {"train": train, "val": val, "test": test})
    counts = datasets.class_counts(train.labels, num_classes)
    return {"train": train, "val": val, "test": test, "class_counts": [int(c) for c in counts],
            "class_names": None, "in_memory": False}


def _check_list_splits(data: dict, splits: dict) -> int:
    """Start-up checks of list datasets, before any training: labels in range and no empty training
    class (file:line of the culprit), and every listed image present (unless data.check_files=false).
    Returns the class count. A bad label used to surface after an epoch, or as a 16-way model."""
    from ltfast.data import datasets
    try:
        num_classes = datasets.check_labels(splits, data["num_classes"], data["allow_empty_classes"])
    except ValueError as error:
        raise ConfigError(f"data labels: {error}") from None
    if data["check_files"]:
        for name, split in splits.items():
            if split is not None:
                datasets.check_files_exist(split, name)
    return num_classes


def make_loader(sets: dict, split: str, data: dict, *, sampler, batch_size: int, device, train: bool, seed: int,
                rank: Optional[int] = None, world: Optional[int] = None):
    """DeviceTensorLoader for in-memory sets, the DALI (or PIL) pipeline for list files: both yield
    normalised float images and int64 labels on ``device`` and have set_epoch / len."""
    norm = {k: tuple(data[k]) for k in ("mean", "std") if data[k] is not None}
    if sets["in_memory"]:
        from ltfast.data.loaders import DeviceTensorLoader
        return DeviceTensorLoader(sets[split], sampler, batch_size, device, train, pad=data["pad"], flip=data["flip"],
                                  drop_last=train, seed=seed, rank=rank, world_size=world, **norm)
    from ltfast.data.dali import make_image_loader
    threads = {"num_threads": data["num_threads"]} if data["num_threads"] else {}
    return make_image_loader(data["backend"], dataset=sets[split], sampler=sampler, batch_size=batch_size,
                             device=device, train=train, crop_size=data["crop_size"], resize_size=data["resize_size"],
                             color_jitter=data["color_jitter"], drop_last=train, seed=seed, rank=rank,
                             world_size=world, **threads, **norm)


def build_data(cfg: dict, rank: int, world: int, device) -> dict:
    from ltfast.data.samplers import make_sampler
    data, seed = cfg["data"], cfg["train"]["seed"]
    for key in ("batch_size", "eval_batch_size"):
        if data[key] % world:
            raise ConfigError(f"data.{key}: {data[key]} is not divisible by the {world} ranks")
    sets = load_datasets(data)
    extra = {}
    if data["sampler"] == "class_balanced":
        extra["num_samples_cls"] = data["num_samples_cls"]
    if data["sampler"] == "progressive":
        extra["total_epochs"] = cfg["optim"]["epochs"]
    # The sampler shards the training set (disjoint, equal length per rank); its stream and the
    # loader's augmentation are pure functions of (seed, epoch, rank): that is what makes resume exact.
    sampler = make_sampler(data["sampler"], sets["train"].labels, seed=seed, rank=rank, world_size=world, **extra)
    per_rank = data["batch_size"] // world
    out = dict(sets)
    out["train_loader"] = make_loader(sets, "train", data, sampler=sampler, batch_size=per_rank, device=device,
                                      train=True, seed=seed, rank=rank, world=world)
    # Evaluation: both loaders go through the set in order, rank::world_size under DDP (disjoint, no
    # padding), so the all-reduced per-class counts cover every image exactly once.
    for split in ("val", "test"):
        out[f"{split}_loader"] = None if sets[split] is None else make_loader(
            sets, split, data, sampler=None, batch_size=data["eval_batch_size"] // world, device=device,
            train=False, seed=seed, rank=rank, world=world)
    if len(out["train_loader"]) == 0:
        raise ConfigError(f"data.batch_size: {data['batch_size']} leaves no full batch per epoch "
                          f"({len(sets['train'])} training images over {world} ranks)")
    return out


# -------------------------------------------------------------------------------------------- loss

def build_loss(loss: dict, class_counts: list[int]) -> nn.Module:
    """The recipe's loss from ltfast.nn. Plain CE is ltfast.nn.CrossEntropyLoss: the survey's
    nn.CrossEntropyLoss computed by the fused op, which also takes mixup's two targets in one call."""
    name = loss["name"]
    if name == "ce":
        return ltfast.nn.CrossEntropyLoss()
    if name == "weighted_ce":
        return ltfast.nn.WeightedCrossEntropyLoss(class_counts)
    if name == "seql":
        return ltfast.nn.SoftmaxEqualizationLoss(class_counts, gamma=loss["gamma"], lambda_=loss["lambda_"],
                                                 count_threshold=loss["count_threshold"])
    if name == "balanced_softmax":
        return ltfast.nn.BalancedSoftmaxLoss(class_counts)
    if name == "lade":
        return ltfast.nn.LADELoss(class_counts, alpha=loss["alpha"], remine_lambda=loss["remine_lambda"],
                                  gather_batch=loss["gather_batch"])
    if name == "ldam_drw":
        return ltfast.nn.LDAMLoss(class_counts, max_margin=loss["max_margin"], s=loss["s"],
                                  drw_epoch=loss["drw_epoch"], beta=loss["beta"],
                                  scale_logits=loss["ldam_scale_logits"])
    if name == "focal":
        return ltfast.nn.FocalLoss(loss["focal_gamma"])
    if name == "logit_adjusted":
        return ltfast.nn.LogitAdjustedLoss(class_counts, tau=loss["tau"])
    if name == "label_aware_smoothing":
        return mislas.label_aware_smoothing_loss(class_counts, loss)
    if name == "sade":
        return ltfast.nn.DiverseExpertLoss(class_counts, tau=loss["sade_tau"])
    if name == "ride":
        return ltfast.nn.RIDELoss(class_counts, max_margin=loss["max_margin"], s=loss["s"], drw_epoch=loss["drw_epoch"],
                                  beta=loss["beta"], base_temperature=loss["base_temperature"],
                                  diversity_factor=loss["diversity_factor"], reweight_factor=loss["reweight_factor"])
    raise ConfigError(f"loss.name: unknown loss {name!r}")


def _summarise_vector(name: str, values: torch.Tensor) -> str:
    values = values.detach().double().cpu()
    if values.numel() <= 10:
        return f"{name} [{', '.join(f'{v:.3g}' for v in values.tolist())}]"
    return f"{name} {values.min().item():.3g}..{values.max().item():.3g} (mean {values.mean().item():.3g})"


def describe_loss(criterion: nn.Module) -> str:
    """One line: the loss class, its scalar settings and a summary of its per-class buffers (tail
    classes, margins, weights), so a run's log shows what it trained with: SEQL on 10 classes with
    the survey's lambda used to become plain CE without a word."""
    parts = []
    per_class_smoothing = getattr(criterion, "_per_class_smoothing", False)
    for key in ("gamma", "tau", "alpha", "remine_lambda", "s", "max_margin", "drw_epoch", "beta", "label_smoothing",
                "base_temperature", "diversity_factor", "reweight_factor"):
        if key == "label_smoothing" and per_class_smoothing:
            continue  # the scalar is 0 then; the per-class values that run are summarised below
        value = getattr(criterion, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) or (key == "drw_epoch" and value is not None):
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    tail = getattr(criterion, "tail_mask", None)
    if isinstance(tail, torch.Tensor):
        classes = torch.nonzero(tail.bool()).flatten().tolist()
        shown = ", ".join(map(str, classes[:20])) + (" ..." if len(classes) > 20 else "")
        parts.append(f"tail classes {len(classes)} of {tail.numel()}: [{shown}]"
                     + (" (none: this is plain cross-entropy)" if not classes else ""))
    for name in ("target_margin", "weight", "drw_weight", "adjustment", "log_prior", "label_smoothing",
                 "class_label_smoothing", "log_inverse_prior", "temperature_weight", "diversity_temperature"):
        value = getattr(criterion, name, None)
        if isinstance(value, torch.Tensor):
            label = {"class_label_smoothing": "label_smoothing per class",
                     "diversity_temperature": "diversity temperature per class (with DRW)",
                     "drw_weight": "drw_weight (with DRW)"}.get(name, name)
            parts.append(_summarise_vector(label, value))
    adjustments = getattr(criterion, "adjustments", None)  # SADE: one [C] logit adjustment per expert
    if isinstance(adjustments, torch.Tensor) and adjustments.dim() == 2:
        parts += [_summarise_vector(f"expert {k + 1} adjustment", row) for k, row in enumerate(adjustments)]
    return f"{type(criterion).__name__}({', '.join(parts)})"


# ---------------------------------------------------------------------------------------- evaluate

@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device, autocast=contextlib.nullcontext,
             memory_format=torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (correct, total), summed over all ranks: each rank evaluates its own shard."""
    correct, total, _ = evaluate_with_experts(model, loader, num_classes, device, autocast, memory_format)
    return correct, total


@torch.no_grad()
def evaluate_with_experts(model: nn.Module, loader, num_classes: int, device, autocast=contextlib.nullcontext,
                          memory_format=torch.contiguous_format):
    """``evaluate`` plus, for a multi-expert model, each expert's per-class correct counts [E, C]
    (None for a single-output model); correct / total are the aggregate (mean-logit) prediction's."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long, device=device)
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    expert_correct = None
    for images, labels in loader:
        with autocast():
            output = model(images.to(device, non_blocking=True).contiguous(memory_format=memory_format))
        logits, expert_logits = split_output(output)
        batch_correct, batch_total = metrics.count_correct(logits.float(), labels, num_classes)
        correct += batch_correct
        total += batch_total
        if expert_logits is not None:
            batch_experts = count_expert_correct(expert_logits.float(), labels.to(expert_logits.device), num_classes)
            expert_correct = batch_experts if expert_correct is None else expert_correct + batch_experts
    model.train(was_training)
    correct, total = metrics.all_reduce_counts(correct, total)
    if expert_correct is not None:
        expert_correct, _ = metrics.all_reduce_counts(expert_correct, torch.zeros_like(expert_correct))
        expert_correct = expert_correct.cpu()
    return correct.cpu(), total.cpu(), expert_correct


# -------------------------------------------------------------------------------------- checkpoint

def _rng_state() -> dict:
    import numpy as np
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng_states(world: int) -> list:
    # Each rank's generator has its own stream (e.g. SEQL's drop seeds); keep all of them.
    if world == 1:
        return [checkpoint.rng_state_for_saving(_rng_state())]
    states = [None] * world
    dist.all_gather_object(states, checkpoint.rng_state_for_saving(_rng_state()))
    return states


def _atomic_save(obj, path: str) -> None:
    # An interrupted or failed save (kill, full disk) never leaves a truncated last.pt or a temp file.
    checkpoint.save_atomic(obj, path)


def _resume_path(cfg: dict) -> Optional[str]:
    resume, last = cfg["train"]["resume"], os.path.join(cfg["train"]["out_dir"], "last.pt")
    if resume is False:
        return None
    if resume is True or resume == "auto":
        if os.path.exists(last):
            return last
        if resume is True:
            raise FileNotFoundError(f"train.resume: no checkpoint at {last}")
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"train.resume: no checkpoint file at {resume}")
    return resume


# Keys a resume may change: where the data is read from and how fast, not what is trained. Every
# other key of data / model / loss / optim, and train.seed, must equal the checkpoint's: a changed
# optim.epochs or optim.lr made the schedule jump mid-run, another loss.name ended in a raw
# RuntimeError from load_state_dict, and either overwrote config.yaml (trial finding 9e).
# The train (but seed) and eval sections are free: logging, device, checkpointing, reporting.
RESUME_HARMLESS = {("data", "root"), ("data", "eval_batch_size"), ("data", "num_threads"), ("data", "check_files"),
                   ("model", "compile"), ("model", "channels_last")}


def check_resume_config(saved: Optional[dict], cfg: dict, path: str) -> None:
    """ConfigError naming the keys whose values differ from the checkpoint's config."""
    if not isinstance(saved, dict):
        raise ConfigError(f"train.resume: {path} holds no config (not a last.pt of ltfast.train?)")
    differ = []
    for section in ("data", "model", "loss", "optim"):
        mine, theirs = cfg.get(section, {}), saved.get(section) or {}
        for key in sorted(set(mine) | set(theirs)):
            if (section, key) not in RESUME_HARMLESS and mine.get(key) != theirs.get(key):
                differ.append(f"{section}.{key} ({theirs.get(key)!r} -> {mine.get(key)!r})")
    if cfg["train"]["seed"] != (saved.get("train") or {}).get("seed", cfg["train"]["seed"]):
        differ.append(f"train.seed ({saved['train']['seed']!r} -> {cfg['train']['seed']!r})")
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise ConfigError(f"train.resume: the config differs from the checkpoint's ({path}) in {shown}; resume "
                          f"with the run's config.yaml, or start a new run (another train.out_dir)")


def load_model_weights(model: nn.Module, path: str, what: str = "model.init_from") -> None:
    """Model weights of a trainer checkpoint (last.pt or best.pt) or a bare state_dict; loaded with
    weights_only=True (ltfast.train.checkpoint): nothing in the file is run."""
    model.load_state_dict(checkpoint.model_state(checkpoint.load(path, what), path, what))


# ------------------------------------------------------------------------------------------- train

def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def _check_before_start(cfg: dict) -> None:
    """What the schema cannot see, checked before any data is read: the device exists and the
    architecture is known (a mistyped model.arch used to fail after the data had loaded)."""
    device = cfg["train"]["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {device!r} but torch.cuda.is_available() is False")
    arch = cfg["model"]["arch"]
    if arch != "small_resnet" and arch not in EXPERT_ARCHS:
        import difflib
        import torchvision
        known = torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            close = difflib.get_close_matches(arch, known + ["small_resnet"] + list(EXPERT_ARCHS), 3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"model.arch: unknown architecture {arch!r}{hint}; small_resnet or a torchvision "
                              f"classification model name")


def train(cfg: dict) -> dict:
    """Trains, selects on validation, tests; returns (and on rank 0 writes) the summary dict."""
    tcfg, ocfg, mcfg = cfg["train"], cfg["optim"], cfg["model"]
    _check_before_start(cfg)
    if tcfg["seeds"]:
        return run_seeds(cfg, train)  # each seed comes back here with train.seeds=None
    rank, world, device = setup_distributed(tcfg["device"])
    prepare_out_dir(cfg, rank)  # before any work: a refused out_dir costs nothing
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cpu" and (tcfg["threads"] or local_world > 1):
        # Ranks sharing a machine would otherwise each start one thread per core.
        torch.set_num_threads(tcfg["threads"] or max(1, (os.cpu_count() or 1) // local_world))
    use_bf16 = tcfg["amp"] == "bf16" or (tcfg["amp"] == "auto" and device.type == "cuda")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
                else contextlib.nullcontext)
    if tcfg["amp"] == "fp16":
        autocast = autocast_fp16(device)
    channels_last = device.type == "cuda" and mcfg["channels_last"]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the survey ran cudnn.deterministic; speed matters more here

    seed = tcfg["seed"]
    random.seed(seed)
    torch.manual_seed(seed)
    import numpy as np
    np.random.seed(seed)

    data = build_data(cfg, rank, world, device)
    counts, num_classes = data["class_counts"], len(data["class_counts"])
    in_channels = data["train"].images.shape[1] if data["in_memory"] else len(cfg["data"]["mean"] or (0, 0, 0))
    model = model_from_config(mcfg, num_classes, in_channels)  # cosine / causal heads, multi-expert archs
    if mcfg["init_from"]:
        load_init_weights(model, mcfg["init_from"], mcfg["head"], num_classes, log=lambda m: _log(rank, m))
    if mcfg["freeze_backbone"]:
        freeze_backbone(model, mcfg["head"], num_classes)
    if mcfg["classifier"] == "lws":
        decoupled.use_lws_classifier(model, num_classes, mcfg["head"])  # only its per-class scale trains
    if mcfg["learnable_scale"]:  # after init_from (stage 1 has no scale) and the freeze (the scale trains)
        mislas.use_learnable_weight_scaling(model, num_classes, mcfg["head"])
    head_name = find_head(model, num_classes, mcfg["head"])[0]
    feature_average = FeatureAverageUpdater.for_model(model)  # causal TDE's moving average, else None
    mixup = mislas.Mixup(cfg["data"]["mixup_alpha"]) if cfg["data"]["mixup_alpha"] > 0 else None
    model.to(device)
    model.to(memory_format=memory_format)
    if mcfg["classifier"] in decoupled.TRAINING_FREE:  # NCM, tau-norm: a classifier from statistics, no epochs
        state = decoupled.fit_training_free(cfg, model, data, device, autocast, memory_format, rank, world,
                                            log=lambda m: _log(rank, m))
        groups = metrics.shot_groups(counts, cfg["eval"]["many_threshold"], cfg["eval"]["few_threshold"],
                                     cfg["eval"]["shot_split"])
        return _finish(cfg, model, data, groups, state, None, device, autocast, memory_format, rank, world, use_bf16)
    criterion = build_loss(cfg["loss"], counts).to(device)
    _log(rank, f"loss: {describe_loss(criterion)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if ocfg["head_lr_factor"] != 1.0:  # each group's lr is lr x its lr_factor (MiSLAS stage 2)
        params = mislas.parameter_groups(model, head_name, ocfg["head_lr_factor"])
    base_lr, lr_note = scaled_lr(cfg)
    optimizer = build_optimizer(params, ocfg, base_lr)
    scaler = make_scaler(tcfg["amp"], device)
    # No SyncBN: the survey's DataParallel also normalised each GPU's 64 images separately.
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    if mcfg["compile"]:
        net = torch.compile(net)
    # Training randomness beyond the data (SEQL's drop seeds) differs per rank.
    torch.manual_seed(seed * 1000 + rank)

    out_dir = tcfg["out_dir"]
    groups = metrics.shot_groups(counts, cfg["eval"]["many_threshold"], cfg["eval"]["few_threshold"],
                                 cfg["eval"]["shot_split"])
    state = {"epoch": 0, "best_top1": -1.0, "best_epoch": None, "history": [], "train_time_s": 0.0,
             "train_images": 0}
    resume = _resume_path(cfg)
    if resume:
        ckpt = checkpoint.load(resume, "train.resume")
        check_resume_config(ckpt.get("config") if isinstance(ckpt, dict) else None, cfg, resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        criterion.load_state_dict(ckpt["criterion"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        if len(ckpt["rng"]) == world:
            _set_rng_state(checkpoint.rng_state_after_loading(ckpt["rng"][rank]))
        else:
            _log(rank, f"resume: checkpoint from {len(ckpt['rng'])} ranks, running {world}: RNG streams reseeded")
            torch.manual_seed(seed * 1000 + rank + 7919 * state["epoch"])
        _log(rank, f"resumed from {resume} after epoch {state['epoch']}")
    if rank == 0:
        # listed before they are written (runlog's manifest: what train.overwrite may delete)
        record_outputs(out_dir, files=["config.yaml"] + (["best.pt", "last.pt"] if tcfg["save_checkpoints"] else []))
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(dump(cfg))

    loader = data["train_loader"]
    stepper = Stepper(optimizer, ocfg["accumulate"], len(loader), scaler, net)
    steps_per_epoch = stepper.steps_per_epoch  # optimizer steps (the schedule's unit)
    batches_per_epoch = len(loader)
    history = History(cfg, rank, state["history"])
    if lr_note:
        _log(rank, lr_note)
    epochs, per_rank = ocfg["epochs"], cfg["data"]["batch_size"] // world
    _log(rank, f"{cfg.get('name') or cfg['loss']['name']}: {mcfg['arch']}, {len(data['train'])} training images, "
               f"{num_classes} classes, {world} rank(s) on {device.type}, {steps_per_epoch} steps/epoch of "
               f"{cfg['data']['batch_size']}, {epochs} epochs{', bf16' if use_bf16 else ''}")
    epochs_this_run, best_weights = 0, None
    while state["epoch"] < epochs:
        epoch = state["epoch"]
        loader.set_epoch(epoch)
        if hasattr(criterion, "set_epoch"):
            criterion.set_epoch(epoch)  # LDAM's deferred re-weighting
        model.train()
        if mcfg["freeze_backbone"]:
            mislas.set_backbone_mode(model, head_name, mcfg["shift_bn"])
        loss_sum = torch.zeros((), device=device)
        bar = None
        if rank == 0 and tcfg["progress"] and progress_enabled():
            from tqdm import tqdm
            bar = tqdm(total=batches_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        step = epoch * steps_per_epoch
        for i, (images, labels) in enumerate(loader):
            lr = base_lr * lr_factor(step + stepper.step_of(i), steps_per_epoch, ocfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_factor", 1.0)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup is not None:
                images, labels_b, lam = mixup.mix(images, labels)
            with stepper.context(i):
                with autocast():
                    logits = net(images.contiguous(memory_format=memory_format))
                    outputs = loss_input(logits, criterion)  # [N, E, C] for the multi-expert losses
                    loss = criterion(outputs, labels) if mixup is None else \
                        mislas.mixed_loss(criterion, outputs, labels, labels_b, lam)
                stepper.backward(loss, i)  # zero_grad / backward / step, accumulated and fp16-scaled
            if feature_average is not None:
                feature_average.update(lr)
            loss_sum += loss.detach().float()
            if bar is not None:
                bar.update(1)
                if (i + 1) % tcfg["log_every"] == 0:  # .item() syncs: only now and then
                    rate = (i + 1) * per_rank * world / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
        if not math.isfinite(loss_sum.item()):
            raise FloatingPointError(f"epoch {epoch + 1}: the training loss is not finite")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        state["train_time_s"] += elapsed
        state["train_images"] += batches_per_epoch * per_rank * world
        record = {"epoch": epoch + 1, "loss": loss_sum.item() / batches_per_epoch, "lr": lr,
                  "time_s": elapsed, "images_per_s": batches_per_epoch * per_rank * world / elapsed}

        _broadcast_buffers(model)
        last = epoch + 1 == epochs
        best_now = False
        if data["val_loader"] is not None and ((epoch + 1) % cfg["eval"]["every"] == 0 or last):
            correct, total, experts = evaluate_with_experts(model, data["val_loader"], num_classes, device, autocast,
                                                            memory_format)
            val = metrics.summarize(correct, total, groups)
            record.update(val_fields(val))
            if experts is not None:
                record.update(expert_fields(experts, total, groups))
            if val["top1"] > state["best_top1"]:
                state["best_top1"], state["best_epoch"], best_now = val["top1"], epoch + 1, True
        state["history"].append(record)
        state["epoch"] = epoch + 1
        rng = _gather_rng_states(world)  # every rank takes part in the gather
        if rank == 0 and tcfg["save_checkpoints"]:
            if best_now:
                _atomic_save({"model": model.state_dict(), "epoch": epoch + 1, "val_top1": state["best_top1"]},
                             os.path.join(out_dir, "best.pt"))
            _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "criterion": criterion.state_dict(), "schedule": {"step": (epoch + 1) * steps_per_epoch},
                          "scaler": scaler.state_dict() if scaler is not None else None,
                          "sampler": {"epoch": epoch + 1, "seed": seed},
                          "state": state, "rng": rng, "world_size": world, "config": cfg},
                         os.path.join(out_dir, "last.pt"))
        if rank == 0 and best_now and not tcfg["save_checkpoints"]:
            best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        val_text = f"  val {record['val_top1']:.2f} (best {state['best_top1']:.2f} @{state['best_epoch']})" \
            if "val_top1" in record else ""
        _log(rank, f"epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}  lr {lr:.4g}{val_text}  "
                   f"{record['images_per_s']:.0f} img/s  {elapsed:.1f}s")
        history.append(record)  # after the checkpoint: the file never runs ahead of last.pt
        epochs_this_run += 1
        if tcfg["stop_after"] is not None and epochs_this_run >= tcfg["stop_after"] and state["epoch"] < epochs:
            _log(rank, f"stopping after {epochs_this_run} epoch(s) (train.stop_after); resume with train.resume=true")
            history.close()
            if dist.is_initialized():
                dist.barrier()
            return {"status": "stopped", "epoch": state["epoch"], "out_dir": out_dir}

    history.close()
    return _finish(cfg, model, data, groups, state, best_weights, device, autocast, memory_format, rank, world,
                   use_bf16)


def _finish(cfg, model, data, groups, state, best_weights, device, autocast, memory_format, rank, world,
            use_bf16) -> dict:
    """Test with the best-validation weights (last epoch's when there is no validation split)."""
    out_dir, num_classes = cfg["train"]["out_dir"], len(data["class_counts"])
    selection = state.get("selection", "last epoch (no validation split)")  # decoupled NCM / tau-norm name theirs
    if data["val_loader"] is not None and state["best_epoch"] is not None:
        selection = f"best validation top-1, epoch {state['best_epoch']}"
        best_path = os.path.join(out_dir, "best.pt")
        if cfg["train"]["save_checkpoints"]:
            if dist.is_initialized():
                dist.barrier()  # rank 0 has finished writing best.pt
            load_model_weights(model, best_path, "best.pt")
        else:
            if world > 1:
                objects = [best_weights]
                dist.broadcast_object_list(objects, 0)
                best_weights = objects[0]
            model.load_state_dict(best_weights)
    eval_start = time.perf_counter()
    try:
        correct, total, experts = evaluate_with_experts(model, data["test_loader"], num_classes, device, autocast,
                                                        memory_format)
    except Exception as error:
        _write_failed_summary(cfg, state, selection, error, rank)
        raise
    test = metrics.summarize(correct, total, groups, cfg["eval"]["ua"])
    test["correct"], test["total"] = correct.tolist(), total.tolist()  # to re-aggregate or compare runs
    if experts is not None:  # each expert alone; the top-level numbers are the experts' mean logits
        test["experts"] = [dict(summary, correct=c.tolist()) for summary, c in
                           zip(expert_summaries(experts, total, groups), experts)]
    eval_time = time.perf_counter() - eval_start
    summary = {
        "name": cfg.get("name") or cfg["loss"]["name"], "status": "finished",
        "selection": selection, "best_epoch": state["best_epoch"], "best_val_top1": state["best_top1"]
        if state["best_epoch"] is not None else None,
        "test": test, "reported": cfg["eval"]["reported"],
        "class_counts": data["class_counts"], "class_names": data["class_names"],
        "shots": {name: [int(c) for c in groups[name].nonzero().flatten()] for name in metrics.SHOTS},
        "world_size": world, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16": use_bf16, "torch_threads": torch.get_num_threads(),
        "train_time_s": state["train_time_s"], "test_time_s": eval_time,
        "train_images_per_s": state["train_images"] / max(state["train_time_s"], 1e-9),
        "history": state["history"], "config": cfg,
    }
    if "decoupled" in state:
        summary["decoupled"] = state["decoupled"]  # tau-norm's tau and validation curve, NCM's settings
    if rank == 0:
        record_outputs(out_dir, files=["summary.json"] + (["per_class.png"] if cfg["train"]["plot"] else []))
        if cfg["train"]["plot"]:
            title = (f"{summary['name']}: test top-1 {test['top1']:.1f}, many {_fmt(test['many'])}, "
                     f"medium {_fmt(test['medium'])}, few {_fmt(test['few'])}")
            summary["plot"] = metrics.plot_per_class(test["per_class"], data["class_counts"], groups,
                                                     os.path.join(out_dir, "per_class.png"), title,
                                                     data["class_names"])
        summary_path = os.path.join(out_dir, "summary.json")
        summary["summary"] = summary_path
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)
        ra = f"  RA {test['ra']:.1f}" if test.get("ra") is not None else ""
        print(f"test ({selection}): top-1 {test['top1']:.2f}  many {_fmt(test['many'])}  "
              f"medium {_fmt(test['medium'])}  few {_fmt(test['few'])}{ra}  -> {summary_path}", flush=True)
        if "experts" in test:
            print("  each expert alone: " + ", ".join(f"expert {k} top-1 {_fmt(e['top1'])} (few {_fmt(e['few'])})"
                                                      for k, e in enumerate(test["experts"], start=1)), flush=True)
    if dist.is_initialized():
        dist.barrier()  # ranks leave together: none tears its connections down while rank 0 still writes
    return summary


def _write_failed_summary(cfg, state, selection, error, rank) -> None:
    """A test-time failure (an image gone since start-up) still leaves what was measured: the
    training history, the selected epoch and the error, in summary.json with status 'test_failed'."""
    if rank != 0:
        return
    path = os.path.join(cfg["train"]["out_dir"], "summary.json")
    record_outputs(cfg["train"]["out_dir"], files=["summary.json"])
    summary = {"name": cfg.get("name") or cfg["loss"]["name"], "status": "test_failed",
               "error": f"{type(error).__name__}: {error}", "selection": selection,
               "best_epoch": state["best_epoch"],
               "best_val_top1": state["best_top1"] if state["best_epoch"] is not None else None,
               "train_time_s": state["train_time_s"], "history": state["history"], "config": cfg}
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"test failed ({type(error).__name__}); training history written to {path}", flush=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
