"""Run folders and logs for a researcher running hundreds of jobs.

- ``prepare_out_dir``: a non-empty ``train.out_dir`` is refused unless ``train.resume`` (continue)
  or ``train.overwrite=true`` (empty it first, so that no file of the earlier run survives: a stale
  ``best.pt`` or ``summary.json`` next to a new run is how wrong numbers get into papers).
- ``History``: one JSON line per epoch in ``out_dir/history.jsonl`` (loss, lr, val top-1 and
  many / medium / few, images/s, seconds), written as the run goes, so ``tail -f`` and a
  crashed run still show the curve; TensorBoard scalars when ``tensorboard`` is installed.
- ``run_seeds``: ``train.seeds=[0,1,2]`` trains each seed into ``out_dir/seed<k>/`` and writes
  ``out_dir/seeds_summary.json`` with the mean and sample standard deviation of the test metrics.
- ``progress_enabled``: the tqdm bar only on a terminal (in a batch job's log file its carriage
  returns turn into thousands of lines).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from typing import Optional

from .config import ConfigError, dump

HISTORY = "history.jsonl"
SEEDS_SUMMARY = "seeds_summary.json"
# A folder is only ever emptied when it holds one of these: it was written by ltfast.train (a typo
# such as train.out_dir=. or =~ with train.overwrite=true must not delete a home directory).
RUN_MARKERS = ("config.yaml", "last.pt", "summary.json", HISTORY, SEEDS_SUMMARY)


def progress_enabled(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream  # tqdm writes to stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _is_run_folder(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in RUN_MARKERS)


def check_out_dir(cfg: dict) -> Optional[str]:
    """The reason ``out_dir`` may not be used, or None. Pure (touches nothing)."""
    train = cfg["train"]
    out_dir = train["out_dir"]
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            return f"train.out_dir: {out_dir} exists and is not a folder"
        return None
    if not os.listdir(out_dir) or train["resume"] is not False:
        return None
    if not train["overwrite"]:
        return (f"train.out_dir: {out_dir} is not empty (an earlier run?); continue it with train.resume=true, "
                f"replace it with train.overwrite=true, or choose another train.out_dir")
    if not _is_run_folder(out_dir):
        return (f"train.overwrite: {out_dir} does not look like an ltfast run folder (none of "
                f"{', '.join(RUN_MARKERS)}); refusing to empty it")
    return None


def empty_folder(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


def prepare_out_dir(cfg: dict, rank: int = 0) -> None:
    """Refuses or empties ``out_dir`` (rank 0 decides and acts; every rank raises the same error)."""
    import torch.distributed as dist
    problem = check_out_dir(cfg) if rank == 0 else None
    if rank == 0 and problem is None and cfg["train"]["overwrite"] and os.path.isdir(cfg["train"]["out_dir"]):
        empty_folder(cfg["train"]["out_dir"])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, 0)
        problem = box[0]
    if problem:
        raise ConfigError(problem)


class History:
    """history.jsonl (+ TensorBoard) of one run; only rank 0 writes."""

    def __init__(self, cfg: dict, rank: int, past: list[dict]) -> None:
        self.path = os.path.join(cfg["train"]["out_dir"], HISTORY)
        self.active = rank == 0
        self.writer = None
        if not self.active:
            return
        os.makedirs(cfg["train"]["out_dir"], exist_ok=True)
        # Rewritten from the checkpoint's history at every start: after a resume the file holds
        # exactly the epochs the weights have seen (an epoch logged after the last checkpoint and
        # then re-run would otherwise appear twice).
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for record in past:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)
        self.writer = _tensorboard_writer(cfg)

    def append(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["epoch"]
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and value is not None and math.isfinite(value):
                    self.writer.add_scalar(_tb_tag(key), value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tb_tag(key: str) -> str:
    # val_many -> val/many, loss -> train/loss: TensorBoard groups by the part before '/'
    if key.startswith("val_"):
        return "val/" + key[4:]
    return "train/" + key


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


def _tensorboard_writer(cfg: dict):
    want = cfg["train"]["tensorboard"]
    if want is False or (want == "auto" and not tensorboard_available()):
        return None
    if not tensorboard_available():
        raise ConfigError("train.tensorboard: true, but the tensorboard package is not installed "
                          "(pip install tensorboard, or train.tensorboard=auto)")
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(cfg["train"]["out_dir"], "tensorboard"))


def val_fields(val: dict) -> dict:
    """The validation numbers an epoch record carries (None for an empty shot group)."""
    return {"val_top1": val["top1"], "val_many": val["many"], "val_medium": val["medium"], "val_few": val["few"]}


# ------------------------------------------------------------------------------------------ seeds

METRICS = ("top1", "micro", "many", "medium", "few")


def mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    # sample standard deviation (n - 1), the usual "± std over seeds"; 0 for one seed
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(values)}


def run_seeds(cfg: dict, train_fn) -> dict:
    """Trains ``train.seeds`` in turn; returns (and writes on rank 0) the summary over seeds."""
    import torch.distributed as dist
    from .trainer import setup_distributed
    rank, _, _ = setup_distributed(cfg["train"]["device"])
    parent = cfg["train"]["out_dir"]
    prepare_out_dir(cfg, rank)          # refuse / empty the parent once; the seeds then start clean
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        with open(os.path.join(parent, "config.yaml"), "w") as f:
            f.write(dump(cfg))
    runs = []
    for seed in cfg["train"]["seeds"]:
        one = copy.deepcopy(cfg)
        one["train"].update(seed=seed, seeds=None, overwrite=False, out_dir=os.path.join(parent, f"seed{seed}"))
        if rank == 0:
            print(f"== seed {seed} -> {one['train']['out_dir']}", flush=True)
        runs.append(train_fn(one))
    finished = [r for r in runs if r.get("status") == "finished"]
    summary = {"name": cfg.get("name") or cfg["loss"]["name"], "seeds": cfg["train"]["seeds"],
               "status": "finished" if len(finished) == len(runs) else "partial",
               "runs": [{"seed": s, "out_dir": r.get("out_dir") or os.path.join(parent, f"seed{s}"),
                         "status": r.get("status"), **({k: r["test"][k] for k in METRICS} if "test" in r else {})}
                        for s, r in zip(cfg["train"]["seeds"], runs)],
               "test": {k: mean_std([r["test"][k] for r in finished]) for k in METRICS}}
    if rank == 0:
        path = os.path.join(parent, SEEDS_SUMMARY)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        summary["summary"] = path
        text = "  ".join(f"{k} {_pm(summary['test'][k])}" for k in ("top1", "many", "medium", "few"))
        print(f"{summary['name']} over seeds {cfg['train']['seeds']}: {text}  -> {path}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return summary


def _pm(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"
