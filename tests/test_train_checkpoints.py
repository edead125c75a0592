"""Checkpoints (issue 13, defects 1 and 5): loading never runs code from the file, and a failed
write (a full disk) names the path and leaves neither a truncated checkpoint nor a temporary file."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ltfast.train import load_config, train
from ltfast.train.checkpoint import CheckpointError, load, save_atomic

from test_train import TINY


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.pt"
    torch.save({"model": {"fc.weight": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize("key", ["train.resume", "model.init_from", "out_dir/last.pt"])
def test_crafted_checkpoint_runs_nothing(tmp_path, key):
    path, marker = _crafted(tmp_path)
    run = tmp_path / "run"
    extra = {"train.resume": [f"train.resume={path}"], "model.init_from": [f"model.init_from={path}"],
             "out_dir/last.pt": ["train.resume=auto"]}[key]
    if key == "out_dir/last.pt":
        run.mkdir()
        os.replace(path, run / "last.pt")
    cfg = load_config(None, TINY + [f"train.out_dir={run}", "optim.epochs=1", "optim.warmup_epochs=0"] + extra)
    with pytest.raises(CheckpointError, match=r"refusing to load .*(crafted|last)\.pt.*nothing in it was run"):
        train(cfg)
    assert not marker.exists(), "the crafted checkpoint ran code"


def test_checkpoint_load_names_the_file_when_it_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"model.init_from: cannot read .*notes\.pt"):
        load(str(bad), "model.init_from")


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    # ltfast's earlier last.pt held np.random.get_state() (a uint32 array): still accepted.
    path = tmp_path / "old.pt"
    torch.save({"rng": [{"numpy": np.random.get_state(), "torch": torch.get_rng_state()}]}, path)
    state = load(str(path))
    assert state["rng"][0]["numpy"][0] == "MT19937"


def test_trainer_checkpoints_load_with_weights_only(tmp_path):
    train(load_config(None, TINY + [f"train.out_dir={tmp_path}", "optim.epochs=1", "optim.warmup_epochs=0",
                                    "loss.name=ldam_drw", "loss.drw_epoch=0"]))
    for name in ("last.pt", "best.pt"):
        torch.load(tmp_path / name, weights_only=True)  # no allow-list needed for what ltfast writes now


def test_disk_full_during_save_names_the_path_and_leaves_no_temp_file(tmp_path):
    # A real write failure: RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk
    # fails them with ENOSPC; torch.save alone reported "unexpected pos ..." and left last.pt.tmp.
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        import torch
        from ltfast.train.checkpoint import CheckpointError, save_atomic
        path = {str(tmp_path / 'last.pt')!r}
        save_atomic({{"small": torch.zeros(10)}}, path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
        try:
            save_atomic({{"big": torch.zeros(1 << 20)}}, path)
        except CheckpointError as error:
            print("ERROR", error)
            sys.exit(0)
        sys.exit("no error")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "cannot write checkpoint" in result.stdout and str(tmp_path / "last.pt") in result.stdout
    assert "free" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]                       # no temp file left
    assert torch.load(tmp_path / "last.pt", weights_only=True)["small"].numel() == 10  # previous one intact


def test_save_atomic_cleans_up_after_any_failure(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*x\.pt: RuntimeError: boom"):
        save_atomic({"bad": Unpicklable()}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []
