"""CIFAR-10-LT through the CIFAR configs on a CIFAR-format folder built here from real images, a few
seeds per method, compared by ``python -m ltfast.report`` (CPU, nothing downloaded).

    python benchmarks/cifar_lt.py                      # 3 seeds, the default methods and budget
    python benchmarks/cifar_lt.py --seeds 1 --epochs 4 --per-class 100    # a quick look

Data: ``scripts/make_cifar_format_fmnist.py`` writes Fashion-MNIST as ``cifar-10-batches-py/``
(28x28 grey padded to 32x32x3; the first ``--per-class`` training images and the first
``--test-per-class`` test images of each class), so n_max = ``--per-class`` and imbalance 100 keeps
n_max, ..., n_max / 100 images per class with LDAM-DRW's generator (``ltfast.data.cifar``). The
default 500 / 200 keeps all three shot groups populated (500 ... 5 images: many / medium / few =
4 / 3 / 3 classes; at CIFAR-10's 5000 no class is few-shot) and a run within a few minutes on 2 cores.

Each run is ``python -m ltfast.train --config cifar10_lt/<method>`` with the recipe scaled to
``--epochs`` (the milestones 160 / 180 of 200 and LDAM-DRW's / RIDE's re-weighting epoch 160 at the
same fractions, warm-up 5 / 200 of the epochs, at least 1) and ``eval.every`` = ``--eval-every``; cRT
is stage 2 from CE's run of the same seed with its own 10-epoch recipe unchanged. The table and the
per-class figure are ``python -m ltfast.report``'s over the run folders (seeds grouped: mean ±
sample standard deviation).

As in LDAM-DRW / BBN / LADE / SADE, validation is the balanced test set, so "best epoch" is the best
test epoch, which is what those papers report; the numbers say nothing about CIFAR itself.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["ce", "balanced_softmax", "lade", "ldam_drw", "crt", "ride", "sade"]
STAGE1_OF = {"crt": "ce"}
DRW_METHODS = {"ldam_drw", "ride"}  # loss.drw_epoch scales with the budget


def scaled_recipe(method: str, epochs: int, eval_every: int) -> list[str]:
    """The overrides that put _base.yaml's 200-epoch recipe on an ``epochs`` budget."""
    if method in STAGE1_OF:  # the stage-2 recipe is its own (10 epochs), run as configured
        return [f"eval.every={eval_every}"]
    second = min(round(epochs * 180 / 200), epochs - 1)  # a milestone must fall inside the run
    milestones = [min(round(epochs * 160 / 200), second - 1), second]
    overrides = [f"optim.epochs={epochs}", f"optim.milestones=[{milestones[0]}, {milestones[1]}]",
                 f"optim.warmup_epochs={max(1, round(epochs * 5 / 200))}", f"eval.every={eval_every}"]
    if method in DRW_METHODS:
        overrides.append(f"loss.drw_epoch={milestones[0]}")
    return overrides


def train(method: str, seed: int, data_root: str, out_root: str, epochs: int, eval_every: int,
          threads: int) -> str:
    out_dir = os.path.join(out_root, f"{method}-seed{seed}")
    command = [sys.executable, "-m", "ltfast.train", "--config", f"cifar10_lt/{method}",
               f"data.root={data_root}", f"train.seed={seed}", f"train.out_dir={out_dir}",
               "train.overwrite=true", "train.progress=false", f"train.threads={threads}",
               *scaled_recipe(method, epochs, eval_every)]
    if method in STAGE1_OF:
        command.append(f"model.init_from={os.path.join(out_root, f'{STAGE1_OF[method]}-seed{seed}', 'best.pt')}")
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"  {method} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated configs/cifar10_lt names")
    parser.add_argument("--epochs", type=int, default=20, help="stage-1 epochs (the recipe's 200, scaled)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate the 10k test set every N epochs")
    parser.add_argument("--per-class", type=int, default=500, help="n_max: training images per class written")
    parser.add_argument("--test-per-class", type=int, default=200,
                        help="balanced test set: the first N test images of each class (1000: all 10,000)")
    parser.add_argument("--data-root", default=None,
                        help="CIFAR-format folder (built when absent; default data/cifar-fmnist-<per-class>-<test-per-class>)")
    parser.add_argument("--out-root", default=os.path.join(ROOT, "runs", "cifar10_lt-fmnist"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="train.threads of each run")
    parser.add_argument("--markdown", default=os.path.join(ROOT, "benchmarks", "results", "cifar10_lt-fmnist.md"))
    parser.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "cifar10_lt-fmnist.csv"))
    parser.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "results", "cifar10_lt-fmnist.png"))
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if not os.path.exists(os.path.join(ROOT, "configs", "cifar10_lt", f"{m}.yaml"))]
    if unknown:
        parser.error(f"--methods: no configs/cifar10_lt/{unknown[0]}.yaml")
    missing = [m for m in methods if m in STAGE1_OF and STAGE1_OF[m] not in methods]
    if missing:
        parser.error(f"--methods: {missing[0]} is stage 2 of {STAGE1_OF[missing[0]]}, which must be listed too")
    if args.seeds < 1 or args.eval_every < 1:
        parser.error("--seeds and --eval-every must be >= 1")
    if args.epochs < 3:
        parser.error("--epochs must be >= 3 (the two lr milestones fall inside the run)")

    if args.data_root is None:
        args.data_root = os.path.join(ROOT, "data", f"cifar-fmnist-{args.per_class}-{args.test_per_class}")
    if not os.path.exists(os.path.join(args.data_root, "cifar-10-batches-py", "test_batch")):
        # Written beside the target and renamed into place, so that two invocations started together
        # (e.g. one per group of methods) never read a half-written pickle.
        staging = f"{args.data_root}.tmp-{os.getpid()}"
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_cifar_format_fmnist.py"), staging,
                        "--per-class", str(args.per_class), "--test-per-class", str(args.test_per_class)],
                       check=True, cwd=ROOT)
        try:
            os.rename(staging, args.data_root)
        except OSError:  # another invocation renamed its identical copy first
            shutil.rmtree(staging)
    ordered = [m for m in methods if m in STAGE1_OF.values()] + [m for m in methods if m not in STAGE1_OF.values()]
    run_dirs = [train(method, seed, args.data_root, args.out_root, args.epochs, args.eval_every, args.threads)
                for seed in range(args.seeds) for method in ordered]
    for path in (args.markdown, args.csv, args.png):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return subprocess.call([sys.executable, "-m", "ltfast.report", *run_dirs, "--markdown", args.markdown,
                            "--csv", args.csv, "--png", args.png], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
