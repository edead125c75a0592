"""Drop-in for the loss classes of the survey's ``Ensemble-codebase/model/loss.py`` (the RIDE/SADE
pytorch-template; seed-methods.md §1.9 and §6), backed by ltfast's fused cross-entropy kernels.

In ``train.py`` replace ``import model.loss as module_loss`` by
``import ltfast.compat.ensemble as module_loss``: the config's ``"loss": {"type": ..., "args": ...}``
then builds these classes with the same arguments (``cls_num_list`` from the data loader).

Same class names, constructor signatures, ``forward`` signatures (``output_logits``, ``target`` and,
where the original has it, ``extra_info``) and ``_hook_before_epoch`` as the originals. Per-class
tensors are non-persistent buffers: they follow ``.to(device)`` (the originals override ``to``
for that) and the state_dict stays empty, as the originals'. Rows whose target is -100 are ignored,
as ``F.cross_entropy`` ignores them (the originals' margin/one-hot code would fail on them).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import ltfast
from ltfast.compat._common import (IGNORE_INDEX, check_logits, check_number, check_target, class_count_list,
                                   effective_number_weights)

CB_BETA = 0.9999  # the originals' `betas = [0, 0.9999]; idx = 1`


def _checked(output_logits, target, owner: str, num_classes: Optional[int], name: str = "output_logits"):
    check_logits(output_logits, name, owner, num_classes)
    check_target(target, output_logits, "target", owner)


class CrossEntropyLoss(nn.Module):
    """``F.cross_entropy(output_logits, target, weight=per_cls_weights)``. With ``reweight_CE=True``
    the weights are the class-balanced ``(1 - 0.9999) / (1 - 0.9999^n_c)`` normalised to sum to C
    (float64 like the original's numpy, then float32), and the mean divides by ``sum_i w_{y_i}``, as
    PyTorch's weighted mean does. ``reweight_CE=True`` needs ``cls_num_list`` with every count >= 1
    (ValueError otherwise; the original fails or gives infinite weights). Float64 logits work with
    the weights too (the original's float32 weight makes ``F.cross_entropy`` reject them)."""

    def __init__(self, cls_num_list=None, reweight_CE=False):
        super().__init__()
        if reweight_CE:
            if cls_num_list is None:
                raise ValueError("CrossEntropyLoss: reweight_CE=True needs cls_num_list (per-class training counts)")
            counts = class_count_list(cls_num_list, "CrossEntropyLoss", allow_zero=False)
            weights = effective_number_weights(counts, CB_BETA)
        else:
            weights = None
        self.register_buffer("per_cls_weights", weights, persistent=False)

    def forward(self, output_logits, target):
        _checked(output_logits, target, "CrossEntropyLoss",
                 None if self.per_cls_weights is None else self.per_cls_weights.numel())
        return ltfast.adjusted_cross_entropy(output_logits, target, weight=self.per_cls_weights, reduction="mean",
                                             ignore_index=IGNORE_INDEX)


class FocalLoss(nn.Module):
    """The Ensemble-codebase's (LDAM-DRW style) focal loss: ``l_i = F.cross_entropy(z, y, weight,
    reduction='none')`` (that is ``w_{y_i} * CE_i``), ``p_i = exp(-l_i)`` **not detached**, and
    ``mean_i (1 - p_i)^gamma * l_i`` over all N rows (a plain mean, not the weighted mean).

    Quirk matched: with a ``weight``, ``p_i = exp(-w_{y_i} CE_i)`` is not the class probability. The
    per-row cross-entropy runs in the fused kernel; the focal factor and its gradient are computed on
    the ``[N]`` vector with the original's expression. ``cls_num_list`` is unused, as in the original;
    ``gamma`` must be >= 0; ``weight`` becomes a non-persistent buffer (it follows ``.to()``)."""

    def __init__(self, cls_num_list=None, weight=None, gamma=0.):
        super().__init__()
        self.gamma = check_number(gamma, "gamma", "FocalLoss", low=0.0)
        if weight is not None:
            weight = torch.as_tensor(weight).detach()
            if not weight.is_floating_point() or weight.dim() != 1:
                raise ValueError(f"FocalLoss: weight must be a 1-D floating-point tensor with one weight per class, "
                                 f"got dtype {weight.dtype} and shape {tuple(weight.shape)}")
        self.register_buffer("weight", weight, persistent=False)

    def _hook_before_epoch(self, epoch):
        pass

    def forward(self, output_logits, target):
        _checked(output_logits, target, "FocalLoss", None if self.weight is None else self.weight.numel())
        per_row = ltfast.adjusted_cross_entropy(output_logits, target, weight=self.weight, reduction="none",
                                                ignore_index=IGNORE_INDEX)
        p = torch.exp(-per_row)
        return ((1 - p) ** self.gamma * per_row).mean()


class LDAMLoss(nn.Module):
    """LDAM with deferred re-weighting, as the Ensemble-codebase computes it (seed-methods.md §1.9):
    ``s * m_y`` is subtracted from the target logit (the logits as the model gives them), with
    ``m_c = max_m * n_c^(-1/4) / max_k n_k^(-1/4)`` (float64, then float32, as the original's numpy),
    and ``F.cross_entropy(..., weight=per_cls_weights)``.

    DRW: ``_hook_before_epoch(epoch)`` switches the class-balanced weights (beta = 0.9999, normalised to
    sum to C) on when ``epoch > reweight_epoch`` (the trainer's epochs start at 1; the survey's config
    uses 160), and off otherwise; ``reweight_epoch=-1`` never re-weights. The weighted mean divides by
    ``sum_i w_{y_i}``.

    Differences, all where the original errs: ``cls_num_list=None`` gives plain cross-entropy as in the
    original, and ``_hook_before_epoch`` is then a no-op (the original raises AttributeError); before
    the first ``_hook_before_epoch`` call the loss is unweighted (the original raises AttributeError);
    classes with 0 training samples raise ValueError (infinite margins in the original); the original's
    ``torch.where`` on a uint8 mask fails on PyTorch >= 2 ("where expected condition to be a boolean
    tensor"), this runs there.
    """

    def __init__(self, cls_num_list=None, max_m=0.5, s=30, reweight_epoch=-1):
        super().__init__()
        self.reweight_epoch = reweight_epoch
        self._reweighting = False
        if cls_num_list is None:
            self.register_buffer("m_list", None, persistent=False)
            self.register_buffer("target_margin", None, persistent=False)
            self.register_buffer("per_cls_weights_enabled", None, persistent=False)
            return
        counts = class_count_list(cls_num_list, "LDAMLoss", allow_zero=False)
        self.max_m = check_number(max_m, "max_m", "LDAMLoss", low=0.0, low_open=True)
        check_number(s, "s", "LDAMLoss", low=0.0, low_open=True)
        self.s = s
        m_list = 1.0 / torch.sqrt(torch.sqrt(counts))
        m_list = (m_list * (max_m / m_list.max())).to(torch.float32)
        self.register_buffer("m_list", m_list, persistent=False)
        # The original subtracts `batch_m * self.s` with batch_m float32: the same float32 product.
        self.register_buffer("target_margin", m_list * self.s, persistent=False)
        self.register_buffer("per_cls_weights_enabled",
                             effective_number_weights(counts, CB_BETA) if reweight_epoch != -1 else None,
                             persistent=False)

    @property
    def per_cls_weights(self) -> Optional[Tensor]:
        """The class weights in use: ``per_cls_weights_enabled`` after the DRW switch, else None."""
        return self.per_cls_weights_enabled if self._reweighting else None

    def _hook_before_epoch(self, epoch):
        if self.reweight_epoch != -1 and self.m_list is not None:
            self.epoch = epoch
            self._reweighting = epoch > self.reweight_epoch

    def forward(self, output_logits, target):
        if self.m_list is None:
            _checked(output_logits, target, "LDAMLoss", None)
            return ltfast.adjusted_cross_entropy(output_logits, target, reduction="mean", ignore_index=IGNORE_INDEX)
        _checked(output_logits, target, "LDAMLoss", self.m_list.numel())
        return ltfast.adjusted_cross_entropy(output_logits, target, target_margin=self.target_margin,
                                             weight=self.per_cls_weights, reduction="mean", ignore_index=IGNORE_INDEX)


class DiverseExpertLoss(nn.Module):
    """SADE's loss (seed-methods.md §6): with ``extra_info['logits']`` holding the experts' logits
    (``[E >= 3, N, C]``, the trainer passes ``logits.transpose(0, 1)``),

    ``CE(z1) + CE(z2 + log(pi + 1e-9)) + CE(z3 + log(pi + 1e-9) - tau * log(inv_pi + 1e-9))``

    each a mean cross-entropy, where ``pi`` is the float32 training prior and ``inv_pi`` the survey's
    "inverse prior": the prior values reassigned by reversed frequency rank (the most frequent class
    gets the smallest value; ties keep ``torch.sort``'s order on the CPU, where the buffer is built).
    Without ``extra_info``, ``CE(output_logits)``, as the original. ``max_m`` and ``s`` are unused, as in
    the original. The logs are computed in float32 like the original; expert 3's two per-class terms
    are combined once, in float64, and added to the logits in one step, so float32 results can differ
    from the original's two float32 additions in the last bit.
    """

    def __init__(self, cls_num_list=None, max_m=0.5, s=30, tau=2):
        super().__init__()
        if cls_num_list is None:
            raise ValueError("DiverseExpertLoss: cls_num_list (per-class training counts) is required")
        counts = class_count_list(cls_num_list, "DiverseExpertLoss", allow_zero=True)
        check_number(tau, "tau", "DiverseExpertLoss")
        self.tau = tau
        self.C_number = counts.numel()
        self.s = s
        prior = (counts / counts.sum()).to(torch.float32)
        log_prior = torch.log(prior + 1e-9)
        inverse = self.inverse_prior(prior)
        tau_log_inverse = self.tau * torch.log(inverse + 1e-9)  # float32, as the original
        self.register_buffer("prior", prior, persistent=False)
        self.register_buffer("inverse_prior_values", inverse, persistent=False)
        self.register_buffer("log_prior", log_prior, persistent=False)
        self.register_buffer("expert3_adjustment", log_prior.double() - tau_log_inverse.double(), persistent=False)
        # [3, C] for the fused op: expert 1 none, expert 2 log(pi + 1e-9), expert 3 the combined term.
        self.register_buffer("adjustments", torch.stack([torch.zeros_like(log_prior.double()), log_prior.double(),
                                                          self.expert3_adjustment]), persistent=False)

    @staticmethod
    def inverse_prior(prior: Tensor) -> Tensor:
        """The prior value of reversed rank: sort ascending, then give the class of rank r the value
        of rank C - 1 - r."""
        values, order = torch.sort(prior)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(prior.shape[0], device=prior.device)
        return values[prior.shape[0] - 1 - rank]

    def forward(self, output_logits, target, extra_info=None):
        if extra_info is None:
            _checked(output_logits, target, "DiverseExpertLoss", self.C_number)
            return ltfast.adjusted_cross_entropy(output_logits, target, reduction="mean", ignore_index=IGNORE_INDEX)
        experts = _expert_logits(extra_info, target, "DiverseExpertLoss", self.C_number, min_experts=3)
        return ltfast.diverse_expert_loss(experts[:, :3], target, self.adjustments, "mean", IGNORE_INDEX)


def _expert_logits(extra_info, target, owner: str, num_classes: Optional[int], min_experts: int = 1) -> Tensor:
    """``extra_info['logits']`` (the trainer's ``logits.transpose(0, 1)``, [E, N, C], or a sequence of
    E [N, C] tensors) as the fused ops' [N, E, C]: for the trainer's tensor a view of the model's
    contiguous [N, E, C] logits, so no copy."""
    try:
        experts = extra_info["logits"]
    except (TypeError, KeyError):
        raise ValueError(f"{owner}: extra_info must be a dict with the experts' logits under 'logits'") from None
    if len(experts) < min_experts:
        raise ValueError(f"{owner}: extra_info['logits'] must hold at least {min_experts} experts' logits, got "
                         f"{len(experts)}")
    if isinstance(experts, Tensor):
        if experts.dim() != 3:
            raise ValueError(f"{owner}: extra_info['logits'] must be a 3-D tensor [E, N, C], got shape "
                             f"{tuple(experts.shape)}")
        _checked(experts[0], target, owner, num_classes, name="extra_info['logits'][0]")  # all share its shape
        return experts.transpose(0, 1)
    for k, z in enumerate(experts):
        _checked(z, target, owner, num_classes, name=f"extra_info['logits'][{k}]")
    return torch.stack(list(experts), dim=1)


class RIDELoss(nn.Module):
    """RIDE's loss as the Ensemble-codebase computes it (seed-methods.md §6), on the fused
    :func:`ltfast.ride_loss`: with ``extra_info['logits']`` holding the experts' logits, per expert k
    ``base_loss_factor * LDAM-DRW CE(z_k) + additional_diversity_factor * Tbar^2 * KL(pbar || p_k)``
    (batchmean), ``p_k = softmax(z_k / T)``, ``pbar = softmax(output_logits / T)`` without gradient,
    ``T = base_diversity_temperature`` before DRW and ``base_diversity_temperature * t_c`` after it,
    ``t_c = (C pi_c f + 1 - f) / max(.)`` with f = ``reweight_factor``. Without ``extra_info``,
    ``F.cross_entropy(output_logits, target)``, as the original. With
    ``additional_diversity_factor == 0`` every expert's CE is taken on ``output_logits``, as the
    original does.

    DRW (``_hook_before_epoch(epoch)``, 1-based epochs): class-balanced CE weights and the per-class
    temperature when ``epoch > reweight_epoch``; ``reweight=False`` or ``reweight_epoch=-1`` never
    re-weights. Margins, weights and temperature factors are float32 like the original's.

    Differences:

    - the fused op takes ``pbar`` from the mean of ``extra_info['logits']``; the original takes it from
      ``output_logits``, which the Ensemble-codebase's expert models compute as exactly that mean
      (``Expert_ResNeXt``: ``output = mean of the expert logits``). A model whose ``output_logits`` is
      something else gets a different diversity term here;
    - ``Tbar`` is the float64 mean of the float32 temperatures (the original: a float32 mean);
    - where the original raises AttributeError (``reweight_epoch=-1``, or no ``_hook_before_epoch``
      call before the first forward), this computes the loss without DRW; ``cls_num_list`` with zero
      counts raises ValueError (infinite margins in the original); rows with target -100 are ignored;
    - ``base_loss_factor == 0`` raises ValueError (the fused op scales the KL term by
      ``additional_diversity_factor / base_loss_factor``).
    """

    def __init__(self, cls_num_list=None, base_diversity_temperature=1.0, max_m=0.5, s=30, reweight=True,
                 reweight_epoch=-1, base_loss_factor=1.0, additional_diversity_factor=-0.2, reweight_factor=0.05):
        super().__init__()
        self.base_loss_factor = check_number(base_loss_factor, "base_loss_factor", "RIDELoss")
        if self.base_loss_factor == 0:
            raise ValueError("RIDELoss: base_loss_factor must be non-zero (the fused loss scales its diversity term "
                             "by additional_diversity_factor / base_loss_factor)")
        self.reweight_epoch = reweight_epoch if reweight else -1
        self.base_diversity_temperature = check_number(base_diversity_temperature, "base_diversity_temperature",
                                                       "RIDELoss", low=0.0, low_open=True)
        self.additional_diversity_factor = check_number(additional_diversity_factor, "additional_diversity_factor",
                                                        "RIDELoss")
        self._reweighting = False
        if cls_num_list is None:
            self.C_number = None
            for name in ("m_list", "target_margin", "per_cls_weights_enabled", "per_cls_weights_enabled_diversity",
                         "diversity_temperature"):
                self.register_buffer(name, None, persistent=False)
            return
        counts = class_count_list(cls_num_list, "RIDELoss", allow_zero=False)
        self.C_number = counts.numel()
        check_number(s, "s", "RIDELoss", low=0.0, low_open=True)
        self.s = s
        m_list = 1.0 / torch.sqrt(torch.sqrt(counts))
        m_list = (m_list * (max_m / m_list.max())).to(torch.float32)
        self.register_buffer("m_list", m_list, persistent=False)
        self.register_buffer("target_margin", m_list * self.s, persistent=False)  # float32, as the original's
        self.register_buffer("per_cls_weights_enabled",
                             effective_number_weights(counts, CB_BETA) if self.reweight_epoch != -1 else None,
                             persistent=False)
        try:
            temperature = ltfast.priors.ride_diversity_temperature(counts, reweight_factor, dtype=torch.float32)
        except ValueError:
            raise ValueError(f"RIDELoss: reweight_factor={reweight_factor} is too large: out of bounds (some "
                             f"diversity temperatures are <= 0)") from None
        self.register_buffer("per_cls_weights_enabled_diversity", temperature, persistent=False)
        self.register_buffer("diversity_temperature", self.base_diversity_temperature * temperature, persistent=False)

    def _hook_before_epoch(self, epoch):
        if self.reweight_epoch != -1:
            self.epoch = epoch
            self._reweighting = epoch > self.reweight_epoch

    @property
    def per_cls_weights_base(self) -> Optional[Tensor]:
        return self.per_cls_weights_enabled if self._reweighting else None

    @property
    def per_cls_weights_diversity(self) -> Optional[Tensor]:
        return self.per_cls_weights_enabled_diversity if self._reweighting else None

    def forward(self, output_logits, target, extra_info=None):
        _checked(output_logits, target, "RIDELoss", self.C_number)
        if extra_info is None:
            return ltfast.adjusted_cross_entropy(output_logits, target, reduction="mean", ignore_index=IGNORE_INDEX)
        experts = _expert_logits(extra_info, target, "RIDELoss", self.C_number)
        if self.additional_diversity_factor == 0:
            # The original then takes every expert's CE on output_logits (and adds 0 * KL).
            ce = ltfast.adjusted_cross_entropy(output_logits, target, target_margin=self.target_margin,
                                               weight=self.per_cls_weights_base, reduction="mean",
                                               ignore_index=IGNORE_INDEX)
            return self.base_loss_factor * experts.shape[1] * ce
        if self._reweighting and self.per_cls_weights_enabled_diversity is not None:
            # T_c = base * t_c as the original forms it: a float32 product (then base 1 in the op).
            temperature, base = self.diversity_temperature, 1.0
        else:
            temperature, base = None, self.base_diversity_temperature
        loss = ltfast.ride_loss(experts, target, self.target_margin, self.per_cls_weights_base, temperature, base,
                                self.additional_diversity_factor / self.base_loss_factor, IGNORE_INDEX)
        return loss if self.base_loss_factor == 1 else self.base_loss_factor * loss


__all__ = ["CrossEntropyLoss", "FocalLoss", "LDAMLoss", "DiverseExpertLoss", "RIDELoss"]
