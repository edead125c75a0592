"""Run folders and logs (ltfast.train.runlog): history.jsonl per epoch (rewritten exactly on resume),
TensorBoard scalars, the progress bar only on a terminal, out_dir refusal / overwrite, seed sweeps."""
import io
import json
import math

import pytest

from ltfast.train import load_config, runlog, train
from ltfast.train.config import ConfigError

from test_train import TINY

ONE = ["optim.epochs=1", "optim.warmup_epochs=0", "train.plot=false"]


def tiny(out, *extra):
    return load_config(None, TINY + [f"train.out_dir={out}"] + list(extra))


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_history_jsonl_every_epoch_and_exact_after_resume(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "train.stop_after=2"))
    first = _history(out)
    assert [r["epoch"] for r in first] == [1, 2]
    for key in ("loss", "lr", "val_top1", "val_many", "val_medium", "val_few", "images_per_s", "time_s"):
        assert key in first[0], key
    # an epoch logged after the last checkpoint (a crash in between) must not survive the resume
    with open(out / "history.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "loss": 0.0}) + "\n")
    train(tiny(out, "train.resume=true"))
    history = _history(out)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[:2] == first and history[2]["loss"] > 0
    assert history == json.loads((out / "summary.json").read_text())["history"]


def test_non_empty_out_dir_is_refused_and_overwrite_leaves_nothing_stale(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, *ONE))
    with pytest.raises(ConfigError, match="train.out_dir: .* is not empty"):
        train(tiny(out, *ONE))
    train(tiny(out, *ONE, "train.overwrite=true", "train.save_checkpoints=false"))
    names = sorted(p.name for p in out.iterdir())
    # no best.pt / last.pt of the first run left
    assert names == [runlog.MANIFEST, "config.yaml", "history.jsonl", "summary.json"]


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("my thesis")
    with pytest.raises(ConfigError, match="has no .ltfast-run.json"):
        train(tiny(tmp_path, *ONE, "train.overwrite=true"))
    assert (tmp_path / "notes.txt").exists()


def test_overwrite_and_resume_contradict():
    with pytest.raises(ConfigError, match="train.overwrite"):
        load_config(None, ["train.overwrite=true", "train.resume=auto"])


def test_seeds_run_in_turn_with_mean_and_std(tmp_path):
    out = tmp_path / "sweep"
    summary = train(tiny(out, *ONE, "train.seeds=[0, 1]"))
    runs = [json.loads((out / f"seed{k}" / "summary.json").read_text()) for k in (0, 1)]
    assert [r["config"]["train"]["seed"] for r in runs] == [0, 1]
    on_disk = json.loads((out / "seeds_summary.json").read_text())
    top1 = [r["test"]["top1"] for r in runs]
    mean = sum(top1) / 2
    assert on_disk["test"]["top1"]["mean"] == pytest.approx(mean)
    assert on_disk["test"]["top1"]["std"] == pytest.approx(math.sqrt(sum((t - mean) ** 2 for t in top1)))
    assert on_disk["status"] == "finished" and summary["test"]["top1"]["n"] == 2
    with pytest.raises(ConfigError, match="train.out_dir"):            # the parent is a run folder now
        train(tiny(out, *ONE, "train.seeds=[0, 1]"))


@pytest.mark.parametrize("seeds", ["[]", "[1, 1]", "[-1]", "[a]"])
def test_bad_seed_lists(seeds):
    with pytest.raises(ConfigError, match="train.seeds"):
        load_config(None, [f"train.seeds={seeds}"])


def test_mean_std():
    assert runlog.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert runlog.mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert runlog.mean_std([None]) == {"mean": None, "std": None, "n": 0}


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert runlog.progress_enabled(Tty()) and not runlog.progress_enabled(io.StringIO())


def test_tensorboard_scalars(tmp_path, monkeypatch):
    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed", None))

    monkeypatch.setattr(runlog, "_tensorboard_writer",
                        lambda cfg: Writer(str(tmp_path / "run" / "tensorboard")) if cfg["train"]["tensorboard"] else None)
    train(tiny(tmp_path / "run", *ONE, "train.tensorboard=true"))
    tags = {tag for tag, _ in written}
    assert {"train/loss", "train/lr", "val/top1", "val/few", "train/images_per_s", "closed"} <= tags
    assert ("train/loss", 1) in written


def test_tensorboard_true_without_the_package(tmp_path):
    if runlog.tensorboard_available():
        pytest.skip("tensorboard is installed")
    with pytest.raises(ConfigError, match="train.tensorboard"):
        train(tiny(tmp_path, *ONE, "train.tensorboard=true"))
