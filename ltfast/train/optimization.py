"""Optimizer, learning-rate scaling, gradient accumulation and fp16 loss scaling for the trainer.

- ``build_optimizer``: SGD (momentum, nesterov; the survey's) or AdamW (decoupled weight decay).
- ``scaled_lr``: ``optim.lr`` is stated for ``optim.reference_batch`` images; the run uses
  ``lr x batch_size x accumulate / reference_batch`` (linear scaling rule, Goyal et al. 2017: the
  survey's 0.1 for 256 becomes 0.025 for a 64-image laptop batch).
- ``Stepper``: one optimizer step per ``optim.accumulate`` micro-batches (gradients of the mean
  over the group; under DDP only the last micro-batch all-reduces), through a GradScaler for fp16.

``model.init_from`` is read by ``models.load_init_weights``, every checkpoint by ``checkpoint``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError


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


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"train.amp: fp16 needs a cuda or cpu device, got {device.type}")
