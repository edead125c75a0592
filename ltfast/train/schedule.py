"""Learning-rate schedules as one pure function of the global step (nanoGPT's get_lr): the trainer
sets the lr of every step from it, so resuming needs nothing but the step number."""
from __future__ import annotations

import math


def lr_factor(step: int, steps_per_epoch: int, optim: dict) -> float:
    """Multiplier of ``optim['lr']`` for the 0-based global ``step``.

    - ``cosine``: 0.5 * (1 + cos(pi * step / total_steps)), per step. It reaches 0 only after the
      last step. The survey steps CosineAnnealingLR(T_max=epochs) once per epoch *before* training
      the epoch, so its last epoch trains at lr = 0 (a wasted epoch, seed-methods.md §2.1); that quirk
      is deliberately not copied.
    - ``step``: gamma ** (epoch // step_size).
    - ``multistep``: gamma ** (number of milestones <= epoch), epochs 0-based.
    - ``constant``: 1.
    - ``warmup_epochs`` > 0 multiplies by a linear ramp (step + 1) / warmup_steps during the warm-up
      (the survey's LDAM CustomLR ramps per epoch, (e + 1) / 5; per step is smoother, same end point).
    """
    epochs = optim["epochs"]
    total = epochs * steps_per_epoch
    epoch = step // steps_per_epoch
    kind = optim["schedule"]
    if kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * step / total))
    elif kind == "step":
        factor = optim["gamma"] ** (epoch // optim["step_size"])
    elif kind == "multistep":
        factor = optim["gamma"] ** sum(epoch >= m for m in optim["milestones"])
    elif kind == "constant":
        factor = 1.0
    else:
        raise ValueError(f"optim.schedule: unknown schedule {kind!r}")
    warmup_steps = int(round(optim["warmup_epochs"] * steps_per_epoch))
    if step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor
