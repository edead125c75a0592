"""Compat suite: every ltfast.compat class (drop-ins for the survey codebases' losses) against the
plain-PyTorch transcription of its original (tests/_survey_originals.py), eager, forward and
forward+backward, round-robin in the same run.

    python benchmarks/throughput.py --suites compat [--quick] [--json PATH]

Records: suite "compat", name "<codebase>.<class>", impl "ltfast" or "original", shape [N, C] (for
DiverseExpertLoss and RIDELoss, per expert: the input is the trainer's [3, N, C] expert logits), and for ltfast
``speedup_vs_original``.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, os.path.join(_HERE, "..", "tests"))
sys.path.insert(0, _HERE)

from common import (OVERHEAD_SHAPES, Record, SingleThread, device_name, is_overhead_shape, loss_calls,  # noqa: E402
                    measure_interleaved, out_of_budget, peak_memory_mb, percentile)

from ltfast.compat import ensemble, survey  # noqa: E402
import _survey_originals as orig  # noqa: E402

# ImageNet-LT-like profile of calculate_prior: int(1280 * (1/256) ** (c / (C - 1))), 1280 -> 5 images.
IMG_MAX, IMBALANCE = 1280, 1.0 / 256


def _list_file(directory: str, counts) -> str:
    path = os.path.join(directory, f"train_{len(counts)}.txt")
    if not os.path.exists(path):
        with open(path, "w") as f:
            for c, n in enumerate(counts):
                f.writelines(f"train/n{c:08d}/{k}.JPEG {c}\n" for k in range(int(n)))
    return path


def _cases(C: int, directory: str):
    """name -> (ltfast module, original module, input kind)."""
    counts = survey.calculate_prior(C, IMG_MAX, IMBALANCE, return_num=True).long().tolist()
    path = _list_file(directory, counts)
    ldam = ensemble.LDAMLoss(counts, reweight_epoch=160)
    ldam_orig = orig.OriginalLDAMLoss(counts, reweight_epoch=160)
    # RIDE with the survey's config (config_imagenet_lt_resnext50_ride.json: reweight_epoch 160, reweight_factor 0.02).
    ride = ensemble.RIDELoss(counts, reweight_epoch=160, reweight_factor=0.02)
    ride_orig = orig.OriginalRIDELoss(counts, reweight_epoch=160, reweight_factor=0.02)
    for module in (ldam, ldam_orig, ride, ride_orig):
        module._hook_before_epoch(161)  # DRW on, as after epoch 160 of the survey's config
    return {
        "survey.SoftmaxLoss": (survey.SoftmaxLoss(), orig.OriginalSoftmaxLoss(), "logits"),
        "survey.WeightedSoftmaxLoss": (survey.WeightedSoftmaxLoss(path, C), orig.OriginalWeightedSoftmaxLoss(path, C),
                                       "logits"),
        "survey.PriorCELoss": (survey.PriorCELoss(C, prior_txt=path), orig.OriginalPriorCELoss(C, prior_txt=path),
                               "logits"),
        "survey.LADELoss": (survey.LADELoss(C, prior_txt=path), orig.OriginalLADELoss(C, prior_txt=path), "logits"),
        "survey.SEQL": (survey.SEQL(prior_txt=path, num_classes=C), orig.OriginalSEQL(path, num_classes=C),
                        "logits"),
        "survey.FocalLoss": (survey.FocalLoss(gamma=3.0), orig.OriginalFocalLoss(3.0), "logits"),
        "ensemble.CrossEntropyLoss": (ensemble.CrossEntropyLoss(counts, reweight_CE=True),
                                      orig.OriginalEnsembleCrossEntropyLoss(counts, reweight_CE=True), "logits"),
        "ensemble.FocalLoss": (ensemble.FocalLoss(counts, gamma=1.0), orig.OriginalEnsembleFocalLoss(gamma=1.0),
                               "logits"),
        "ensemble.LDAMLoss": (ldam, ldam_orig, "logits"),
        "ensemble.DiverseExpertLoss": (ensemble.DiverseExpertLoss(counts, tau=2),
                                       orig.OriginalDiverseExpertLoss(counts, tau=2), "experts"),
        "ensemble.RIDELoss": (ride, ride_orig, "experts"),
    }


def compat_suite(args) -> list[Record]:
    device = args.device
    # 1 x 2: the host overhead of a call; 64 x 1000: a small batch (single-threaded on the CPU).
    shapes = OVERHEAD_SHAPES + ([(256, 1000)] if args.quick else [(256, 1000), (4096, 1000)])
    if getattr(args, "shapes", None):
        shapes = [shape for shape in shapes if "x".join(map(str, shape)) in args.shapes]
    dtype = torch.float32
    records = args.sink if getattr(args, "sink", None) is not None else []
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="ltfast_compat_bench_") as directory:
        for N, C in shapes:
            if out_of_budget(args):
                print(f"compat suite: --budget-s reached, shape {N}x{C} not measured", flush=True)
                break
            single = device == "cpu" and is_overhead_shape((N, C))
            cases = _cases(C, directory)
            target = torch.randint(0, C, (N,), generator=gen).to(device)
            logits = (torch.randn(N, C, generator=gen) * 2).to(device=device, dtype=dtype)
            experts = (torch.randn(N, 3, C, generator=gen) * 2).to(device=device, dtype=dtype)
            for name, (ours, original, kind) in cases.items():
                ours, original = ours.to(device), original.to(device)
                if kind == "experts":
                    def loss_of(module, x):
                        return module(output_logits=x.mean(1), target=target, extra_info={"logits": x.transpose(0, 1)})
                    source = experts
                else:
                    def loss_of(module, x):
                        return module(x, target)
                    source = logits
                for mode in ("fwd", "fwd_bwd"):
                    x = source.detach().clone().requires_grad_(mode == "fwd_bwd")
                    calls = loss_calls({"ltfast": ours, "original": original}, x, loss_of, mode)
                    with SingleThread(single):
                        times = measure_interleaved(calls, device, args.min_time, args.max_reps, warmup=3)
                    medians = {impl: statistics.median(t) for impl, t in times.items()}
                    for impl, t in times.items():
                        extra = {"codebase": name.split(".")[0], **({"threads": 1} if single else {})}
                        if impl == "ltfast":
                            speedup = round(medians["original"] / medians["ltfast"], 2)
                            extra["speedup_vs_original"] = speedup
                            extra["speedup_vs_best_baseline"] = speedup  # the column print_table shows
                        peak = peak_memory_mb(calls[impl], device)
                        records.append(Record("compat", name, impl, device, device_name(device),
                                              str(dtype).replace("torch.", ""), [N, C], mode,
                                              round(medians[impl], 4), round(percentile(t, 0.2), 4),
                                              round(percentile(t, 0.8), 4),
                                              None if peak is None else round(peak, 2),
                                              round(N / (medians[impl] * 1e-3), 1), extra))
    return records
