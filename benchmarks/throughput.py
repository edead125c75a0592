"""Throughput of every ltfast part against what a user would use instead, measured in one run.

    python benchmarks/throughput.py [--device cpu|cuda] [--quick] [--json PATH]

Loss suite: each fused op against its plain-PyTorch version in ltfast.reference, run eagerly and
under torch.compile, forward and forward+backward. Prints a table (median and p20/p80 ms, peak
memory on CUDA, speed-up of ltfast over the faster baseline) and, with --json, writes the records
described in DESIGN.md, rewriting the file after every record, so that a run cut short (a
timeout) still leaves the rows measured so far. --budget-s stops starting new rows after that many
seconds. On CUDA it also measures the card's copy bandwidth in the same run and reports, per ltfast
row, the achieved GB/s against three passes over the logits (one read forward; one read and one
write backward) and against benchmarks/traffic_model.py's bytes, with the kernel times of one call
from torch.profiler split into row, column and finish/reduce kernels.

The 1 x 2 rows measure the host overhead of a call and the 64 x 1000 rows a small batch; on the
CPU both run with torch.set_num_threads(1) (threads only add fork/join cost there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ltfast  # noqa: E402
from ltfast import priors, reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (OVERHEAD_SHAPES, Record, SingleThread, device_name, is_overhead_shape,  # noqa: E402
                    keep_freed_memory_in_the_heap, loss_calls, measure_interleaved, out_of_budget, peak_memory_mb,
                    percentile)
import traffic_model  # noqa: E402


# ------------------------------------------------------------------ loss definitions
def balanced_softmax_case(C, device):
    counts = torch.logspace(3.1, 0.7, C).round()  # ImageNet-LT-like profile, 1280 -> 5 images
    log_prior = priors.log_prior(counts).to(device)
    return (lambda x, y: ltfast.balanced_softmax_loss(x, y, log_prior),
            lambda x, y: reference.balanced_softmax(x, y, log_prior))


def ldam_drw_case(C, device):
    counts = torch.logspace(3.1, 0.7, C).round()
    margin = (30 * priors.ldam_margins(counts)).to(device)
    weight = priors.effective_number_weights(counts).to(device)
    return (lambda x, y: ltfast.adjusted_cross_entropy(x, y, target_margin=margin, weight=weight),
            lambda x, y: reference.adjusted_cross_entropy(x, y, target_margin=margin, weight=weight))


def lade_case(C, device):
    counts = torch.logspace(3.1, 0.7, C).round()
    log_prior = priors.log_prior(counts).to(device)
    return (lambda x, y: ltfast.lade_loss(x, y, log_prior),
            lambda x, y: reference.lade(x, y, log_prior))


def seql_case(C, device):
    counts = torch.logspace(3.1, 0.7, C).round()
    tail = priors.tail_classes(counts).to(device)  # the survey's 4.3e-4 frequency threshold
    return (lambda x, y: ltfast.softmax_equalization_loss(x, y, tail, 0.9),
            lambda x, y: reference.softmax_equalization_loss(x, y, tail, 0.9))


def eql_case(C, device):
    counts = torch.logspace(3.1, 0.7, C).round()
    tail = priors.tail_classes(counts).to(device)
    return (lambda x, y: ltfast.equalization_loss(x, y, tail),
            lambda x, y: reference.equalization_loss(x, y, tail))


def mixup_case(C, device):
    """Mixup/CutMix targets: the fused mixed op against the usual two cross-entropies combined by
    lambda (a Python float, as np.random.beta draws it). The target is the pair (y_a, y_b)."""
    import torch.nn.functional as F
    lam = 0.3
    return (lambda x, y: ltfast.mixed_cross_entropy(x, y[0], y[1], lam),
            lambda x, y: lam * F.cross_entropy(x, y[0]) + (1 - lam) * F.cross_entropy(x, y[1]))


def probability_case(C, device):
    """Dense probability targets (distillation, smoothed or mixed one-hots): the fused op against
    F.cross_entropy with a floating [N, C] target (ltfast.reference). The target is a softmax row."""
    return (lambda x, t: ltfast.probability_cross_entropy(x, t),
            lambda x, t: reference.probability_cross_entropy(x, t))


def sade_case(C, device):
    """SADE's three experts (rows of shape [N, 3, C])."""
    counts = torch.logspace(3.1, 0.7, C).round()
    adjustments = priors.sade_adjustments(counts, 2.0, dtype=torch.float32).to(device)
    return (lambda x, y: ltfast.diverse_expert_loss(x, y, adjustments),
            lambda x, y: reference.diverse_expert_loss(x, y, adjustments))


def ride_case(C, device):
    """RIDE after DRW (margins, CB weights, per-class temperature), the survey's config, [N, E, C] rows."""
    counts = torch.logspace(3.1, 0.7, C).round()
    margin = (30 * priors.ldam_margins(counts)).to(device)
    weight = priors.effective_number_weights(counts).to(device)
    temperature = priors.ride_diversity_temperature(counts, 0.02, dtype=torch.float32).to(device)
    return (lambda x, y: ltfast.ride_loss(x, y, margin, weight, temperature),
            lambda x, y: reference.ride_loss(x, y, margin, weight, temperature))


LOSSES = {"balanced_softmax": balanced_softmax_case, "ldam_drw": ldam_drw_case, "lade": lade_case,
          "seql": seql_case, "eql": eql_case, "mixup": mixup_case, "probability": probability_case, "sade": sade_case, "ride": ride_case}
# Losses whose target is a pair of class-index tensors (y_a, y_b).
PAIRED_TARGETS = ("mixup",)
# Losses whose target is a probability row per sample ([N, C], float32).
DENSE_TARGETS = ("probability",)
# Losses on expert logits [N, E, C]: their rows are (N, E, C) and they have no traffic model yet.
EXPERT_LOSSES = ("sade", "ride")
EXPERT_SHAPES = [(256, 3, 1000), (4096, 3, 1000)]
# The op of traffic_model.py behind each benchmark row.
MODEL_OP = {"balanced_softmax": "balanced_softmax", "ldam_drw": "adjusted_cross_entropy", "lade": "lade",
            "seql": "softmax_equalization_loss", "eql": "equalization_loss", "mixup": "adjusted_cross_entropy"}
class RecordSink(list):
    """The records of the run; with a path, the JSON file is rewritten (atomically) after every
    append, so a run killed by a timeout still leaves every row measured before."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def append(self, record) -> None:
        super().append(record)
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump([as_json(r) for r in self], f, indent=1)
            os.replace(tmp, self.path)


def as_json(r: Record) -> dict:
    out = {**{k: v for k, v in asdict(r).items() if k != "extra"}, **r.extra}
    if r.device == "cpu":
        # Which build of ltfast's CPU kernels ran (csrc/common/cpu_dispatch.h) and torch's own pick,
        # which the eager and compiled baselines use (ATEN_CPU_CAPABILITY sets both).
        out["cpu_capability"] = ltfast.cpu_capability()
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


def kernel_profile(call, device: str) -> dict:
    """Kernels of one call (CUDA, torch.profiler): launches and ms per kind (rows, column,
    finish = finish/reduce kernels, other = torch's own fills/copies)."""
    kernels = traffic_model.profile_call(call, device)
    by_kind, launches = {}, {}
    for name, ms in kernels:
        kind = traffic_model.kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        launches[kind] = launches.get(kind, 0) + 1
    ours_ms = sum(ms for kind, ms in by_kind.items() if kind != "other")
    return {"kernel_ms": round(ours_ms, 4), "kernel_ms_by_kind": {k: round(v, 4) for k, v in by_kind.items()},
            "launches": sum(n for kind, n in launches.items() if kind != "other"), "launches_by_kind": launches}


def copy_bandwidth_gb_s(device: str) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = measure_interleaved({"copy": lambda: dst.copy_(src)}, device, min_time_s=0.5, max_reps=50, warmup=3)
    return 2 * src.numel() * 4 / (statistics.median(times["copy"]) * 1e-3) / 1e9


def loss_suite(args) -> list[Record]:
    device = args.device
    if args.quick:
        plan = [("balanced_softmax", (1, 2), torch.float32), ("balanced_softmax", (64, 1000), torch.float32),
                ("balanced_softmax", (256, 1000), torch.float32), ("balanced_softmax", (4096, 1000), torch.float32),
                ("lade", (4096, 1000), torch.float32)]
    elif device == "cuda":
        # Most valuable first, so that --budget-s cuts the least useful rows: the headline
        # ImageNet-LT-sized bf16 rows of every op, then the host overhead (1 x 2) and a small batch
        # (64 x 1000), then the mid-sized fp32 rows. Each row costs a torch.compile of the
        # reference (~10 s) unless --baselines leaves it out.
        plan = [(name, (65536, 8142), torch.bfloat16) for name in LOSSES]
        plan += [(name, shape, torch.float32) for shape in OVERHEAD_SHAPES for name in ("balanced_softmax", "lade")]
        plan += [(name, (4096, 1000), torch.float32) for name in LOSSES]
        plan += [("balanced_softmax", (1024, 8142), torch.float32), ("balanced_softmax", (4096, 1000), torch.bfloat16)]
        plan += [(name, shape, torch.float32) for name in EXPERT_LOSSES for shape in EXPERT_SHAPES]
    else:
        shapes = OVERHEAD_SHAPES + [(256, 1000), (4096, 1000), (1024, 8142)]
        plan = [(name, shape, torch.float32) for name in LOSSES
                if name not in ("mixup", "probability") and name not in EXPERT_LOSSES for shape in shapes]
        plan += [("mixup", (4096, 1000), torch.float32), ("probability", (4096, 1000), torch.float32)]
        plan += [(name, shape, torch.float32) for name in EXPERT_LOSSES for shape in EXPERT_SHAPES]
    if args.losses:
        plan = [row for row in plan if row[0] in args.losses]
    if args.shapes:
        plan = [row for row in plan if "x".join(map(str, row[1])) in args.shapes]
    copy_bw = copy_bandwidth_gb_s(device) if device == "cuda" else None
    records = args.sink if getattr(args, "sink", None) is not None else []
    baselines = getattr(args, "baselines", None) or ["eager", "compile"]
    gen = torch.Generator().manual_seed(0)
    for row, (name, shape, dtype) in enumerate(plan):
        N, C = shape[0], shape[-1]
        if out_of_budget(args):
            print(f"loss suite: --budget-s reached, {len(plan) - row} rows not measured", flush=True)
            break
        fused, ref = LOSSES[name](C, device)
        logits = (torch.randn(*shape, generator=gen) * 2).to(device=device, dtype=dtype)
        target = torch.randint(0, C, (N,), generator=gen).to(device)
        if name in PAIRED_TARGETS:
            target = (target, torch.randint(0, C, (N,), generator=gen).to(device))
        if name in DENSE_TARGETS:
            target = torch.softmax(torch.randn(N, C, generator=gen) * 2, 1).to(device)
        impls = {"ltfast": fused, "eager": ref}
        if "compile" in baselines:
            impls["compile"] = torch.compile(ref, dynamic=False)
        single = device == "cpu" and is_overhead_shape(tuple(shape))
        model = (traffic_model.model(MODEL_OP[name], N, C, str(dtype).replace("torch.", ""))
                 if name in MODEL_OP else None)
        for mode in ("fwd", "fwd_bwd"):
            x = logits.detach().clone().requires_grad_(mode == "fwd_bwd")
            calls = loss_calls(impls, x, lambda fn, x, target=target: fn(x, target), mode)
            with SingleThread(single):
                # warm-up 3: torch.compile compiles on the first calls
                times = measure_interleaved(calls, device, args.min_time, args.max_reps, warmup=3)
            medians = {impl: statistics.median(t) for impl, t in times.items()}
            best_baseline = min(medians[b] for b in medians if b != "ltfast")
            for impl, t in times.items():
                median = medians[impl]
                extra = {"threads": 1} if single else {}
                if device == "cuda":
                    passes = 1 if mode == "fwd" else 3  # logits read fwd; read + grad write bwd
                    achieved = passes * logits.numel() * logits.element_size() / (median * 1e-3) / 1e9
                    extra.update({"achieved_gb_s": round(achieved, 1), "copy_gb_s": round(copy_bw, 1),
                                  "fraction_of_copy_bw": round(achieved / copy_bw, 3)})
                if impl == "ltfast":
                    extra["speedup_vs_best_baseline"] = round(best_baseline / median, 2)
                    for b in medians:
                        if b != "ltfast":
                            extra[f"speedup_vs_{b}"] = round(medians[b] / median, 2)
                    phases = [] if model is None else model if mode == "fwd_bwd" else model[:1]
                    model_bytes = sum(p.total_bytes for p in phases)
                    if phases:
                        extra.update({"model_bytes": model_bytes, "model_launches": sum(p.launches for p in phases),
                                      "model_gb_s": round(model_bytes / (median * 1e-3) / 1e9, 1)})
                    if device == "cuda" and phases:
                        extra["model_fraction_of_copy_bw"] = round(extra["model_gb_s"] / copy_bw, 3)
                    if device == "cuda":
                        prof = kernel_profile(calls[impl], device)
                        extra.update(prof)
                        if phases and prof["kernel_ms"] > 0:
                            extra["kernel_model_gb_s"] = round(model_bytes / (prof["kernel_ms"] * 1e-3) / 1e9, 1)
                peak = peak_memory_mb(calls[impl], device)
                records.append(Record("loss", name, impl, device, device_name(device), str(dtype).replace("torch.", ""),
                                      list(shape), mode, round(median, 4), round(percentile(t, 0.2), 4),
                                      round(percentile(t, 0.8), 4), None if peak is None else round(peak, 2),
                                      round(N / (median * 1e-3), 1), extra))
        del logits, target, impls, calls, x
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


def print_table(records: list[Record]) -> None:
    header = f"{'suite':5} {'name':17} {'shape':>12} {'dtype':9} {'mode':8} {'impl':8} {'median ms':>10} {'p20':>9} {'p80':>9} {'peak MiB':>9} {'speed-up':>9} {'GB/s':>7}"
    print(header)
    print("-" * len(header))
    for r in records:
        peak = "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"
        speedup = r.extra.get("speedup_vs_best_baseline")
        gbs = r.extra.get("achieved_gb_s")
        print(f"{r.suite:5} {r.name:17} {'x'.join(map(str, r.shape)):>12} {r.dtype:9} {r.mode:8} {r.impl:8} "
              f"{r.median_ms:10.3f} {r.p20_ms:9.3f} {r.p80_ms:9.3f} {peak:>9} "
              f"{(f'{speedup:.2f}x' if speedup else ''):>9} {(f'{gbs:.0f}' if gbs else ''):>7}")
    copy = next((r.extra["copy_gb_s"] for r in records if "copy_gb_s" in r.extra), None)
    if copy:
        print(f"copy bandwidth measured in this run: {copy:.0f} GB/s")
    print("speed-up = min(eager, compile) median / ltfast median, same run")


def _data_suite():
    from data_suite import data_suite
    return data_suite


def _compat_suite():
    from compat_suite import compat_suite
    return compat_suite


# Each entry returns the suite's function (args) -> list[Record]; imported lazily so that one
# suite's dependencies (DALI for data) are only needed when it runs.
SUITES = {"loss": lambda: loss_suite, "data": _data_suite, "compat": _compat_suite}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="balanced_softmax at 1x2, 64x1000, 256x1000, 4096x1000 and lade at one shape "
                             "(< 1 min on 2 cores)")
    parser.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES),
                        help="which suites to run (default: all)")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), help="only these losses")
    parser.add_argument("--shapes", nargs="+", metavar="NxC", help="only these loss shapes, e.g. 1x2 64x1000")
    parser.add_argument("--baselines", nargs="+", choices=["eager", "compile"], default=["eager", "compile"],
                        help="loss-suite baselines (leaving out compile saves ~10 s of compilation per row)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new row after this many seconds (rows already written stay)")
    parser.add_argument("--json", metavar="PATH", help="write the records to PATH")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per row")
    parser.add_argument("--max-reps", type=int, default=200)
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="keep glibc's default trimming (see keep_freed_memory_in_the_heap)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.glibc_default_malloc and not keep_freed_memory_in_the_heap():
        print("note: could not raise glibc's trim threshold; large allocations may page-fault every call")
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 1.0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if not ltfast._extension.AVAILABLE:
        parser.error(f"ltfast._C is not available ({ltfast._extension.LOAD_ERROR}): build it first")
    if args.device == "cuda" and not ltfast.has_cuda_kernels():
        parser.error("ltfast._C was built without CUDA kernels")
    args.deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    if args.device == "cpu":
        print(f"CPU: {device_name('cpu')}; ltfast CPU kernels: {ltfast.cpu_capability()}; "
              f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()} "
              f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})")
    records = args.sink = RecordSink(args.json)
    for suite in args.suites:
        if out_of_budget(args):
            print(f"--budget-s reached: suite {suite} not run")
            continue
        for r in SUITES[suite]()(args):
            if not any(r is s for s in records):  # suites that do not write into args.sink
                records.append(r)
    print_table(records)
    if args.json:
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
