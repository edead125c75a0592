"""``Method``: what a long-tail method may change in a run, as hooks that default to nothing.

The trainer (``ltfast.train.trainer``) and the model builder (``ltfast.train.engine.build_model``)
call every hook of every *enabled* method, in registry order (``methods/__init__.py``), at fixed
points; none of them names a method. A method is one file in ``methods/`` with one ``Method``
subclass per recipe and its line in the registry. See docs/methods.md for a worked example.

Class-level (read without a run):
- ``name``, ``summary``: the registry's listing (``ltfast.train.methods.available()``).
- ``config_keys``: {section: {key: (default, types, check, comment)}}, merged into the config schema.
- ``classifiers``: the ``model.classifier`` values this method provides.
- ``enabled(cfg)``: whether this run uses the method.
- ``check(cfg)``: ConfigErrors beyond the key types; called for EVERY config, enabled or not (a key
  of this method set in a run that does not use it is a mistake worth naming).

Per run (``Method(cfg)``; an instance may keep run state, e.g. a feature average or mixup):
- ``build_head(model, num_classes)``: replace the architecture's head (cosine, causal); before
  ``model.init_from`` is loaded, so a checkpoint of the same kind fits. Returns None (the model was
  changed in place) or the module to use instead of ``model`` (BBN: the architecture split into a
  shared trunk and two branches).
- ``adapt(model, num_classes, stage)``: after ``model.init_from`` (stage "train") and on every
  rebuild from a checkpoint (stage "rebuild": evaluation, test-time); wraps or swaps the head so
  that it has the structure the checkpoint was saved with (LWS, NCM, MiSLAS's scale).
- ``fit(model, data, run)``: a training-free stage 2 (NCM, tau-norm): builds the classifier from
  statistics and returns {"label", "selection", "info"}; the trainer then validates, saves and
  tests without any epoch. None (the default): the run trains.
- ``extra_loaders(data, run)``: {name: loader} of further training streams (BBN's reversed-sampled
  batches), made once after the data; each has the training loader's length and ``set_epoch``,
  and its batch i reaches ``train_step`` beside the training loader's batch i.
- ``start(model, head_name, run)``: once before the first epoch of a training run.
- ``param_groups(model, head_name, params)``: the optimizer's parameter groups (each may carry an
  ``lr_factor``, multiplied into the scheduled lr).
- ``on_epoch_start(model, head_name, epoch)``: after ``model.train()``, before the epoch's batches.
- ``mix_batch(images, labels, criterion)``: (the batch the model sees, the function from the model's
  loss input to the loss) when the method changes them (mixup), else None: the batch as loaded and
  ``criterion(outputs, labels)``. At most one enabled method may return something.
- ``train_step(net, images, labels, extra, criterion)``: the loss of one training batch when the
  method owns the forward (BBN: two batches, two branches, one mixed loss), else None (the default
  step: ``criterion(net(images), labels)``). ``extra``: {name: (images, labels)} of every method's
  extra loaders, on the device. Runs inside the run's autocast; the trainer does the backward.
  At most one enabled method may return something; it sees the batch as loaded (no ``mix_batch``).
- ``after_step(lr)``: after each training batch's backward / optimizer step.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn


class Method:
    name: str = ""
    summary: str = ""
    config_keys: dict[str, dict[str, tuple]] = {}
    classifiers: tuple[str, ...] = ()

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return False

    @classmethod
    def check(cls, cfg: dict) -> None:
        return None

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg

    def build_head(self, model: nn.Module, num_classes: int) -> Optional[nn.Module]:
        return None

    def adapt(self, model: nn.Module, num_classes: int, stage: str) -> None:
        return None

    def fit(self, model: nn.Module, data: dict, run) -> Optional[dict]:
        return None

    def extra_loaders(self, data: dict, run) -> dict:
        return {}

    def start(self, model: nn.Module, head_name: str, run) -> None:
        return None

    def param_groups(self, model: nn.Module, head_name: str, params: list) -> list:
        return params

    def on_epoch_start(self, model: nn.Module, head_name: str, epoch: int) -> None:
        return None

    def mix_batch(self, images: Tensor, labels: Tensor,
                  criterion: nn.Module) -> Optional[tuple[Tensor, Callable[[Tensor], Tensor]]]:
        return None

    def train_step(self, net: nn.Module, images: Tensor, labels: Tensor, extra: dict,
                   criterion: nn.Module) -> Optional[Tensor]:
        return None

    def after_step(self, lr: float) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
