"""Issue 13 §1.6: the CLI ends with one line, not a traceback: a mistyped model.arch (before any
data is read), a missing checkpoint, and Ctrl-C, which prints the command that resumes."""
import pytest

from ltfast.train import __main__ as cli
from ltfast.train import load_config, train, trainer
from ltfast.train.config import ConfigError


def test_mistyped_arch_is_a_config_error_before_the_data(monkeypatch):
    monkeypatch.setattr(trainer, "build_data", lambda *a, **k: pytest.fail("data loaded before the arch check"))
    with pytest.raises(ConfigError, match=r"^model\.arch: unknown architecture 'resnet5O' \(did you mean [^)]*\bresnet50\b"):
        train(load_config(None, ["model.arch=resnet5O"]))


def test_ctrl_c_prints_one_line_with_the_resume_command(monkeypatch, tmp_path, capsys):
    def interrupted(cfg):
        (tmp_path / "last.pt").write_bytes(b"")
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "train", interrupted)
    rc = cli.main(["data.dataset=synthetic", f"train.out_dir={tmp_path}", "optim.epochs=3", "train.resume=auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(err) == 1
    assert err[0] == (f"interrupted; resume from {tmp_path / 'last.pt'} with: python -m ltfast.train "
                      f"data.dataset=synthetic train.out_dir={tmp_path} optim.epochs=3 train.resume=true")


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    rc = cli.main(["data.dataset=synthetic", f"train.out_dir={tmp_path}", f"model.init_from={tmp_path / 'no.pt'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.init_from: no checkpoint file at" in err[0]
