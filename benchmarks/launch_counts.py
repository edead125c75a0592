"""Counts what one loss call costs in launches: CUDA kernels per forward and per backward (from the
profiler), ltfast against ltfast.reference in eager mode. On CPU it counts the aten operators run.

    python benchmarks/launch_counts.py [--device cuda|cpu] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from throughput import LOSSES  # noqa: E402


def count(fn, x, y, device):
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    loss = fn(x, y)  # warm-up (allocator, first-call costs)
    loss.backward()
    x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    counts = {}
    for phase in ("fwd", "bwd"):
        with profile(activities=activities) as prof:
            if phase == "fwd":
                loss = fn(x, y)
            else:
                loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
        events = prof.events()
        if device == "cuda":
            names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        else:
            names = [e.name for e in events if e.name.startswith(("aten::", "ltfast::"))]
        counts[phase] = {"count": len(names), "names": sorted(set(names))}
    x.grad = None
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    records = []
    N, C = 4096, 1000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=gen).to(args.device).requires_grad_()
    y = torch.randint(0, C, (N,), generator=gen).to(args.device)
    what = "CUDA kernels" if args.device == "cuda" else "aten/ltfast ops"
    print(f"{'loss':17} {'impl':7} {'fwd':>4} {'bwd':>4}   ({what} per call, [{N}, {C}] fp32, {args.device})")
    for name, make in LOSSES.items():
        fused, ref = make(C, args.device)
        for impl, fn in (("ltfast", fused), ("eager", ref)):
            c = count(fn, x, y, args.device)
            print(f"{name:17} {impl:7} {c['fwd']['count']:>4} {c['bwd']['count']:>4}")
            records.append({"name": name, "impl": impl, "device": args.device, "what": what,
                            "fwd": c["fwd"]["count"], "bwd": c["bwd"]["count"],
                            "fwd_names": c["fwd"]["names"], "bwd_names": c["bwd"]["names"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
