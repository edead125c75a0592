"""Optimizer, learning-rate scaling, gradient accumulation, fp16 loss scaling and weight
initialisation for the trainer (issue 13 §2.4).

- ``build_optimizer``: SGD (momentum, nesterov; the survey's) or AdamW (decoupled weight decay).
- ``scaled_lr``: ``optim.lr`` is stated for ``optim.reference_batch`` images; the run uses
  ``lr x batch_size x accumulate / reference_batch`` (linear scaling rule, Goyal et al. 2017: the
  survey's 0.1 for 256 becomes 0.025 for a 64-image laptop batch).
- ``Stepper``: one optimizer step per ``optim.accumulate`` micro-batches (gradients of the mean
  over the group; under DDP only the last micro-batch all-reduces), through a GradScaler for fp16.
- ``load_init_weights``: ``model.init_from`` as a trainer checkpoint, a plain state_dict or a
  torchvision weights file saved locally (nothing is downloaded); a head of another shape (1000
  ImageNet classes) is left at its initialisation and reported.
- ``safe_load``: ``torch.load(weights_only=True)`` with nothing allowed beyond tensors and the
  numpy RNG state a ltfast checkpoint holds; a pickle that would run code is refused.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from .config import ConfigError


def build_optimizer(params, optim: dict, lr: float) -> torch.optim.Optimizer:
    if optim["name"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"])
    return torch.optim.SGD(params, lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"],
                           nesterov=optim["nesterov"])


def scaled_lr(cfg: dict) -> tuple[float, Optional[str]]:
    """(lr the run uses, a line saying how it was scaled, or None when it is used as given)."""
    optim, batch = cfg["optim"], cfg["data"]["batch_size"]
    effective = batch * optim["accumulate"]
    if optim["reference_batch"] is None:
        return optim["lr"], None
    lr = optim["lr"] * effective / optim["reference_batch"]
    batch_text = f"{batch} x {optim['accumulate']} accumulated = {effective}" if optim["accumulate"] > 1 else str(batch)
    return lr, (f"lr {lr:.6g} = optim.lr {optim['lr']:.6g} (for batch {optim['reference_batch']}) x {effective} / "
                f"{optim['reference_batch']} (linear scaling; effective batch {batch_text})")


class Stepper:
    """Gradient accumulation and fp16 loss scaling around ``loss.backward(); optimizer.step()``.

    The batches of an epoch are taken in groups of ``accumulate``; the last group may be shorter
    (its loss is divided by its own size, so every step follows the mean over its images). With
    ``accumulate=1`` and no scaler this is exactly ``zero_grad; backward; step`` (exact resume and
    every earlier result are unchanged)."""

    def __init__(self, optimizer, accumulate: int, batches_per_epoch: int, scaler=None, net: nn.Module = None):
        self.optimizer, self.accumulate, self.batches, self.scaler, self.net = \
            optimizer, accumulate, batches_per_epoch, scaler, net
        self.steps_per_epoch = math.ceil(batches_per_epoch / accumulate)

    def step_of(self, i: int) -> int:
        """Optimizer step (within the epoch) of the i-th batch."""
        return i // self.accumulate

    def _group(self, i: int) -> tuple[bool, bool, int]:
        start = (i // self.accumulate) * self.accumulate
        size = min(self.accumulate, self.batches - start)
        return i == start, i == start + size - 1, size

    def context(self, i: int):
        """DDP all-reduces gradients on every backward; only the group's last one needs it."""
        _, last, _ = self._group(i)
        if not last and hasattr(self.net, "no_sync"):
            return self.net.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, i: int) -> bool:
        """Backward of one micro-batch; steps at the end of its group. Returns True when it stepped."""
        first, last, size = self._group(i)
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        scaled = loss / size if size > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        if not last:
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)   # skips the step when a gradient is inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        return True


def make_scaler(amp: str, device: torch.device):
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def autocast_fp16(device: torch.device):
    return lambda: torch.autocast(device.type, dtype=torch.float16)


# ---------------------------------------------------------------------------------- checkpoints

def safe_load(path: str, what: str = "model.init_from") -> object:
    """``torch.load(path, weights_only=True)`` through ltfast.train.checkpoint.load: tensors,
    containers and numbers only (plus the numpy types of older checkpoints' RNG state); anything else
    is a CheckpointError naming ``what`` and the path, before any of it runs."""
    from . import checkpoint
    return checkpoint.load(path, what)


def _state_dict_of(obj, path: str) -> dict:
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never returns one
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.init_from: {path} holds no state_dict (expected a trainer checkpoint, a "
                         f"state_dict or a torchvision weights file)")
    # DDP / torch.compile prefixes from other training code
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_checked_state(model: nn.Module, state: dict, path: str) -> None:
    """``model.load_state_dict(state)`` whose mismatch (another architecture or config, a crafted
    file) is a ConfigError naming the file and the first differences, not a traceback."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        detail = "; ".join(lines)[:400] or str(error)[:400]
        raise ConfigError(f"checkpoint {path} does not fit the model of its config (another model.* setting or not "
                          f"this run's file?): {detail}") from None


def load_init_weights(model: nn.Module, path: str, head: Optional[str] = None, num_classes: Optional[int] = None,
                      log=print) -> dict:
    """Initialises ``model`` from ``path``. Every backbone tensor must be present with its shape
    (a wrong architecture fails loudly); head tensors of another shape are skipped. Returns
    {"loaded", "skipped_head"}."""
    from .models import find_head
    state = _state_dict_of(safe_load(path), path)  # CheckpointError naming the key for a missing file
    head_name, _ = find_head(model, num_classes, head)
    own = model.state_dict()
    skipped = [k for k in own if k.startswith(head_name + ".") and k in state and state[k].shape != own[k].shape]
    for key in skipped:
        state.pop(key)
    missing = [k for k in own if k not in state and not (k.startswith(head_name + ".") and skipped)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"model.init_from: {path} does not fit {type(model).__name__}: "
                         + "; ".join(f"{name}: {items[:6]}{' ...' if len(items) > 6 else ''}"
                                     for name, items in (("missing", missing), ("unexpected", unexpected),
                                                         ("shape", wrong)) if items))
    model.load_state_dict(state, strict=False)
    if skipped:
        log(f"init_from {path}: classifier {head_name} has another shape there ({', '.join(skipped)}); "
            f"it keeps its fresh initialisation")
    return {"loaded": len(state), "skipped_head": skipped}


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"train.amp: fp16 needs a cuda or cpu device, got {device.type}")
