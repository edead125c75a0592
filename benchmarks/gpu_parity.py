"""CUDA against the CPU kernels and ltfast.reference at the sizes the CPU tests cannot reach.

    python benchmarks/gpu_parity.py [--out PATH.jsonl] [--budget-s 75] [--cpu-rows 2048]
    python benchmarks/gpu_parity.py --dry-run     # CPU only, tiny sizes: what CI and CPU machines run

Checks, most valuable first (each one JSON line in --out as soon as it is measured: check, op,
shape, dtype, against, quantity, max_abs, max_rel, rtol, atol, pass, seconds):

1. every loss op at 65536 x 8142 bfloat16, forward and gradient: 'mean' against the float64
   reference on the GPU (the whole batch), and 'none' (gradient of the sum) against the CPU op on
   the first --cpu-rows rows (row-local; LADE, whose column pass couples the rows, runs both devices
   on that sub-batch instead);
2. N = 64 with C = 100k, N = 0, C = 1;
3. an expanded grad_output (reduction='none', stride-0 gradient);
4. EQL non-finite logits (suppressed entries exactly 0 even for NaN/inf, kept +-inf give the
   limits 0/inf) and label smoothing with x[0, :2048] = -inf, eps = 0.1, C = 5000 (inf, like
   F.cross_entropy);
5. large logits (offsets of 1e4, 1e6, 1e30) against F.cross_entropy;
6. 10^6 sampler draws, CUDA bit-identical to the CPU op (and the first 10^5 to the reference).

--dry-run runs the same code on the CPU at tiny sizes (the "CPU op" comparisons then compare the
CPU kernels with themselves on a row subset, which exercises the row-subset code). Exit status 1
when a check fails; checks left when --budget-s runs out are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ltfast  # noqa: E402
from ltfast import priors, reference  # noqa: E402

IGNORE = -100
# Against a float64 reference on the same rounded inputs (as tests/test_cross_entropy.py TOL): the
# ops accumulate in float32, so the error is the final rounding to the logits dtype.
TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (2e-5, 2e-6), torch.bfloat16: (1.6e-2, 2e-3),
       torch.float16: (2e-3, 2e-4)}
# Every loss op; "rowwise": loss per row with reduction='none' (LADE returns a batch scalar).
OPS = {
    "balanced_softmax": True, "adjusted_cross_entropy": True, "label_smoothing": True, "focal": True,
    "softmax_equalization_loss": True, "equalization_loss": True, "lade": False, "lade_regularizer": False,
}


# ------------------------------------------------------------------ the ops and their references
class Case:
    """One op with fixed per-class arguments: ours(x, y, reduction) and ref(x64, y, reduction,
    grad) (the reference may need our gradient: SEQL replays the kernel's own drop decisions)."""

    def __init__(self, op: str, C: int, device: str):
        counts = torch.logspace(3.1, 0.7, C).round() if C > 1 else torch.tensor([100.0])
        self.op, self.C = op, C
        self.log_prior = priors.log_prior(counts).to(device)
        self.margin = (30 * priors.ldam_margins(counts)).to(device) if C > 1 else torch.zeros(1, device=device)
        self.weight = priors.effective_number_weights(counts).to(device)
        tail = torch.zeros(C, dtype=torch.bool)
        tail[C // 2:] = True  # half the classes are tail: both kinds of element in every row
        self.tail = tail.to(device)
        self.seed = torch.tensor([12345, 678], dtype=torch.int64, device=device)

    def to(self, device: str) -> "Case":
        other = Case.__new__(Case)
        other.__dict__ = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return other

    def ours(self, x, y, reduction="mean"):
        op = self.op
        if op == "balanced_softmax":
            return ltfast.balanced_softmax_loss(x, y, self.log_prior, reduction, IGNORE)
        if op == "adjusted_cross_entropy":
            return ltfast.adjusted_cross_entropy(x, y, target_margin=self.margin, weight=self.weight,
                                                 reduction=reduction, ignore_index=IGNORE)
        if op == "label_smoothing":
            return ltfast.adjusted_cross_entropy(x, y, label_smoothing=0.1, reduction=reduction, ignore_index=IGNORE)
        if op == "focal":
            return ltfast.adjusted_cross_entropy(x, y, gamma=2.0, reduction=reduction, ignore_index=IGNORE)
        if op == "softmax_equalization_loss":
            return ltfast.softmax_equalization_loss(x, y, self.tail, 0.9, reduction, IGNORE, seed=self.seed.to(x.device))
        if op == "equalization_loss":
            return ltfast.equalization_loss(x, y, self.tail, reduction, IGNORE)
        if op == "lade":
            return ltfast.lade_loss(x, y, self.log_prior, ignore_index=IGNORE)
        if op == "lade_regularizer":
            return ltfast.lade_regularizer(x, y, self.log_prior, ignore_index=IGNORE)
        raise KeyError(op)

    def ref(self, x, y, reduction="mean", our_grad=None):
        op, lp = self.op, self.log_prior.double()
        if op == "balanced_softmax":
            return reference.balanced_softmax(x, y, lp, reduction, IGNORE)
        if op == "adjusted_cross_entropy":
            return reference.adjusted_cross_entropy(x, y, target_margin=self.margin.double(),
                                                    weight=self.weight.double(), reduction=reduction,
                                                    ignore_index=IGNORE)
        if op == "label_smoothing":
            return reference.adjusted_cross_entropy(x, y, label_smoothing=0.1, reduction=reduction,
                                                    ignore_index=IGNORE)
        if op == "focal":
            return reference.adjusted_cross_entropy(x, y, gamma=2.0, reduction=reduction, ignore_index=IGNORE)
        if op == "softmax_equalization_loss":
            # The kernel's drops are the tail negatives whose gradient is exactly 0 (tests do the same).
            N, C = x.shape
            columns = torch.arange(C, device=x.device)
            tail_neg = (self.tail[None, :] & (columns[None, :] != y[:, None]) & (y != IGNORE)[:, None])
            dropped = tail_neg & (our_grad == 0)
            return reference.softmax_equalization_loss(x, y, self.tail, 0.9, reduction, IGNORE, keep=~dropped)
        if op == "equalization_loss":
            return reference.equalization_loss(x, y, self.tail, reduction, IGNORE)
        if op == "lade":
            return reference.lade(x, y, lp, ignore_index=IGNORE)
        if op == "lade_regularizer":
            return reference.lade_regularizer(x, y, lp, ignore_index=IGNORE)
        raise KeyError(op)


def loss_and_grad(fn, x, grad_out=None):
    x = x.detach().requires_grad_()
    loss = fn(x)
    if x.numel() == 0 and not loss.requires_grad:
        return loss.detach(), torch.zeros_like(x)
    g = torch.ones_like(loss) if grad_out is None else grad_out
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss.detach(), grad


# ------------------------------------------------------------------ recording
class Recorder:
    def __init__(self, out_path: str | None, budget_s: float, device: str):
        self.out = open(out_path, "a") if out_path else None
        self.deadline = time.monotonic() + budget_s
        self.device = device
        self.records: list[dict] = []
        self.t0 = time.monotonic()

    def emit(self, record: dict) -> None:
        record = {"suite": "parity", **record}
        self.records.append(record)
        if self.out:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[record["pass"]]
        err = "" if record.get("max_abs") is None else f" max_abs {record['max_abs']:.3g} max_rel {record['max_rel']:.3g}"
        op = record.get("op", "")
        name = record["check"] if record["check"].startswith(op) else f"{record['check']} {op}"
        print(f"{mark} {name:40} {record.get('quantity', ''):6} vs {record.get('against', ''):16} "
              f"{'x'.join(map(str, record.get('shape', [])))} {record.get('dtype', '')}{err} "
              f"({record['seconds']:.2f} s){'  ' + record['note'] if record.get('note') else ''}", flush=True)

    def compare(self, check, op, got, expected, dtype, against, quantity, start, *, shape=None, scale_atol=False,
                rtol=None, atol=None, note="", exact=False):
        """Elementwise |got - expected| <= atol + rtol |expected| on finite entries; non-finite
        entries must match exactly (inf with inf of the same sign, NaN with NaN). scale_atol: atol
        also grows by rtol * max|expected| (gradients, whose small entries are roundings of large
        ones, as in the tests). exact: bit-identical."""
        d_rtol, d_atol = TOL.get(dtype, (0.0, 0.0))
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
        got = got.detach().to(expected.device).double()
        expected = expected.detach().double()
        if got.shape != expected.shape:
            return self.emit(dict(check=check, op=op, shape=list(shape or got.shape), dtype=str(dtype)[6:],
                                  against=against, quantity=quantity, max_abs=None, max_rel=None, rtol=rtol,
                                  atol=atol, device=self.device, seconds=round(time.monotonic() - start, 3),
                                  note=f"shape {tuple(got.shape)} != {tuple(expected.shape)}", **{"pass": False}))
        finite = torch.isfinite(got) & torch.isfinite(expected)
        if exact:
            rtol = atol = 0.0
        if scale_atol and expected.numel():
            scale = expected[torch.isfinite(expected)].abs().max().item() if finite.any() else 0.0
            atol = atol + rtol * scale
        diff = torch.where(finite, (got - expected).abs(), torch.zeros_like(got))
        nonfinite_ok = torch.where(finite, True, (got == expected) | (got.isnan() & expected.isnan()))
        ok = bool(((diff <= atol + rtol * expected.abs()) | ~finite).all()) and bool(nonfinite_ok.all())
        if exact:
            ok = ok and bool((diff == 0).all())
        max_abs = diff[finite].max().item() if bool(finite.any()) else 0.0
        rel = diff / expected.abs().clamp_min(max(atol, 1e-30))
        max_rel = rel[finite].max().item() if bool(finite.any()) else 0.0
        bad = int((~nonfinite_ok).sum())
        self.emit(dict(check=check, op=op, shape=list(shape or got.shape), dtype=str(dtype).replace("torch.", ""),
                       against=against, quantity=quantity, max_abs=max_abs, max_rel=max_rel, rtol=rtol, atol=atol,
                       device=self.device, seconds=round(time.monotonic() - start, 3),
                       note=(note + (f" {bad} non-finite mismatches" if bad else "")).strip(), **{"pass": ok}))

    def flag(self, check, op, ok, start, note, shape=(), dtype="", against="", quantity="property"):
        self.emit(dict(check=check, op=op, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                       against=against, quantity=quantity, max_abs=None, max_rel=None, rtol=None, atol=None,
                       device=self.device, seconds=round(time.monotonic() - start, 3), note=note,
                       **{"pass": None if ok is None else bool(ok)}))

    def run(self, check, fn, *args):
        """Runs one group of comparisons; out of budget: skipped; an exception: one failed record."""
        start = time.monotonic()
        if start > self.deadline:
            return self.emit(dict(check=check, seconds=0.0, note="budget exhausted", **{"pass": None}))
        try:
            fn(self, check, start, *args)
        except Exception as e:  # noqa: BLE001 - reported as a failed check, the next ones still run
            traceback.print_exc()
            self.emit(dict(check=check, seconds=round(time.monotonic() - start, 3),
                           note=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                           **{"pass": False}))
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def summary(self) -> int:
        passed = sum(r["pass"] is True for r in self.records)
        failed = [r for r in self.records if r["pass"] is False]
        skipped = sum(r["pass"] is None for r in self.records)
        print(f"\nparity summary: {passed} passed, {len(failed)} failed, {skipped} skipped (budget, undefined) "
              f"in {time.monotonic() - self.t0:.1f} s on {self.device}")
        for r in failed:
            print(f"  FAILED {r['check']} {r.get('quantity', '')} vs {r.get('against', '')}: "
                  f"max_abs {r.get('max_abs')} {r.get('note', '')}")
        if self.out:
            self.out.close()
        return 1 if failed else 0


# ------------------------------------------------------------------ checks
_INPUTS: dict = {}


def inputs(N, C, dtype, device, seed=0, ignored=(1, 4)):
    """Logits (randn * 2) and targets drawn on the device itself: 65536 x 8142 normals from the
    CPU generator would take ~3 s per op, and the last big shape is kept for the next op."""
    key = (N, C, dtype, device, seed, ignored)
    if key not in _INPUTS:
        _INPUTS.clear()
        gen = torch.Generator(device=device).manual_seed(seed)
        x = (torch.randn(N, C, generator=gen, device=device) * 2).to(dtype)
        y = torch.randint(0, C, (N,), generator=gen, device=device)
        for row in ignored:
            if row < N:
                y[row] = IGNORE
        _INPUTS[key] = (x, y)
    x, y = _INPUTS[key]
    return x.clone() if x.numel() < 2**24 else x, y.clone()  # small ones may be edited in place


def op_parity(rec: Recorder, check, start, op, N, C, dtype, cpu_rows):
    """'mean' against the float64 reference on the device under test (whole batch); rows against
    the CPU op (row-local ops: 'none' losses and the gradient of their sum on the first cpu_rows
    rows of the whole-batch call; LADE: both devices on the first cpu_rows rows)."""
    dev = rec.device
    case = Case(op, C, dev)
    x, y = inputs(N, C, dtype, dev)
    loss, grad = loss_and_grad(lambda t: case.ours(t, y, "mean"), x)
    if N == 0 and not OPS[op]:
        # The reference's log(batch size) is undefined for an empty batch: only the CPU op compares.
        rec.flag(check, op, None, start, "reference undefined at N = 0 (log 0); CPU op only", [N, C], dtype,
                 "reference_f64", "loss")
    else:
        x64 = x.double()
        ref_loss, ref_grad = loss_and_grad(lambda t, ours_grad=grad: case.ref(t, y, "mean", ours_grad), x64)
        rec.compare(check, op, loss, ref_loss, dtype, "reference_f64", "loss", start, shape=[N, C])
        rec.compare(check, op, grad, ref_grad, dtype, "reference_f64", "grad", start, shape=[N, C], scale_atol=True)
        del x64, ref_loss, ref_grad
    del grad
    R = min(N, cpu_rows)
    cpu_case = case.to("cpu")
    if OPS[op]:
        rows, rows_grad = loss_and_grad(lambda t: case.ours(t, y, "none"), x)
        rows, rows_grad = rows[:R].cpu(), rows_grad[:R].cpu()
        cpu_rows_loss, cpu_grad = loss_and_grad(lambda t: cpu_case.ours(t, y[:R].cpu(), "none"), x[:R].cpu())
        note = f"first {R} of {N} rows"
    else:
        rows, rows_grad = loss_and_grad(lambda t: case.ours(t, y[:R], "mean"), x[:R])
        rows, rows_grad = rows.cpu(), rows_grad.cpu()
        cpu_rows_loss, cpu_grad = loss_and_grad(lambda t: cpu_case.ours(t, y[:R].cpu(), "mean"), x[:R].cpu())
        note = f"both devices on the first {R} rows (batch-coupled)"
    rec.compare(check, op, rows, cpu_rows_loss, dtype, "cpu_op", "loss", start, shape=[R, C], note=note)
    rec.compare(check, op, rows_grad, cpu_grad, dtype, "cpu_op", "grad", start, shape=[R, C], scale_atol=True, note=note)


def expanded_grad(rec: Recorder, check, start, op, N, C, dtype):
    """reduction='none' with a stride-0 grad_output (what loss.sum() or a broadcast scalar gives):
    the kernel must read grad_output[i] through its stride, never assume contiguity."""
    dev = rec.device
    case = Case(op, C, dev)
    x, y = inputs(N, C, dtype, dev, seed=1)
    scalar = torch.tensor(0.37, dtype=dtype, device=dev)
    expanded = scalar.expand(N)
    assert expanded.stride() == (0,)
    _, grad = loss_and_grad(lambda t: case.ours(t, y, "none"), x, expanded)
    _, grad_contig = loss_and_grad(lambda t: case.ours(t, y, "none"), x, expanded.contiguous())
    x64 = x.double()
    _, ref_grad = loss_and_grad(lambda t: case.ref(t, y, "none", grad), x64, expanded.double())
    rec.compare(check, op, grad, grad_contig, dtype, "contiguous_grad", "grad", start, exact=True)
    rec.compare(check, op, grad, ref_grad, dtype, "reference_f64", "grad", start, scale_atol=True)


def eql_non_finite(rec: Recorder, check, start, N, C, dtype):
    """EQL per element (ltfast.equalization_loss docstring): suppressed entries (tail negatives) are
    exactly 0 in loss and gradient even for NaN/inf; kept +-inf give the limits 0 / inf."""
    dev = rec.device
    inf, nan = float("inf"), float("nan")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, generator=gen) * 2
    tail = torch.zeros(C, dtype=torch.bool)
    tail[C // 2:] = True
    y = torch.randint(0, C // 2, (N,), generator=gen)  # head targets: every tail entry is suppressed
    # Sprinkle NaN/+inf/-inf over 2% of the suppressed entries of every row.
    sprinkle = (torch.rand(N, C, generator=gen) < 0.02) & tail[None, :]
    values = torch.tensor([nan, inf, -inf])[torch.randint(0, 3, (N, C), generator=gen)]
    x = torch.where(sprinkle, values, x)
    # Kept entries: row 0 limit 0 (target +inf, head negative -inf), row 1 target -inf (inf),
    # row 2 head negative +inf (inf), row 3 NaN in a kept entry (NaN).
    y[:4] = 0
    x[0, 0], x[0, 1] = inf, -inf
    x[1, 0] = -inf
    x[2, 1] = inf
    x[3, 2] = nan
    x = x.to(dtype).to(dev)
    y, tail_d = y.to(dev), tail.to(dev)
    xg = x.detach().requires_grad_()
    loss = ltfast.equalization_loss(xg, y, tail_d, "none")
    (grad,) = torch.autograd.grad(loss, xg, torch.ones_like(loss))
    x64 = x.double().requires_grad_()
    expected = reference.equalization_loss(x64, y, tail_d, "none")
    (expected_grad,) = torch.autograd.grad(expected, x64, torch.ones_like(expected))
    rec.compare(check, "equalization_loss", loss, expected, dtype, "reference_f64", "loss", start)
    rec.compare(check, "equalization_loss", grad, expected_grad, dtype, "reference_f64", "grad", start)
    suppressed = tail_d[None, :] & (torch.arange(C, device=dev)[None, :] != y[:, None])
    nonzero = int((grad[suppressed] != 0).sum())
    limits = loss.detach().double().cpu()
    ok = (nonzero == 0 and math.isfinite(limits[0]) and limits[1] == inf and limits[2] == inf
          and math.isnan(limits[3]) and bool(torch.isfinite(limits[4:]).all()))
    rec.flag(check, "equalization_loss", ok, start, f"suppressed grads nonzero: {nonzero}; rows 0-3: "
             f"{[round(v, 3) if math.isfinite(v) else v for v in limits[:4].tolist()]} (want finite, inf, inf, nan); "
             f"rows 4+ finite: {bool(torch.isfinite(limits[4:]).all())}", [N, C], dtype, "semantics")
    if dev != "cpu":
        cpu_loss = ltfast.equalization_loss(x.cpu(), y.cpu(), tail, "none")
        rec.compare(check, "equalization_loss", loss, cpu_loss, dtype, "cpu_op", "loss", start)


def label_smoothing_inf_tile(rec: Recorder, check, start, dtype):
    """x[0, :2048] = -inf (a whole 2048-column tile of row 0), eps = 0.1, C = 5000: the smoothing
    term sums log p over every class, so the loss is +inf, as F.cross_entropy gives."""
    dev = rec.device
    N, C = 8, 5000
    x, y = inputs(N, C, dtype, dev, seed=4, ignored=())
    x[0, :2048] = float("-inf")
    y[0] = 3000
    loss = ltfast.adjusted_cross_entropy(x, y, label_smoothing=0.1, reduction="none")
    expected = F.cross_entropy(x.double(), y, label_smoothing=0.1, reduction="none")
    rec.compare(check, "label_smoothing", loss, expected, dtype, "F.cross_entropy", "loss", start)
    mean = ltfast.adjusted_cross_entropy(x, y, label_smoothing=0.1)
    rec.flag(check, "label_smoothing", loss[0].item() == float("inf") and mean.item() == float("inf"), start,
             f"row 0 {loss[0].item()}, mean {mean.item()} (want inf, inf)", [N, C], dtype, "F.cross_entropy")


def large_logits(rec: Recorder, check, start, N, C):
    """Rows offset by +-1e4, +-1e6, 1e30 (float32): (z - max) - log(sum) keeps every digit, so the
    loss and gradient match F.cross_entropy in float64 on the same values."""
    dev, dtype = rec.device, torch.float32
    x, y = inputs(N, C, dtype, dev, seed=5, ignored=())
    offsets = torch.tensor([1e4, -1e4, 1e6, -1e6, 1e30], dtype=torch.float32, device=dev)
    x = x + offsets[torch.arange(N, device=dev) % 5][:, None]
    for op, ours, theirs in (
            ("adjusted_cross_entropy", lambda t: ltfast.adjusted_cross_entropy(t, y, reduction="none"),
             lambda t: F.cross_entropy(t, y, reduction="none")),
            ("label_smoothing", lambda t: ltfast.adjusted_cross_entropy(t, y, label_smoothing=0.1, reduction="none"),
             lambda t: F.cross_entropy(t, y, label_smoothing=0.1, reduction="none"))):
        loss, grad = loss_and_grad(ours, x)
        ref_loss, ref_grad = loss_and_grad(theirs, x.double())
        rec.compare(check, op, loss, ref_loss, dtype, "F.cross_entropy", "loss", start, rtol=2e-5, atol=1e-4)
        rec.compare(check, op, grad, ref_grad, dtype, "F.cross_entropy", "grad", start, scale_atol=True)


def sampler_draws(rec: Recorder, check, start, draws, ref_draws):
    """class_aware_sample / class_weighted_sample: counter-based, so the device op must give the
    CPU op's indices bit for bit; the numpy reference checks the first ref_draws."""
    dev = rec.device
    C = 1000
    counts = torch.logspace(3.1, 0.7, C).round().long()  # ImageNet-LT-like, 1259 -> 5 images
    offsets = torch.zeros(C + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    members = torch.randperm(int(offsets[-1]), generator=torch.Generator().manual_seed(0))
    cdf = torch.cumsum(counts.double().sqrt() / counts.double().sqrt().sum(), 0)
    cdf[-1] = 1.0
    seed, epoch, start_pos, per_class = 2**40 + 7, 3, 11, 4
    length = draws + start_pos
    aware = (torch.ops.ltfast.class_aware_sample, (offsets, members), (seed, epoch, start_pos, draws, per_class, length),
             reference.class_aware_sample)
    weighted = (torch.ops.ltfast.class_weighted_sample, (cdf, offsets, members), (seed, epoch, start_pos, draws, length),
                reference.class_weighted_sample)
    for name, (op, tables, scalars, ref) in (("class_aware_sample", aware), ("class_weighted_sample", weighted)):
        got = op(*(t.to(dev) for t in tables), *scalars)
        cpu = op(*tables, *scalars) if dev != "cpu" else got
        rec.compare(check, name, got, cpu, torch.int64, "cpu_op", "draws", start, exact=True,
                    note=f"{draws} draws")
        short = list(scalars)
        short[3] = ref_draws  # count is the 4th scalar of both ops
        expected = ref(*tables, *short)
        rec.compare(check, name, got[:ref_draws], expected, torch.int64, "reference", "draws", start, exact=True,
                    note=f"first {ref_draws} draws")


# ------------------------------------------------------------------ plan
def plan(dry_run: bool, cpu_rows: int):
    """(check name, function, args), most valuable first. Dry run: the same checks at sizes that
    take a few seconds on 2 CPU cores."""
    big, wide, edge = ((256, 515), (8, 3000), (64, 100)) if dry_run else ((65536, 8142), (64, 100_000), (4096, 1000))
    bf16, f32 = torch.bfloat16, torch.float32
    steps = [(f"{op}@{big[0]}x{big[1]}", op_parity, (op, *big, bf16, cpu_rows)) for op in OPS]
    steps += [(f"{op}@{wide[0]}x{wide[1]}", op_parity, (op, *wide, bf16, cpu_rows)) for op in OPS]
    steps += [(f"{op}@N=0", op_parity, (op, 0, 1000, f32, cpu_rows)) for op in OPS]
    steps += [(f"{op}@C=1", op_parity, (op, 64, 1, f32, cpu_rows)) for op in OPS]
    steps += [(f"{op}@expanded_grad", expanded_grad, (op, *edge, bf16)) for op, rowwise in OPS.items() if rowwise]
    steps += [("eql_non_finite", eql_non_finite, (edge[0], edge[1], dtype)) for dtype in (f32, bf16)]
    steps += [("label_smoothing_-inf_tile", label_smoothing_inf_tile, (dtype,)) for dtype in (f32, bf16)]
    steps += [("large_logits", large_logits, (256, 1000) if dry_run else (4096, 8142))]
    steps += [("sampler_draws", sampler_draws, (20_000, 5_000) if dry_run else (10**6, 10**5))]
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes")
    parser.add_argument("--out", metavar="PATH", help="append one JSON line per check")
    parser.add_argument("--budget-s", type=float, default=75.0, help="skip the checks left after this many seconds")
    parser.add_argument("--cpu-rows", type=int, default=None,
                        help="rows of the big shapes the CPU op recomputes (default 2048; dry run 32)")
    parser.add_argument("-k", metavar="SUBSTRING", help="only checks whose name contains this")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not ltfast._extension.AVAILABLE:
        print(f"ltfast._C is not available ({ltfast._extension.LOAD_ERROR}): build it first")
        return 1
    if device == "cuda" and not (torch.cuda.is_available() and ltfast.has_cuda_kernels()):
        print("no CUDA device or ltfast built without CUDA kernels (use --dry-run on a CPU machine)")
        return 1
    cpu_rows = args.cpu_rows or (32 if args.dry_run else 2048)
    rec = Recorder(args.out, args.budget_s, device)
    print(f"parity on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU kernels vs reference'}), "
          f"torch {torch.__version__}, budget {args.budget_s:.0f} s", flush=True)
    for name, fn, fn_args in plan(args.dry_run, cpu_rows):
        if args.k and args.k not in name:
            continue
        rec.run(name, fn, *fn_args)
    return rec.summary()


if __name__ == "__main__":
    sys.exit(main())
