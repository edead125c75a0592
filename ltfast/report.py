"""Compare finished runs: one table of every run and one figure of per-class accuracy.

    python -m ltfast.report runs/ce runs/bs runs/lade --markdown table.md --csv table.csv --png classes.png

Each argument is a run folder (it holds ``summary.json``) or a folder searched for them, so the
parent of a ``train.seeds`` sweep (``seed0/``, ``seed1/``, ...) brings all its seeds. Runs whose
configs are the same apart from the seed and where they were written (``train.seed``,
``train.seeds``, ``train.out_dir``, ``train.overwrite``, ``train.progress``, ``model.init_from``)
form one row: the metrics are the mean ± sample standard deviation (n - 1) over those seeds, the
same statistic ``seeds_summary.json`` reports. ``model.init_from`` is left out of the key because a
second stage of seed s starts from the first stage of seed s: its path differs per seed by design.

Columns: method (the run's ``name``), dataset (``data.dataset``, with the imbalance ratio when the
config sets one), seeds, test top-1 / many / medium / few (best-validation checkpoint, as the
trainer reports them), ECE (when the run recorded one), training wall time per seed and training
images per second. Only ``summary.json`` files written by ``python -m ltfast.train`` are read; a
run that did not finish (``status`` other than ``finished``) is listed by ``--show-unfinished`` and
otherwise skipped with a line on stderr, never averaged in.

Nothing here imports the trainer: the report reads JSON, so it works on runs copied off a cluster.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Iterable, Optional

SUMMARY_FILE = "summary.json"
ACCURACY_KEYS = ("top1", "many", "medium", "few")
# Config keys that differ between runs of one experiment without changing the experiment.
RUN_LOCAL_KEYS = {"train": ("seed", "seeds", "out_dir", "overwrite", "progress"), "model": ("init_from",)}
COLUMNS = ("method", "dataset", "seeds", "top1", "many", "medium", "few", "ece", "train_time_s",
           "train_images_per_s")


class ReportError(ValueError):
    """A run folder or summary that the report cannot use; the message names the path."""


def find_summaries(paths: Iterable[str]) -> list[str]:
    """Every ``summary.json`` under the given folders (or the files themselves), sorted, unique."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            if os.path.basename(path) != SUMMARY_FILE:
                raise ReportError(f"{path}: expected a run folder or a {SUMMARY_FILE}, got another file")
            found.append(os.path.abspath(path))
            continue
        if not os.path.isdir(path):
            raise ReportError(f"{path}: no such run folder")
        before = len(found)
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            if SUMMARY_FILE in files:
                found.append(os.path.abspath(os.path.join(folder, SUMMARY_FILE)))
        if len(found) == before:
            raise ReportError(f"{path}: no {SUMMARY_FILE} in it or below it (is it a run folder of "
                              "python -m ltfast.train, and did the run finish?)")
    return sorted(set(found))


def load_run(path: str) -> dict:
    with open(path) as f:
        try:
            summary = json.load(f)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(summary, dict) or "config" not in summary:
        raise ReportError(f"{path}: not a summary written by python -m ltfast.train (no 'config' key)")
    summary["_path"] = path
    return summary


def experiment_key(config: dict) -> str:
    """The config without its run-local keys, as canonical JSON: equal for seeds of one experiment."""
    stripped = {section: (dict(values) if isinstance(values, dict) else values) for section, values in config.items()}
    for section, keys in RUN_LOCAL_KEYS.items():
        if isinstance(stripped.get(section), dict):
            for key in keys:
                stripped[section].pop(key, None)
    return json.dumps(stripped, sort_keys=True, default=str)


def dataset_label(config: dict) -> str:
    data = config.get("data", {})
    name = str(data.get("dataset", "?"))
    ratio = data.get("imbalance", data.get("ratio"))
    return f"{name} (IF {ratio:g})" if isinstance(ratio, (int, float)) else name


def mean_std(values: list) -> tuple[Optional[float], Optional[float], int]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var), len(values)


def group_runs(summaries: list[dict], show_unfinished: bool = False) -> list[dict]:
    """Rows of the report, in the order their first run was found."""
    groups: dict[str, list[dict]] = {}
    for summary in summaries:
        if summary.get("status") != "finished" and not show_unfinished:
            print(f"report: skipping {summary['_path']} (status {summary.get('status')!r})", file=sys.stderr)
            continue
        groups.setdefault(experiment_key(summary["config"]), []).append(summary)
    rows = []
    for runs in groups.values():
        runs.sort(key=lambda s: s["config"].get("train", {}).get("seed", 0))
        config = runs[0]["config"]
        finished = [r for r in runs if r.get("status") == "finished"]
        tests = [r.get("test", {}) for r in finished]
        row = {"method": runs[0].get("name") or config.get("loss", {}).get("name", "?"),
               "dataset": dataset_label(config),
               "seeds": [r["config"].get("train", {}).get("seed") for r in runs],
               "status": "finished" if len(finished) == len(runs) else f"{len(finished)}/{len(runs)} finished",
               "paths": [os.path.dirname(r["_path"]) for r in runs]}
        for key in ACCURACY_KEYS + ("ece",):
            row[key] = mean_std([t.get(key) for t in tests])
        row["train_time_s"] = mean_std([r.get("train_time_s") for r in finished])
        row["train_images_per_s"] = mean_std([r.get("train_images_per_s") for r in finished])
        row["per_class"] = _mean_per_class([t.get("per_class") for t in tests])
        row["class_counts"] = runs[0].get("class_counts")
        rows.append(row)
    return rows


def _mean_per_class(per_class_runs: list) -> Optional[list]:
    per_class_runs = [p for p in per_class_runs if p]
    if not per_class_runs:
        return None
    num = len(per_class_runs[0])
    if any(len(p) != num for p in per_class_runs):
        return None
    means = []
    for c in range(num):
        values = [p[c] for p in per_class_runs if p[c] is not None]
        means.append(sum(values) / len(values) if values else None)
    return means


def _cell(stat: tuple, digits: int = 2, scale: float = 1.0) -> str:
    mean, std, n = stat
    if mean is None:
        return "n/a"
    if n > 1:
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


def format_cells(row: dict) -> dict:
    return {"method": row["method"], "dataset": row["dataset"],
            "seeds": ",".join(str(s) for s in row["seeds"]) + ("" if row["status"] == "finished"
                                                               else f" ({row['status']})"),
            **{k: _cell(row[k]) for k in ACCURACY_KEYS},
            # test.ece is in percent, like the accuracies (ltfast.train.calibration)
            "ece": _cell(row["ece"]),
            "train_time_s": _cell(row["train_time_s"], digits=1),
            "train_images_per_s": _cell(row["train_images_per_s"], digits=0)}


HEADERS = {"method": "method", "dataset": "dataset", "seeds": "seeds", "top1": "top-1", "many": "many",
           "medium": "medium", "few": "few", "ece": "ECE (%)", "train_time_s": "train s / seed",
           "train_images_per_s": "images/s"}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
             "|" + "|".join("---" if c in ("method", "dataset", "seeds") else "---:" for c in COLUMNS) + "|"]
    for row in rows:
        cells = format_cells(row)
        lines.append("| " + " | ".join(cells[c] for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str) -> None:
    """Machine-readable: mean, std and n as separate columns, no ± strings."""
    header = ["method", "dataset", "seeds", "status"]
    for key in ACCURACY_KEYS + ("ece", "train_time_s", "train_images_per_s"):
        header += [f"{key}_mean", f"{key}_std", f"{key}_n"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            line = [row["method"], row["dataset"], " ".join(str(s) for s in row["seeds"]), row["status"]]
            for key in ACCURACY_KEYS + ("ece", "train_time_s", "train_images_per_s"):
                mean, std, n = row[key]
                line += ["" if mean is None else repr(mean), "" if std is None else repr(std), n]
            writer.writerow(line)


def plot_per_class(rows: list[dict], path: str) -> str:
    """Per-class test accuracy (mean over seeds) against training images per class, one line per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    plotted = 0
    for row in rows:
        per_class, counts = row["per_class"], row["class_counts"]
        if not per_class or not counts or len(per_class) != len(counts):
            print(f"report: {row['method']} ({row['dataset']}) has no per-class accuracy to plot", file=sys.stderr)
            continue
        points = sorted((int(n), acc) for n, acc in zip(counts, per_class) if acc is not None)
        label = f"{row['method']} · {row['dataset']}" + (f" · {len(row['seeds'])} seeds" if len(row["seeds"]) > 1 else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1.2, label=label)
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise ReportError("--png: no run has per-class test accuracy (test.per_class in summary.json)")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(0, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def report(paths: list[str], markdown: Optional[str] = None, csv_path: Optional[str] = None,
           png: Optional[str] = None, show_unfinished: bool = False) -> list[dict]:
    """Builds the rows from the runs under ``paths`` and writes the requested files."""
    rows = group_runs([load_run(p) for p in find_summaries(paths)], show_unfinished)
    if not rows:
        raise ReportError("no finished run among " + ", ".join(paths))
    if markdown:
        with open(markdown, "w") as f:
            f.write(markdown_table(rows))
    if csv_path:
        write_csv(rows, csv_path)
    if png:
        plot_per_class(rows, png)
    return rows


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltfast.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding them")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    parser.add_argument("--csv", metavar="PATH", help="write the table as CSV (mean, std, n per metric)")
    parser.add_argument("--png", metavar="PATH", help="write per-class accuracy against class size")
    parser.add_argument("--show-unfinished", action="store_true", help="list runs that did not finish")
    args = parser.parse_args(argv)
    try:
        rows = report(args.runs, args.markdown, args.csv, args.png, args.show_unfinished)
    except ReportError as error:
        print(f"python -m ltfast.report: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table(rows))
    for label, path in (("markdown", args.markdown), ("csv", args.csv), ("png", args.png)):
        if path:
            print(f"-> {label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
