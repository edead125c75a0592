"""python -m ltfast.train --config configs/fmnist_lt/ce.yaml [section.key=value ...]

Single process:  python -m ltfast.train --config configs/fmnist_lt/lade.yaml
DDP (4 GPUs):    torchrun --nproc_per_node=4 -m ltfast.train --config configs/imagenet_lt/lade.yaml
Multi-node:      torchrun --nnodes=2 --nproc_per_node=4 --rdzv-endpoint=HOST:29500 -m ltfast.train ...
Resume:          the same command plus train.resume=true (or train.resume=auto for preemptible jobs)
"""
import argparse
import sys

import torch.distributed as dist

from .config import ConfigError, dump, load_config
from .errors import CheckpointError
from .trainer import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltfast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/<set>/<method>.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, parsed as YAML (optim.lr=0.05)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        parser.exit(2, f"config error: {error}\n")
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    try:
        train(cfg)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as error:  # named causes: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(args, cfg), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # train() ends with a barrier on success
    return 0


def _interrupted_message(args, cfg) -> str:
    """Ctrl-C: one line with the command that resumes from the last completed epoch."""
    import os
    import shlex
    last = os.path.join(cfg["train"]["out_dir"], "last.pt")
    if not os.path.exists(last):
        return "interrupted before the first checkpoint; nothing to resume"
    command = ["python", "-m", "ltfast.train"] + (["--config", args.config] if args.config else [])
    command += [o for o in args.overrides if not o.startswith("train.resume=")] + ["train.resume=true"]
    return f"interrupted; resume from {last} with: {shlex.join(command)}"


if __name__ == "__main__":
    sys.exit(main())
