"""Global-memory traffic of every ltfast CUDA kernel, counted by the SIMT emulator (no GPU needed).

Every global-memory access of the kernels (csrc/ops/*/*_kernels.cuh) goes through gpu::load /
gpu::store and their vector forms (csrc/common/gpu_kernel.h); in the emulator build they record
(kernel, source site, warp, lane, address, bytes). This script runs each op's forward and backward
under the emulator at small shapes with realistic C and writes one record per kernel and pass:

    {"op", "kernel", "shape", "dtype", "pass": "fwd" | "bwd", "fused", "launches", "bytes_read",
     "bytes_written", "bytes_model", "sector_efficiency", "max_access_bytes", ...}

- fused: the cross-entropy family's training step with the forward-time gradient (the forward writes
  the gradient; the backward only reads the upstream gradient), else forward and backward kernels.

- bytes_read / bytes_written: the distinct bytes the kernel's launches touch (each byte once: an
  ideal cache, which is what DRAM traffic is at best), summed over its launches in the call;
  sector_bytes_read / _written: the same in whole 32-byte sectors (a kernel that skips elements still
  moves their sectors).
- bytes_model: benchmarks/traffic_model.py's bytes for the same kernel and call (read + written).
- sector_efficiency: on the [N, C] streams (sites that read the logits or write the gradient),
  requested bytes / (32 x distinct 32-byte sectors), where a request is the k-th execution of a
  site by the lanes of one warp (what Nsight Compute counts as sectors per request); null for
  kernels without an [N, C] stream. sector_efficiency_all: the same over every site.
- max_access_bytes: the widest single access on the [N, C] streams (16 = LDG/STG.128).

    python benchmarks/memory_model.py --simt [--json PATH] [--quick] [--ops balanced_softmax ...]

The emulator library is built by tests/simt_support.py (python tests/simt_support.py --build).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import traffic_model  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class Site:
    kernel: str
    site: str
    write: bool
    requests: int
    bytes: int
    sectors: int
    widest: int
    lowest: int
    end: int

    @property
    def efficiency(self) -> float:
        return self.bytes / (32 * self.sectors) if self.sectors else 1.0


@dataclass
class Launch:
    kernel: str
    bytes_read: int
    bytes_written: int
    sector_bytes_read: int      # the distinct 32-byte sectors touched, x 32
    sector_bytes_written: int
    sites: list = field(default_factory=list)


def parse_trace(text: str) -> list[Launch]:
    launches: dict[int, Launch] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if parts[0] == "L":
            launches[int(parts[1])] = Launch(parts[2], *map(int, parts[3:7]))
        elif parts[0] == "S":
            launches[int(parts[1])].sites.append(Site(parts[2], parts[3], parts[4] == "w", *map(int, parts[5:11])))
    return [launches[k] for k in sorted(launches)]


def traced(fn):
    """(result of fn(), launches it made) with the emulator's memory trace on."""
    torch.ops.ltfast_simt.memory_trace_start()
    try:
        result = fn()
    finally:
        text = torch.ops.ltfast_simt.memory_trace_stop()
    return result, parse_trace(text)


# ------------------------------------------------------------------------------ the calls
@dataclass
class Case:
    op: str
    shape: tuple           # (N, C) or (N, E, C)
    dtype: str
    options: dict = field(default_factory=dict)  # what the call passes (for the model)
    # The cross-entropy family's training step with the forward-time gradient: the forward op with
    # with_grad=True, then _scale_forward_grad_ for an upstream gradient of 1 (what autograd runs on
    # a GPU); else the forward without it and the backward kernel.
    fused: bool = False

    @property
    def label(self) -> str:
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.dtype}{' fused' if self.fused else ''}"


def cases(quick: bool = False) -> list[Case]:
    """The issue's shapes: 64 x 8142 and 256 x 1000 bf16 for every loss, 32 x 100k fp32 for the
    headline op, the multi-expert ops at 3 experts. --quick: smaller N, the same C (tests)."""
    big = [(64, 8142), (256, 1000)] if not quick else [(8, 8142), (32, 1000)]
    ops = ("balanced_softmax", "adjusted_cross_entropy", "softmax_equalization_loss", "equalization_loss", "lade",
           "lade_regularizer", "mixed_cross_entropy", "probability_cross_entropy")
    out = [Case(op, shape, "bfloat16") for op in ops for shape in big]
    out.append(Case("balanced_softmax", (32, 100_000) if not quick else (2, 100_000), "float32"))
    # Rows of <= 32 classes, tiled (cross-entropy family, EQL, soft targets): 1 row per 8-lane group
    # and tile at C = 20, 3 at CIFAR-10's C = 10.
    out.append(Case("balanced_softmax", (256, 20) if not quick else (32, 20), "bfloat16"))
    out.append(Case("balanced_softmax", (1024, 10) if not quick else (200, 10), "bfloat16"))
    out.append(Case("balanced_softmax", (1024, 10) if not quick else (200, 10), "bfloat16", fused=True))
    out += [Case(op, (1024, 10) if not quick else (200, 10), "bfloat16")
            for op in ("equalization_loss", "mixed_cross_entropy", "probability_cross_entropy")]
    experts = [(128, 3, 1000)] if not quick else [(16, 3, 1000)]
    out += [Case(op, shape, "bfloat16") for op in ("diverse_expert_loss", "ride_loss") for shape in experts]
    out += [Case(op, shape, "bfloat16", fused=True) for op in traffic_model.CE_FAMILY for shape in big]
    # PaCo on ImageNet-LT: (B, M = 2B + queue, C), the original's 8192-key queue; --quick: 1000 keys.
    out.append(Case("paco_loss", (64, 2 * 64 + 8192, 1000) if not quick else (8, 2 * 8 + 1000, 1000), "bfloat16"))
    return out


def make_call(case: Case, generator: torch.Generator, device: str = "cpu"):
    """(logits leaf, fn(logits) -> loss) with the benchmark's arguments (traffic_model._op_call);
    the tensors are drawn on the CPU, then moved to `device` (benchmarks/ncu_sectors.py: cuda)."""
    from ltfast import priors
    dtype = DTYPES[case.dtype]
    C = case.shape[-1]
    N = case.shape[0]
    if case.op == "paco_loss":
        return _paco_call(case, generator, device, dtype)
    logits = (torch.randn(*case.shape, generator=generator) * 2).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, C, (N,), generator=generator).to(device)
    counts = torch.logspace(3.1, 0.7, C).round()
    log_prior = priors.log_prior(counts).to(device)
    with warnings.catch_warnings():  # at C = 20 the default threshold marks no class as tail: said once here
        warnings.simplefilter("ignore")
        tail = priors.tail_classes(counts).to(device)
    margin = (30 * priors.ldam_margins(counts)).to(device)
    weight = priors.effective_number_weights(counts).to(device)
    seed = torch.tensor([1, 2], dtype=torch.int64, device=device)
    ops = torch.ops.ltfast
    op = case.op
    if case.fused:
        forward = {
            "balanced_softmax": lambda x: ops._balanced_softmax_forward(x, target, log_prior, "mean", -100, True),
            "adjusted_cross_entropy": lambda x: ops._adjusted_cross_entropy_forward(
                x, target, None, margin, weight, 0.0, 0.0, "mean", -100, True),
            "softmax_equalization_loss": lambda x: ops._softmax_equalization_loss_forward(
                x, target, tail, seed, 0.9, "mean", -100, True),
        }[op]
        return logits.detach(), forward
    if op == "balanced_softmax":
        return logits, lambda x: ops.balanced_softmax(x, target, log_prior)
    if op == "adjusted_cross_entropy":  # LDAM-DRW: margins and class weights
        return logits, lambda x: ops.adjusted_cross_entropy(x, target, None, margin, weight)
    if op == "softmax_equalization_loss":
        return logits, lambda x: ops.softmax_equalization_loss(x, target, tail, seed, 0.9)
    if op == "equalization_loss":
        return logits, lambda x: ops.equalization_loss(x, target, tail)
    if op == "lade":
        return logits, lambda x: ops.lade(x, target, log_prior)
    if op == "lade_regularizer":
        return logits, lambda x: ops.lade_regularizer(x, target, log_prior)
    if op == "mixed_cross_entropy":  # mixup / cutmix: two targets, one mixing weight
        target_b = torch.randint(0, C, (N,), generator=generator).to(device)
        return logits, lambda x: ops.mixed_cross_entropy(x, target, target_b, None, 0.7)
    if op == "probability_cross_entropy":  # soft targets with the balanced-softmax prior
        probabilities = torch.softmax(torch.randn(N, C, generator=generator), dim=1).to(device=device, dtype=dtype)
        return logits, lambda x: ops.probability_cross_entropy(x, probabilities, log_prior)
    if op == "diverse_expert_loss":  # SADE: three experts, their own adjustments
        E = case.shape[1]
        adjustments = torch.stack([log_prior * k for k in (-1.0, 0.0, 1.0)][:E])
        return logits, lambda x: ops.diverse_expert_loss(x, target, adjustments)
    if op == "ride_loss":
        return logits, lambda x: ops.ride_loss(x, target, margin, weight)
    raise ValueError(f"memory_model: unknown op {op!r}")


def _paco_call(case: Case, generator: torch.Generator, device: str, dtype: torch.dtype):
    """paco_loss at shape (B, M, C): the leaf returned is the similarity [B, M]; sup_logits [B, C] is
    a leaf too (fn.other_leaves: its rows are a stream as well). Keys: the anchors twice (q and k)
    and a queue of M - 2B keys, labels in [0, C) (every row counted); the log prior of the other ops."""
    from ltfast import priors
    B, M, C = case.shape
    similarity = (torch.randn(B, M, generator=generator) * 2).to(device=device, dtype=dtype).requires_grad_()
    sup_logits = (torch.randn(B, C, generator=generator) * 2).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=generator)
    key_labels = torch.cat([labels, labels, torch.randint(0, C, (M - 2 * B,), generator=generator)]).to(device)
    labels = labels.to(device)
    log_prior = priors.log_prior(torch.logspace(3.1, 0.7, C).round()).to(device)

    def paco(x):
        return torch.ops.ltfast.paco_loss(x, labels, key_labels, sup_logits, log_prior, 0.2, 0.05, 1.0, 1.0, 1.0)

    paco.other_leaves = (sup_logits,)
    return similarity, paco


def stream_sites(launch: Launch, ranges: list[tuple[int, int]]) -> list[Site]:
    """The sites of a launch whose accesses all fall in one [N, C] tensor (address ranges given; a
    site that also reads elsewhere, e.g. a finishing sum over two partials buffers, is not a stream)."""
    return [s for s in launch.sites if any(begin <= s.lowest and s.end <= end for begin, end in ranges)]


def measure(case: Case, seed: int = 0) -> list[dict]:
    """One record per kernel and pass of one call of the case."""
    import simt_support
    gen = torch.Generator().manual_seed(seed)
    logits, fn = make_call(case, gen)
    with simt_support.emulate_cuda_kernels():
        if case.fused:  # (loss, row_stats, denominator, gradient), then the GPU autograd's backward
            outputs, fwd = traced(lambda: fn(logits))
            gradient = outputs[3]
            _, bwd = traced(lambda: torch.ops.ltfast._scale_forward_grad_(gradient, torch.ones(())))
        else:
            ltfast_switch = _forward_gradient(False)  # the separate backward kernel (fused: the cases above)
            try:
                loss, fwd = traced(lambda: fn(logits))
                _, bwd = traced(lambda: loss.backward())
            finally:
                _forward_gradient(ltfast_switch)
    # The emulator runs the kernels on CPU tensors, where the autograd of some ops (the multi-expert
    # losses: csrc/autograd/multi_expert_autograd.cpp) asks the forward for the gradient too, and the
    # emulated CUDA glue then runs the backward kernel inside the forward call. On a GPU that kernel
    # runs in the backward: it is counted there.
    moved = [launch for launch in fwd if "backward" in launch.kernel]
    fwd = [launch for launch in fwd if launch not in moved]
    bwd = moved + bwd
    # The [N, C] streams: the logits leaf and any other input the op streams by rows (paco_loss's
    # sup_logits), then (backward) their gradients.
    leaves = [logits, *getattr(fn, "other_leaves", ())]
    inputs = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in leaves]
    grad_tensors = [gradient] if case.fused else [t.grad for t in leaves if t.grad is not None]
    grads = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in grad_tensors]
    streams = inputs + grads
    if case.fused:  # the forward writes the gradient: a stream of the forward
        inputs = streams
    model = traffic_model.kernel_model(case.op, case.shape, case.dtype, fused=case.fused)
    records = []
    for phase, launches in (("fwd", fwd), ("bwd", bwd)):
        by_kernel: dict[str, list[Launch]] = {}
        for launch in launches:
            by_kernel.setdefault(launch.kernel, []).append(launch)
        for kernel, group in by_kernel.items():
            sites = [s for launch in group for s in launch.sites]
            # The forward's sites are matched with the inputs only: the gradients, allocated later,
            # may reuse memory the forward's temporaries had.
            stream = [s for launch in group for s in stream_sites(launch, streams if phase == "bwd" else inputs)]
            expected = model.get(phase, {}).get(kernel)
            records.append({
                "op": case.op, "kernel": kernel, "shape": list(case.shape), "dtype": case.dtype, "pass": phase,
                "fused": case.fused,
                "launches": len(group),
                "launches_model": None if expected is None else expected.launches,
                "bytes_read": sum(launch.bytes_read for launch in group),
                "bytes_written": sum(launch.bytes_written for launch in group),
                "sector_bytes_read": sum(launch.sector_bytes_read for launch in group),
                "sector_bytes_written": sum(launch.sector_bytes_written for launch in group),
                "bytes_model": None if expected is None else expected.read_bytes + expected.write_bytes,
                "bytes_read_model": None if expected is None else expected.read_bytes,
                "bytes_written_model": None if expected is None else expected.write_bytes,
                "sector_efficiency": _efficiency(stream),
                "max_access_bytes": max((s.widest for s in stream), default=None),
                "sector_efficiency_all": _efficiency(sites),
                # every load / every store of the kernel: what ncu's
                # smsp__sass_average_data_bytes_per_sector_mem_global_op_{ld,st} measure on a GPU
                "sector_efficiency_loads": _efficiency([s for s in sites if not s.write]),
                "sector_efficiency_stores": _efficiency([s for s in sites if s.write]),
                "requests": sum(s.requests for s in sites),
                "sites": [{"site": s.site, "access": "w" if s.write else "r", "requests": s.requests,
                           "bytes": s.bytes, "sectors": s.sectors, "efficiency": round(s.efficiency, 4),
                           "width": s.widest, "nc_stream": s in stream} for s in sites],
            })
        # Kernels the model names that did not run.
        for kernel, expected in model.get(phase, {}).items():
            if kernel not in by_kernel:
                records.append({"op": case.op, "kernel": kernel, "shape": list(case.shape), "dtype": case.dtype,
                                "pass": phase, "fused": case.fused, "launches": 0, "launches_model": expected.launches,
                                "bytes_read": 0, "bytes_written": 0,
                                "bytes_model": expected.read_bytes + expected.write_bytes,
                                "bytes_read_model": expected.read_bytes, "bytes_written_model": expected.write_bytes,
                                "sector_efficiency": None, "max_access_bytes": None, "sector_efficiency_all": None,
                                "requests": 0, "sites": []})
    return records


def _forward_gradient(enabled: bool) -> bool:
    """ltfast.set_forward_gradient, returning the previous setting."""
    import ltfast
    return ltfast.set_forward_gradient(enabled)


def _efficiency(sites) -> float | None:
    sectors = sum(s.sectors for s in sites)
    return round(sum(s.bytes for s in sites) / (32 * sectors), 4) if sectors else None


def print_records(records: list[dict]) -> None:
    print(f"{'op':26} {'shape':15} {'dtype':8} {'pass':4} {'kernel':40} {'n':>2} {'read KB':>9} {'write KB':>9} "
          f"{'model KB':>9} {'diff %':>7} {'eff NxC':>7} {'eff all':>7} {'width':>5}")
    for r in records:
        counted = r["bytes_read"] + r["bytes_written"]
        diff = "" if not r["bytes_model"] else f"{100 * (counted - r['bytes_model']) / r['bytes_model']:7.2f}"
        eff = "-" if r["sector_efficiency"] is None else f"{r['sector_efficiency']:.3f}"
        eff_all = "-" if r["sector_efficiency_all"] is None else f"{r['sector_efficiency_all']:.3f}"
        model = "-" if r["bytes_model"] is None else f"{r['bytes_model'] / 1e3:9.1f}"
        op = r["op"] + (" fused" if r.get("fused") else "")
        print(f"{op:26} {'x'.join(map(str, r['shape'])):15} {r['dtype']:8} {r['pass']:4} {r['kernel']:40} "
              f"{r['launches']:>2} {r['bytes_read'] / 1e3:9.1f} {r['bytes_written'] / 1e3:9.1f} {model:>9} {diff:>7} "
              f"{eff:>7} {eff_all:>7} {r['max_access_bytes'] or '-':>5}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simt", action="store_true", required=True,
                        help="count with the SIMT emulator (the only counter; a GPU's is ncu, scripts/gpu_check.sh)")
    parser.add_argument("--json", metavar="PATH", help="write the records, one JSON line each")
    parser.add_argument("--quick", action="store_true", help="smaller N (the same C): what the tests run")
    parser.add_argument("--ops", nargs="*", help="only these ops")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    records = []
    for case in cases(args.quick):
        if args.ops and case.op not in args.ops:
            continue
        records += measure(case)
    print_records(records)
    worst = [r for r in records if r["bytes_model"] and
             abs(r["bytes_read"] + r["bytes_written"] - r["bytes_model"]) > 0.02 * r["bytes_model"]]
    print(f"({time.perf_counter() - t0:.1f} s, emulator; {len(records)} kernel records; "
          f"{len(worst)} differ from the model by more than 2 %)")
    if args.json:
        with open(args.json, "w") as out:
            for r in records:
                out.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
