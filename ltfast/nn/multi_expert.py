"""nn.Module losses of the multi-expert methods (seed-methods.md §6): SADE's
:class:`DiverseExpertLoss` and RIDE's :class:`RIDELoss`, and ResLT's three-branch
:class:`ResLTLoss` (§2.4), exported from :mod:`ltfast.nn`.

All three take the experts' (ResLT: the branches') logits ``[N, E, C]`` (``forward(expert_logits,
target)``) and have the class attribute ``takes_expert_logits = True``, which tells the trainer to pass
them instead of the aggregated ``[N, C]`` output. Per-class vectors are float64 buffers (saved in the
state_dict and moved by ``.to()``), handed to the fused ops in the logits' accumulation dtype
(``_ClassVectors``); ResLT's branch class mask is a bool buffer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import priors
from ..ops import adjusted_cross_entropy, diverse_expert_loss, ride_loss
from ._base import _check_reduction, _ClassVectors


def _check_expert_logits(expert_logits: Tensor, owner: str, num_classes: int,
                         num_experts: Optional[int] = None) -> None:
    if not isinstance(expert_logits, Tensor) or expert_logits.dim() != 3:
        shape = tuple(expert_logits.shape) if isinstance(expert_logits, Tensor) else type(expert_logits).__name__
        raise ValueError(f"{owner}: expert_logits must be a 3-D tensor [N, E, C] (one row of logits per expert), "
                         f"got {shape}")
    if expert_logits.shape[2] != num_classes:
        raise ValueError(f"{owner}: expert_logits must have C = {num_classes} classes (from class_counts), got "
                         f"shape {tuple(expert_logits.shape)}")
    if num_experts is not None and expert_logits.shape[1] != num_experts:
        raise ValueError(f"{owner}: expert_logits must hold E = {num_experts} experts, got shape "
                         f"{tuple(expert_logits.shape)}")


class DiverseExpertLoss(_ClassVectors, nn.Module):
    """SADE's loss (Zhang et al. 2022, "TADE" in the survey; seed-methods.md §6) for three experts:
    ``CE(z1) + CE(z2 + log(pi + 1e-9)) + CE(z3 + log(pi + 1e-9) - tau * log(pi_inv + 1e-9))``,
    with ``pi`` the training prior and ``pi_inv`` the survey's inverse prior (prior values by reversed
    frequency rank, :func:`ltfast.priors.inverse_prior`), fused into one op
    (:func:`ltfast.diverse_expert_loss`). The adjustments are float64 here; the survey computes them
    in float32 (``ltfast.compat.ensemble.DiverseExpertLoss`` keeps that).

    ``forward(expert_logits [N, 3, C], target [N])``. Predict with the mean of the experts' raw logits.
    """

    takes_expert_logits = True
    num_experts = 3

    def __init__(self, class_counts, tau: float = 2.0, reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__()
        tau = float(tau)
        if not torch.isfinite(torch.tensor(tau)):
            raise ValueError(f"DiverseExpertLoss: tau must be finite, got {tau}")
        self.tau = tau
        self.reduction = _check_reduction(reduction)
        self.ignore_index = int(ignore_index)
        self.register_buffer("adjustments", priors.sade_adjustments(class_counts, tau, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return self.adjustments.shape[1]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, tau={self.tau}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}")

    def forward(self, expert_logits: Tensor, target: Tensor) -> Tensor:
        _check_expert_logits(expert_logits, "DiverseExpertLoss", self.num_classes, self.num_experts)
        return diverse_expert_loss(expert_logits, target, self._class_vector("adjustments", expert_logits),
                                   self.reduction, self.ignore_index)


class RIDELoss(_ClassVectors, nn.Module):
    """RIDE's loss (Wang et al. 2021) as the survey's Ensemble-codebase trains it (seed-methods.md §6,
    §1.9), for any number of experts, fused into one op (:func:`ltfast.ride_loss`): per expert k,

    - LDAM CE on ``z_k``: ``s * m_y`` subtracted from the target logit, ``m_c = max_margin *
      (n_min / n_c)^(1/4)``; with DRW, class-balanced weights (``beta``) and the weighted mean;
    - plus ``diversity_factor * Tbar^2 * KL(pbar || softmax(z_k / T))`` (batchmean), ``pbar`` the
      softmax of the experts' mean logits over T, without gradient. Before DRW ``T = base_temperature``;
      with DRW ``T_c = base_temperature * t_c``, ``t_c = (C pi_c f + 1 - f) / max(.)``,
      f = ``reweight_factor`` (the survey's config: 0.02; the original class's default is 0.05).

    With ``diversity_factor == 0`` every expert's CE is taken on the experts' *mean* logits (the
    KL term vanishes): ``E * LDAM-DRW CE(mean_k z_k)``, as the original ``RIDELoss`` (and
    :class:`ltfast.compat.ensemble.RIDELoss`) does with ``additional_diversity_factor == 0``, where
    it uses ``output_logits`` instead of each ``logits_item``. This is not the same as
    ``sum_k CE(z_k)``: the experts are then trained as one averaged classifier.

    DRW: call :meth:`set_epoch` at the start of every epoch (0-based), as for
    :class:`ltfast.nn.LDAMLoss`: from epoch ``drw_epoch`` on (the survey: ``reweight_epoch=160`` with
    1-based epochs and ``epoch > 160``, i.e. ``drw_epoch=160``); ``None`` never re-weights. The epoch is
    saved in the state_dict. Reduction is the mean only (the KL term is a batch mean), as
    :func:`ltfast.lade_loss`.

    ``forward(expert_logits [N, E, C], target [N])``.
    """

    takes_expert_logits = True

    def __init__(self, class_counts, max_margin: float = 0.5, s: float = 30.0, drw_epoch: Optional[int] = None,
                 beta: float = 0.9999, base_temperature: float = 1.0, diversity_factor: float = -0.2,
                 reweight_factor: float = 0.02, ignore_index: int = -100) -> None:
        super().__init__()
        self.max_margin = float(max_margin)
        self.s = float(s)
        if not self.s > 0.0:
            raise ValueError(f"RIDELoss: s must be > 0, got {s}")
        self.drw_epoch = None if drw_epoch is None else int(drw_epoch)
        self.beta = float(beta)
        self.base_temperature = float(base_temperature)
        if not (self.base_temperature > 0.0 and self.base_temperature < float("inf")):
            raise ValueError(f"RIDELoss: base_temperature must be a finite number > 0, got {base_temperature}")
        self.diversity_factor = float(diversity_factor)
        if self.diversity_factor != self.diversity_factor or abs(self.diversity_factor) == float("inf"):
            raise ValueError(f"RIDELoss: diversity_factor must be finite, got {diversity_factor}")
        self.reweight_factor = float(reweight_factor)
        self.ignore_index = int(ignore_index)
        self.epoch = 0
        self.register_buffer("target_margin",
                             self.s * priors.ldam_margins(class_counts, self.max_margin, dtype=torch.float64))
        self.register_buffer("drw_weight", priors.effective_number_weights(class_counts, self.beta,
                                                                            dtype=torch.float64))
        self.register_buffer("diversity_temperature",
                             priors.ride_diversity_temperature(class_counts, self.reweight_factor, dtype=torch.float64))
        if not bool((self.diversity_temperature > 0).all()):  # checked here: the op cannot on CUDA (a sync)
            raise ValueError(f"RIDELoss: reweight_factor={reweight_factor} gives diversity temperatures <= 0")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def reweighting(self) -> bool:
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    @property
    def num_classes(self) -> int:
        return self.target_margin.numel()

    def get_extra_state(self):
        return {"epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        self.epoch = int(state["epoch"])

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, s={self.s}, max_margin={self.max_margin}, "
                f"drw_epoch={self.drw_epoch}, base_temperature={self.base_temperature}, "
                f"diversity_factor={self.diversity_factor}, reweight_factor={self.reweight_factor}, "
                f"ignore_index={self.ignore_index}")

    def forward(self, expert_logits: Tensor, target: Tensor) -> Tensor:
        _check_expert_logits(expert_logits, "RIDELoss", self.num_classes)
        reweighting = self.reweighting
        vector = self._class_vector
        if self.diversity_factor == 0.0:
            # The original's additional_diversity_factor == 0 branch: the CE of every expert on
            # output_logits, the experts' mean (tests/_survey_originals.py OriginalRIDELoss).
            ce = adjusted_cross_entropy(expert_logits.mean(1), target, target_margin=vector("target_margin",
                                                                                           expert_logits),
                                        weight=vector("drw_weight", expert_logits) if reweighting else None,
                                        reduction="mean", ignore_index=self.ignore_index)
            return expert_logits.shape[1] * ce
        return ride_loss(expert_logits, target, vector("target_margin", expert_logits),
                         vector("drw_weight", expert_logits) if reweighting else None,
                         vector("diversity_temperature", expert_logits) if reweighting else None,
                         self.base_temperature, self.diversity_factor, self.ignore_index)


class ResLTLoss(nn.Module):
    """ResLT's loss (Cui et al., "ResLT: Residual Learning for Long-tailed Recognition", TPAMI 2022) as
    the seed's ``ImageNetTrain_reslt.py`` computes it, on the three branches' logits ``[N, 3, C]``
    (head, medium, tail; predict with their sum)::

        l_e(z)  = -log(softmax(z)_y + e)
        I       = sum_k sum_n m[k, y_n] l_1e-7(z_k) / sum_k sum_n m[k, y_n]
        F       = mean_n l_fusion_epsilon(z_0 + z_1 + z_2)
        loss    = (1 - beta) F + beta I

    ``m = priors.reslt_branch_classes(class_counts, medium_classes, tail_classes)``: branch 0 trains on
    every class, branch 1 on the ``medium_classes`` rarest, branch 2 on the ``tail_classes`` rarest (the
    seed: 825 and 220 of ImageNet-LT's 1000; 65 / 30 of CIFAR-100, 8 / 6 of CIFAR-10). ``I`` is
    normalised by the number of (sample, branch) pairs that train, over the whole batch, as the seed's
    ``(labelH.sum() + labelM.sum() + labelT.sum())``; ``F`` by N (its ``labelH`` is 1 for every sample).
    ``fusion_epsilon``: 1e-7 in the ImageNet-LT script; 0 = the CIFAR scripts' ``nn.CrossEntropyLoss``.

    The branches share one classifier and are summed with weight 1 (``methods/reslt.py`` builds that
    head). ``beta`` is the seed's ``--beta`` (X50.sh 0.99; the upstream CIFAR scripts: CIFAR-100-LT IF 100
    0.995, CIFAR-10-LT IF 100 0.998), the alpha of the upstream README. The seed's label smoothing
    (``--lsm``, 0 in every script) is left out.

    Computation: the four cross-entropies (three branches and their sum) are one call of the fused
    cross-entropy op on ``[4N, C]`` rows (``reduction='none'``); ``-log(p + e)`` is then
    ``-logaddexp(-ce, log e)``, the same value computed without forming ``p`` (stable when p underflows).
    The seed ran DataParallel: one global batch. Under DDP each rank normalises by its own batch's counts
    unless ``global_batch``: the counts are then all-reduced over ``process_group`` (two numbers per
    step) and the rank's loss is ``world`` times its share of the global loss, so that DDP's gradient mean
    is the global batch's gradient and the mean of the ranks' losses is the global loss.
    Rows whose target is ``ignore_index`` count in neither term (a batch of only those gives NaN, as
    ``nn.CrossEntropyLoss``'s mean).
    """

    takes_expert_logits = True
    num_experts = 3
    epsilon = 1e-7  # both seed codebases: torch.log(softmax(logit) + 1e-7) in the branch terms

    def __init__(self, class_counts, medium_classes: int, tail_classes: int, beta: float = 0.99,
                 fusion_epsilon: float = 1e-7, ignore_index: int = -100, global_batch: bool = False,
                 process_group=None) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.global_batch, self.process_group = bool(global_batch), process_group
        beta, fusion_epsilon = float(beta), float(fusion_epsilon)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"ResLTLoss: beta must be in [0, 1] (the weight of the per-branch term), got {beta}")
        if not 0.0 <= fusion_epsilon < 1.0:
            raise ValueError(f"ResLTLoss: fusion_epsilon must be in [0, 1), got {fusion_epsilon}")
        self.beta, self.fusion_epsilon = beta, fusion_epsilon
        self.medium_classes, self.tail_classes = medium_classes, tail_classes
        self.register_buffer("branch_classes", priors.reslt_branch_classes(class_counts, medium_classes,
                                                                           tail_classes))

    @property
    def num_classes(self) -> int:
        return self.branch_classes.shape[1]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, medium_classes={self.medium_classes}, "
                f"tail_classes={self.tail_classes}, beta={self.beta}, fusion_epsilon={self.fusion_epsilon}, "
                f"ignore_index={self.ignore_index}, global_batch={self.global_batch}")

    def forward(self, expert_logits: Tensor, target: Tensor) -> Tensor:
        _check_expert_logits(expert_logits, "ResLTLoss", self.num_classes, self.num_experts)
        n, _, c = expert_logits.shape
        rows = torch.cat([expert_logits.transpose(0, 1).reshape(3 * n, c), expert_logits.sum(dim=1)])
        ce = adjusted_cross_entropy(rows, target.repeat(4), reduction="none", ignore_index=self.ignore_index)
        ce = ce.to(torch.promote_types(ce.dtype, torch.float32)).view(4, n)  # bf16 / fp16 -> float32
        branch = -torch.logaddexp(-ce[:3], ce.new_tensor(math.log(self.epsilon)))
        fused = ce[3] if self.fusion_epsilon == 0.0 else \
            -torch.logaddexp(-ce[3], ce.new_tensor(math.log(self.fusion_epsilon)))
        kept = target != self.ignore_index  # ignored rows count in neither term (the seed has none)
        classes = self.branch_classes[:, torch.where(kept, target, 0)] & kept  # [3, N]: branches that train on y_n
        weights = classes.to(branch.dtype)
        pairs, kept_rows = weights.sum(), kept.sum().to(branch.dtype)
        scale = 1.0
        if self.global_batch:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
                # the seed's normalisation over the global batch (DataParallel): divide by the global counts
                # and multiply by the world size, so that DDP's gradient mean is the global batch's gradient
                counts = torch.stack([pairs, kept_rows]).detach()
                dist.all_reduce(counts, group=self.process_group)
                pairs, kept_rows = counts[0], counts[1]
                scale = float(dist.get_world_size(self.process_group))
        individual = (weights * branch).sum() / pairs
        fused_mean = (fused * kept).sum() / kept_rows
        return scale * ((1.0 - self.beta) * fused_mean + self.beta * individual)


__all__ = ["DiverseExpertLoss", "RIDELoss", "ResLTLoss"]
