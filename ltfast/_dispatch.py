"""What every caller of the torch.ops.ltfast ops shares: the eager fast path (ltfast._C's direct
entry points), the torch.compile test, and the argument helpers that the functionals
(ltfast.ops, ltfast.soft_targets), the nn modules and the fake kernels (ltfast._meta) all apply.

A loss call takes one of three paths, in this order:

1. eager, extension built: ``fast.<op>(...)`` (csrc/python_entry.cpp), which calls the public op
   without going through the dispatcher's Python layer; it returns ``NotImplemented`` under a
   TorchFunctionMode, for tensor subclasses and for unexpected argument types;
2. otherwise (and always under ``torch.compile``): ``torch.ops.ltfast.<op>.default``;
3. without the extension: the plain-PyTorch ``ltfast.reference``, with a one-time warning.

This module imports nothing of ltfast above ``_extension``, so that ``ops``, ``soft_targets`` and
``_meta`` can all use it without importing each other.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _extension

REDUCTIONS = ("none", "mean", "sum")

# ltfast._C's direct entry points, or an object whose functions all decline (NotImplemented) without
# the extension or with LTFAST_FAST_PATH=0. Read as ``_dispatch.fast`` at each call, never bound to
# another name, so that a test can replace it here to observe which path every caller takes.
fast = _extension.fast_entry_points()
is_compiling = torch.compiler.is_compiling


def accumulate_dtype(logits: Tensor) -> torch.dtype:
    """The dtype the kernels accumulate in (``at::opmath_type``): float64 for float64 logits,
    float32 for float32, float16 and bfloat16."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_devices(op: str, logits: Tensor, tensors: dict) -> None:
    """Every tensor argument on the logits' device: a RuntimeError naming the argument and the
    expected device. Cheap (no data read); also run by the fake kernels, which are what runs when
    any argument is a meta tensor."""
    device = logits.device
    for name, tensor in tensors.items():
        if isinstance(tensor, Tensor) and tensor.device != device:
            raise RuntimeError(f"{op}: {name} must be on the same device as logits ({device}), got {tensor.device}")
