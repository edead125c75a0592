"""Runs every ltfast CUDA kernel once, forward and backward, at small shapes: the program that
scripts/gpu_check.sh puts under compute-sanitizer (memcheck, racecheck).

Why not pytest: under compute-sanitizer every kernel of the process is instrumented, and a test
module launches far more of torch's kernels (references, comparisons, random inputs) than of
ltfast's; the sanitizer's kernel filter (``--kernel-name kns=ltfast``) plus this driver keep the
instrumented work to ltfast's own launches, so both tools fit their ~40 s in the GPU call.

    python scripts/sanitizer_driver.py --device cuda     # on the GPU machine, under the sanitizer
    python scripts/sanitizer_driver.py --device cpu      # CI: the same calls on the CPU kernels

Shapes: 129 x 1000 (a partial last block of rows, odd C), a 5000-wide row with a -inf tile (the
online-softmax rescaling path), C = 1 and N = 0 edge cases, bf16 and fp32; every per-class option
of the CE family; the sampler tables; mixed and probability targets; 9 x 3 x 1000 expert logits.
Each case prints one line; the exit status is non-zero when a call raises or returns a
non-finite loss where a finite one is expected.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ltfast  # noqa: E402
from ltfast import priors  # noqa: E402


def _inputs(n, c, dtype, device, generator):
    logits = torch.randn(n, c, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    if n > 2:
        target[1] = -100  # an ignored row in every case
    return logits, target


def cases(device):
    """(name, thunk returning the loss to backpropagate)."""
    generator = torch.Generator().manual_seed(0)
    c = 1000
    counts = torch.logspace(3.1, 0.7, c).round()
    log_prior = priors.log_prior(counts).to(device)
    margins = priors.ldam_margins(counts).to(device) * 30
    weights = priors.effective_number_weights(counts).to(device)
    tail = priors.tail_classes(counts).to(device)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).split(".")[1]

        def bs(dtype=dtype):
            x, y = _inputs(129, c, dtype, device, generator)
            return x, ltfast.balanced_softmax_loss(x, y, log_prior)

        def ldam_focal(dtype=dtype):
            x, y = _inputs(129, c, dtype, device, generator)
            return x, ltfast.adjusted_cross_entropy(x, y, log_prior, margins, weights, gamma=1.0)

        def smoothing(dtype=dtype):  # focal and smoothing are exclusive: a case of its own
            x, y = _inputs(129, c, dtype, device, generator)
            return x, ltfast.adjusted_cross_entropy(x, y, log_prior, weight=weights, label_smoothing=0.1)

        def seql(dtype=dtype):
            x, y = _inputs(129, c, dtype, device, generator)
            return x, ltfast.softmax_equalization_loss(x, y, tail)

        def eql(dtype=dtype):
            x, y = _inputs(129, c, dtype, device, generator)
            return x, ltfast.equalization_loss(x, y, tail)

        def lade(dtype=dtype):
            x, y = _inputs(129, c, dtype, device, generator)
            return x, ltfast.lade_loss(x, y, log_prior)

        def mixed(dtype=dtype):
            x, y = _inputs(129, c, dtype, device, generator)
            y_b = torch.randint(0, c, (129,), generator=generator).to(device)
            return x, ltfast.mixed_cross_entropy(x, y, y_b, 0.3, adjustment=log_prior, label_smoothing=0.1)

        def probability(dtype=dtype):
            x, _ = _inputs(129, c, dtype, device, generator)
            p = torch.softmax(torch.randn(129, c, generator=generator), 1).to(device=device, dtype=dtype)
            return x, ltfast.probability_cross_entropy(x, p, adjustment=log_prior)

        def sade(dtype=dtype):
            x = torch.randn(9, 3, c, generator=generator).to(device=device, dtype=dtype).requires_grad_()
            y = torch.randint(0, c, (9,), generator=generator).to(device)
            adjustments = priors.sade_adjustments(counts).to(device=device, dtype=torch.float32)
            return x, ltfast.diverse_expert_loss(x, y, adjustments)

        def ride(dtype=dtype):
            x = torch.randn(9, 3, c, generator=generator).to(device=device, dtype=dtype).requires_grad_()
            y = torch.randint(0, c, (9,), generator=generator).to(device)
            temperature = priors.ride_diversity_temperature(counts).to(device)
            return x, ltfast.ride_loss(x, y, margins, weights, temperature)

        out += [(f"{name}-{tag}", fn) for name, fn in
                (("balanced_softmax-129x1000", bs), ("ldam_weight_focal-129x1000", ldam_focal),
                 ("smoothing_weight-129x1000", smoothing), ("seql-129x1000", seql),
                 ("eql-129x1000", eql), ("lade-129x1000", lade), ("mixed-129x1000", mixed),
                 ("probability-129x1000", probability), ("sade-9x3x1000", sade), ("ride-9x3x1000", ride))]

    def wide_row_with_inf_tile():
        x = torch.randn(3, 5000, generator=generator)
        x[0, :2048] = -math.inf  # a whole tile at -inf: the online rescaling must not produce NaN
        x = x.to(device).requires_grad_()
        y = torch.tensor([4000, 7, 4999], device=device)
        return x, ltfast.adjusted_cross_entropy(x, y, label_smoothing=0.0)

    def one_class():
        x = torch.randn(5, 1, generator=generator).to(device).requires_grad_()
        return x, ltfast.balanced_softmax_loss(x, torch.zeros(5, dtype=torch.int64, device=device),
                                               torch.zeros(1, device=device))

    def empty_batch():
        x = torch.randn(0, 7).to(device).requires_grad_()
        return x, ltfast.balanced_softmax_loss(x, torch.zeros(0, dtype=torch.int64, device=device),
                                               torch.zeros(7, device=device), reduction="sum")

    out += [("wide_row_inf_tile-3x5000-float32", wide_row_with_inf_tile), ("one_class-5x1-float32", one_class),
            ("empty_batch-0x7-float32", empty_batch)]
    return out


def sampler_cases(device):
    counts = torch.logspace(3.1, 0.7, 1000).round().long()
    offsets = torch.zeros(1001, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    members = torch.randperm(int(offsets[-1]), generator=torch.Generator().manual_seed(0))
    cdf = torch.cumsum(counts.double().sqrt() / counts.double().sqrt().sum(), 0)
    cdf[-1] = 1.0
    offsets, members, cdf = offsets.to(device), members.to(device), cdf.to(device)
    return [("class_aware_sample-5000", lambda: torch.ops.ltfast.class_aware_sample(offsets, members, 7, 3, 11, 5000, 4, 5011)),
            ("class_weighted_sample-5000", lambda: torch.ops.ltfast.class_weighted_sample(cdf, offsets, members, 7, 3, 11, 5000, 5011))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    failures = 0
    started = time.perf_counter()
    for name, thunk in cases(args.device):
        try:
            logits, loss = thunk()
            loss.float().sum().backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            finite = bool(torch.isfinite(loss.detach().float()).all()) and bool(torch.isfinite(logits.grad.float()).all())
            print(f"{'ok  ' if finite else 'FAIL'} {name}: loss {loss.detach().float().sum().item():.6g}"
                  + ("" if finite else " (non-finite loss or gradient)"))
            failures += not finite
        except Exception as error:  # report every case, then fail
            print(f"FAIL {name}: {type(error).__name__}: {str(error).splitlines()[0]}")
            failures += 1
    for name, thunk in sampler_cases(args.device):
        try:
            draws = thunk()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"ok   {name}: {draws.numel()} draws, max index {int(draws.max())}")
        except Exception as error:
            print(f"FAIL {name}: {type(error).__name__}: {str(error).splitlines()[0]}")
            failures += 1
    print(f"sanitizer driver: {failures} failure(s), {time.perf_counter() - started:.1f} s on {args.device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
