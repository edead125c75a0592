"""Packaging: the recipes resolve by name from any directory (shipped as ltfast/configs by setup.py's
build_py, or read from the checkout), a local path still wins, and pyproject declares the extras."""
import os
import subprocess
import sys

import pytest

from ltfast.train.config import ConfigError, load_config, resolve_config_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("imagenet_lt/lade", "imagenet_lt/lade.yaml", "configs/imagenet_lt/lade.yaml"):
        path = resolve_config_path(name)
        assert os.path.isabs(path) and path.endswith(os.path.join("imagenet_lt", "lade.yaml")), name
    cfg = load_config("fmnist_lt/ce", ["optim.epochs=1"])
    assert cfg["loss"]["name"] == "ce" and cfg["data"]["dataset"] == "fmnist_lt"   # base: _base.yaml followed


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmnist_lt").mkdir()
    (tmp_path / "fmnist_lt" / "ce.yaml").write_text("name: mine\noptim: {epochs: 3}\n")
    assert resolve_config_path("fmnist_lt/ce.yaml") == "fmnist_lt/ce.yaml"
    assert load_config("fmnist_lt/ce.yaml")["name"] == "mine"
    assert load_config("fmnist_lt/ce")["name"] == "CE"        # no local fmnist_lt/ce (without .yaml): shipped


def test_unknown_name_lists_the_shipped_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="imagenet_lt/lade"):
        resolve_config_path("imagenet_lt/lad")


def test_build_py_ships_the_configs_inside_the_package(tmp_path):
    # What `pip install .` puts into the wheel: build_py alone (no compilation).
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "LTFAST_CUDA": "0"})
    shipped = tmp_path / "ltfast" / "configs"
    for name in ("fmnist_lt/_base.yaml", "fmnist_lt/ce.yaml", "imagenet_lt/lade.yaml", "imagenet_lt/crt.yaml"):
        assert (shipped / name).read_text() == open(os.path.join(ROOT, "configs", name)).read()
    # the built package resolves names to its own copy
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from ltfast.train.config import resolve_config_path;"
            "print(resolve_config_path('imagenet_lt/lade'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == str(shipped / "imagenet_lt" / "lade.yaml")


def test_pyproject_declares_the_extras():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert {"torch>=2.11,<2.16", "numpy"} <= set(project["dependencies"])  # the range CI builds and tests
    extras = project["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].lower() for req in extras["train"]}
    assert {"pyyaml", "tqdm", "matplotlib", "torchvision", "pillow"} <= names
    assert any(req.startswith("nvidia-dali") for req in extras["dali"])


def test_config_errors_still_name_the_key():
    with pytest.raises(ConfigError, match="train.amp"):
        load_config("fmnist_lt/ce", ["train.amp=fp8"])
