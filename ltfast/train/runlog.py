"""Run folders and logs for a researcher running hundreds of jobs.

- ``prepare_out_dir``: a non-empty ``train.out_dir`` is refused unless ``train.resume`` (continue)
  or ``train.overwrite=true`` (delete the earlier run's files first, so that none survives: a stale
  ``best.pt`` or ``summary.json`` next to a new run is how wrong numbers get into papers).
- The run manifest ``out_dir/.ltfast-run.json`` lists every file and folder ltfast wrote there
  (``record_outputs`` adds each one *before* writing it, so a crash mid-write still leaves it
  listed). ``train.overwrite`` deletes exactly what the manifest lists and refuses, naming the
  first foreign entries, when the folder holds anything else: a user's ``src/`` or ``README.md``
  in ``out_dir`` is never deleted (a trial lost one when any ``config.yaml`` made a folder "a
  run"). A folder of an older ltfast (no manifest) is refused too: delete it yourself, or resume it
  once (a resume writes the manifest of the ltfast files it finds).
- ``History``: one JSON line per epoch in ``out_dir/history.jsonl`` (loss, lr, val top-1 and
  many / medium / few, images/s, seconds), written as the run goes, so ``tail -f`` and a
  crashed run still show the curve; TensorBoard scalars when ``tensorboard`` is installed.
- ``run_seeds``: ``train.seeds=[0,1,2]`` trains each seed into ``out_dir/seed<k>/`` and writes
  ``out_dir/seeds_summary.json`` with the mean and sample standard deviation of the test metrics.
- ``progress_enabled``: the tqdm bar only on a terminal (in a batch job's log file its carriage
  returns turn into thousands of lines).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import sys
from typing import Optional

from .distributed import setup_distributed
from .errors import ConfigError
from .schema import dump

HISTORY = "history.jsonl"
SEEDS_SUMMARY = "seeds_summary.json"
MANIFEST = ".ltfast-run.json"
# What an older ltfast (no manifest) wrote at the top of a run folder: a resume of such a folder
# lists those it finds in a new manifest (the trainer's and the seed sweep's fixed names).
KNOWN_OUTPUTS = ("config.yaml", "last.pt", "best.pt", "summary.json", "per_class.png", HISTORY, SEEDS_SUMMARY)
KNOWN_FOLDERS = ("tensorboard", "eval", "test_time")
_SEED_RUN = re.compile(r"seed\d+")


def progress_enabled(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream  # tqdm writes to stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------ run manifest

def read_manifest(out_dir: str) -> Optional[dict]:
    """The manifest of ``out_dir`` ({"files", "folders", "runs"}: paths relative to it), or None."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.out_dir: cannot read the run manifest {path} ({error}); delete the folder's "
                          f"contents yourself or choose another train.out_dir") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"train.out_dir: {path} is not an ltfast run manifest")
    return {key: [str(p) for p in manifest.get(key, [])] for key in ("files", "folders", "runs")}


def _write_manifest(out_dir: str, manifest: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"written_by": "ltfast", **{k: sorted(set(manifest[k])) for k in ("files", "folders", "runs")}},
                  f, indent=1)
    os.replace(tmp, path)


def record_outputs(out_dir: str, files=(), folders=(), runs=()) -> None:
    """Adds paths (relative to ``out_dir``) to its manifest, creating both when absent: ``files``
    written by ltfast, ``folders`` whose whole content ltfast writes (TensorBoard), ``runs``
    sub-folders that are runs with their own manifest (``seed<k>``). Call before writing them."""
    manifest = read_manifest(out_dir) or {"files": [], "folders": [], "runs": []}
    added = False
    for key, paths in (("files", files), ("folders", folders), ("runs", runs)):
        for rel in paths:
            rel = os.path.normpath(rel)
            if rel.startswith("..") or os.path.isabs(rel):
                raise ValueError(f"record_outputs: {rel} is not inside {out_dir}")
            if rel not in manifest[key]:
                manifest[key].append(rel)
                added = True
    if added or not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        _write_manifest(out_dir, manifest)


def record_output_path(path: str) -> None:
    """Lists ``path`` (a file about to be written) in the manifest of the run folder it lies in, if
    any: an evaluation or test-time report written into a run folder belongs to that run."""
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while True:
        if os.path.isfile(os.path.join(probe, MANIFEST)):
            record_outputs(probe, files=[os.path.relpath(os.path.abspath(path), probe)])
            return
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent


def _temporary_of(rel: str, files: set) -> bool:
    # checkpoint.save_atomic's "last.pt.<random>.tmp", History's and the manifest's "<name>.tmp":
    # what a kill during a write leaves behind belongs to the run
    return any(rel == f + ".tmp" or (rel.startswith(f + ".") and rel.endswith(".tmp")) for f in files)


def foreign_entries(out_dir: str) -> Optional[list[str]]:
    """Paths in ``out_dir`` (relative, folders with a trailing '/') that its manifest does not list,
    sorted; None when it has no manifest."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return None
    files = set(manifest["files"]) | {MANIFEST}
    owned = set(manifest["folders"])
    runs = set(manifest["runs"])
    listed = files | owned | runs
    foreign: list[str] = []

    def walk(rel: str) -> None:
        for name in sorted(os.listdir(os.path.join(out_dir, rel) if rel else out_dir)):
            path = os.path.join(rel, name) if rel else name
            full = os.path.join(out_dir, path)
            is_dir = os.path.isdir(full) and not os.path.islink(full)
            if (path in files and not is_dir) or (path in owned and is_dir) or _temporary_of(path, files):
                continue
            if path in runs and is_dir:
                inner = foreign_entries(full)
                foreign.extend([path + "/ (no " + MANIFEST + ")"] if inner is None
                               else [os.path.join(path, p) for p in inner])
                continue
            if is_dir and any(p.startswith(path + os.sep) for p in listed):
                walk(path)
                continue
            foreign.append(path + ("/" if is_dir else ""))

    walk("")
    return foreign


def delete_run_outputs(out_dir: str) -> None:
    """Deletes what the manifest of ``out_dir`` lists (and the manifest); folders that held only
    those are removed too. Callers check :func:`foreign_entries` first."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return
    parents = set()
    for rel in manifest["runs"]:
        full = os.path.join(out_dir, rel)
        if os.path.isdir(full) and not os.path.islink(full):
            delete_run_outputs(full)
            with contextlib.suppress(OSError):
                os.rmdir(full)
        parents.add(os.path.dirname(rel))
    for rel in manifest["folders"]:
        full = os.path.join(out_dir, rel)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        parents.add(os.path.dirname(rel))
    files = set(manifest["files"])
    for rel in manifest["files"]:
        full = os.path.join(out_dir, rel)
        if os.path.lexists(full) and not (os.path.isdir(full) and not os.path.islink(full)):
            os.remove(full)
        parents.add(os.path.dirname(rel))
    for name in os.listdir(out_dir):  # temporaries of listed files (a killed write)
        if _temporary_of(name, files | {MANIFEST}):
            os.remove(os.path.join(out_dir, name))
    for rel in sorted((p for p in parents if p), key=lambda p: -p.count(os.sep)):  # deepest first
        while rel:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(out_dir, rel))  # only when empty
            rel = os.path.dirname(rel)
    os.remove(os.path.join(out_dir, MANIFEST))


def _manifest_for_older_run(out_dir: str) -> None:
    # A resumed folder of an ltfast without manifests: list the files such a version wrote there,
    # so that a later train.overwrite of this folder works.
    if read_manifest(out_dir) is not None or not os.path.isdir(out_dir):
        return
    names = os.listdir(out_dir)
    record_outputs(out_dir, files=[n for n in names if n in KNOWN_OUTPUTS],
                   folders=[n for n in names if n in KNOWN_FOLDERS and os.path.isdir(os.path.join(out_dir, n))],
                   runs=[n for n in names if _SEED_RUN.fullmatch(n) and os.path.isdir(os.path.join(out_dir, n))])


def _listing(entries: list[str], shown: int = 3) -> str:
    more = f" and {len(entries) - shown} more" if len(entries) > shown else ""
    return ", ".join(entries[:shown]) + more


def check_out_dir(cfg: dict) -> Optional[str]:
    """The reason ``out_dir`` may not be used, or None. Pure (touches nothing)."""
    train = cfg["train"]
    out_dir = train["out_dir"]
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            return f"train.out_dir: {out_dir} exists and is not a folder"
        return None
    if not [n for n in os.listdir(out_dir) if n != MANIFEST] or train["resume"] is not False:
        return None
    if not train["overwrite"]:
        return (f"train.out_dir: {out_dir} is not empty (an earlier run?); continue it with train.resume=true, "
                f"replace it with train.overwrite=true, or choose another train.out_dir")
    foreign = foreign_entries(out_dir)
    if foreign is None:
        return (f"train.overwrite: {out_dir} has no {MANIFEST} (the list of files an ltfast run wrote; an older "
                f"ltfast's run or not a run folder), so nothing in it is deleted; delete its contents yourself "
                f"or choose another train.out_dir")
    if foreign:
        return (f"train.overwrite: {out_dir} holds files this run's manifest does not list ({_listing(foreign)}); "
                f"refusing to delete anything: move them away or choose another train.out_dir")
    return None


def prepare_out_dir(cfg: dict, rank: int = 0) -> None:
    """Refuses ``out_dir``, or deletes the earlier run's files in it (rank 0 decides and acts; every
    rank raises the same error)."""
    import torch.distributed as dist
    problem = check_out_dir(cfg) if rank == 0 else None
    out_dir = cfg["train"]["out_dir"]
    if rank == 0 and problem is None and os.path.isdir(out_dir):
        if cfg["train"]["overwrite"] and read_manifest(out_dir) is not None:
            delete_run_outputs(out_dir)
        elif cfg["train"]["resume"] is not False:
            _manifest_for_older_run(out_dir)
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
        record_outputs(cfg["train"]["out_dir"], files=[HISTORY])
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
    record_outputs(cfg["train"]["out_dir"], folders=["tensorboard"])
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
    rank, _, _ = setup_distributed(cfg["train"]["device"])
    parent = cfg["train"]["out_dir"]
    prepare_out_dir(cfg, rank)          # refuse / empty the parent once; the seeds then start clean
    if rank == 0:
        record_outputs(parent, files=["config.yaml", SEEDS_SUMMARY],
                       runs=[f"seed{seed}" for seed in cfg["train"]["seeds"]])
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
