"""Markdown tables of a throughput.py --json file, one per suite:

- loss: medians of ltfast, eager and compiled reference, and ltfast's speed-up over each (CUDA:
  achieved GB/s and the fraction of the measured copy bandwidth);
- data: images/s (or draws/s) of each implementation and the speed-up of ltfast's side (DALI,
  DeviceTensorLoader, the sampler op) over the best baseline of the same row;
- compat: each compat class against the plain transcription of the original.

    python benchmarks/summarize.py benchmarks/results/<file>.json
"""
import json
import sys

# The implementation that is ltfast's side of each data row; the others are baselines.
OURS = {"dali", "ltfast"}


def group(records, suite):
    rows = {}
    for r in records:
        if r["suite"] == suite:
            key = (r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"])
            rows.setdefault(key, {})[r["impl"]] = r
    return rows


def loss_table(records):
    rows = group(records, "loss")
    if not rows:
        return
    cuda = any(r["device"] == "cuda" for r in records)
    header = "| loss | shape | dtype | mode | ltfast ms | eager ms | compile ms | vs eager | vs compile |"
    if cuda:
        # GB/s: three passes over the logits (fwd 1, fwd_bwd 3) / median; model GB/s: traffic_model.py
        # bytes / median; launches measured/model; kernel ms from torch.profiler of one call.
        header += " ltfast GB/s | of copy BW | model GB/s | launches | row+column kernel ms | finish kernel ms |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for (name, shape, dtype, mode), impls in rows.items():
        fused, eager, compiled = impls["ltfast"], impls["eager"], impls.get("compile")  # compile: optional
        line = (f"| {name} | {shape} | {dtype} | {mode} | {fused['median_ms']:.3f} | {eager['median_ms']:.3f} | "
                f"{compiled['median_ms'] if compiled else float('nan'):.3f} | "
                f"{eager['median_ms'] / fused['median_ms']:.2f}x | "
                f"{compiled['median_ms'] / fused['median_ms'] if compiled else float('nan'):.2f}x |")
        if cuda:
            kinds = fused.get("kernel_ms_by_kind", {})
            line += (f" {fused.get('achieved_gb_s', 0):.0f} | {fused.get('fraction_of_copy_bw', 0):.2f} |"
                     f" {fused.get('model_gb_s', 0):.0f} | {fused.get('launches', '-')}/{fused.get('model_launches', '-')} |"
                     f" {kinds.get('rows', 0) + kinds.get('column', 0):.3f} | {kinds.get('finish', 0):.3f} |")
        print(line)
    print()


def data_table(records):
    rows = group(records, "data")
    if not rows:
        return
    print("| row | batch shape | mode | ltfast side | items/s | baseline | items/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, shape, _dtype, mode), impls in rows.items():
        ours = next(impl for impl in impls if impl in OURS)
        baselines = {impl: r for impl, r in impls.items() if impl != ours}
        best = max(baselines, key=lambda impl: baselines[impl]["items_per_s"])
        a, b = impls[ours]["items_per_s"], baselines[best]["items_per_s"]
        print(f"| {name} | {shape} | {mode} | {ours} | {a:,.0f} | {best} | {b:,.0f} | {a / b:.2f}x |")
    print()


def compat_table(records):
    rows = group(records, "compat")
    if not rows:
        return
    print("| class | shape | mode | ltfast ms | original ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for (name, shape, _dtype, mode), impls in rows.items():
        ours, original = impls["ltfast"]["median_ms"], impls["original"]["median_ms"]
        print(f"| {name} | {shape} | {mode} | {ours:.3f} | {original:.3f} | {original / ours:.2f}x |")
    print()


def load(path: str) -> list:
    """A JSON list (throughput.py --json) or JSON lines."""
    with open(path) as f:
        text = f.read()
    try:
        records = json.loads(text)
        return records if isinstance(records, list) else [records]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(path: str) -> int:
    records = load(path)
    if not records:
        print(f"{path}: no records")
        return 1
    print(f"Device: {records[0]['device_name']}\n")
    loss_table(records)
    data_table(records)
    compat_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
