"""The run context and the model: what training, ``ltfast.evaluate`` and test-time share.

- ``RunContext``: the device, the precision (autocast, memory format) and the DDP rank / world of
  a run, made once (``start_run`` for training, ``RunContext.single`` for the evaluation tools) and
  handed to whatever needs them, instead of five values threaded through every call.
- ``build_model(cfg, num_classes, in_channels, stage)``: THE place a run's model is assembled,
  for training (stage "train": the methods' heads, ``model.init_from``, the frozen backbone, the
  methods' adaptations) and for every rebuild from a checkpoint (stage "rebuild": the same
  structure, then the checkpoint's weights; ``load_run``).
- ``evaluate`` / ``evaluate_with_experts`` / ``evaluate_split``: per-class correct / total counts
  (and, for ``evaluate_split(..., calibrate=True)``, the calibration and precision count tables of
  ``calibration.ClassificationCounts``), summed over the ranks, in one pass over the data.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import checkpoint, methods, metrics
from .calibration import ClassificationCounts
from .config import ConfigError, dump, load_config
from .data import load_datasets
from .distributed import setup_distributed
from .models import (build_backbone, check_arch, count_expert_correct, find_head, freeze_backbone, load_init_weights,
                     split_output)
from .optimization import autocast_fp16
from .runlog import prepare_out_dir

STAGES = ("train", "rebuild")


@dataclass
class RunContext:
    """Where and how a run computes. ``autocast()`` is a context manager factory (bf16 / fp16 autocast
    or nothing); ``memory_format`` applies to the model and every input batch."""
    device: torch.device
    rank: int = 0
    world: int = 1
    use_bf16: bool = False
    autocast: Callable = contextlib.nullcontext
    memory_format: torch.memory_format = torch.contiguous_format
    printer: Callable[[str], None] = field(default=lambda message: print(message, flush=True), repr=False)

    @classmethod
    def single(cls, device_name: str = "auto") -> "RunContext":
        """One process, fp32, contiguous: the evaluation tools' context."""
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(torch.device(device_name))

    def log(self, message: str) -> None:
        """Printed by rank 0 only."""
        if self.rank == 0:
            self.printer(message)

    def to_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        return model.to(memory_format=self.memory_format)

    def evaluate(self, model: nn.Module, loader, num_classes: int):
        """``evaluate_with_experts`` in this context."""
        return evaluate_with_experts(model, loader, num_classes, self.device, self.autocast, self.memory_format)

    def evaluate_split(self, model: nn.Module, loader, num_classes: int, calibrate: bool = True) -> "Evaluation":
        """``evaluate_split`` in this context (the test: with the calibration counts)."""
        return evaluate_split(model, loader, num_classes, self.device, self.autocast, self.memory_format, calibrate)


def check_before_start(cfg: dict) -> None:
    """What the schema cannot see, checked before any data is read: the device exists and the
    architecture is known (a mistyped model.arch used to fail after the data had loaded)."""
    device = cfg["train"]["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {device!r} but torch.cuda.is_available() is False")
    check_arch(cfg["model"]["arch"])


def start_run(cfg: dict) -> RunContext:
    """A training run's context: the process group (torchrun's environment), the output folder
    prepared (before any work: a refused out_dir costs nothing), CPU threads, the precision, and
    every generator seeded with ``train.seed``."""
    tcfg, mcfg = cfg["train"], cfg["model"]
    rank, world, device = setup_distributed(tcfg["device"])
    prepare_out_dir(cfg, rank)
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
    return RunContext(device, rank, world, use_bf16, autocast, memory_format)


def input_channels(sets: dict, data_cfg: dict) -> int:
    """Image channels of the run's data: the in-memory tensor's, else data.mean's length (3 by default)."""
    if sets["in_memory"] and hasattr(sets["train"], "images"):
        return sets["train"].images.shape[1]
    return len(data_cfg["mean"] or (0, 0, 0))


def build_model(cfg: dict, num_classes: int, in_channels: int, stage: str = "train",
                active: Optional[list] = None, log: Callable[[str], None] = print) -> nn.Module:
    """The run's model, on the CPU. ``stage``: "train" (a training run: ``model.init_from`` loaded, the
    backbone frozen when asked, then the methods adapt it) or "rebuild" (the structure a checkpoint
    of this config was saved with, for its weights to be loaded). ``active``: the run's methods
    (default ``methods.active(cfg)``)."""
    if stage not in STAGES:
        raise ValueError(f"build_model: stage must be one of {STAGES}, got {stage!r}")
    mcfg = cfg["model"]
    active = methods.active(cfg) if active is None else active
    model = build_backbone(mcfg, num_classes, in_channels)
    model = methods.build_head(model, num_classes, cfg, active)  # before init_from: a checkpoint with that head fits
    if stage == "train":
        if mcfg["init_from"]:
            load_init_weights(model, mcfg["init_from"], mcfg["head"], num_classes, log=log)
        if mcfg["freeze_backbone"]:
            freeze_backbone(model, mcfg["head"], num_classes)
    for method in active:
        method.adapt(model, num_classes, stage)
    return model


def wrap_for_training(model: nn.Module, cfg: dict, run: RunContext) -> nn.Module:
    """What the training forward runs through: DDP over the ranks, torch.compile when asked."""
    # No SyncBN: the survey's DataParallel also normalised each GPU's 64 images separately.
    net = model
    if run.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda"
                                                  else None)
    if cfg["model"]["compile"]:
        net = torch.compile(net)
    return net


# ------------------------------------------------------------------------------ runs on disk

def resolve_target(target: str, config: Optional[str]) -> tuple[str, Optional[str], str]:
    """(checkpoint, config path or None, run folder) of a run folder or a checkpoint file."""
    if os.path.isdir(target):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(target, name)):
                checkpoint_path = os.path.join(target, name)
                break
        else:
            raise FileNotFoundError(f"{target}: no best.pt or last.pt in this folder")
        run_dir = target
    elif os.path.isfile(target):
        checkpoint_path, run_dir = target, os.path.dirname(os.path.abspath(target))
    else:
        raise FileNotFoundError(f"{target}: no such run folder or checkpoint")
    if config is None and os.path.isfile(os.path.join(run_dir, "config.yaml")):
        config = os.path.join(run_dir, "config.yaml")
    return checkpoint_path, config, run_dir


def run_config(config: Optional[str], checkpoint_obj, overrides) -> dict:
    """The run's config: the given file, else the one the checkpoint embeds; ``overrides`` on top."""
    if config is not None:
        return load_config(config, overrides)
    embedded = checkpoint_obj.get("config") if isinstance(checkpoint_obj, dict) else None
    if not isinstance(embedded, dict):
        raise ConfigError("--config: the checkpoint has no config.yaml next to it and embeds none; pass --config")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(dump(embedded))
    try:
        return load_config(f.name, overrides)
    finally:
        os.unlink(f.name)


@dataclass
class LoadedRun:
    """A trained run rebuilt from disk: the model (eval mode, on the device) and what it was trained on."""
    model: nn.Module
    cfg: dict
    sets: dict
    checkpoint: str
    config: Optional[str]
    run_dir: str


def load_run(target: str, config: Optional[str], overrides, device, what: str,
             check: Optional[Callable[[dict, str], None]] = None) -> LoadedRun:
    """A run folder or checkpoint -> ``LoadedRun``. ``what`` names the tool in errors; ``check(cfg,
    checkpoint)`` refuses a config before the data is read (test-time: multi-expert models only)."""
    checkpoint_path, config, run_dir = resolve_target(target, config)
    obj = checkpoint.load(checkpoint_path, what)
    cfg = run_config(config, obj, overrides)
    if check is not None:
        check(cfg, checkpoint_path)
    sets = load_datasets(cfg["data"])
    model = build_model(cfg, len(sets["class_counts"]), input_channels(sets, cfg["data"]), "rebuild")
    checkpoint.load_model_weights(model, checkpoint_path, what, obj=obj)
    model.to(device).eval()
    return LoadedRun(model, cfg, sets, checkpoint_path, config, run_dir)


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
    result = evaluate_split(model, loader, num_classes, device, autocast, memory_format, calibrate=False)
    return result.correct, result.total, result.expert_correct


@dataclass
class Evaluation:
    """One pass over a split: per-class ``correct`` / ``total`` (int64 [C], CPU), each expert's
    correct counts [E, C] (None for a single-output model) and, when asked, the calibration /
    precision tables (``calibration.ClassificationCounts`` of the aggregate prediction, CPU)."""
    correct: torch.Tensor
    total: torch.Tensor
    expert_correct: Optional[torch.Tensor] = None
    classification: Optional[ClassificationCounts] = None


@torch.no_grad()
def evaluate_split(model: nn.Module, loader, num_classes: int, device, autocast=contextlib.nullcontext,
                   memory_format=torch.contiguous_format, calibrate: bool = False) -> Evaluation:
    """Per-class counts of ``loader`` in one pass; with ``calibrate`` the ECE / precision count tables
    too (15 confidence bins by true and by predicted class, [C, 15] each: additive, so each rank
    counts its shard and one all-reduce per table sums them, like correct / total)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long, device=device)
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    tables = ClassificationCounts.zeros(num_classes, device=device) if calibrate else None
    expert_correct = None
    for images, labels in loader:
        with autocast():
            output = model(images.to(device, non_blocking=True).contiguous(memory_format=memory_format))
        logits, expert_logits = split_output(output)
        batch_correct, batch_total = metrics.count_correct(logits.float(), labels, num_classes)
        correct += batch_correct
        total += batch_total
        if tables is not None:
            tables.update(logits.float(), labels)
        if expert_logits is not None:
            batch_experts = count_expert_correct(expert_logits.float(), labels.to(expert_logits.device), num_classes)
            expert_correct = batch_experts if expert_correct is None else expert_correct + batch_experts
    model.train(was_training)
    correct, total = metrics.all_reduce_counts(correct, total)
    if expert_correct is not None:
        expert_correct, _ = metrics.all_reduce_counts(expert_correct, torch.zeros_like(expert_correct))
        expert_correct = expert_correct.cpu()
    if tables is not None:
        tables = ClassificationCounts(*(t.cpu() for t in tables.all_reduce().tensors()))
    return Evaluation(correct.cpu(), total.cpu(), expert_correct, tables)


def head_name_of(model: nn.Module, cfg: dict, num_classes: int) -> str:
    """The dotted name of the model's classifier (``models.find_head`` with ``model.head``)."""
    return find_head(model, num_classes, cfg["model"]["head"])[0]
