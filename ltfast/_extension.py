"""Loads the compiled extension ltfast._C, which registers the torch.ops.ltfast.* kernels.

The CPU kernels are built for several instruction sets (DEFAULT, and AVX2 and AVX-512 on x86-64)
and the one that runs is picked like ATen's own (``cpu_capability()``), so _C loads on any CPU.
If it cannot be loaded (not built), ``AVAILABLE`` is False and ``LOAD_ERROR`` says why; the
functionals and ``ltfast.nn`` then fall back to the plain-PyTorch ``ltfast.reference`` with a
one-time warning.
"""
from __future__ import annotations

import warnings

import torch

AVAILABLE = False
LOAD_ERROR: str | None = None


try:
    from . import _C  # noqa: F401  (importing registers the ops)

    AVAILABLE = True
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
    extension is unavailable or predates them, an object whose functions all return NotImplemented
    (the callers then take torch.ops)."""
    if AVAILABLE:
        from . import _C
        if hasattr(_C, "balanced_softmax"):
            return _C
    return _NoEntryPoints()


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
