"""Loads the compiled extension ltfast._C, which registers the torch.ops.ltfast.* kernels.

The CPU kernels are built for several instruction sets (DEFAULT, and AVX2 and AVX-512 on x86-64)
and the one that runs is picked like ATen's own (``cpu_capability()``), so _C loads on any CPU.
If it cannot be loaded (not built), ``AVAILABLE`` is False and ``LOAD_ERROR`` says why; the
functionals and ``ltfast.nn`` then fall back to the plain-PyTorch ``ltfast.reference`` with a
one-time warning.
"""
from __future__ import annotations

import os
import warnings

import torch

AVAILABLE = False
LOAD_ERROR: str | None = None


# The forward-time gradient of the CPU cross-entropy family (set_forward_gradient), on from import:
# it reuses the forward's exponentials, and a float32 4096 x 1000 balanced_softmax step (forward +
# backward) took 2.97-3.14 ms with it against 3.92-4.04 ms with the separate backward op on the
# project's AMD EPYC (Zen 4, AVX512 kernels, 1 thread, minima of 40 steps in two rounds, shared machine).
FORWARD_GRADIENT_DEFAULT = True

try:
    from . import _C  # noqa: F401  (importing registers the ops)

    AVAILABLE = True
    if hasattr(_C, "set_forward_gradient"):
        _C.set_forward_gradient(FORWARD_GRADIENT_DEFAULT)
except ImportError as error:  # pragma: no cover - exercised only where the build is missing
    LOAD_ERROR = str(error)

_warned = False


def warn_fallback_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"ltfast: the compiled kernels are unavailable ({LOAD_ERROR}); using the plain-PyTorch "
            "ltfast.reference implementations instead (same values, slower). "
            "Build them with `pip install -e . --no-build-isolation`.",
            RuntimeWarning,
            stacklevel=3,
        )


class _NoEntryPoints:
    """Stands in for ltfast._C's entry points where they are missing: every call declines."""

    def __getattr__(self, name):
        return lambda *args: NotImplemented


def fast_entry_points():
    """ltfast._C, whose functions call the public loss ops directly (csrc/python_entry.cpp); where the
    extension is unavailable or predates them, where ``LTFAST_FAST_PATH=0``, or where the fast path
    fails its self-check, an object whose functions all return NotImplemented (the callers then take
    torch.ops, the dispatcher path, which behaves the same and costs ~3 us more per call)."""
    if AVAILABLE and os.environ.get("LTFAST_FAST_PATH", "1") != "0":
        from . import _C
        if hasattr(_C, "balanced_softmax") and _fast_path_declines_under_a_mode(_C):
            return _C
    return _NoEntryPoints()


def _fast_path_declines_under_a_mode(entry_points) -> bool:
    """The fast path reads torch's torch-function state through internals (at::impl TLS) that may
    change in any release: checked here, by behaviour, once at import. Under an active
    TorchFunctionMode it must decline (return NotImplemented), else a mode or a tensor subclass would
    be silently bypassed; and outside one it must return the op's result. If either fails, the fast
    path is turned off with a warning and every call takes the dispatcher."""
    from torch.overrides import TorchFunctionMode

    class _Probe(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    logits, target, log_prior = torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), torch.zeros(2)
    try:
        with _Probe():
            under_mode = entry_points.balanced_softmax(logits, target, log_prior, "mean", -100)
        plain = entry_points.balanced_softmax(logits, target, log_prior, "mean", -100)
    except Exception as error:  # noqa: BLE001  (any failure means: do not trust the fast path)
        problem = f"it raised {type(error).__name__}: {error}"
    else:
        if under_mode is not NotImplemented:
            problem = "it did not decline under a TorchFunctionMode"
        elif not isinstance(plain, torch.Tensor):
            problem = f"it returned {type(plain).__name__} instead of the loss"
        else:
            return True
    warnings.warn(f"ltfast: the eager fast path failed its self-check with torch {torch.__version__} ({problem}); "
                  "every call takes the dispatcher path instead (same results, ~3 us more per call).",
                  RuntimeWarning, stacklevel=2)
    return False


def has_cuda_kernels() -> bool:
    """True when ltfast._C was compiled with its CUDA kernels."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ltfast::_balanced_softmax_forward", "CUDA")


def cpu_capability() -> str | None:
    """The instruction set of the CPU kernels that run: 'AVX512', 'AVX2' or 'DEFAULT' (scalar code,
    any CPU). It follows torch's own choice (``torch.backends.cpu.get_cpu_capability()``), so
    ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) in the environment before torch is imported forces
    the narrower kernels. None where the extension is unavailable (or predates the dispatch)."""
    if AVAILABLE:
        from . import _C
        if hasattr(_C, "cpu_capability"):
            return _C.cpu_capability()
    return None


def set_forward_gradient(enabled: bool) -> bool:
    """Whether the CPU and CUDA forward kernels of the cross-entropy family (balanced_softmax,
    adjusted_cross_entropy and its wrappers, softmax_equalization_loss) also write the gradient when
    the logits require grad; on by default (FORWARD_GRADIENT_DEFAULT). The forward computes it from
    the exponentials of its own softmax pass (equal to the backward op's within a few float32 ulp;
    tests/test_cross_entropy.py FORWARD_GRADIENT_TOL), and the backward returns it (scaled when the
    upstream gradient is not 1) instead of reading the logits again: one read of [N, C] and one
    exponential per element per training step instead of two of each, at the cost of the [N, C]
    gradient (logits dtype) held from the forward to the backward (16 MB at 4096 x 1000 float32; the
    peak of a step that calls backward right after the forward is unchanged). Turn it off where the
    logits require grad but often see no backward, or for a gradient bit-identical to the backward
    op's (CPU; the CUDA kernels' is bit-identical: docs/ops.md). paco_loss follows it too (the
    gradients of similarity and sup_logits). The multi-expert losses always compute their gradient in
    the forward. Process-wide; returns the previous setting."""
    if not isinstance(enabled, bool):
        raise TypeError(f"ltfast.set_forward_gradient: enabled must be a bool, got {type(enabled).__name__}")
    if not AVAILABLE:
        return False
    from . import _C
    return _C.set_forward_gradient(enabled)
