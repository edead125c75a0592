"""Findings of the ltfast trial (issue 19 §4), one test (or a parametrized set) per finding: each
failed before its fix."""
import json
import os

import pytest

from ltfast.train import load_config, runlog, train
from ltfast.train.config import ConfigError

from test_train import TINY

ONE = ["optim.epochs=1", "optim.warmup_epochs=0", "train.plot=false", "train.tensorboard=false"]


def tiny(out, *extra):
    return load_config(None, TINY + [f"train.out_dir={out}"] + list(extra))


# ------------------------------------------------------------- 1: overwrite deletes only its own files

@pytest.mark.parametrize("foreign", ["README.md", "src/main.py", "eval/mine.txt"])
def test_overwrite_refuses_and_keeps_foreign_entries(tmp_path, foreign):
    out = tmp_path / "run"
    train(tiny(out, *ONE))
    path = out / foreign
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's work")
    with pytest.raises(ConfigError, match=rf"train.overwrite: {out} holds files .*{foreign.split('/')[0]}"):
        train(tiny(out, *ONE, "train.overwrite=true"))
    assert path.read_text() == "the user's work"
    assert (out / "summary.json").exists()          # nothing at all deleted


@pytest.mark.parametrize("marker", ["config.yaml", "summary.json", "history.jsonl"])
def test_overwrite_refuses_a_folder_without_manifest(tmp_path, marker):
    # the trial's data loss: any of these names made a user's folder "a run" that overwrite emptied
    (tmp_path / marker).write_text("x")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.py").write_text("code")
    (tmp_path / "README.md").write_text("notes")
    with pytest.raises(ConfigError, match=rf"train.overwrite: {tmp_path} has no .ltfast-run.json"):
        train(tiny(tmp_path, *ONE, "train.overwrite=true"))
    assert (tmp_path / "src" / "model.py").read_text() == "code" and (tmp_path / "README.md").exists()


def test_overwrite_of_a_genuine_run_deletes_exactly_its_files(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, *ONE, "train.plot=true"))
    manifest = runlog.read_manifest(str(out))
    assert {"config.yaml", "best.pt", "last.pt", "history.jsonl", "summary.json", "per_class.png"} <= \
        set(manifest["files"])
    (out / "last.pt.abc123.tmp").write_bytes(b"")   # what a killed checkpoint write leaves
    train(tiny(out, *ONE, "train.overwrite=true", "train.save_checkpoints=false"))
    assert sorted(p.name for p in out.iterdir()) == [runlog.MANIFEST, "config.yaml", "history.jsonl",
                                                      "summary.json"]


def test_overwrite_of_a_seed_sweep_and_of_evaluation_outputs(tmp_path):
    from ltfast.train.evaluation import main as evaluate_main
    out = tmp_path / "sweep"
    train(tiny(out, *ONE, "train.seeds=[0, 1]"))
    assert evaluate_main([str(out / "seed0"), "--no-plot"]) == 0   # eval/test/ is listed in seed0's manifest
    assert (out / "seed0" / "eval" / "test" / "evaluation.json").exists()
    assert runlog.foreign_entries(str(out)) == []
    (out / "seed1" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="seed1/notes.txt"):
        train(tiny(out, *ONE, "train.seeds=[0, 1]", "train.overwrite=true"))
    os.remove(out / "seed1" / "notes.txt")
    train(tiny(out, *ONE, "train.seeds=[0]", "train.overwrite=true"))
    assert sorted(p.name for p in out.iterdir()) == [runlog.MANIFEST, "config.yaml", "seed0", "seeds_summary.json"]
    assert not (out / "seed0" / "eval").exists()


def test_resume_of_an_older_run_writes_its_manifest(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "optim.epochs=2", "train.stop_after=1", "train.plot=false", "train.tensorboard=false"))
    os.remove(out / runlog.MANIFEST)                 # as an ltfast before the manifest left it
    train(tiny(out, "optim.epochs=2", "train.resume=true", "train.plot=false", "train.tensorboard=false"))
    assert runlog.foreign_entries(str(out)) == []
