"""PaCo's loss on the CPU, forward + backward: the fused ltfast.paco_loss against the plain-PyTorch
transcription of the original PaCoLoss.forward (tests/_survey_originals.py), eager and under
torch.compile, in the same run, timed round-robin (median of interleaved repeats).

The similarity matmul ``features[:B] @ features.T`` is excluded from every implementation: each takes
the similarity [B, M] and sup_logits [B, C] as its inputs (the matmul is MKL's in all three) and
returns the loss; the backward produces the gradients of both.

    python benchmarks/paco_loss.py [--batch 256 --classes 1000 --queue 8192] [--json PATH]

Default shape: the issue's B = 256, C = 1000, K = 8192 (M = 2B + K = 8704), float32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, os.path.join(_HERE, "..", "tests"))
sys.path.insert(0, _HERE)

from common import Record, device_name, keep_freed_memory_in_the_heap, measure_interleaved, percentile  # noqa: E402

import ltfast  # noqa: E402
import _survey_originals as orig  # noqa: E402

# sh/ImageNetLT_train_X50.sh: alpha 0.05, beta 1, gamma 1, moco-t 0.07 (base temperature = moco-t).
ALPHA, BETA, GAMMA, TEMPERATURE, SUPT = 0.05, 1.0, 1.0, 0.07, 1.0


def make_inputs(batch, classes, queue, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = 128  # PaCo's moco-dim
    features = torch.nn.functional.normalize(torch.randn(2 * batch + queue, dim, generator=gen), dim=1)
    labels = torch.randint(0, classes, (2 * batch + queue,), generator=gen)
    labels[batch:2 * batch] = labels[:batch]  # k has q's labels
    similarity = features[:batch] @ features.T
    sup_logits = torch.randn(batch, classes, generator=gen) * 2
    counts = [max(1, int(1280 * (1 / 256) ** (c / max(classes - 1, 1)))) for c in range(classes)]
    return similarity, sup_logits, labels, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--queue", type=int, default=8192)
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per implementation")
    parser.add_argument("--max-reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory_in_the_heap()
    B, C, K = args.batch, args.classes, args.queue
    M = 2 * B + K
    similarity, sup_logits, labels, counts = make_inputs(B, C, K)
    original = orig.OriginalPaCoLoss(ALPHA, BETA, GAMMA, SUPT, TEMPERATURE, K=K, num_classes=C)
    original.cal_weight_for_classes(counts)
    log_prior = torch.log(original.weight + 1e-9).view(-1)
    anchor_labels = labels[:B]

    def fused(x, s):
        return ltfast.paco_loss(x, anchor_labels, labels, s, log_prior, temperature=TEMPERATURE, alpha=ALPHA,
                                beta=BETA, gamma=GAMMA, sup_temperature=SUPT)

    def eager(x, s):
        return original.loss_from_similarity(x, labels, s)

    functions = {"ltfast": fused, "eager": eager}
    if not args.no_compile:
        functions["compiled"] = torch.compile(eager, fullgraph=True)

    x = similarity.clone().requires_grad_()
    s = sup_logits.clone().requires_grad_()

    def step(fn):
        x.grad = s.grad = None
        fn(x, s).backward()

    # The three agree before anything is timed.
    results = {}
    for impl, fn in functions.items():
        step(fn)
        results[impl] = (fn(x, s).detach(), x.grad.clone(), s.grad.clone())
    for impl, (loss, gx, gs) in results.items():
        ref_loss, ref_gx, ref_gs = results["eager"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(gs, ref_gs, rtol=1e-4, atol=1e-7)

    calls = {impl: (lambda fn=fn: step(fn)) for impl, fn in functions.items()}
    times = measure_interleaved(calls, "cpu", args.min_time, args.max_reps, warmup=3)
    medians = {impl: statistics.median(t) for impl, t in times.items()}
    load = os.getloadavg()[0]
    print(f"PaCo loss fwd+bwd, CPU ({device_name('cpu')}, {torch.get_num_threads()} threads, "
          f"load average {load:.1f}: the machine is shared, timings are noisy), float32, "
          f"B = {B}, C = {C}, K = {K} (M = {M}).")
    print("Matmul excluded from all: inputs are similarity [B, M] and sup_logits [B, C]; each call is forward + "
          "backward into both.")
    for impl, t in times.items():
        print(f"  {impl:10s} median {medians[impl]:8.2f} ms   p20 {percentile(t, 0.2):8.2f}   "
              f"p80 {percentile(t, 0.8):8.2f}   ({len(t)} interleaved repeats)")
    baselines = {impl: m for impl, m in medians.items() if impl != "ltfast"}
    best = min(baselines, key=baselines.get)
    ratio = baselines[best] / medians["ltfast"]
    print(f"speedup of the fused op over the faster baseline ({best}): {ratio:.2f}x "
          + "  ".join(f"(vs {impl}: {m / medians['ltfast']:.2f}x)" for impl, m in baselines.items()))
    if args.json:
        records = []
        for impl, t in times.items():
            records.append(asdict(Record(
                suite="paco", name="paco_loss", impl=impl, device="cpu", device_name=device_name("cpu"),
                dtype="float32", shape=[B, C, M], mode="fwd_bwd", median_ms=medians[impl],
                p20_ms=percentile(t, 0.2), p80_ms=percentile(t, 0.8), peak_mem_mb=None,
                items_per_s=B / (medians[impl] / 1e3),
                extra={"matmul": "excluded", "threads": torch.get_num_threads(), "load_average": load,
                       "speedup_vs_faster_baseline": ratio if impl == "ltfast" else None, "repeats": len(t)})))
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")
    return ratio


if __name__ == "__main__":
    main()
