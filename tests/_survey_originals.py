"""Plain-PyTorch transcriptions of the survey codebases' loss classes, written for ltfast's tests and
benchmarks from a reading of the originals (Vanint/Awesome-LongTailed-Learning: Main-codebase/loss/*.py,
Main-codebase/utils.py::calculate_prior, Ensemble-codebase/model/loss.py; seed-methods.md §1, §6).

They compute what the originals compute, operation by operation where it matters for rounding (float32
per-class statistics, C x N masks for LADER, -1e7 masking for SEQL, a per-sample margin vector for
LDAM), with three changes that make them runnable here: no ``.cuda()`` (per-class tensors are buffers that
follow ``.to(device)``); LDAM's uint8 ``torch.where``
condition is a bool mask (PyTorch >= 2 rejects uint8); per-class weights are cast to the logits'
dtype (``F.cross_entropy`` rejects float32 weights with float64 logits). SEQL takes an optional
``keep`` mask so that a test can replay the drop decisions of another implementation.

These are the test oracle and the "original" baseline of benchmarks/compat_suite.py, not part of
the ltfast package.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- Main-codebase
def survey_counts(num_classes, img_max=None, prior=None, prior_txt=None, reverse=False):
    """utils.calculate_prior(..., return_num=True): float32 counts."""
    if prior_txt:
        with open(prior_txt) as f:
            occurrences = Counter(int(line.split()[1]) for line in f if line.strip())
        values = [occurrences[c] for c in range(num_classes)]
    else:
        values = []
        for c in range(num_classes):
            position = (num_classes - 1 - c) if reverse else c
            values.append(int(img_max * prior ** (position / (num_classes - 1.0))))
    return torch.Tensor(values)


def list_file_frequencies(path, num_classes=1000):
    """The float32 frequencies the original WeightedSoftmaxLoss/SEQL build from their list file."""
    histogram = [0] * num_classes
    with open(path) as f:
        for line in f:
            if line.strip():
                histogram[int(line.split()[1])] += 1
    total = sum(histogram)
    return torch.FloatTensor([count / total for count in histogram])


class OriginalSoftmaxLoss(nn.CrossEntropyLoss):
    """SoftmaxLoss.create_loss(): nn.CrossEntropyLoss()."""


class OriginalWeightedSoftmaxLoss(nn.Module):
    def __init__(self, prior_txt, num_classes=1000):
        super().__init__()
        frequency = list_file_frequencies(prior_txt, num_classes)
        relative = frequency / frequency.max().item()
        self.register_buffer("weight", 1 - relative.log())

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, weight=self.weight.to(logits.dtype))


class OriginalPriorCELoss(nn.Module):
    def __init__(self, num_classes, img_max=None, prior=None, prior_txt=None):
        super().__init__()
        counts = survey_counts(num_classes, img_max, prior, prior_txt).float()
        self.register_buffer("prior", counts / counts.sum())

    def forward(self, logits, target):
        return F.cross_entropy(logits + torch.log(self.prior + 1e-9), target)


class OriginalLADELoss(nn.Module):
    def __init__(self, num_classes=10, img_max=None, prior=None, prior_txt=None, remine_lambda=0.1):
        super().__init__()
        counts = survey_counts(num_classes, img_max, prior, prior_txt).float()
        self.num_classes = num_classes
        self.register_buffer("prior", counts / counts.sum())
        self.register_buffer("cls_weight", counts.float() / torch.sum(counts.float()))
        self.register_buffer("balanced_prior", torch.tensor(1.0 / num_classes).float())
        self.remine_lambda = remine_lambda

    def forward(self, y_pred, target, q_pred=None):
        classes = torch.arange(self.num_classes).to(target)                                      # as type_as
        member = target[None, :] == classes[:, None]                                              # C x N
        x_p = y_pred.T * member
        x_q = (y_pred - torch.log(self.prior + 1e-9) + torch.log(self.balanced_prior + 1e-9)).T
        count = member.sum(-1).float()
        first = x_p.sum(-1) / (count + 1e-8)
        second = torch.logsumexp(x_q, -1) - np.log(x_p.size(-1))
        bound = first - second - self.remine_lambda * second ** 2
        return -(bound * self.cls_weight).sum()


class OriginalSEQL(nn.Module):
    def __init__(self, prior_txt, gamma=0.9, lambda_n=0.00043, num_classes=1000):
        super().__init__()
        self.gamma = gamma
        frequency = list_file_frequencies(prior_txt, num_classes)
        self.register_buffer("class_weight",
                             torch.tensor([1.0 if frequency[c] > lambda_n else 0.0 for c in range(num_classes)]))

    def forward(self, logits, target, keep=None):
        n, c = logits.shape
        head = self.class_weight.view(1, c).repeat(n, 1)
        # the original draws on the CPU generator and copies: torch.rand(shape).cuda()
        lucky = (torch.rand(logits.shape).to(logits.device) > self.gamma).float() if keep is None else keep.float()
        gt = target.new_zeros((n, c)).float()
        gt[torch.arange(n), target] = 1
        mask = ((head + lucky + gt) > 0).float()
        masked = logits * mask + (-1e7) * (1 - mask)
        return F.cross_entropy(masked, target)


class OriginalFocalLoss(nn.Module):
    def __init__(self, gamma=0, size_average=True):
        super().__init__()
        self.gamma, self.size_average = gamma, size_average

    def forward(self, logits, target):
        if logits.dim() > 2:
            classes = logits.size(1)
            logits = logits.view(logits.size(0), classes, -1).transpose(1, 2).contiguous().view(-1, classes)
        log_pt = F.log_softmax(logits, dim=-1).gather(1, target.view(-1, 1)).view(-1)
        pt = log_pt.detach().exp()
        loss = -((1 - pt) ** self.gamma) * log_pt
        return loss.mean() if self.size_average else loss.sum()


# ----------------------------------------------------------------------------- Ensemble-codebase
def class_balanced_weights(cls_num_list, beta=0.9999):
    effective = 1.0 - np.power(beta, cls_num_list)
    weights = (1.0 - beta) / np.array(effective)
    weights = weights / np.sum(weights) * len(cls_num_list)
    return torch.tensor(weights, dtype=torch.float)


class OriginalEnsembleCrossEntropyLoss(nn.Module):
    def __init__(self, cls_num_list=None, reweight_CE=False):
        super().__init__()
        self.register_buffer("per_cls_weights", class_balanced_weights(cls_num_list) if reweight_CE else None)

    def forward(self, output_logits, target):
        weight = None if self.per_cls_weights is None else self.per_cls_weights.to(output_logits.dtype)
        return F.cross_entropy(output_logits, target, weight=weight)


class OriginalEnsembleFocalLoss(nn.Module):
    def __init__(self, cls_num_list=None, weight=None, gamma=0.0):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, output_logits, target):
        weight = None if self.weight is None else self.weight.to(output_logits.dtype)
        per_row = F.cross_entropy(output_logits, target, reduction="none", weight=weight)
        p = torch.exp(-per_row)
        return ((1 - p) ** self.gamma * per_row).mean()


class OriginalLDAMLoss(nn.Module):
    def __init__(self, cls_num_list=None, max_m=0.5, s=30, reweight_epoch=-1):
        super().__init__()
        margins = 1.0 / np.sqrt(np.sqrt(cls_num_list))
        margins = margins * (max_m / np.max(margins))
        self.register_buffer("m_list", torch.tensor(margins, dtype=torch.float))
        self.s = s
        self.reweight_epoch = reweight_epoch
        self.register_buffer("enabled", class_balanced_weights(cls_num_list) if reweight_epoch != -1 else None)
        self.per_cls_weights = None

    def _hook_before_epoch(self, epoch):
        if self.reweight_epoch != -1:
            self.per_cls_weights = self.enabled if epoch > self.reweight_epoch else None

    def forward(self, output_logits, target):
        onehot = torch.zeros_like(output_logits, dtype=torch.bool)
        onehot.scatter_(1, target.view(-1, 1), True)
        batch_m = (self.m_list[None, :] @ onehot.float().T).view(-1, 1)
        shifted = output_logits - batch_m * self.s
        final = torch.where(onehot, shifted, output_logits)
        weight = None if self.per_cls_weights is None else self.per_cls_weights.to(output_logits.dtype)
        return F.cross_entropy(final, target, weight=weight)


class OriginalDiverseExpertLoss(nn.Module):
    def __init__(self, cls_num_list=None, max_m=0.5, s=30, tau=2):
        super().__init__()
        self.register_buffer("prior", torch.tensor(np.array(cls_num_list) / np.sum(cls_num_list)).float())
        self.tau = tau

    @staticmethod
    def reversed_rank_values(prior):
        values, order = torch.sort(prior)
        _, rank = torch.sort(order)
        return values.index_select(0, prior.shape[0] - 1 - rank)

    def forward(self, output_logits, target, extra_info=None):
        if extra_info is None:
            return F.cross_entropy(output_logits, target)
        z1, z2, z3 = extra_info["logits"][0], extra_info["logits"][1], extra_info["logits"][2]
        total = 0
        total += F.cross_entropy(z1, target)
        total += F.cross_entropy(z2 + torch.log(self.prior + 1e-9), target)
        inverse = self.reversed_rank_values(self.prior)
        total += F.cross_entropy(z3 + torch.log(self.prior + 1e-9) - self.tau * torch.log(inverse + 1e-9), target)
        return total


class OriginalRIDELoss(nn.Module):
    """Ensemble-codebase ``RIDELoss`` (the same class as frank-xwang/RIDE-LongTailRecognition
    model/loss.py): LDAM-DRW CE per expert plus the diversity KL against softmax(output_logits / T).
    The original's ``per_cls_weights_base``/``_diversity`` exist only after ``_hook_before_epoch`` with
    ``reweight_epoch != -1``; here they start as None, which is what that hook sets before DRW."""

    def __init__(self, cls_num_list=None, base_diversity_temperature=1.0, max_m=0.5, s=30, reweight=True,
                 reweight_epoch=-1, base_loss_factor=1.0, additional_diversity_factor=-0.2, reweight_factor=0.05):
        super().__init__()
        self.base_loss_factor = base_loss_factor
        self.reweight_epoch = reweight_epoch if reweight else -1
        margins = 1.0 / np.sqrt(np.sqrt(cls_num_list))
        margins = margins * (max_m / np.max(margins))
        self.register_buffer("m_list", torch.tensor(margins, dtype=torch.float))
        self.s = s
        self.register_buffer("per_cls_weights_enabled",
                             class_balanced_weights(cls_num_list) if reweight_epoch != -1 else None)
        prior = np.array(cls_num_list) / np.sum(cls_num_list)
        factors = len(cls_num_list) * prior * reweight_factor + 1 - reweight_factor
        factors = factors / np.max(factors)
        self.register_buffer("per_cls_weights_enabled_diversity", torch.tensor(factors, dtype=torch.float))
        self.base_diversity_temperature = base_diversity_temperature
        self.additional_diversity_factor = additional_diversity_factor
        self.per_cls_weights_base = None
        self.per_cls_weights_diversity = None

    def _hook_before_epoch(self, epoch):
        if self.reweight_epoch != -1:
            on = epoch > self.reweight_epoch
            self.per_cls_weights_base = self.per_cls_weights_enabled if on else None
            self.per_cls_weights_diversity = self.per_cls_weights_enabled_diversity if on else None

    def get_final_output(self, output_logits, target):
        onehot = torch.zeros_like(output_logits, dtype=torch.bool)
        onehot.scatter_(1, target.view(-1, 1), True)
        batch_m = (self.m_list[None, :] @ onehot.float().T).view(-1, 1)
        return torch.where(onehot, output_logits - batch_m * self.s, output_logits)

    def forward(self, output_logits, target, extra_info=None):
        if extra_info is None:
            return F.cross_entropy(output_logits, target)
        loss = 0
        for logits_item in extra_info["logits"]:
            ride_loss_logits = output_logits if self.additional_diversity_factor == 0 else logits_item
            final_output = self.get_final_output(ride_loss_logits, target)
            weight = None if self.per_cls_weights_base is None else self.per_cls_weights_base.to(output_logits.dtype)
            loss += self.base_loss_factor * F.cross_entropy(final_output, target, weight=weight)
            if self.per_cls_weights_diversity is not None:
                diversity_temperature = self.base_diversity_temperature * self.per_cls_weights_diversity.view((1, -1))
                temperature_mean = diversity_temperature.mean().item()
                diversity_temperature = diversity_temperature.to(output_logits.dtype)
            else:
                diversity_temperature = self.base_diversity_temperature
                temperature_mean = self.base_diversity_temperature
            output_dist = F.log_softmax(logits_item / diversity_temperature, dim=1)
            with torch.no_grad():
                mean_output_dist = F.softmax(output_logits / diversity_temperature, dim=1)
            loss += self.additional_diversity_factor * temperature_mean * temperature_mean * F.kl_div(
                output_dist, mean_output_dist, reduction="batchmean")
        return loss


# ----------------------------------------------------------------------------- PaCo-codebase
class OriginalPaCoLoss(nn.Module):
    """PaCo-codebase/losses.py::PaCoLoss, operation by operation. Changes that make it runnable here: the
    class prior ``self.weight`` follows the features' device and dtype instead of ``.to('cuda')``, the
    masks are built in the features' dtype instead of float32 (float64 tests), and the one-hot label is
    cast to that dtype too. ``features`` is ``[q, k, queue]`` (N = 2B + K rows), ``labels`` their N labels."""

    def __init__(self, alpha, beta=1.0, gamma=1.0, supt=1.0, temperature=1.0, base_temperature=None, K=128,
                 num_classes=1000):
        super().__init__()
        self.temperature = temperature
        self.base_temperature = temperature if base_temperature is None else base_temperature
        self.K = K
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.supt = supt
        self.num_classes = num_classes

    def cal_weight_for_classes(self, cls_num_list):
        cls_num_list = torch.Tensor(cls_num_list).view(1, self.num_classes)
        self.weight = cls_num_list / cls_num_list.sum()

    def forward(self, features, labels=None, sup_logits=None, mask=None, epoch=None):
        batch_size = (features.shape[0] - self.K) // 2
        return self.loss_from_similarity(torch.matmul(features[:batch_size], features.T), labels, sup_logits)

    def loss_from_similarity(self, similarity, labels, sup_logits):
        """The rest of forward, from ``torch.matmul(features[:batch_size], features.T)`` on (the
        benchmark's baseline with the matmul excluded)."""
        device = similarity.device
        dtype = similarity.dtype
        batch_size = similarity.shape[0]

        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels[:batch_size], labels.T).to(dtype).to(device)

        anchor_dot_contrast = torch.div(similarity, self.temperature)
        weight = self.weight.to(device)
        anchor_dot_contrast = torch.cat(((sup_logits + torch.log(weight + 1e-9)) / self.supt, anchor_dot_contrast),
                                        dim=1)

        logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
        logits = anchor_dot_contrast - logits_max.detach()

        logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size).view(-1, 1).to(device), 0)
        mask = mask * logits_mask

        one_hot_label = F.one_hot(labels[:batch_size, ].view(-1, ), num_classes=self.num_classes).to(dtype)
        mask = torch.cat((one_hot_label * self.beta, mask * self.alpha), dim=1)

        logits_mask = torch.cat((torch.ones(batch_size, self.num_classes, dtype=dtype).to(device),
                                 self.gamma * logits_mask), dim=1)
        exp_logits = torch.exp(logits) * logits_mask
        log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True) + 1e-12)

        mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)

        loss = - (self.temperature / self.base_temperature) * mean_log_prob_pos
        loss = loss.mean()
        return loss
