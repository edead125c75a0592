"""benchmarks/train_step.py runs on CPU with a tiny batch (the GPU numbers come from the same code)."""
import importlib.util
import json
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def test_train_step_benchmark_cpu_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train_step
    finally:
        sys.path.pop(0)
    out = tmp_path / "step.json"
    args = ["--device", "cpu", "--batch", "2", "--image-size", "32", "--steps", "1", "--warmup", "0",
            "--classes", "10", "--jpegs", "4", "--jpeg-size", "40x30", "--json", str(out)]
    assert train_step.main(args + ([] if HAVE_DALI else ["--no-dali"])) == 0
    records = {r["name"]: r for r in json.loads(out.read_text())}
    expected = {"synthetic", "eval", "projection_imagenet_lt_90ep_4gpu"} | ({"dali", "dali+step"} if HAVE_DALI else set())
    assert expected <= set(records)
    for name in expected - {"projection_imagenet_lt_90ep_4gpu"}:
        assert "error" not in records[name] and records[name]["images_per_s"] > 0
        assert records[name]["arch"] == "resnext50_32x4d"
    assert records["projection_imagenet_lt_90ep_4gpu"]["total_hours"] > 0
