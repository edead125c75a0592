"""SADE's test-time self-supervised aggregation (seed-methods.md §6, last bullet), on shifted test sets.

    python -m ltfast.train.test_time runs/fmnist_lt/sade                       # forward50, uniform, backward50
    python -m ltfast.train.test_time runs/imagenet_lt/sade --distribution all  # the 11 of SADE's table
    python -m ltfast.train.test_time runs/x/best.pt --list ImageNet_LT_forward50.txt --root data/ImageNet

The method (the aggregation, the guard, the strong views, the shifted test sets) is
``ltfast.train.methods.sade_test_time``; this module is its command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from . import engine, metrics
from .errors import CheckpointError, ConfigError
from .methods import sade_test_time
from .methods.sade_test_time import (DEFAULT_DISTRIBUTIONS, DISTRIBUTIONS, GUARD_TOLERANCE, ImageSource, StrongViews,
                                     aggregate_on, collect_expert_logits, implied_test_priors, learn_aggregation,
                                     parse_distribution, prior_consistency, shifted_counts, shifted_test_indices,
                                     subset)
from .models import is_expert_arch
from .runlog import record_output_path

__all__ = ["DEFAULT_DISTRIBUTIONS", "DISTRIBUTIONS", "GUARD_TOLERANCE", "ImageSource", "StrongViews", "aggregate_on",
           "build_parser", "collect_expert_logits", "implied_test_priors", "learn_aggregation", "load_run", "main",
           "parse_distribution", "prior_consistency", "run", "shifted_counts", "shifted_test_indices", "subset"]


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ltfast.train.test_time",
                                     description=__doc__ + "\n" + sade_test_time.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="run folder (best.pt / last.pt + config.yaml) or a checkpoint file")
    parser.add_argument("overrides", nargs="*", help="section.key=value on top of the run's config")
    parser.add_argument("--distribution", default=",".join(DEFAULT_DISTRIBUTIONS),
                        help=f"comma-separated shifted test sets built from the balanced test split, or 'all' "
                             f"({', '.join(DISTRIBUTIONS)}); 'none' with --list: the list as it is")
    parser.add_argument("--list", dest="list_file", help="test list file ('<path> <label>' lines) instead of the "
                                                         "config's test split")
    parser.add_argument("--root", help="image root for --list (default: data.root of the config)")
    parser.add_argument("--config", help="config of the checkpoint (default: config.yaml next to it)")
    parser.add_argument("--epochs", type=int, default=5, help="at most this many epochs (SADE: 5)")
    parser.add_argument("--batch-size", type=int, default=128, help="SADE: 128")
    parser.add_argument("--augment", choices=("auto", "imagenet", "small"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="shifted-set choice, views and batch order")
    parser.add_argument("--out", help="output folder (default RUN_DIR/test_time)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    return parser


def _multi_expert_only(cfg: dict, checkpoint: str) -> None:
    if not is_expert_arch(cfg["model"]["arch"]):
        raise ConfigError(f"model.arch: test-time aggregation needs a multi-expert model, {checkpoint} is a "
                          f"{cfg['model']['arch']}")


def load_run(target: str, config: Optional[str], overrides, device):
    """(model in eval mode on device, cfg, sets, checkpoint path, run folder) of a trained run."""
    loaded = engine.load_run(target, config, overrides, device, "ltfast.train.test_time", check=_multi_expert_only)
    return loaded.model, loaded.cfg, loaded.sets, loaded.checkpoint, loaded.run_dir


def run(args) -> dict:
    from ltfast.data import datasets
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    model, cfg, sets, checkpoint, run_dir = load_run(args.target, args.config, args.overrides, device)
    counts = sets["class_counts"]
    base, base_name = sets["test"], "test"
    if args.list_file:
        root = args.root if args.root is not None else cfg["data"]["root"]
        base, base_name = datasets.read_list_file(args.list_file, root), os.path.basename(args.list_file)
        if base.labels.numel() and int(base.labels.max()) >= len(counts):
            raise ValueError(f"--list {args.list_file}: label {int(base.labels.max())} is outside the model's "
                             f"{len(counts)} classes")
        sets = dict(sets, in_memory=False)
    names = DISTRIBUTIONS if args.distribution == "all" else [d for d in args.distribution.split(",") if d]
    if names == ["none"]:
        names = []
    for name in names:
        parse_distribution(name)  # every name checked before any work
    groups = metrics.shot_groups(counts, cfg["eval"]["many_threshold"], cfg["eval"]["few_threshold"],
                                 cfg["eval"]["shot_split"])
    results = {}
    todo = [(name, subset(base, shifted_test_indices(base.labels, counts, name, args.seed))) for name in names] \
        or [(base_name, base)]
    for name, dataset in todo:
        print(f"{name}: {len(dataset)} images", flush=True)
        results[name] = aggregate_on(model, sets, dataset, cfg["data"], counts, groups, device=device,
                                     batch_size=args.batch_size, augment=args.augment, epochs=args.epochs,
                                     seed=args.seed, sade_tau=cfg["loss"]["sade_tau"])
    summary = {"name": cfg.get("name") or cfg["loss"]["name"], "checkpoint": os.path.abspath(checkpoint),
               "test_set": base_name, "seed": args.seed, "device": str(device), "results": results}
    out_dir = args.out or os.path.join(run_dir, "test_time")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "test_time.json")
    record_output_path(path)  # inside a run folder: listed in its manifest
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    summary["json"] = path
    _print(summary)
    return summary


def _print(summary: dict) -> None:
    print(f"{summary['name']}: SADE test-time aggregation, {summary['checkpoint']}")
    print(f"{'test set':14s} {'images':>7s}  micro before -> after   top-1 before -> after   weights (epochs)   "
          f"selected")
    for name, r in summary["results"].items():
        weights = ", ".join(f"{w:.2f}" for w in r["weights"])
        guard = f"   {r['selected']}" + (" (guard: learnt weights contradict the test prior)"
                                         if r["selected"] == "plain" else "")
        print(f"{name:14s} {r['samples']:7d}  {r['before']['micro']:12.2f} -> {r['after']['micro']:5.2f}   "
              f"{r['before']['top1']:12.2f} -> {r['after']['top1']:5.2f}   {weights} ({r['epochs']}"
              f"{', stopped early' if r['stopped_early'] else ''}){guard}")
    print(f"-> {summary['json']}")


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        run(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as error:
        text = str(error)  # one line, the tool named once
        print(f"ltfast.train.test_time: error: {text[len('ltfast.train.test_time: '):] if text.startswith('ltfast.train.test_time: ') else text}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
