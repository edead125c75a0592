"""The fake (meta) kernels of every torch.ops.ltfast op, in one place (as torchvision's
``_meta_registrations.py``): what runs under ``torch.compile`` (FakeTensor tracing), for meta
tensors and in ``torch.library.opcheck``. Each returns empty tensors of the real kernel's output
shapes and dtypes, and repeats the argument checks of the C++ kernels that do not run on fake
tensors, so that torch.compile and meta inputs fail with the same messages.

Registered when this module is first imported, and only when the extension defines the ops.
``ltfast/__init__`` imports it, and so does every module that calls the ops (``ops``,
``soft_targets``, ``data.samplers``); it depends on nothing but ``_extension`` and ``_dispatch``,
so no import order can leave an op without its fake kernel. The schemas are in csrc/ltfast.cpp;
the output layouts in csrc/ops/<family>/<family>.h.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _extension
from ._dispatch import REDUCTIONS, accumulate_dtype, check_devices


def _fake_forward(op: str, logits: Tensor, target: Tensor, reduction: str, class_vectors: dict):
    # The C++ checks do not run on fake/meta tensors; these keep torch.compile and meta inputs
    # failing with the same messages.
    torch._check(logits.dim() == 2, lambda: f"{op}: logits must be a 2-D tensor [N, C], got {logits.dim()}-D")
    torch._check(reduction in REDUCTIONS,
                 lambda: f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0],
                 lambda: f"{op}: target must be a 1-D tensor of N = {logits.shape[0]} elements, got shape "
                         f"{tuple(target.shape)}")
    for name, vector in class_vectors.items():
        if vector is None:
            continue
        torch._check(vector.dim() == 1 and vector.shape[0] == logits.shape[1],
                     lambda: f"{op}: {name} must be a 1-D tensor of C = {logits.shape[1]} elements, got shape "
                             f"{tuple(vector.shape)}")
    for name, tensor in {"target": target, **class_vectors}.items():
        if tensor is not None and tensor.device != logits.device:
            raise RuntimeError(f"{op}: {name} must be on the same device as logits ({logits.device}), "
                               f"got {tensor.device}")
    acc = accumulate_dtype(logits)
    rows = logits.shape[0]
    loss = logits.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    return loss, logits.new_empty((2, rows), dtype=acc), logits.new_empty((), dtype=acc)


def _fake_expert_checks(op: str, logits: Tensor, target: Tensor, tensors: dict) -> None:
    torch._check(logits.dim() == 3,
                 lambda: f"{op}: logits must be a 3-D tensor [N, E, C] of expert logits, got {logits.dim()}-D")
    torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0],
                 lambda: f"{op}: target must be a 1-D tensor of N = {logits.shape[0]} elements, got shape "
                         f"{tuple(target.shape)}")
    for name, tensor in {"target": target, **tensors}.items():
        if tensor is not None and tensor.device != logits.device:
            raise RuntimeError(f"{op}: {name} must be on the same device as logits ({logits.device}), "
                               f"got {tensor.device}")


def _fake_forward_grad(logits: Tensor, with_grad: bool, cuda: bool = False) -> Tensor:
    """The grad_logits of the forward ops with with_grad: computed by the CPU kernels (cross-entropy
    family, multi-expert: cross_entropy.h, multi_expert.h) and, with `cuda`, the CUDA kernels (the
    cross-entropy family)."""
    if with_grad and (logits.device.type == "cpu" or (cuda and logits.device.type == "cuda")):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits.new_empty((0,))


def _fake_paco_checks(similarity: Tensor, labels: Tensor, key_labels: Tensor, sup_logits: Tensor | None,
                      log_prior: Tensor | None, temperature: float, alpha: float, beta: float, gamma: float,
                      sup_temperature: float, base_temperature: float, reduction: str) -> None:
    """The shape, device and scalar checks of csrc/ops/paco/paco_args.cpp, with its messages."""
    op = "ltfast.paco_loss"
    torch._check(similarity.dim() == 2, lambda: f"{op}: similarity must be a 2-D tensor [B, M] (anchors x keys, "
                                                f"q @ keys.T), got a {similarity.dim()}-D tensor")
    torch._check(similarity.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"{op}: similarity must be float32, float64, float16 or bfloat16, got {similarity.dtype}")
    batch, keys = similarity.shape
    torch._check(keys >= batch, lambda: f"{op}: similarity [B, M] must have at least as many keys as anchors (M >= B: "
                                        f"the first B keys are the anchors themselves), got shape "
                                        f"{tuple(similarity.shape)}")
    for name, tensor, size, size_name in (("labels", labels, batch, "B"), ("key_labels", key_labels, keys, "M")):
        torch._check(tensor.dim() == 1 and tensor.shape[0] == size,
                     lambda: f"{op}: {name} must be a 1-D tensor [{size_name}] of labels, {size_name} = {size} "
                             f"elements, got shape {tuple(tensor.shape)}")
        torch._check(tensor.dtype == torch.int64, lambda: f"{op}: {name} must be an int64 tensor of labels, got "
                                                          f"{tensor.dtype}")
    if sup_logits is not None:
        torch._check(sup_logits.dim() == 2 and sup_logits.shape[0] == batch and sup_logits.shape[1] >= 1,
                     lambda: f"{op}: sup_logits must be a 2-D tensor [B = {batch}, C >= 1], got shape "
                             f"{tuple(sup_logits.shape)}")
        torch._check(sup_logits.dtype == similarity.dtype,
                     lambda: f"{op}: sup_logits must have the same dtype as similarity ({similarity.dtype}), got "
                             f"{sup_logits.dtype}")
    if log_prior is not None:
        torch._check(sup_logits is not None, lambda: f"{op}: log_prior is added to sup_logits, which is None")
        torch._check(log_prior.dim() == 1 and log_prior.shape[0] == sup_logits.shape[1],
                     lambda: f"{op}: log_prior must be a 1-D tensor of C = {sup_logits.shape[1]} elements, got "
                             f"shape {tuple(log_prior.shape)}")
    for name, value in (("temperature", temperature), ("sup_temperature", sup_temperature),
                        ("base_temperature", base_temperature)):
        torch._check(math.isfinite(value) and value > 0, lambda: f"{op}: {name} must be a finite number > 0, got {value}")
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        torch._check(math.isfinite(value) and value >= 0, lambda: f"{op}: {name} must be a finite number >= 0, got {value}")
    torch._check(reduction in REDUCTIONS, lambda: f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    for name, tensor in (("labels", labels), ("key_labels", key_labels), ("sup_logits", sup_logits),
                         ("log_prior", log_prior)):
        if tensor is not None and tensor.device != similarity.device:
            raise RuntimeError(f"{op}: {name} must be on the same device as similarity ({similarity.device}), "
                               f"got {tensor.device}")


def register() -> None:
    """Registers every fake kernel (once: this module runs once per process)."""
    lib = torch.library

    # ---------------------------------------------------------------- balanced_softmax
    @lib.register_fake("ltfast::_balanced_softmax_forward")
    def _(logits, target, log_prior, reduction, ignore_index, with_grad=False):
        return (*_fake_forward("ltfast.balanced_softmax", logits, target, reduction, {"log_prior": log_prior}),
                _fake_forward_grad(logits, with_grad, cuda=True))

    @lib.register_fake("ltfast::_balanced_softmax_backward")
    def _(grad_loss, logits, target, log_prior, row_stats, denominator, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @lib.register_fake("ltfast::_scale_forward_grad_")
    def _(grad, upstream):
        return None

    # ---------------------------------------------------------------- adjusted_cross_entropy
    @lib.register_fake("ltfast::_adjusted_cross_entropy_forward")
    def _(logits, target, adjustment, target_margin, weight, gamma, label_smoothing, reduction, ignore_index,
          with_grad=False):
        return (*_fake_forward("ltfast.adjusted_cross_entropy", logits, target, reduction,
                               {"adjustment": adjustment, "target_margin": target_margin, "weight": weight}),
                _fake_forward_grad(logits, with_grad, cuda=True))

    @lib.register_fake("ltfast::_adjusted_cross_entropy_backward")
    def _(grad_loss, logits, target, adjustment, target_margin, weight, row_stats, denominator, gamma,
          label_smoothing, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- softmax_equalization_loss
    @lib.register_fake("ltfast::_softmax_equalization_loss_forward")
    def _(logits, target, tail_mask, seed, gamma, reduction, ignore_index, with_grad=False):
        check_devices("ltfast.softmax_equalization_loss", logits, {"seed": seed})
        return (*_fake_forward("ltfast.softmax_equalization_loss", logits, target, reduction,
                               {"tail_mask": tail_mask}),
                _fake_forward_grad(logits, with_grad, cuda=True))

    @lib.register_fake("ltfast::_softmax_equalization_loss_backward")
    def _(grad_loss, logits, target, tail_mask, seed, row_stats, denominator, gamma, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- equalization_loss (EQL)
    @lib.register_fake("ltfast::_equalization_loss_forward")
    def _(logits, target, tail_mask, reduction, ignore_index):
        loss, _, denominator = _fake_forward("ltfast.equalization_loss", logits, target, reduction,
                                             {"tail_mask": tail_mask})
        return loss, denominator

    @lib.register_fake("ltfast::_equalization_loss_backward")
    def _(grad_loss, logits, target, tail_mask, denominator, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- lade
    @lib.register_fake("ltfast::_lade_forward")
    def _(logits, target, log_prior, ce_weight, alpha, remine_lambda, ignore_index):
        _fake_forward("ltfast.lade", logits, target, "mean", {"log_prior": log_prior})
        acc = accumulate_dtype(logits)
        # row_stats [2, N], column_stats [4, C] (layouts: csrc/ops/lade/lade.h), num_valid int64.
        return (logits.new_empty((), dtype=acc), logits.new_empty((2, logits.shape[0]), dtype=acc),
                logits.new_empty((4, logits.shape[1]), dtype=acc), logits.new_empty((), dtype=torch.int64))

    @lib.register_fake("ltfast::_lade_backward")
    def _(grad_loss, logits, target, log_prior, row_stats, column_stats, num_valid, ce_weight, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- multi-expert losses
    @lib.register_fake("ltfast::_diverse_expert_loss_forward")
    def _(logits, target, adjustments, reduction, ignore_index, with_grad=False):
        op = "ltfast.diverse_expert_loss"
        _fake_expert_checks(op, logits, target, {"adjustments": adjustments})
        torch._check(adjustments.dim() == 2 and adjustments.shape[0] == logits.shape[1]
                     and adjustments.shape[1] == logits.shape[2],
                     lambda: f"{op}: adjustments must be a 2-D tensor [E = {logits.shape[1]}, C = {logits.shape[2]}], "
                             f"got shape {tuple(adjustments.shape)}")
        torch._check(reduction in REDUCTIONS,
                     lambda: f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        acc = accumulate_dtype(logits)
        rows, experts = logits.shape[0], logits.shape[1]
        loss = logits.new_empty((rows,) if reduction == "none" else (), dtype=acc)
        # row_stats [2, N, E], denominator, grad_logits (layouts: csrc/ops/multi_expert/multi_expert.h).
        return (loss, logits.new_empty((2, rows, experts), dtype=acc), logits.new_empty((), dtype=acc),
                _fake_forward_grad(logits, with_grad))

    @lib.register_fake("ltfast::_diverse_expert_loss_backward")
    def _(grad_loss, logits, target, adjustments, row_stats, denominator, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @lib.register_fake("ltfast::_ride_loss_forward")
    def _(logits, target, target_margin, weight, temperature, base_temperature, diversity_factor, ignore_index,
          with_grad=False):
        op = "ltfast.ride_loss"
        vectors = {"target_margin": target_margin, "weight": weight, "temperature": temperature}
        _fake_expert_checks(op, logits, target, vectors)
        for name, vector in vectors.items():
            if vector is not None:
                torch._check(vector.dim() == 1 and vector.shape[0] == logits.shape[2],
                             lambda: f"{op}: {name} must be a 1-D tensor of C = {logits.shape[2]} elements, got "
                                     f"shape {tuple(vector.shape)}")
        acc = accumulate_dtype(logits)
        # row_stats [2, N, 2E + 1], denominators [3] (layouts: csrc/ops/multi_expert/multi_expert.h).
        return (logits.new_empty((), dtype=acc), logits.new_empty((2, logits.shape[0], 2 * logits.shape[1] + 1),
                                                                   dtype=acc),
                logits.new_empty((3,), dtype=acc), _fake_forward_grad(logits, with_grad))

    @lib.register_fake("ltfast::_ride_loss_backward")
    def _(grad_loss, logits, target, target_margin, weight, temperature, row_stats, denominators, base_temperature,
          diversity_factor, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- paco_loss
    @lib.register_fake("ltfast::_paco_forward")
    def _(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha, beta, gamma, sup_temperature,
          base_temperature, reduction, ignore_index, with_grad=False):
        _fake_paco_checks(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha, beta, gamma,
                          sup_temperature, base_temperature, reduction)
        acc = accumulate_dtype(similarity)
        rows = similarity.shape[0]
        loss = similarity.new_empty((rows,) if reduction == "none" else (), dtype=acc)
        # row_stats [2, B] (lse, positive weight), denominator, then the forward-time gradients: the CPU
        # kernel's only (csrc/ops/paco/paco.h).
        return (loss, similarity.new_empty((2, rows), dtype=acc), similarity.new_empty((), dtype=acc),
                _fake_forward_grad(similarity, with_grad),
                _fake_forward_grad(sup_logits, with_grad) if sup_logits is not None else similarity.new_empty((0,)))

    @lib.register_fake("ltfast::_paco_backward")
    def _(grad_loss, similarity, labels, key_labels, sup_logits, log_prior, row_stats, denominator, temperature,
          alpha, beta, gamma, sup_temperature, base_temperature, reduction, ignore_index):
        _fake_paco_checks(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha, beta, gamma,
                          sup_temperature, base_temperature, reduction)
        return (torch.empty_like(similarity, memory_format=torch.contiguous_format),
                torch.empty_like(sup_logits, memory_format=torch.contiguous_format) if sup_logits is not None
                else similarity.new_empty((0,)))

    # ---------------------------------------------------------------- soft targets (ltfast.soft_targets)
    @lib.register_fake("ltfast::_mixed_cross_entropy_forward")
    def _(logits, target, target_b, mix_weight, mix, adjustment, target_margin, weight, gamma, label_smoothing,
          class_label_smoothing, reduction, ignore_index):
        op = "ltfast.mixed_cross_entropy"
        # The meta kernel runs whenever one argument is a meta tensor: without these checks a meta
        # target_b next to CPU logits returned uninitialised CPU memory (trial finding 3).
        check_devices(op, logits, {"target_b": target_b, "mix_weight": mix_weight})
        loss, row_stats, _ = _fake_forward(op, logits, target, reduction,
                                           {"adjustment": adjustment, "target_margin": target_margin,
                                            "weight": weight, "class_label_smoothing": class_label_smoothing})
        if target_b is not None:
            torch._check(target_b.dim() == 1 and target_b.shape[0] == logits.shape[0],
                         lambda: f"{op}: target_b must be a 1-D tensor of N = {logits.shape[0]} class indices, "
                                 f"got shape {tuple(target_b.shape)}")
            torch._check(target_margin is None,
                         lambda: f"{op}: target_margin (LDAM) cannot be combined with target_b")
        if mix_weight is not None:
            torch._check(target_b is not None, lambda: f"{op}: mix_weight is only meaningful together with target_b")
            torch._check(mix_weight.dim() == 0 or tuple(mix_weight.shape) == (logits.shape[0],),
                         lambda: f"{op}: mix_weight must be a 0-dim tensor or a 1-D tensor of N = "
                                 f"{logits.shape[0]} elements, got shape {tuple(mix_weight.shape)}")
        return loss, row_stats, logits.new_empty((2,), dtype=row_stats.dtype)

    @lib.register_fake("ltfast::_mixed_cross_entropy_backward")
    def _(grad_loss, logits, target, target_b, mix_weight, mix, adjustment, target_margin, weight, row_stats,
          denominator, gamma, label_smoothing, class_label_smoothing, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @lib.register_fake("ltfast::_probability_cross_entropy_forward")
    def _(logits, target, adjustment, weight, label_smoothing, reduction):
        op = "ltfast.probability_cross_entropy"
        torch._check(tuple(target.shape) == tuple(logits.shape),
                     lambda: f"{op}: a probability target must have the logits' shape [N, C] = "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        rows = target[:, 0].to(torch.int64)  # shape [N]: the shared checks of the class vectors
        loss, _, denominator = _fake_forward(op, logits, rows, reduction, {"adjustment": adjustment, "weight": weight})
        return loss, logits.new_empty((3, logits.shape[0]), dtype=denominator.dtype), denominator

    @lib.register_fake("ltfast::_probability_cross_entropy_backward")
    def _(grad_loss, logits, target, adjustment, weight, row_stats, denominator, label_smoothing, reduction):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------- sampler draws (ltfast.data)
    @lib.register_fake("ltfast::class_aware_sample")
    def _(class_offsets, members, seed, epoch, start, count, num_samples_cls, epoch_length):
        torch._check(members.device == class_offsets.device,
                     lambda: "ltfast.class_aware_sample: members must be on the same device as class_offsets")
        return members.new_empty((count,))

    @lib.register_fake("ltfast::class_weighted_sample")
    def _(class_cdf, class_offsets, members, seed, epoch, start, count, epoch_length):
        torch._check(class_cdf.shape[0] == class_offsets.shape[0] - 1,
                     lambda: "ltfast.class_weighted_sample: class_cdf must have one entry per class")
        return members.new_empty((count,))


if _extension.AVAILABLE:
    register()
