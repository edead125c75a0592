"""Plain-PyTorch multi-expert losses, SADE's ``DiverseExpertLoss`` and ``RIDELoss``, with exactly the
interface of the fused ``ltfast.nn`` classes another branch adds (issue 14, part 2).

PENDING: the lead replaces this module by the fused ``ltfast.nn.DiverseExpertLoss`` /
``ltfast.nn.RIDELoss`` at merge. The trainer imports both from one place only
(``ltfast.train.trainer.build_loss``: ``from ltfast._experts_pending import ...``), so the swap is
that one import line; then this file and its parity test go.

Contract shared with the fused classes: ``forward(expert_logits [N, E, C], target [N])`` returns the
scalar loss; the class attribute ``takes_expert_logits = True`` tells the trainer to pass the
per-expert logits instead of their mean; ``set_epoch(epoch)`` is 0-based, as ``ltfast.nn.LDAMLoss``.

Math (seed-methods.md §6, the survey's Ensemble-codebase ``model/loss.py``):

- SADE: ``CE(z1) + CE(z2 + log pi) + CE(z3 + log pi - tau log pi~)``, three experts; ``pi`` the
  training prior (``log(pi + 1e-9)`` as upstream), ``pi~`` the "inverse prior": the prior's values
  re-assigned by reversed frequency rank (the most frequent class gets the smallest prior value),
  not ``1 / pi``. Ties are ranked by class index (a stable sort; upstream's ``torch.sort`` is not
  stable, so upstream's order among equal counts is unspecified).
- RIDE, per expert k: LDAM cross-entropy on that expert's logits (``s * m_y`` subtracted from the
  target logit, ``m_c = max_margin (n_min / n_c)^(1/4)``; the model already outputs ``s cos``),
  class-balanced DRW weights (``beta``) from ``drw_epoch`` on, plus the diversity term
  ``diversity_factor * mean(T)^2 * KL(p_mean || p_k)`` (batchmean) with ``p_k = softmax(z_k / T)``
  and ``p_mean = softmax(mean_k z_k / T)`` (no gradient). ``T = base_temperature`` before DRW and
  ``base_temperature * T_c`` after, ``T_c = (C pi_c r + 1 - r) / max(.)`` with ``r =
  reweight_factor``. Upstream switches both at ``epoch > reweight_epoch`` with 1-based epochs,
  i.e. ``drw_epoch = reweight_epoch`` here (0-based, ``epoch >= drw_epoch``). With
  ``diversity_factor == 0`` upstream puts the mean logits (not the expert's) into the LDAM term;
  kept. ``drw_epoch=None`` never re-weights (upstream's ``reweight=False``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import priors


def _check_inputs(expert_logits: Tensor, target: Tensor, num_classes: int, name: str,
                  num_experts: Optional[int] = None) -> None:
    if expert_logits.dim() != 3:
        raise ValueError(f"{name}: expert_logits must be [N, E, C] (per-expert logits), got shape "
                         f"{tuple(expert_logits.shape)}")
    if expert_logits.shape[2] != num_classes:
        raise ValueError(f"{name}: expert_logits has {expert_logits.shape[2]} classes, class_counts {num_classes}")
    if num_experts is not None and expert_logits.shape[1] != num_experts:
        raise ValueError(f"{name}: needs exactly {num_experts} experts (long-tailed, uniform, inverse), got "
                         f"expert_logits with E = {expert_logits.shape[1]}")
    if target.shape != (expert_logits.shape[0],):
        raise ValueError(f"{name}: target must be [N] = [{expert_logits.shape[0]}], got {tuple(target.shape)}")


def inverse_prior(prior: Tensor) -> Tensor:
    """The prior's values in reversed rank order: the class with the k-th largest prior gets the
    k-th smallest value (SADE's ``inverse_prior``)."""
    values, order = torch.sort(prior, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(prior.numel(), device=prior.device)
    return values[prior.numel() - 1 - rank]


class DiverseExpertLoss(nn.Module):
    """SADE's loss: expert 1 plain CE, expert 2 Balanced Softmax, expert 3 inverse-prior softmax."""

    takes_expert_logits = True

    def __init__(self, class_counts, tau: float = 2.0) -> None:
        super().__init__()
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau == tau:
            raise ValueError(f"tau: must be a number, got {tau!r}")
        self.tau = float(tau)
        prior = priors.class_prior(class_counts, dtype=torch.float64)
        self.num_classes = prior.numel()
        self.register_buffer("log_prior", torch.log(prior + 1e-9).float())
        self.register_buffer("log_inverse_prior", torch.log(inverse_prior(prior) + 1e-9).float())

    def extra_repr(self) -> str:
        return f"tau={self.tau}, classes={self.num_classes}"

    def forward(self, expert_logits: Tensor, target: Tensor) -> Tensor:
        _check_inputs(expert_logits, target, self.num_classes, "DiverseExpertLoss", num_experts=3)
        z = expert_logits.float()
        log_prior = self.log_prior.to(z.device)
        loss = F.cross_entropy(z[:, 0], target)
        loss = loss + F.cross_entropy(z[:, 1] + log_prior, target)
        inverse = log_prior - self.tau * self.log_inverse_prior.to(z.device)
        return loss + F.cross_entropy(z[:, 2] + inverse, target)


class RIDELoss(nn.Module):
    """RIDE's per-expert LDAM-DRW cross-entropy plus the distribution-aware diversity term."""

    takes_expert_logits = True

    def __init__(self, class_counts, max_margin: float = 0.5, s: float = 30.0, drw_epoch: Optional[int] = None,
                 beta: float = 0.9999, base_temperature: float = 1.0, diversity_factor: float = -0.2,
                 reweight_factor: float = 0.02) -> None:
        super().__init__()
        if not s > 0:
            raise ValueError(f"s: must be > 0, got {s!r}")
        if not base_temperature > 0:
            raise ValueError(f"base_temperature: must be > 0, got {base_temperature!r}")
        if drw_epoch is not None and (not isinstance(drw_epoch, int) or drw_epoch < 0):
            raise ValueError(f"drw_epoch: must be None or an int >= 0, got {drw_epoch!r}")
        self.max_margin, self.s, self.drw_epoch, self.beta = float(max_margin), float(s), drw_epoch, float(beta)
        self.base_temperature, self.diversity_factor = float(base_temperature), float(diversity_factor)
        self.reweight_factor = float(reweight_factor)
        self.epoch = 0
        counts = priors.as_counts(class_counts)
        self.num_classes = counts.numel()
        self.register_buffer("target_margin", (self.s * priors.ldam_margins(counts, max_margin, torch.float64)).float())
        self.register_buffer("drw_weight", priors.effective_number_weights(counts, beta, torch.float64).float())
        temperature = self.num_classes * (counts / counts.sum()) * self.reweight_factor + 1 - self.reweight_factor
        if not bool((temperature > 0).all()):
            raise ValueError(f"reweight_factor: {reweight_factor} makes a diversity temperature <= 0 "
                             f"(C * pi_c * r + 1 - r must be > 0 for every class)")
        self.register_buffer("temperature_weight", (temperature / temperature.max()).float())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def reweighting(self) -> bool:
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def get_extra_state(self):
        return {"epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        self.epoch = int(state["epoch"])

    def extra_repr(self) -> str:
        return (f"s={self.s}, max_margin={self.max_margin}, drw_epoch={self.drw_epoch}, beta={self.beta}, "
                f"base_temperature={self.base_temperature}, diversity_factor={self.diversity_factor}, "
                f"reweight_factor={self.reweight_factor}")

    def forward(self, expert_logits: Tensor, target: Tensor) -> Tensor:
        _check_inputs(expert_logits, target, self.num_classes, "RIDELoss")
        z = expert_logits.float()
        mean_logits = z.mean(dim=1)
        if self.reweighting:
            weight = self.drw_weight.to(z.device)
            temperature = self.base_temperature * self.temperature_weight.to(z.device)
            temperature_mean = float(temperature.mean())
        else:
            weight, temperature, temperature_mean = None, self.base_temperature, self.base_temperature
        with torch.no_grad():
            mean_distribution = F.softmax(mean_logits / temperature, dim=1)
        margin = torch.zeros_like(mean_logits).scatter_(1, target.view(-1, 1),
                                                         self.target_margin.to(z.device)[target].view(-1, 1))
        loss = z.new_zeros(())
        for k in range(z.shape[1]):
            expert = z[:, k]
            ldam_input = mean_logits if self.diversity_factor == 0 else expert
            loss = loss + F.cross_entropy(ldam_input - margin, target, weight=weight)
            log_distribution = F.log_softmax(expert / temperature, dim=1)
            loss = loss + self.diversity_factor * temperature_mean ** 2 * F.kl_div(
                log_distribution, mean_distribution, reduction="batchmean")
        return loss
