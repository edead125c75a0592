"""The methods that are a loss and nothing else (cross-entropy, re-weighting, SEQL, balanced softmax,
LADE, LDAM-DRW, focal, logit adjustment): one registry entry per ``ltfast.train.losses.LOSSES``
entry that no other method claims, enabled by ``loss.name``. Their keys and checks live with the
loss (``losses.KEYS`` / ``LOSSES``), the one place a new loss is added; the trainer builds every
loss the same way, so these entries have no hooks to override."""
from __future__ import annotations

from ..losses import LOSSES
from .base import Method


class LossMethod(Method):
    """A method that only names its loss."""
    loss_name = ""

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["loss"]["name"] == cls.loss_name


def loss_methods(claimed: set) -> list[type]:
    """One LossMethod subclass per loss of ``LOSSES`` not in ``claimed`` (losses of other methods)."""
    return [type(f"LossMethod_{name}", (LossMethod,), {"name": name, "loss_name": name, "summary": spec.summary})
            for name, spec in LOSSES.items() if name not in claimed]
