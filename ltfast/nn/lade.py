"""LADE (Hong et al. 2021) as a module, with the batch gathered across DDP ranks on request
(:func:`gather_batch_with_grad`): LADER is a statistic of the whole batch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _dispatch, _extension, priors
from .._dispatch import is_compiling as _is_compiling
from ..ops import adjusted_cross_entropy, lade_loss, lade_regularizer
from ._base import _check_smoothing, _ClassVectors


class _AllGatherRows(torch.autograd.Function):
    """Concatenates every rank's rows (equal sizes); backward sums the incoming gradient over the
    ranks and returns this rank's slice: a reduce-scatter on NCCL, an all-reduce plus a slice on
    backends without reduce-scatter (gloo). Written here because
    ``torch.distributed.nn.functional.all_gather`` is deprecated (FutureWarning on every call)."""

    @staticmethod
    def forward(ctx, rows: Tensor, group):
        import torch.distributed as dist
        ctx.group = group
        parts = [torch.empty_like(rows, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, rows.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist
        world = dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total.chunk(world)[rank].clone(), None


def gather_batch_with_grad(logits: Tensor, target: Tensor, ignore_index: int, group=None):
    """All-gathers logits and targets over the process group, rank by rank. Local batches may differ in
    size: each is padded to the largest with rows whose target is ``ignore_index`` (they count
    nowhere). The logits keep their autograd graph: the backward sums the gathered gradient over the
    ranks (reduce-scatter), so each rank's logits receive ``world_size * dL/dz_local`` and DDP's
    averaging of parameter gradients yields exactly the single-process gradient of L on the whole
    batch. Costs one host synchronisation per call, to learn the batch sizes."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    local = torch.tensor([logits.shape[0]], device=target.device, dtype=torch.long)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    largest = int(torch.stack(sizes).max())
    pad = largest - logits.shape[0]
    if pad:
        logits = torch.cat([logits, logits.new_zeros(pad, logits.shape[1])])
        target = torch.cat([target, target.new_full((pad,), ignore_index)])
    gathered_logits = _AllGatherRows.apply(logits, group)
    gathered_target = [torch.empty_like(target) for _ in range(world)]
    dist.all_gather(gathered_target, target.contiguous(), group=group)
    return gathered_logits, torch.cat(gathered_target)


class LADELoss(_ClassVectors, nn.Module):
    """LADE loss (Hong et al. 2021) as the survey trains it: Balanced Softmax (PriorCE, mean) plus
    ``alpha`` times the LADER regulariser, with the survey's defaults alpha = remine_lambda = 0.1
    (seed-methods.md §1.5; see :func:`ltfast.lade_loss` for the math).

    LADER's column log-mean-exp runs over the batch, so its value depends on which rows share a
    call. The survey used ``nn.DataParallel``: one loss call on the whole 256-sample batch.
    Under DDP:

    - ``gather_batch=False`` (default): each rank computes LADE on its local batch (e.g. 64 rows).
      S_c then estimates the log-mean-exp from 64 samples instead of 256, a different (noisier,
      biased for small batches) estimator than the survey's.
    - ``gather_batch=True``: the loss all-gathers logits and targets across ranks and computes LADE
      on the concatenated batch; values equal the single-process loss on that batch on every rank,
      and after DDP's gradient averaging the parameter gradients equal the single-process ones
      (see :func:`gather_batch_with_grad`). Outside an initialised process group it does nothing.

    ``weight`` and ``label_smoothing`` act on the PriorCE term only (as in ``nn.CrossEntropyLoss``
    on ``logits + log_prior``); with either set the loss is that term plus ``alpha`` times
    :func:`ltfast.lade_regularizer`, two ops instead of the fused one. ``reduction`` is ``"mean"``
    only: LADER is a statistic of the whole batch, with no per-row value.
    """

    def __init__(self, class_counts, alpha: float = 0.1, remine_lambda: float = 0.1, gather_batch: bool = False,
                 *, weight: Optional[Tensor] = None, label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", process_group=None) -> None:
        super().__init__()
        if remine_lambda < 0:
            raise ValueError(f"remine_lambda must be >= 0, got {remine_lambda}")
        if reduction != "mean":
            raise ValueError(f"LADELoss: reduction must be 'mean' (LADER is a batch statistic with no per-row "
                             f"value), got {reduction!r}")
        self.reduction = reduction
        self.label_smoothing = _check_smoothing(label_smoothing)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float64))
        self.alpha = float(alpha)
        self.remine_lambda = float(remine_lambda)
        self.gather_batch = bool(gather_batch)
        self.ignore_index = int(ignore_index)
        self.process_group = process_group
        self.register_buffer("log_prior", priors.log_prior(class_counts, dtype=torch.float64))

    def extra_repr(self) -> str:
        return (f"num_classes={self.log_prior.numel()}, alpha={self.alpha}, remine_lambda={self.remine_lambda}, "
                f"gather_batch={self.gather_batch}")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if self.gather_batch:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
                input, target = gather_batch_with_grad(input, target, self.ignore_index, self.process_group)
        if self.weight is not None or self.label_smoothing != 0.0:
            log_prior = self._class_vector("log_prior", input)
            prior_ce = adjusted_cross_entropy(input, target, adjustment=log_prior,
                                              weight=self._class_vector("weight", input),
                                              label_smoothing=self.label_smoothing, ignore_index=self.ignore_index)
            return prior_ce + self.alpha * lade_regularizer(input, target, log_prior, self.remine_lambda,
                                                            self.ignore_index)
        if _extension.AVAILABLE and not _is_compiling():
            loss = _dispatch.fast.lade(input, target, self._eager_class_vector("log_prior", input), self.alpha,
                                   self.remine_lambda, self.ignore_index)
            if loss is not NotImplemented:
                return loss
        return lade_loss(input, target, self._class_vector("log_prior", input), self.alpha,
                         self.remine_lambda, self.ignore_index)
