"""Markdown table of a throughput.py --json file: medians of ltfast, eager and compiled reference,
and ltfast's speed-up over each (CUDA: achieved GB/s and the fraction of the measured copy
bandwidth).

    python benchmarks/summarize.py benchmarks/results/<file>.json
"""
import json
import sys


def main(path: str) -> int:
    with open(path) as f:
        records = json.load(f)
    rows = {}
    for r in records:
        key = (r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"])
        rows.setdefault(key, {})[r["impl"]] = r
    cuda = any(r["device"] == "cuda" for r in records)
    print(f"Device: {records[0]['device_name']}\n")
    header = "| loss | shape | dtype | mode | ltfast ms | eager ms | compile ms | vs eager | vs compile |"
    if cuda:
        header += " ltfast GB/s | of copy BW |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for (name, shape, dtype, mode), impls in rows.items():
        fused, eager, compiled = impls["ltfast"], impls["eager"], impls["compile"]
        line = (f"| {name} | {shape} | {dtype} | {mode} | {fused['median_ms']:.3f} | {eager['median_ms']:.3f} | "
                f"{compiled['median_ms']:.3f} | {eager['median_ms'] / fused['median_ms']:.2f}x | "
                f"{compiled['median_ms'] / fused['median_ms']:.2f}x |")
        if cuda:
            line += f" {fused.get('achieved_gb_s', 0):.0f} | {fused.get('fraction_of_copy_bw', 0):.2f} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
