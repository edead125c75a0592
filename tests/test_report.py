"""python -m ltfast.report: grouping of seeds, mean ± std, the files it writes, its errors."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from ltfast import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(folder, name, seed, top1, few, *, ratio=100, lr=0.05, status="finished", ece=None,
              per_class=None, init_from=None, train_time=10.0):
    """A summary.json with the keys python -m ltfast.train writes (the ones the report reads)."""
    os.makedirs(folder, exist_ok=True)
    test = {"top1": top1, "many": top1 + 10, "medium": top1, "few": few,
            "per_class": per_class if per_class is not None else [top1 + 10, top1, few]}
    if ece is not None:
        test["ece"] = ece
    summary = {"name": name, "status": status, "test": test, "class_counts": [100, 30, 5],
               "train_time_s": train_time, "train_images_per_s": 1000.0 / train_time,
               "config": {"name": name, "data": {"dataset": "fmnist_lt", "ratio": ratio},
                          "loss": {"name": name}, "optim": {"lr": lr},
                          "model": {"arch": "small_resnet", "init_from": init_from},
                          "train": {"seed": seed, "out_dir": str(folder), "overwrite": True, "progress": False}}}
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    return folder


def test_seeds_of_one_config_form_one_row_with_sample_std(tmp_path):
    for seed, top1 in enumerate([60.0, 62.0, 64.0]):
        write_run(tmp_path / "bs" / f"seed{seed}", "balanced_softmax", seed, top1, few=top1 - 20,
                  init_from=f"/runs/ce/seed{seed}/best.pt")   # stage-2 style: differs per seed by design
    rows = report.report([str(tmp_path / "bs")])
    assert len(rows) == 1
    row = rows[0]
    assert row["seeds"] == [0, 1, 2]
    mean, std, n = row["top1"]
    assert (mean, n) == (62.0, 3)
    assert std == pytest.approx(2.0)      # sample std (n - 1) of 60, 62, 64
    assert row["per_class"] == pytest.approx([72.0, 62.0, 42.0])
    assert "62.00 ± 2.00" in report.markdown_table(rows)


def test_different_configs_are_different_rows(tmp_path):
    write_run(tmp_path / "a", "ce", 0, 50.0, 10.0, lr=0.05)
    write_run(tmp_path / "b", "ce", 0, 51.0, 11.0, lr=0.1)          # same method, another lr
    write_run(tmp_path / "c", "ce", 0, 40.0, 5.0, ratio=50)         # another imbalance
    rows = report.report([str(tmp_path)])
    assert len(rows) == 3
    assert sorted(r["dataset"] for r in rows) == ["fmnist_lt (IF 100)", "fmnist_lt (IF 100)", "fmnist_lt (IF 50)"]
    assert all(r["top1"][2] == 1 for r in rows)
    assert "± " not in report.markdown_table(rows)   # one seed: no spread shown


def test_unfinished_runs_are_skipped_not_averaged(tmp_path, capsys):
    write_run(tmp_path / "s0", "lade", 0, 70.0, 30.0)
    write_run(tmp_path / "s1", "lade", 1, 0.0, 0.0, status="failed")
    rows = report.report([str(tmp_path)])
    assert rows[0]["top1"][0] == 70.0 and rows[0]["seeds"] == [0]
    assert "status 'failed'" in capsys.readouterr().err
    rows = report.report([str(tmp_path)], show_unfinished=True)
    assert rows[0]["status"] == "1/2 finished" and rows[0]["top1"] == (70.0, 0.0, 1)


def test_csv_markdown_and_png(tmp_path):
    for seed in range(2):
        write_run(tmp_path / "runs" / "ce" / f"seed{seed}", "ce", seed, 50.0 + seed, 5.0, ece=10.0 + 2.0 * seed)
        write_run(tmp_path / "runs" / "bs" / f"seed{seed}", "balanced_softmax", seed, 55.0, 20.0 + seed)
    out = tmp_path / "out"
    out.mkdir()
    report.report([str(tmp_path / "runs")], markdown=str(out / "t.md"), csv_path=str(out / "t.csv"), png=str(out / "classes.png"))
    table = (out / "t.md").read_text()
    assert "| ce | fmnist_lt (IF 100) | 0,1 | 50.50 ± 0.71 |" in table
    assert "11.00 ± 1.41" in table              # ECE 10 % / 12 % (summary.json's test.ece is in percent)
    rows = list(csv.DictReader(open(out / "t.csv")))
    by_method = {r["method"]: r for r in rows}
    assert float(by_method["ce"]["top1_mean"]) == 50.5
    assert float(by_method["ce"]["top1_std"]) == pytest.approx(math.sqrt(0.5))
    assert by_method["balanced_softmax"]["ece_mean"] == ""       # not recorded: empty, not 0
    png = (out / "classes.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_prints_the_table_and_names_bad_paths(tmp_path):
    write_run(tmp_path / "r", "ce", 0, 50.0, 5.0)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "ltfast.report", str(tmp_path / "r")], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| ce | fmnist_lt (IF 100) | 0 | 50.00 |" in done.stdout
    missing = tmp_path / "nope"
    done = subprocess.run([sys.executable, "-m", "ltfast.report", str(missing)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert done.returncode == 2 and f"{missing}: no such run folder" in done.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="no summary.json in it or below"):
        report.report([str(tmp_path / "empty")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="not valid JSON"):
        report.report([str(tmp_path / "bad")])


def test_accuracy_benchmark_table_comes_from_the_report(tmp_path):
    """benchmarks/accuracy.py: its mean / std are ltfast.report's and its markdown ends with the report's
    table of the same run folders (the old columns stay)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", os.path.join(ROOT, "benchmarks", "accuracy.py"))
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    runs = []
    for seed in range(2):
        for method, top1 in (("ce", 50.0 + seed), ("balanced_softmax", 55.0 + 2 * seed)):
            folder = write_run(tmp_path / method / f"seed{seed}", method, seed, top1, 5.0, ece=10.0 + seed)
            runs.append({"method": method, "name": method, "seed": seed, "wall_s": 3.0, "top1": top1,
                         "many": top1 + 10, "medium": top1, "few": 5.0, "summary": str(folder / "summary.json")})
    rows = accuracy.aggregate(runs, ["ce", "balanced_softmax"])
    assert rows[1]["top1"] == 56.0 and rows[1]["top1_std"] == pytest.approx(math.sqrt(2.0))
    assert rows[1]["top1_vs_ce"] == pytest.approx(5.5)
    table_text, report_rows = accuracy.report_of(runs)
    meta = {"ratio": 100, "train_images": 135, "shots": "1 / 1 / 1", "machine": "test", "report_table": table_text}
    text = accuracy.markdown(rows, runs, meta)
    assert "| method | top-1 (balanced) | many | medium | few | top-1 vs CE | s / run |" in text
    assert "| balanced_softmax | 56.00 ± 1.41 |" in text
    assert "| ce | fmnist_lt (IF 100) | 0,1 | 50.50 ± 0.71 |" in text and "10.50 ± 0.71" in text   # ECE column
    assert sorted(r["method"] for r in report_rows) == ["balanced_softmax", "ce"]
    assert all(r["seeds"] == [0, 1] and "per_class" not in r for r in report_rows)
    runs[0]["summary"] = str(tmp_path / "gone" / "summary.json")   # a merged file measured elsewhere
    assert accuracy.report_of(runs) == ("", [])
