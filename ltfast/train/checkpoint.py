"""Checkpoint files: safe loading and atomic writing.

Loading never runs code from the file. ``torch.load(..., weights_only=False)`` unpickles arbitrary
objects, so a crafted ``last.pt`` or ``init_from`` file could run ``os.system`` before failing (issue
13). Every load here is ``weights_only=True``: tensors, plain containers and numbers, plus only the
few numpy types that checkpoints of earlier ltfast versions hold (their numpy RNG state, a uint32
array); checkpoints written now hold no numpy object at all (see :func:`rng_state_for_saving`).

Writing goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target: a kill, a full disk or a quota leaves the previous checkpoint intact and no temporary file
behind, and the error names the path and the cause.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile

import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message names the file."""


def _numpy_globals() -> list:
    # What pickling np.random.get_state()'s uint32 key array writes: ltfast up to this version saved
    # it in last.pt["rng"][rank]["numpy"]. Arrays of object dtype would still need further globals,
    # which stay refused.
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return []
    try:
        from numpy._core.multiarray import _reconstruct as reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as reconstruct
    found = [reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in ("UInt32DType", "Int64DType", "Float64DType")
                  if hasattr(dtypes, name)]
    return [g for g in found if g is not None]


def load(path: str, what: str = "checkpoint") -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with ltfast's allow-list; any
    refused or unreadable content is a :class:`CheckpointError` naming ``path`` and ``what`` (the
    config key that named the file, e.g. ``train.resume``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is generic on its first line; the detail ("Trying to load unsupported GLOBAL
        # posix.system ...", "Unsupported operand 110") is on a later one.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines[1:] if not line.startswith(("Please file", "Check the doc"))),
                      lines[0] if lines else type(error).__name__)
        if "GLOBAL" not in detail:
            raise CheckpointError(f"{what}: cannot read {path} as a PyTorch checkpoint (not a torch.save "
                                  f"file?): {detail}") from None
        raise CheckpointError(
            f"{what}: refusing to load {path}: it holds objects other than tensors, numbers and plain "
            f"containers, which ltfast never writes, so nothing in it was run ({detail}). If you wrote this "
            f"file yourself and trust it, re-save just its state_dict.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{what}: cannot read {path} as a PyTorch checkpoint (truncated or not a "
                              f"torch.save file?): {type(error).__name__}: {error}") from None


def model_state(obj, path: str, what: str = "model.init_from") -> dict:
    """The model state_dict inside a loaded checkpoint: ``obj["model"]`` of a trainer checkpoint
    (last.pt / best.pt), ``obj["state_dict"]`` of the common {"state_dict": ...} layout, or ``obj``
    itself when it is a bare state_dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"{what}: {path} holds no model state_dict (expected a trainer checkpoint with "
                          f"'model', a dict with 'state_dict', or a bare state_dict of tensors)")


def save_atomic(obj, path: str) -> None:
    """``torch.save(obj, path)`` that is all-or-nothing: written to a temporary file next to
    ``path``, fsynced, then renamed over it. On failure the temporary file is removed and a
    :class:`CheckpointError` names ``path``, the cause and the free space left."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: clean up, then go on
            raise
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}"
        except OSError:
            free = f"free space in {folder} unknown"
        # torch.save on a full disk says only "unexpected pos 494784 vs 494672": name the likely cause.
        raise CheckpointError(f"cannot write checkpoint {path}: {type(error).__name__}: {error} ({free}; "
                              f"a full disk or quota is the usual cause; the previous {os.path.basename(path)}, "
                              f"if any, is unchanged)") from error


def rng_state_for_saving(state: dict) -> dict:
    """The trainer's RNG state with numpy's tuple as plain values (a tensor and numbers), so that
    a checkpoint loads under ``weights_only=True`` without any numpy global."""
    out = dict(state)
    numpy_state = state.get("numpy")
    if isinstance(numpy_state, tuple):
        name, keys, pos, has_gauss, cached = numpy_state
        out["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return out


def rng_state_after_loading(state: dict) -> dict:
    """Inverse of :func:`rng_state_for_saving` (older checkpoints hold the tuple itself)."""
    out = dict(state)
    numpy_state = state.get("numpy")
    if isinstance(numpy_state, dict):
        import numpy as np
        out["numpy"] = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                        numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    return out
