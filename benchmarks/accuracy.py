"""Long-tailed accuracy of the survey's methods on Fashion-MNIST-LT (CPU, no download).

    python benchmarks/accuracy.py --quick     # the main job: 1 seed, CE / Balanced Softmax / LADE
    python benchmarks/accuracy.py             # 2 seeds, every configs/fmnist_lt method; writes
                                              # benchmarks/results/fmnist_lt-cpu.{json,md}

Each run is `ltfast.train.train` on configs/fmnist_lt/<method>.yaml (the same code as
`python -m ltfast.train`), in this process, one after the other. Seeds change the training
randomness (init, sampling, augmentation); the long-tailed subset (data.split_seed) stays the same,
so the methods are compared on one dataset. Numbers are test-set accuracies (balanced 10k test set)
of the best-validation epoch. A second stage starts from its first stage's run of the same seed
(STAGE1_OF: cRT, LWS, NCM and tau-norm from CE, MiSLAS stage 2 from MiSLAS stage 1), which --methods
must list too; it is run first whatever the order. NCM and tau-norm train nothing: their s / run is
the fit and the evaluation. SADE's rows also run its test-time self-supervised aggregation
(ltfast.train.test_time) on a forward- and a backward-long-tailed test set (imbalance 50, built from
the balanced test set) and report the micro accuracy before and after.

The statistics (mean, sample standard deviation over the seeds) are ``ltfast.report``'s, and the
markdown ends with ``python -m ltfast.report``'s table of the same run folders (ECE, training time
and images/s per method), also stored under "report" in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ltfast import report  # noqa: E402  (after the sys.path line: the checkout's ltfast)

ALL_METHODS = ["ce", "weighted_ce", "seql", "balanced_softmax", "lade", "ldam_drw", "crt", "lws", "ncm", "tau_norm",
               "causal", "mislas_stage1", "mislas_stage2", "ride", "sade", "reslt", "bbn", "rsg", "paco"]
# second stage -> the method whose best.pt of the same seed it starts from (model.init_from)
STAGE1_OF = {"crt": "ce", "lws": "ce", "ncm": "ce", "tau_norm": "ce", "mislas_stage2": "mislas_stage1"}
TEST_TIME_METHODS = {"sade"}             # SADE's test-time aggregation runs after these
TEST_TIME_SETS = ("forward50", "backward50")
QUICK_METHODS = ["ce", "balanced_softmax", "lade"]
COLUMNS = ("top1", "many", "medium", "few")


def run_method(method: str, seed: int, out_root: str, overrides: list[str], stage1: dict) -> dict:
    from ltfast.train import load_config, train
    out_dir = os.path.join(out_root, method, f"seed{seed}")
    # The benchmark owns its run folders: a second run replaces the first (the trainer refuses a
    # non-empty out_dir otherwise).
    extra = [f"train.seed={seed}", f"train.out_dir={out_dir}", "train.progress=false", "train.overwrite=true"]
    if method in STAGE1_OF:
        first = STAGE1_OF[method]
        if (first, seed) not in stage1:
            raise SystemExit(f"{method} needs the {first} run of the same seed: list {first} in --methods")
        extra.append(f"model.init_from={stage1[(first, seed)]}")
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt", f"{method}.yaml"), extra + overrides)
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    stage1[(method, seed)] = os.path.join(out_dir, "best.pt")
    test = summary["test"]
    test_time = run_test_time(out_dir, seed) if method in TEST_TIME_METHODS else {}
    return {"method": method, "name": summary["name"], "seed": seed, "wall_s": wall, **test_time,
            "train_time_s": summary["train_time_s"], "best_epoch": summary["best_epoch"],
            "epochs": 0 if cfg["model"]["classifier"] in ("ncm", "tau_norm") else cfg["optim"]["epochs"],
            "decoupled": summary.get("decoupled"), **{k: test[k] for k in COLUMNS},
            "per_class": test["per_class"], "plot": summary.get("plot"), "summary": summary.get("summary")}


def run_test_time(out_dir: str, seed: int) -> dict:
    """Micro accuracy before / after SADE's aggregation on TEST_TIME_SETS, with the learnt weights."""
    import torch
    from ltfast.train import metrics
    from ltfast.train.test_time import aggregate_on, load_run, shifted_test_indices, subset
    device = torch.device("cpu")
    model, cfg, sets, _, _ = load_run(out_dir, None, [], device)
    counts = sets["class_counts"]
    groups = metrics.shot_groups(counts, cfg["eval"]["many_threshold"], cfg["eval"]["few_threshold"])
    out = {}
    for name in TEST_TIME_SETS:
        dataset = subset(sets["test"], shifted_test_indices(sets["test"].labels, counts, name, seed))
        start = time.perf_counter()
        result = aggregate_on(model, sets, dataset, cfg["data"], counts, groups, device=device, seed=seed,
                              log=lambda message: None)
        out[f"{name}_before"], out[f"{name}_after"] = result["before"]["micro"], result["after"]["micro"]
        out[f"{name}_weights"], out[f"{name}_tta_s"] = result["weights"], time.perf_counter() - start
        print(f"test-time aggregation, {name} ({result['samples']} images): micro {result['before']['micro']:.2f} -> "
              f"{result['after']['micro']:.2f}, weights {', '.join(f'{w:.2f}' for w in result['weights'])}, "
              f"{result['epochs']} epoch(s)", flush=True)
    return out


def aggregate(runs: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row = {"method": method, "name": mine[0]["name"], "seeds": [r["seed"] for r in mine]}
        for key in COLUMNS:
            values = [r[key] for r in mine]
            row[key], std, n = report.mean_std(values)  # ltfast.report's statistic: sample std (n - 1)
            row[f"{key}_runs"] = values
            row[f"{key}_std"] = std if n > 1 else None
        row["wall_s"] = report.mean_std([r["wall_s"] for r in mine])[0]
        for name in TEST_TIME_SETS:
            for when in ("before", "after"):
                key = f"{name}_{when}"
                if all(key in r for r in mine):
                    values = [r[key] for r in mine]
                    row[key], std, n = report.mean_std(values)
                    row[f"{key}_runs"], row[f"{key}_std"] = values, std if n > 1 else None
        rows.append(row)
    ce = next((r for r in rows if r["method"] == "ce"), None)
    for row in rows:
        row["top1_vs_ce"] = None if ce is None else row["top1"] - ce["top1"]
    return rows


def markdown(rows: list[dict], runs: list[dict], meta: dict) -> str:
    seeds = len(rows[0]["seeds"]) if rows else 0
    lines = [f"Fashion-MNIST-LT (imbalance {meta['ratio']:g}, {meta['train_images']} training images; many / medium / "
             f"few = {meta['shots']}), balanced 10k test set, best-validation epoch; mean over {seeds} seed(s)"
             + (" (± standard deviation)" if seeds > 1 else "") + f". {meta['machine']}.", "",
             "| method | top-1 (balanced) | many | medium | few | top-1 vs CE | s / run |",
             "|---|---|---|---|---|---|---|"]

    def cell(row, key):
        std = row.get(f"{key}_std")
        return f"{row[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    for row in rows:
        delta = "" if row["top1_vs_ce"] is None or row["method"] == "ce" else f"{row['top1_vs_ce']:+.2f}"
        lines.append(f"| {row['name']} | {cell(row, 'top1')} | {cell(row, 'many')} | {cell(row, 'medium')} | "
                     f"{cell(row, 'few')} | {delta} | {row['wall_s']:.0f} |")
    shifted = [row for row in rows if f"{TEST_TIME_SETS[0]}_before" in row]
    if shifted:
        lines += ["", "SADE's test-time self-supervised aggregation (python -m ltfast.train.test_time): micro accuracy "
                      "on long-tailed test sets built from the balanced test set (imbalance 50; forward: the "
                      "training order, backward: reversed), before (mean of the experts) and after (learnt weights).",
                  "", "| method | " + " | ".join(f"{n} before | {n} after | gain" for n in TEST_TIME_SETS) + " |",
                  "|---|" + "---|---|---|" * len(TEST_TIME_SETS)]
        for row in shifted:
            cells = []
            for name in TEST_TIME_SETS:
                before, after = row[f"{name}_before"], row[f"{name}_after"]
                cells += [cell(row, f"{name}_before"), cell(row, f"{name}_after"), f"{after - before:+.2f}"]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if meta.get("note"):
        lines += ["", meta["note"]]
    if any(r.get("plot") for r in runs):
        lines += ["", "Per-class accuracy plots: per_class.png in each run folder (--out-root, by default "
                      "runs/fmnist_lt/<method>/seed<k>/)."]
    if meta.get("report_table"):
        lines += ["", "The same run folders through `python -m ltfast.report` (test ECE in %, training time per "
                      "seed and training images per second):", "", meta["report_table"].rstrip("\n")]
    return "\n".join(lines) + "\n"


def report_of(runs: list[dict]) -> tuple[str, list]:
    """``ltfast.report``'s markdown table and rows of the runs' folders ('' and [] when a summary is gone,
    e.g. a --merge of results measured elsewhere)."""
    folders = [os.path.dirname(r["summary"]) for r in runs if r.get("summary")]
    if not folders or len(folders) != len(runs) or not all(os.path.isfile(r["summary"]) for r in runs):
        return "", []
    rows = report.group_runs([report.load_run(path) for path in report.find_summaries(folders)])
    return report.markdown_table(rows), [{k: v for k, v in row.items() if k != "per_class"} for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, CE / Balanced Softmax / LADE (the main job)")
    parser.add_argument("--seeds", type=int, help="training seeds 0..N-1 (default: 1 quick, 2 full)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start the seeds here (seeds first..first+N-1): one seed per process, merged with --merge")
    parser.add_argument("--methods", help="comma-separated configs/fmnist_lt names (default: all; quick: ce,"
                                          "balanced_softmax,lade)")
    parser.add_argument("--out-root", default=os.path.join(ROOT, "runs", "fmnist_lt"), help="run folders")
    parser.add_argument("--json", help="results JSON (default: benchmarks/results/fmnist_lt-cpu.json, "
                                       "quick: benchmarks/results/fmnist_lt-quick.tmp.json)")
    parser.add_argument("--md", help="results markdown (default: next to the JSON, full mode only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set optim.epochs=10")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="train nothing: one table from the runs of earlier results JSONs (a method's run of a "
                             "seed comes from the last file that has it), e.g. when the table was measured in parts")
    parser.add_argument("--note", default="", help="a sentence added under the table (how it was measured)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge_results(args.merge, args.json or os.path.join(ROOT, "benchmarks", "results", "fmnist_lt-cpu.json"),
                             args.md, args.note)

    methods = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {ALL_METHODS}")
    missing = sorted({STAGE1_OF[m] for m in methods if m in STAGE1_OF} - set(methods))
    if missing:
        parser.error(f"--methods: {', '.join(m for m in methods if STAGE1_OF.get(m) in missing)} need(s) "
                     f"{', '.join(missing)} of the same seed: add {', '.join(missing)} to --methods")
    firsts = [m for m in methods if m in STAGE1_OF.values()]  # stage 1 runs before its stage 2
    methods = firsts + [m for m in methods if m not in firsts]
    seeds = args.seeds or (1 if args.quick else 2)
    results_dir = os.path.join(ROOT, "benchmarks", "results")
    json_path = args.json or os.path.join(results_dir, "fmnist_lt-quick.tmp.json" if args.quick else "fmnist_lt-cpu.json")
    md_path = args.md or (None if args.quick else os.path.splitext(json_path)[0] + ".md")

    import torch
    from ltfast.train.metrics import shot_groups
    start = time.perf_counter()
    runs, stage1 = [], {}
    for seed in range(args.first_seed, args.first_seed + seeds):
        for method in methods:
            print(f"=== {method}, seed {seed} ===", flush=True)
            runs.append(run_method(method, seed, args.out_root, args.set, stage1))
    total = time.perf_counter() - start

    with open(runs[0]["summary"]) as f:
        first = json.load(f)
    counts = first["class_counts"]
    groups = shot_groups(counts, first["config"]["eval"]["many_threshold"], first["config"]["eval"]["few_threshold"])
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {"ratio": first["config"]["data"]["ratio"], "train_images": sum(counts), "class_counts": counts,
            "shots": " / ".join(str(int(groups[k].sum())) for k in ("many", "medium", "few")),
            "machine": f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores ({cpu}), torch "
                       f"{torch.__version__}", "seeds": seeds, "overrides": args.set, "total_wall_s": total,
            "note": args.note}
    rows = aggregate(runs, methods)
    meta["report_table"], report_rows = report_of(runs)
    table = markdown(rows, runs, meta)
    print("\n" + table)
    print("per-class accuracy plots: " + ", ".join(os.path.relpath(r["plot"]) for r in runs if r.get("plot")))
    for row in rows:
        if row["method"] != "ce" and row["top1_vs_ce"] is not None:
            print(f"{row['name']} - CE: {row['top1_vs_ce']:+.2f} points top-1, few-shot {row['few']:.2f} vs "
                  f"{next(r for r in rows if r['method'] == 'ce')['few']:.2f}")
    print(f"total {total:.0f} s for {len(runs)} runs")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "runs": runs, "report": report_rows}, f, indent=1)
    print(f"wrote {json_path}")
    if md_path:
        with open(md_path, "w") as f:
            f.write(table)
        print(f"wrote {md_path}")
    return 0


def merge_results(paths: list[str], json_path: str, md_path, note: str) -> int:
    """``--merge``: the table of the runs stored in earlier results JSONs, in ALL_METHODS order."""
    runs, metas = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        metas.append(data["meta"])
        replaced = {(r["method"], r["seed"]) for r in data["runs"]}  # seeds of one method may come from several files
        runs = [r for r in runs if (r["method"], r["seed"]) not in replaced] + data["runs"]
    keys = ("ratio", "train_images", "class_counts", "shots")
    if any(m[k] != metas[0][k] for m in metas for k in keys):
        raise SystemExit(f"--merge: the files were measured on different data ({', '.join(keys)} differ)")
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in runs)]
    meta = {**metas[-1], "seeds": max(len({r["seed"] for r in runs if r["method"] == m}) for m in methods),
            "merged_from": [os.path.basename(p) for p in paths],
            "total_wall_s": sum(m["total_wall_s"] for m in metas), "note": note}
    rows = aggregate(runs, methods)
    meta["report_table"], report_rows = report_of(runs)
    table = markdown(rows, runs, meta)
    print(table)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "runs": runs, "report": report_rows}, f, indent=1)
    md_path = md_path or os.path.splitext(json_path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(table)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
