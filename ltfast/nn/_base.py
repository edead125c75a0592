"""What the ltfast.nn loss modules share: the per-class buffers handed to the ops in the logits'
accumulation dtype (:class:`_ClassVectors`) and the argument checks of the nn.CrossEntropyLoss
arguments."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class _ClassVectors:
    """Mixin: the per-class buffers in the accumulation dtype of the logits, cast once, not per call.

    The buffers are float64 (float64 logits must see them exact: computed in float32 they left
    float64 losses 5e-7 relative away from a float64 reference); float32/bf16/fp16 logits need float32
    values. Casting at every call cost a ``.to()`` dispatch per buffer per call (~1.3 us of a 1 x 2
    forward+backward of ~40 us). The float32 copy is cached per buffer and reused while the buffer is
    the same tensor object with the same version counter: ``.to(device)``/``.cuda()`` (``_apply``)
    replace the buffer object, and ``load_state_dict``'s ``copy_`` or any other in-place update bumps
    its version, so either refreshes the copy on the next call. (A write through ``buffer.data``, which
    has a version counter of its own, is not seen.) Under ``torch.compile`` the cast is traced as
    before. Buffers are read from ``_buffers`` directly: ``nn.Module.__getattr__`` costs ~0.7 us each.

    In eager mode the modules' forwards use :meth:`_eager_class_vector`, a cache hit in one comparison
    of (buffer object, logits dtype, version) that skips the dtype logic, and call ltfast._C's entry
    points directly (see ltfast/_dispatch.py); under ``torch.compile`` they take the functionals.
    """

    def _class_vector(self, name: str, input: Tensor) -> Optional[Tensor]:
        buffer = self._buffers[name]
        if buffer is None:
            return None
        in_dtype = input.dtype
        dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
        if torch.compiler.is_compiling():
            return buffer if buffer.dtype == dtype else buffer.to(dtype)
        try:
            version = buffer._version
        except RuntimeError:  # an inference tensor (module built under inference_mode) has no version
            return buffer if buffer.dtype == dtype else buffer.to(dtype)
        if buffer.dtype == dtype:
            converted = buffer
        else:
            with torch.no_grad():
                converted = buffer.to(dtype)
        # Keyed by the logits dtype itself, so that a hit needs no dtype logic.
        self.__dict__.setdefault("_cast_cache", {})[name] = (buffer, in_dtype, version, converted)
        return converted

    def _eager_class_vector(self, name: str, input: Tensor) -> Optional[Tensor]:
        """:meth:`_class_vector` outside torch.compile (the caller checks)."""
        buffer = self._buffers[name]
        cache = self.__dict__.get("_cast_cache")
        if cache is not None and buffer is not None:
            entry = cache.get(name)
            if (entry is not None and entry[0] is buffer and entry[1] is input.dtype
                    and entry[2] == buffer._version):
                return entry[3]
        return self._class_vector(name, input)

    def __getstate__(self):  # copies and pickles refill the cache on first use
        state = super().__getstate__()
        state = dict(state)
        state.pop("_cast_cache", None)
        return state


def _check_reduction(reduction: str) -> str:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def _check_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)
