"""Checkpoint files: THE loader and saver of the trainer's state, safe loading and atomic writing.

One layout, written by :func:`save_last` / :func:`save_best` and read by :func:`read_resume` (the
trainer's resume) and :func:`model_state` (``model.init_from``, ``ltfast.evaluate``, test-time,
best.pt at the end of training)::

    last.pt  {"model", "optimizer", "criterion", "schedule": {"step"}, "scaler", "sampler": {"epoch", "seed"},
              "state", "rng": [per rank], "world_size", "config"}
    best.pt  {"model", "epoch", "val_top1"} (+ "decoupled" for the training-free stages)

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
import random
import shutil
import tempfile
from typing import Optional

import torch
from torch import nn

from . import distributed
from .errors import CheckpointError, ConfigError


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
    (last.pt / best.pt), ``obj["state_dict"]`` / ``obj["model_state_dict"]`` of other training code's
    layouts, or ``obj`` itself when it is a bare state_dict; DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` prefixes are removed."""
    state = None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
        else:
            state = obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: {path} holds no model state_dict (expected a trainer checkpoint with "
                              f"'model', a dict with 'state_dict', or a bare state_dict of tensors)")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checked_state(model: nn.Module, state: dict, path: str) -> None:
    """``model.load_state_dict(state)`` whose mismatch (another architecture or config, a crafted
    file) is a ConfigError naming the file and the first differences, not a traceback."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        detail = "; ".join(lines)[:400] or str(error)[:400]
        raise ConfigError(f"checkpoint {path} does not fit the model of its config (another model.* setting or not "
                          f"this run's file?): {detail}") from None


def load_model_weights(model: nn.Module, path: str, what: str = "model.init_from", obj=None) -> None:
    """Model weights of a trainer checkpoint (last.pt or best.pt) or a bare state_dict, all of them
    (see :func:`load_checked_state`); loaded with weights_only=True: nothing in the file is run.
    ``obj``: the file's content when the caller has read it already."""
    obj = load(path, what) if obj is None else obj
    load_checked_state(model, model_state(obj, path, what), path)


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


# ------------------------------------------------------------------------------ the trainer's state

def _rng_state() -> dict:
    import numpy as np
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restores the generators of one rank from :func:`gather_rng_states`' entry (any version's)."""
    import numpy as np
    state = rng_state_after_loading(state)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world: int) -> list:
    # Each rank's generator has its own stream (e.g. SEQL's drop seeds); keep all of them. Every rank
    # takes part in the gather.
    return distributed.all_gather_objects(rng_state_for_saving(_rng_state()), world)


def save_best(path: str, model: nn.Module, epoch: int, val_top1: float, **extra) -> None:
    save_atomic({"model": model.state_dict(), "epoch": epoch, "val_top1": val_top1, **extra}, path)


def save_last(path: str, *, model: nn.Module, optimizer, criterion: nn.Module, scaler, state: dict, rng: list,
              world: int, cfg: dict, steps_per_epoch: int) -> None:
    """Everything an exact resume needs after ``state["epoch"]`` epochs."""
    epoch = state["epoch"]
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "criterion": criterion.state_dict(), "schedule": {"step": epoch * steps_per_epoch},
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "sampler": {"epoch": epoch, "seed": cfg["train"]["seed"]},
                 "state": state, "rng": rng, "world_size": world, "config": cfg}, path)


def read_resume(path: str, cfg: dict) -> dict:
    """last.pt's content, checked against ``cfg`` (:func:`check_resume_config`)."""
    ckpt = load(path, "train.resume")
    check_resume_config(ckpt.get("config") if isinstance(ckpt, dict) else None, cfg, path)
    return ckpt


def resume_path(cfg: dict) -> Optional[str]:
    """The checkpoint ``train.resume`` names (None: a fresh start)."""
    resume, last = cfg["train"]["resume"], os.path.join(cfg["train"]["out_dir"], "last.pt")
    if resume is False:
        return None
    if resume is True or resume == "auto":
        if os.path.exists(last):
            return last
        if resume is True:
            raise FileNotFoundError(f"train.resume: no checkpoint at {last}")
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"train.resume: no checkpoint file at {resume}")
    return resume


# Keys a resume may change: where the data is read from and how fast, not what is trained. Every
# other key of data / model / loss / optim, and train.seed, must equal the checkpoint's: a changed
# optim.epochs or optim.lr made the schedule jump mid-run, another loss.name ended in a raw
# RuntimeError from load_state_dict, and either overwrote config.yaml (trial finding 9e).
# The train (but seed) and eval sections are free: logging, device, checkpointing, reporting.
RESUME_HARMLESS = {("data", "root"), ("data", "eval_batch_size"), ("data", "num_threads"), ("data", "check_files"),
                   ("model", "compile"), ("model", "channels_last")}


def check_resume_config(saved: Optional[dict], cfg: dict, path: str) -> None:
    """ConfigError naming the keys whose values differ from the checkpoint's config."""
    if not isinstance(saved, dict):
        raise ConfigError(f"train.resume: {path} holds no config (not a last.pt of ltfast.train?)")
    differ = []
    for section in ("data", "model", "loss", "optim"):
        mine, theirs = cfg.get(section, {}), saved.get(section) or {}
        for key in sorted(set(mine) | set(theirs)):
            if (section, key) not in RESUME_HARMLESS and mine.get(key) != theirs.get(key):
                differ.append(f"{section}.{key} ({theirs.get(key)!r} -> {mine.get(key)!r})")
    if cfg["train"]["seed"] != (saved.get("train") or {}).get("seed", cfg["train"]["seed"]):
        differ.append(f"train.seed ({saved['train']['seed']!r} -> {cfg['train']['seed']!r})")
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise ConfigError(f"train.resume: the config differs from the checkpoint's ({path}) in {shown}; resume "
                          f"with the run's config.yaml, or start a new run (another train.out_dir)")
