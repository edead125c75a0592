"""De-confound / causal TDE (Tang et al. 2020) as the survey's Main-codebase runs it
(shared/reference/seed-methods.md §1.6; ``models/CausalNormClassifier.py`` and
``run_networks.py::batch_forward`` of KaihuaTang/Long-Tailed-Recognition.pytorch).

- ``CausalNormClassifier``: K heads over the D-dim feature, ``x_k / ||x_k||`` against
  ``w_ck / (||w_ck|| + gamma)``, logits ``(tau / K) sum_k <x̂_k, ŵ_ck>`` (no bias); in eval mode with
  ``alpha > 0`` the TDE logits ``(tau / K) sum_k <x̂_k - alpha cos_k ĉ_k, ŵ_ck>``, ĉ_k the unit
  direction of the feature moving average in head k and ``cos_k = <x̂_k, ĉ_k>``.
- The moving average ``e <- mu e + mean_batch(x)`` (no (1 - mu) factor: only its direction is used)
  with ``mu = 1 - 0.1 min(50 lr, 1)`` is the buffer ``feature_average`` of the classifier, so it is
  in every checkpoint (the survey saves it as ``embed``). ``FeatureAverageUpdater`` is the trainer's
  plumbing: a forward pre-hook keeps the batch mean of the classifier's input, and ``update(lr)``
  after each training batch folds it in. Under DDP the batch mean is all-reduced first, so that
  every rank holds the average over the global batch, as the survey's DataParallel computed it.

Differences from the survey's code, on purpose: mu follows the lr of each step (the trainer's
schedule is per step; the survey computed mu from the lr once per epoch); a zero feature vector
normalises to 0 (``F.normalize``) instead of NaN; evaluating TDE with a moving average that was never
updated is an error instead of NaN logits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from .. import schema
from ..errors import ConfigError
from ..models import find_head, replace_head
from .base import Method


def moving_average_momentum(lr: float) -> float:
    """mu = 1 - 0.1 * min(50 * lr, 1): 0.9 while lr >= 0.02, rising to 1 as lr goes to 0."""
    return 1.0 - 0.1 * min(50.0 * lr, 1.0)


class CausalNormClassifier(nn.Module):
    """Multi-head normalised classifier with TDE inference. ``weight`` is [classes, features] like
    ``nn.Linear``'s (initialised uniform in ±1/sqrt(features), as the original)."""

    is_classifier_head = True

    def __init__(self, in_features: int, out_features: int, num_heads: int = 2, tau: float = 16.0,
                 gamma: float = 1.0 / 32, alpha: float = 3.0) -> None:
        super().__init__()
        if num_heads <= 0 or in_features % num_heads:
            raise ConfigError(f"model.causal_heads: {num_heads} heads do not split the {in_features}-dim feature "
                              f"evenly")
        if not tau > 0 or not gamma >= 0 or not alpha >= 0:
            raise ValueError(f"model.causal_tau must be > 0, causal_gamma and causal_alpha >= 0; got tau={tau}, "
                             f"gamma={gamma}, alpha={alpha}")
        self.in_features, self.out_features = in_features, out_features
        self.num_heads, self.tau, self.gamma, self.alpha = num_heads, float(tau), float(gamma), float(alpha)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.register_buffer("feature_average", torch.zeros(in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, heads={self.num_heads}, "
                f"tau={self.tau:g}, gamma={self.gamma:g}, alpha={self.alpha:g}")

    def _heads(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.num_heads, -1)

    def normalized_weight(self) -> Tensor:
        """ŵ_ck = w_ck / (||w_ck|| + gamma), as [classes, heads, features / heads]."""
        w = self._heads(self.weight)
        return w / (w.norm(dim=2, keepdim=True) + self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"CausalNormClassifier: expected [N, {self.in_features}] features, got {tuple(x.shape)}")
        x_hat = F.normalize(self._heads(x), dim=2)                          # [N, K, D/K]
        if not self.training and self.alpha > 0:
            average = self._heads(self.feature_average.unsqueeze(0).to(x_hat.dtype))
            if bool((average.norm(dim=2) == 0).any()):   # one sync per evaluation batch
                raise RuntimeError("CausalNormClassifier: TDE needs the feature moving average, which is zero in "
                                   "at least one head (no training step has updated it). Train first, or set "
                                   "model.causal_alpha=0 for the plain normalised logits.")
            c_hat = F.normalize(average, dim=2)                                # [1, K, D/K]
            cos = (x_hat * c_hat).sum(dim=2, keepdim=True)                     # [N, K, 1]
            x_hat = x_hat - self.alpha * cos * c_hat
        w_hat = self.normalized_weight().to(x_hat.dtype)
        return (self.tau / self.num_heads) * x_hat.flatten(1) @ w_hat.flatten(1).t()


def use_causal_classifier(model: nn.Module, num_classes: int, mcfg: dict) -> str:
    """``model.classifier=causal``: the head (``models.find_head``) becomes a CausalNormClassifier on the
    same features, with ``model.causal_heads / causal_tau / causal_gamma / causal_alpha``."""
    _, head = find_head(model, num_classes, mcfg["head"])
    causal = CausalNormClassifier(head.in_features, head.out_features, mcfg["causal_heads"], mcfg["causal_tau"],
                                  mcfg["causal_gamma"], mcfg["causal_alpha"])
    return replace_head(model, causal, mcfg["head"], num_classes)


class FeatureAverageUpdater:
    """Keeps a CausalNormClassifier's ``feature_average`` up to date during training:
    ``updater = FeatureAverageUpdater.for_model(model)`` (None without a causal head), then
    ``updater.update(lr)`` after each training batch."""

    def __init__(self, classifier: CausalNormClassifier) -> None:
        self.classifier = classifier
        self._batch_mean: Optional[Tensor] = None
        self._handle = classifier.register_forward_pre_hook(self._capture)

    @classmethod
    def for_model(cls, model: nn.Module) -> Optional["FeatureAverageUpdater"]:
        found = [m for m in model.modules() if isinstance(m, CausalNormClassifier)]
        if len(found) > 1:
            raise ValueError(f"model.classifier=causal: {len(found)} CausalNormClassifier modules; expected one")
        return cls(found[0]) if found else None

    def _capture(self, module: nn.Module, inputs: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            self._batch_mean = inputs[0].detach().float().mean(dim=0)

    def update(self, lr: float) -> None:
        """e <- mu(lr) e + mean of the last training batch's features (over all ranks)."""
        if self._batch_mean is None:
            raise RuntimeError("FeatureAverageUpdater.update: no training forward of the causal classifier since "
                               "the last update")
        batch_mean, self._batch_mean = self._batch_mean, None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_mean)
            batch_mean /= dist.get_world_size()
        average = self.classifier.feature_average
        with torch.no_grad():
            average.mul_(moving_average_momentum(lr)).add_(batch_mean.to(average.dtype))

    def remove(self) -> None:
        self._handle.remove()


class CausalTDE(Method):
    """``model.classifier=causal``: the causal normalised head, its feature moving average updated
    after every training step at that step's lr, TDE logits whenever the model is in eval mode."""
    name = "causal"
    summary = "de-confound training with TDE inference (Tang et al. 2020)"
    classifiers = ("causal",)
    config_keys = {"model": {
        "causal_heads": (2, int, schema.positive, "causal: K heads the feature is split into (survey 2)"),
        "causal_tau": (16.0, (int, float), schema.positive, "causal: logit scale tau (survey 16)"),
        "causal_gamma": (0.03125, (int, float), schema.non_negative, "causal: w / (||w|| + gamma) (survey 1/32)"),
        "causal_alpha": (3.0, (int, float), schema.non_negative,
                         "causal: TDE strength at test time (survey 3); 0 = plain normalised logits"),
    }}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["classifier"] == "causal"

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.feature_average: Optional[FeatureAverageUpdater] = None

    def build_head(self, model: nn.Module, num_classes: int) -> None:
        use_causal_classifier(model, num_classes, self.cfg["model"])

    def start(self, model: nn.Module, head_name: str, run) -> None:
        self.feature_average = FeatureAverageUpdater.for_model(model)

    def after_step(self, lr: float) -> None:
        if self.feature_average is not None:
            self.feature_average.update(lr)
