"""Launch-count and bytes-moved model of every ltfast op, forward and backward, as a function of
N, C and the logits dtype, for the launch plan of the CUDA kernels (csrc/ops/*/*_kernels.cuh):

    cross-entropy family (balanced_softmax, adjusted_cross_entropy, softmax_equalization_loss):
        forward 1 kernel (for 'mean'/'sum' the row kernel's last block, by a ticket, sums the
        per-block partials: gpu_reduce::finish_in_last_block); backward 1. (Under CUDA graph
        capture, which has no ticket counter, a reduced forward is 2: row kernel + one-block finish.)
    equalization_loss: forward 1 (rows, finished by the last block), backward 1
    lade: forward 4 (CE row kernel, column pass, per-class finish over a grid, one-block scalar
        finish); lade_regularizer 3 (no CE rows); backward 1
    class_aware_sample / class_weighted_sample: 1

Bytes: the logits are read once per row kernel or column pass and the gradient written once; the
small per-row ([N]) and per-class ([C]) vectors and the partials are counted too (they are <1% of
the traffic at 65536 x 8142). The reference point "three passes" is what DESIGN.md asks of a
fused loss: forward reads the logits once, backward reads them once and writes the gradient once.

    python benchmarks/traffic_model.py [--shape 65536 8142] [--dtype bfloat16] [--json PATH]
    python benchmarks/traffic_model.py --measure --device cuda [--json PATH]   # profiler vs model

--measure runs each op under torch.profiler (CUDA activity on a GPU) and prints, per op and phase,
the ltfast kernels launched and their summed kernel time next to the model's launches and the
time the model's bytes take at the copy bandwidth measured in the same run (the floor for a
memory-bound kernel). On the CPU (--device cpu, what CI runs) it counts ltfast:: operator calls
instead, which exercises the same code at tiny sizes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
F32, I64 = 4, 8
# The ticket counter a reduced forward's row kernel increments once per block (atomicInc, 4 bytes
# read and written: gpu_reduce::took_last_ticket).
TICKET = 4
# LADE's column pass splits the batch into at most 64 row blocks (lade_kernels.cuh kMaxRowBlocks);
# each writes per class: column max, exp-sum, target-logit sum (3 x fp32) and a count (int64).
LADE_MAX_ROW_BLOCKS, LADE_ROWS_PER_BLOCK = 64, 64

CE_FAMILY = ("balanced_softmax", "adjusted_cross_entropy", "softmax_equalization_loss")
LOSS_OPS = CE_FAMILY + ("equalization_loss", "lade", "lade_regularizer")
SAMPLER_OPS = ("class_aware_sample", "class_weighted_sample")


@dataclass
class Phase:
    op: str
    phase: str            # "fwd" | "bwd"
    launches: int
    read_bytes: int
    write_bytes: int
    logits_passes: float  # passes over the [N, C] logits/gradient (reads + writes)
    fused: bool = False   # the cross-entropy family's step with the forward-time gradient

    @property
    def total_bytes(self) -> int:
        return self.read_bytes + self.write_bytes


def _class_vectors(op: str, C: int) -> int:
    """fp32 [C] inputs the kernels read: log_prior / adjustment+margin+weight (the benchmark's
    ldam_drw uses two) / tail_mask (bool)."""
    return {"balanced_softmax": C * F32, "adjusted_cross_entropy": 2 * C * F32,
            "softmax_equalization_loss": C * 1 + 2 * I64, "equalization_loss": C * 1,
            "lade": C * F32, "lade_regularizer": C * F32}[op]


def model(op: str, N: int, C: int, dtype: str = "bfloat16", reduction: str = "mean",
          fused: bool = False) -> list[Phase]:
    """[forward, backward] (one entry for the sampler ops, with N = number of draws and C = classes).
    fused: the cross-entropy family's step with the forward-time gradient (kernel_model)."""
    e = ELEMENT_SIZE[dtype]
    logits = N * C * e
    if op in SAMPLER_OPS:
        # Per draw: two class offsets, one member (random gathers), the index written; the class
        # CDF (float64 [C]) for the weighted draw; one kernel.
        extra = C * 8 if op == "class_weighted_sample" else 0
        return [Phase(op, "fwd", 1, N * 3 * I64 + extra, N * I64, 0.0)]
    if reduction == "mean":
        # The per-kernel model, summed per phase: the same numbers memory_model.py checks against the
        # emulator's count (it replaced an estimate that took the partials as float32 and 8 rows per
        # block at every C, and left out the per-row loss the row kernels write).
        phases = kernel_model(op, (N, C), dtype, fused=fused)
        passes = {"fwd": 2.0 if op == "lade" or fused else 1.0, "bwd": 0.0 if fused else 2.0}
        return [Phase(op, phase, sum(k.launches for k in kernels.values()),
                      sum(k.read_bytes for k in kernels.values()), sum(k.write_bytes for k in kernels.values()),
                      passes[phase], fused) for phase, kernels in phases.items()]
    reduced = reduction != "none"
    ce_blocks = row_blocks(N, C, tiled=op in TILED_ROW_OPS)
    vectors = _class_vectors(op, C)
    row_stats = 2 * N * F32       # [2, N] fp32 saved for backward
    loss_out = e if reduced else N * e
    grad_out = e if reduced else N * e

    # Reduced: the row kernel writes its partials (float64) and its last block reads them back with the
    # ticket counter; one launch either way.
    partials = ce_blocks * 2 * 8 + TICKET if reduced else 0
    if op in CE_FAMILY:
        fwd = Phase(op, "fwd", 1,
                    read_bytes=logits + N * I64 + vectors + partials,
                    write_bytes=row_stats + partials + loss_out + (F32 if reduced else 0), logits_passes=1)
        bwd = Phase(op, "bwd", 1, read_bytes=logits + N * I64 + vectors + row_stats + grad_out + F32,
                    write_bytes=logits, logits_passes=2)
        return [fwd, bwd]

    if op == "equalization_loss":
        fwd = Phase(op, "fwd", 1, read_bytes=logits + N * I64 + vectors + partials,
                    write_bytes=partials + loss_out + F32, logits_passes=1)
        bwd = Phase(op, "bwd", 1, read_bytes=logits + N * I64 + vectors + grad_out + F32,
                    write_bytes=logits, logits_passes=2)
        return [fwd, bwd]

    # LADE: the CE row kernel writes row_stats and a per-row loss ([N] fp32) for the scalar finish;
    # the column pass writes partials [3, B, C] fp32 + [B, C] int64, B = min(64, ceil(N / 64)) row
    # blocks; the per-class finish (a grid over C) reads them and writes column_stats [4, C] fp32
    # and one fp32 term per class, which the one-block scalar finish reduces with the row losses.
    with_ce = op == "lade"
    blocks = max(1, min(LADE_MAX_ROW_BLOCKS, math.ceil(N / LADE_ROWS_PER_BLOCK)))
    partials = blocks * C * (3 * F32 + I64)
    column_stats, per_class_terms, row_loss = 4 * C * F32, C * F32, N * F32
    ce_rows = (logits + N * I64 + vectors, row_stats + row_loss) if with_ce else (0, 0)
    column_pass = (logits + N * I64, partials)
    class_finish = (partials + vectors, column_stats + per_class_terms)
    scalar_finish = (per_class_terms + (row_loss if with_ce else 0), F32 + I64)
    stages = (ce_rows, column_pass, class_finish, scalar_finish)
    fwd = Phase(op, "fwd", 4 if with_ce else 3, read_bytes=sum(r for r, _ in stages),
                write_bytes=sum(w for _, w in stages), logits_passes=2 if with_ce else 1)
    bwd = Phase(op, "bwd", 1, read_bytes=logits + N * I64 + vectors + (row_stats if with_ce else 0)
                + column_stats + I64 + e, write_bytes=logits, logits_passes=2)
    return [fwd, bwd]


# ------------------------------------------------------------------ per-kernel model (memory_model.py)
@dataclass
class KernelTraffic:
    launches: int
    read_bytes: int
    write_bytes: int


BLOCK_THREADS = 256  # gpu_reduce::kBlockThreads
# Ops whose row kernels tile rows of <= 32 classes (gpu_reduce.cuh, tiled rows); LADE's rows are the
# cross-entropy row kernel's.
TILED_ROW_OPS = CE_FAMILY + ("lade", "equalization_loss", "mixed_cross_entropy", "probability_cross_entropy")


def row_blocks(N: int, C: int, tiled: bool = False) -> int:
    """Blocks of a row kernel (gpu_reduce::with_row_group / row_blocks): 8 lanes per row for
    C <= 32, a warp for C <= 1024, the block beyond; at most 4096 blocks. tiled: the cross-entropy
    family's, EQL's and the soft targets' tiles of short rows, floor(32 / C) rows per 8-lane group for
    C <= 32 (gpu_reduce::tiled_row_blocks)."""
    group = 8 if C <= 32 else 32 if C <= 1024 else BLOCK_THREADS
    rows_per_group = 32 // C if tiled and 1 <= C <= 32 else 1
    return max(1, min(-(-N // (BLOCK_THREADS // group * rows_per_group)), 4096))


def kernel_model(op: str, shape, dtype: str = "bfloat16", fused: bool = False) -> dict:
    """{"fwd": {kernel: KernelTraffic}, "bwd": {...}} for one call with reduction='mean' and the
    arguments of benchmarks/memory_model.py (the benchmark's: balanced_softmax with log_prior,
    adjusted_cross_entropy with LDAM margins and class weights, SEQL with a tail mask and a seed,
    mixed_cross_entropy with two targets and a scalar mix, probability_cross_entropy with the prior,
    diverse_expert_loss with E adjustments, ride_loss with margins and weights).

    Bytes are distinct bytes (each byte of a tensor once per kernel: what DRAM moves with an ideal
    cache). Per-class vectors read only at the target class are gathered once per distinct target:
    min(N, C) entries, exact for N << C, an upper bound otherwise (<0.1 % of the logits at the
    memory_model shapes). Partials are float64 (gpu_reduce::write_block_partials); per-row outputs and
    row statistics are in the accumulation type (float32 for half types, float64 for float64).

    A reduced forward is one launch: the row kernel writes its block partials, takes a ticket per
    block, and its last block reads the partials back and writes the loss and denominator(s)
    (gpu_reduce::finish_in_last_block); the partials count as read and written by the row kernel.

    fused (the cross-entropy family): the training step with the forward-time gradient. The forward
    writes the [N, C] gradient for an upstream gradient of 1 (read once, written once: the gradient
    pass re-reads the row the block has just read, which the ideal cache counts once), after a
    one-block pass over the targets that computes the mean's denominator first; the backward is
    _scale_forward_grad_'s kernel, which reads the upstream gradient and, at exactly 1, stops."""
    e, acc = ELEMENT_SIZE[dtype], (8 if dtype == "float64" else 4)
    if op == "paco_loss":
        return _paco_kernel_model(shape, e, acc)
    N, C = shape[0], shape[-1]
    E = shape[1] if len(shape) == 3 else 1
    logits = N * E * C * e
    B = row_blocks(N, C, tiled=op in TILED_ROW_OPS)
    gathered = min(N, C) * acc  # a [C] vector read at each row's target
    K = KernelTraffic

    def finished(reads: int, writes: int, quantities: int, outputs: int) -> KernelTraffic:
        """A row kernel whose last block finishes: `quantities` float64 partials per block written and
        read back, the ticket read and written, `outputs` scalars (loss, denominators) written."""
        partials = quantities * B * 8
        return K(1, reads + partials + TICKET, writes + partials + outputs * acc + TICKET)
    if op in CE_FAMILY:
        forward_vectors, backward_vectors = {
            "balanced_softmax": (C * acc, C * acc),  # log_prior as the adjustment
            # margin at the target; weight at the target (forward) and at every class (backward)
            "adjusted_cross_entropy": (2 * gathered, gathered + C * acc),
            # tail mask per class, the two seed words
            "softmax_equalization_loss": (C + 2 * I64, C + 2 * I64),
        }[op]
        if fused:
            # the gradient pass reads the backward's class vectors and the scale's denominator
            union_vectors = {"balanced_softmax": C * acc, "adjusted_cross_entropy": gathered + C * acc,
                             "softmax_equalization_loss": C + 2 * I64}[op]
            # the class weights at the targets: this kernel reads little else, so the upper bound
            # min(N, C) is replaced by the expected number of distinct classes among N uniform
            # targets, C (1 - (1 - 1/C)^N) (226 of 1000 at N = 256: the bound was 4.4 % over)
            distinct = round(C * (1 - (1 - 1 / C) ** N))
            target_weights = distinct * acc if op == "adjusted_cross_entropy" else 0
            return {
                "fwd": {"cross_entropy mean_denominator_kernel": K(1, N * I64 + target_weights, acc),
                        "cross_entropy forward_rows_kernel": finished(logits + N * I64 + union_vectors + acc,
                                                                      3 * N * acc + logits, 2, 2)},
                "bwd": {"cross_entropy scale_rows_kernel": K(1, acc, 0)},
            }
        return {
            # row_stats, row_loss; loss and weight sums -> loss, denominator
            "fwd": {"cross_entropy forward_rows_kernel": finished(logits + N * I64 + forward_vectors, 3 * N * acc,
                                                                  2, 2)},
            "bwd": {"cross_entropy backward_rows_kernel": K(1, logits + N * I64 + backward_vectors + 2 * N * acc
                                                              + 2 * acc,  # row_stats, grad_output, denominator
                                                              logits)},
        }
    if op == "equalization_loss":
        return {
            "fwd": {"equalization forward_rows_kernel": finished(logits + N * I64 + C, N * acc, 2, 2)},
            "bwd": {"equalization backward_rows_kernel": K(1, logits + N * I64 + C + 2 * acc, logits)},
        }
    if op in ("lade", "lade_regularizer"):
        with_ce = op == "lade"
        RB = max(1, min(LADE_MAX_ROW_BLOCKS, -(-N // LADE_ROWS_PER_BLOCK)))
        CB = -(-C // BLOCK_THREADS)
        column_partials = 3 * RB * C * acc + RB * C * I64 + RB * I64
        fwd = {}
        if with_ce:  # the CE row kernel with reduction 'sum' (its partials feed the scalar finish)
            fwd["cross_entropy forward_rows_kernel"] = K(1, logits + N * I64 + C * acc, 3 * N * acc + 2 * B * 8)
        fwd["lade column_partials_kernel"] = K(1, logits + N * I64, column_partials)
        fwd["lade finish_columns_kernel"] = K(1, column_partials + C * acc, 4 * C * acc + CB * 8)
        # the CE loss sums only (not the weight sums), the row-block counts, the LADER partials
        fwd["lade finish_scalar_kernel"] = K(1, (B * 8 if with_ce else 0) + RB * I64 + CB * 8, acc + I64)
        # column_stats: M_c, L_c and the sigma coefficient per class, the target coefficient at the
        # target only; log_prior and N' only with the CE term
        backward_reads = (logits + N * I64 + 2 * N * acc + 3 * C * acc + gathered + acc
                          + ((C * acc + I64) if with_ce else 0))
        return {"fwd": fwd, "bwd": {"lade backward_kernel": K(1, backward_reads, logits)}}
    if op == "mixed_cross_entropy":
        return {
            # row_stats and the two targets' partials (no per-row loss unless reduction='none'); loss and
            # two denominators
            "fwd": {"soft_targets mixed_forward_kernel": finished(logits + 2 * N * I64, 2 * N * acc, 4, 3)},
            "bwd": {"soft_targets mixed_backward_kernel": K(1, logits + 2 * N * I64 + 2 * N * acc + 3 * acc,
                                                              logits)},
        }
    if op == "probability_cross_entropy":
        return {
            "fwd": {"soft_targets probability_forward_kernel": finished(2 * logits + C * acc, 4 * N * acc, 2, 2)},
            "bwd": {"soft_targets probability_backward_kernel": K(1, 2 * logits + C * acc + 3 * N * acc + 2 * acc,
                                                                   logits)},
        }
    if op == "diverse_expert_loss":
        return {
            "fwd": {"multi_expert diverse_forward_kernel": finished(logits + N * I64 + E * C * acc,
                                                                    2 * N * E * acc + N * acc, 2, 2)},
            "bwd": {"multi_expert diverse_backward_kernel": K(1, logits + N * I64 + E * C * acc + 2 * N * E * acc
                                                                + 2 * acc, logits)},
        }
    if op == "ride_loss":
        S = 2 * E + 1  # row statistics per sample (multi_expert.h)
        return {
            # loss and three denominators (W, N', the mean temperature)
            "fwd": {"multi_expert ride_forward_kernel": finished(logits + N * I64 + 2 * gathered, 2 * N * S * acc, 4,
                                                                 4)},
            "bwd": {"multi_expert ride_backward_kernel": K(1, logits + N * I64 + 2 * gathered + 2 * N * S * acc
                                                             + 4 * acc, logits)},
        }
    raise ValueError(f"traffic_model.kernel_model: no model for op {op!r}")


def _paco_kernel_model(shape, e: int, acc: int) -> dict:
    """paco_loss with shape (B, M, C): similarity [B, M], sup_logits [B, C], log_prior [C] (the
    accumulation type: prepare_paco_args converts it), labels [B] and key_labels [M] int64, every
    row counted (the benchmark's labels are all in [0, C), so each row has its class positive). A
    row of the kernels is C + M columns (paco_kernels.cuh), which sizes the row group and the
    blocks. The key labels and log_prior are read by every row but counted once (distinct bytes)."""
    B, M, C = shape
    K = KernelTraffic
    blocks = row_blocks(B, C + M)
    streams = B * (M + C) * e
    inputs = streams + B * I64 + M * I64 + C * acc
    partials = 2 * blocks * 8  # loss sums, counted rows -> loss, denominator, in the last block (+ the ticket)
    return {
        "fwd": {"paco forward_rows_kernel": K(1, inputs + partials + TICKET,
                                              3 * B * acc + partials + 2 * acc + TICKET)},  # row_stats, row_loss
        # row_stats, grad_output and the denominator; both gradients written once
        "bwd": {"paco backward_rows_kernel": K(1, inputs + 2 * B * acc + 2 * acc, streams)},
    }


def three_passes_bytes(N: int, C: int, dtype: str, phase: str) -> int:
    """DESIGN.md's target: forward one read of the logits, backward one read and one write."""
    return N * C * ELEMENT_SIZE[dtype] * (1 if phase == "fwd" else 2)


def table(N: int, C: int, dtype: str, reduction: str = "mean", draws: int = 10**6, classes: int = 1000):
    rows = []
    for op in LOSS_OPS:
        rows += model(op, N, C, dtype, reduction)
    if reduction == "mean":
        for op in CE_FAMILY:
            rows += model(op, N, C, dtype, reduction, fused=True)
    for op in SAMPLER_OPS:
        rows += model(op, draws, classes, "float32")
    return rows


def print_table(rows: list[Phase], N: int, C: int, dtype: str) -> None:
    print(f"traffic model, logits [{N}, {C}] {dtype}, reduction='mean' (samplers: 1e6 draws, 1000 classes)")
    print(f"{'op':27} {'phase':5} {'launches':>8} {'read MB':>10} {'write MB':>10} {'total MB':>10} "
          f"{'logits passes':>13} {'vs 3-pass':>9}")
    for r in rows:
        ref = three_passes_bytes(N, C, dtype, r.phase) if r.op in LOSS_OPS else None
        ratio = f"{r.total_bytes / ref:.3f}" if ref else ""
        name = r.op + (" fused" if r.fused else "")
        print(f"{name:27} {r.phase:5} {r.launches:>8} {r.read_bytes / 1e6:10.1f} {r.write_bytes / 1e6:10.1f} "
              f"{r.total_bytes / 1e6:10.1f} {r.logits_passes:>13g} {ratio:>9}")
    print("vs 3-pass = model bytes / the DESIGN.md passes over the logits of that phase (fwd 1, bwd 2)")


# ------------------------------------------------------------------ measurement (profiler)
def kernel_kind(name: str) -> str:
    """Groups the kernels of one call: finish/reduce (one-block or per-class finishing kernels),
    column (LADE's column pass), rows (row kernels, backward), other (torch's own: fills, copies)."""
    if "ltfast" not in name:
        return "other"
    base = kernel_base_name(name).lower()
    if "finish" in base or "reduce" in base:
        return "finish"
    if "column" in base:
        return "column"
    return "rows"


def kernel_base_name(name: str) -> str:
    """'void ltfast::lade_kernels::finish_kernel<float>(float const*, ...)' -> 'finish_kernel':
    the kind is read from the function's own name, never from its template or parameter types."""
    depth, kept = 0, []
    for ch in name.split("(")[0]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            kept.append(ch)
    return "".join(kept).split("::")[-1].split()[-1] if "".join(kept).strip() else name


def profile_call(fn, device: str) -> list[tuple[str, float]]:
    """(kernel name, kernel ms) for each kernel of one call; on the CPU, (op name, CPU ms) of the
    ltfast:: operators."""
    from torch.profiler import ProfilerActivity, profile
    # CPU + CUDA: kernel events are recorded with the launches that issued them; only the
    # device_type == CUDA events (kernels, memsets, copies) are kept below.
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    out = []
    for e in prof.events():
        if device == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA:
                # A kernel event's time range is the kernel's start and end on the GPU (us).
                out.append((e.name, e.time_range.elapsed_us() / 1e3))
        elif e.name.startswith("ltfast::"):
            out.append((e.name, e.time_range.elapsed_us() / 1e3))
    return out


def _op_call(op: str, C: int, device: str):
    """(forward(x, y) -> loss) of each op with the benchmark's arguments."""
    import ltfast
    from ltfast import priors
    counts = torch.logspace(3.1, 0.7, C).round()
    log_prior = priors.log_prior(counts).to(device)
    tail = priors.tail_classes(counts).to(device)
    margin = (30 * priors.ldam_margins(counts)).to(device)
    weight = priors.effective_number_weights(counts).to(device)
    seed = torch.tensor([1, 2], dtype=torch.int64, device=device)
    return {
        "balanced_softmax": lambda x, y: torch.ops.ltfast.balanced_softmax(x, y, log_prior),
        "adjusted_cross_entropy": lambda x, y: torch.ops.ltfast.adjusted_cross_entropy(
            x, y, None, margin, weight),
        "softmax_equalization_loss": lambda x, y: torch.ops.ltfast.softmax_equalization_loss(x, y, tail, seed, 0.9),
        "equalization_loss": lambda x, y: torch.ops.ltfast.equalization_loss(x, y, tail),
        "lade": lambda x, y: torch.ops.ltfast.lade(x, y, log_prior),
        "lade_regularizer": lambda x, y: torch.ops.ltfast.lade_regularizer(x, y, log_prior),
    }[op], ltfast


def measure(N: int, C: int, dtype: str, device: str, copy_gb_s: float | None, emit) -> list[dict]:
    """Profiles forward and backward of each loss op once (after a warm-up call) and compares the
    ltfast kernels with the model."""
    gen = torch.Generator().manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    logits = (torch.randn(N, C, generator=gen) * 2).to(device=device, dtype=torch_dtype)
    target = torch.randint(0, C, (N,), generator=gen).to(device)
    import ltfast
    results = []
    for op, fused in [(op, False) for op in LOSS_OPS] + [(op, True) for op in CE_FAMILY]:
        # The separate backward (the forward-time gradient off), then the cross-entropy family's
        # fused step (on: the forward writes the gradient, the backward reads the upstream gradient).
        switch = ltfast.set_forward_gradient(fused)
        try:
            results += _measure_op(op, fused, logits, target, N, C, dtype, device, copy_gb_s, emit)
        finally:
            ltfast.set_forward_gradient(switch)
    return results


def _measure_op(op, fused, logits, target, N, C, dtype, device, copy_gb_s, emit) -> list[dict]:
    results = []
    fn, _ = _op_call(op, C, device)
    x = logits.detach().requires_grad_()
    fn(x, target).backward()  # warm-up: first-call costs, allocator
    x.grad = None
    loss_box = {}

    def forward():
        loss_box["loss"] = fn(x, target)

    def backward():
        loss_box["loss"].backward()

    for phase_model, call in zip(model(op, N, C, dtype, fused=fused), (forward, backward)):
        kernels = profile_call(call, device)
        ours = [(n, ms) for n, ms in kernels if device != "cuda" or kernel_kind(n) != "other"]
        by_kind = {}
        for n, ms in kernels:
            kind = kernel_kind(n) if device == "cuda" else "cpu_op"
            by_kind[kind] = round(by_kind.get(kind, 0.0) + ms, 4)
        kernel_ms = sum(ms for _, ms in ours)
        floor_ms = phase_model.total_bytes / (copy_gb_s * 1e9) * 1e3 if copy_gb_s else None
        rec = {"suite": "traffic", "op": op, "fused": fused, "phase": phase_model.phase, "device": device,
               "dtype": dtype,
               "shape": [N, C], "model_launches": phase_model.launches, "measured_launches": len(ours),
               "model_bytes": phase_model.total_bytes, "kernel_ms": round(kernel_ms, 4),
               "kernel_ms_by_kind": by_kind, "kernels": sorted({n for n, _ in ours}),
               "model_floor_ms": None if floor_ms is None else round(floor_ms, 4),
               "model_gb_s": round(phase_model.total_bytes / (kernel_ms * 1e6), 1) if kernel_ms > 0 else None,
               "three_pass_gb_s": round(three_passes_bytes(N, C, dtype, phase_model.phase) / (kernel_ms * 1e6), 1)
               if kernel_ms > 0 else None,
               "copy_gb_s": copy_gb_s}
        results.append(rec)
        emit(rec)
    x.grad = None
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[65536, 8142], metavar=("N", "C"))
    parser.add_argument("--dtype", default="bfloat16", choices=list(ELEMENT_SIZE))
    parser.add_argument("--measure", action="store_true", help="profile each op and compare with the model")
    parser.add_argument("--measure-shape", type=int, nargs=2, metavar=("N", "C"),
                        help="shape of the --measure run (default: --shape; the CPU dry run uses a tiny one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="append JSON lines (model rows, then measurements)")
    args = parser.parse_args(argv)
    N, C = args.shape
    out = open(args.json, "a") if args.json else None

    def emit(record):
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()

    rows = table(N, C, args.dtype)
    print_table(rows, N, C, args.dtype)
    for r in rows:
        emit({"suite": "traffic_model", **asdict(r), "total_bytes": r.total_bytes, "dtype": args.dtype,
              "shape": [N, C] if r.op in LOSS_OPS else [10**6, 1000]})
    status = 0
    if args.measure:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
        # The repository root too: on the lent GPU machine ltfast is built in place, not installed
        # (found by the torch 2.11 dry run in CI, whose venv has no ltfast installed).
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        copy_gb_s = None
        if args.device == "cuda":
            from throughput import copy_bandwidth_gb_s
            copy_gb_s = round(copy_bandwidth_gb_s("cuda"), 1)
        t0 = time.perf_counter()
        N, C = args.measure_shape or (N, C)
        print(f"\nmeasured on {args.device} ({'kernels' if args.device == 'cuda' else 'ltfast:: ops'} of one call), "
              f"[{N}, {C}] {args.dtype}" + (f", copy bandwidth {copy_gb_s:.0f} GB/s" if copy_gb_s else ""))
        print(f"{'op':27} {'phase':5} {'launches':>8} {'model':>5} {'kernel ms':>10} {'floor ms':>9} "
              f"{'GB/s model':>10} {'GB/s 3-pass':>11}  by kind (ms)")
        for rec in measure(N, C, args.dtype, args.device, copy_gb_s, emit):
            mismatch = args.device == "cuda" and rec["measured_launches"] != rec["model_launches"]
            floor = f"{rec['model_floor_ms']:.3f}" if rec["model_floor_ms"] is not None else "-"
            op_name = rec["op"] + (" fused" if rec["fused"] else "")
            print(f"{op_name:27} {rec['phase']:5} {rec['measured_launches']:>8} {rec['model_launches']:>5} "
                  f"{rec['kernel_ms']:10.3f} {floor:>9} {rec['model_gb_s'] or 0:10.0f} {rec['three_pass_gb_s'] or 0:11.0f}"
                  f"  {rec['kernel_ms_by_kind']}{'  LAUNCHES DIFFER FROM THE MODEL' if mismatch else ''}")
            # A launch count off the plan is reported, not failed: the plan is being implemented.
        print(f"({time.perf_counter() - t0:.1f} s)")
    if out:
        out.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
