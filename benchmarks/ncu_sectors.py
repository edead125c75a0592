"""Nsight Compute's view of one kernel per family beside the SIMT emulator's (scripts/gpu_check.sh).

On a GPU machine with `ncu`, runs forward and backward of one op per family once at 64 x 8142 bf16
(the memory_model.py shape) under

    ncu --csv --kernel-name regex:ltfast --metrics <sector and DRAM metrics>

and prints per kernel: ncu's sector efficiency of loads and stores (the bytes used per 32-byte
sector), DRAM bytes, kernel time and achieved GB/s, next to the emulator's sector efficiency and
counted bytes for the same kernel and shape from benchmarks/results/memory_model.json (written by
`python benchmarks/memory_model.py --simt --json ...` on a CPU machine: the emulator takes minutes,
which a GPU loan cannot spare). A kernel whose ncu efficiency differs from the emulator's by more than
0.05 is flagged: the emulator's model of warp requests is then wrong for it.

    python benchmarks/ncu_sectors.py [--json PATH] [--timeout S]
    python benchmarks/ncu_sectors.py --dry-run      # CPU: the ncu command line and the emulator side only
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR_RESULTS = os.path.join(ROOT, "benchmarks", "results", "memory_model.json")
SHAPE = (64, 8142)
# One op per family (the kernels of each family share their structure).
OPS = ("balanced_softmax", "equalization_loss", "lade", "mixed_cross_entropy", "diverse_expert_loss")
METRICS = {
    "smsp__sass_average_data_bytes_per_sector_mem_global_op_ld.pct": "load_efficiency_pct",
    "smsp__sass_average_data_bytes_per_sector_mem_global_op_st.pct": "store_efficiency_pct",
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__bytes_write.sum": "dram_write_bytes",
    "gpu__time_duration.sum": "duration_ns",
}


def run_kernels() -> None:
    """What ncu profiles: forward and backward of each op once, after a warm-up call."""
    import torch
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import memory_model
    gen = torch.Generator().manual_seed(0)
    for op in OPS:
        shape = (SHAPE[0], 3, SHAPE[1]) if op == "diverse_expert_loss" else SHAPE
        case = memory_model.Case(op, shape, "bfloat16")
        logits, fn = memory_model.make_call(case, gen, device="cuda")
        for _ in range(2):  # warm-up, then the profiled call (ncu reports each launch; the last one counts)
            logits.grad = None
            fn(logits).backward()
        torch.cuda.synchronize()


def ncu_command() -> list[str]:
    return ["ncu", "--csv", "--kernel-name", "regex:ltfast", "--metrics", ",".join(METRICS),
            sys.executable, os.path.abspath(__file__), "--run-kernels"]


def parse_ncu_csv(text: str) -> dict:
    """{kernel function name: {metric: value}} of the last launch of each kernel."""
    start = text.find('"ID"')
    rows = csv.DictReader(io.StringIO(text[start:])) if start >= 0 else []
    out: dict = {}
    for row in rows:
        name = row.get("Kernel Name", "")
        metric = row.get("Metric Name", "")
        if metric not in METRICS:
            continue
        value = float(row.get("Metric Value", "nan").replace(",", ""))
        unit = row.get("Metric Unit", "")
        scale = {"Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "usecond": 1e3, "msecond": 1e6}.get(unit, 1.0)
        out.setdefault(name, {})[METRICS[metric]] = value * scale
    return out


def base_name(kernel: str) -> str:
    """'void ltfast::cross_entropy_kernels::forward_rows_kernel<...>(...)' -> 'forward_rows_kernel'."""
    head = kernel.split("(")[0]
    depth, kept = 0, []
    for ch in head:
        depth += ch == "<"
        depth -= ch == ">"
        if depth == 0 and ch not in "<>":
            kept.append(ch)
    return "".join(kept).split("::")[-1].split()[-1]


def emulator_records() -> list[dict]:
    if not os.path.exists(EMULATOR_RESULTS):
        return []
    with open(EMULATOR_RESULTS) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-kernels", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="append one JSON line per kernel")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.run_kernels:
        run_kernels()
        return 0
    emulated = [r for r in emulator_records() if r["op"] in OPS and r["shape"][-1] == SHAPE[1]
                and r["shape"][0] == SHAPE[0]]
    print(f"ncu sectors vs SIMT emulator, {SHAPE[0]}x{SHAPE[1]} bf16 (emulator: {EMULATOR_RESULTS}, "
          f"{len(emulated)} kernel records)")
    if args.dry_run or shutil.which("ncu") is None:
        print("ncu command:", " ".join(ncu_command()))
        for r in emulated:
            print(f"  emulator {r['op']:22} {r['pass']} {r['kernel']:42} loads {r.get('sector_efficiency_loads')} "
                  f"stores {r.get('sector_efficiency_stores')} bytes {r['bytes_read'] + r['bytes_written']}")
        if not args.dry_run:
            print("ncu not found: nothing measured")
            return 2
        return 0
    done = subprocess.run(ncu_command(), capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return 1
    measured = parse_ncu_csv(done.stdout)
    out = open(args.json, "a") if args.json else None
    status = 0
    print(f"{'kernel':60} {'ld eff':>6} {'emu':>6} {'st eff':>6} {'emu':>6} {'DRAM MB':>8} {'model MB':>8} "
          f"{'us':>8} {'GB/s':>7}")
    for name, m in sorted(measured.items()):
        base = base_name(name)
        match = [r for r in emulated if r["kernel"].split()[-1] == base]
        emu = match[-1] if match else {}
        ld = m.get("load_efficiency_pct", float("nan")) / 100
        st = m.get("store_efficiency_pct", float("nan")) / 100
        dram = m.get("dram_read_bytes", 0) + m.get("dram_write_bytes", 0)
        us = m.get("duration_ns", float("nan")) / 1e3
        gb_s = dram / (us * 1e3) if us == us and us > 0 else float("nan")
        emu_ld, emu_st = emu.get("sector_efficiency_loads"), emu.get("sector_efficiency_stores")
        flag = any(e is not None and abs(e - v) > 0.05 for e, v in ((emu_ld, ld), (emu_st, st)) if v == v)
        status = max(status, 0)  # a disagreement is reported, not failed: the first GPU run calibrates
        model = emu.get("bytes_model")
        print(f"{name[:60]:60} {ld:6.3f} {emu_ld if emu_ld is not None else '-':>6} {st:6.3f} "
              f"{emu_st if emu_st is not None else '-':>6} {dram / 1e6:8.2f} "
              f"{(model or 0) / 1e6:8.2f} {us:8.1f} {gb_s:7.0f}{'  EMULATOR DIFFERS' if flag else ''}")
        if out:
            out.write(json.dumps({"suite": "ncu_sectors", "kernel": name, "shape": list(SHAPE), "dtype": "bfloat16",
                                  **m, "emulator": {k: emu.get(k) for k in ("op", "pass", "sector_efficiency_loads",
                                                                           "sector_efficiency_stores", "bytes_read",
                                                                           "bytes_written", "bytes_model")},
                                  "achieved_gb_s": gb_s, "emulator_differs": flag}) + "\n")
    if out:
        out.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
