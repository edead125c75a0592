"""ltfast.train's import layers (pyproject.toml's import-linter contracts): the tree keeps them, and an
upward import placed inside a function (the kind that held the old import circle together) breaks
them, so CI's `lint-imports` catches it too."""
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

pytest.importorskip("importlinter")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_contracts() -> list[dict]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    return [c for c in contracts if c["name"].startswith("ltfast.train")]


def _lint(tree: str, tmp_path) -> subprocess.CompletedProcess:
    """lint-imports with only the train contracts on the ``ltfast`` package found under ``tree``."""
    lines = ["[importlinter]", "root_package = ltfast", ""]
    for k, contract in enumerate(_train_contracts()):
        lines.append(f"[importlinter:contract:train{k}]")
        for key, value in contract.items():
            if isinstance(value, list):
                lines.append(f"{key} =")
                lines += [f"    {v}" for v in value]
            else:
                lines.append(f"{key} = {value}")
        lines.append("")
    config = tmp_path / "importlinter.ini"
    config.write_text("\n".join(lines))
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(config), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


def _copy_train_package(tmp_path) -> str:
    """ltfast/train alone, under an empty ltfast package: the contracts only look inside ltfast.train."""
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "ltfast", "train"), tree / "ltfast" / "train",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "ltfast" / "__init__.py").write_text("")
    return str(tree)


def test_the_train_package_keeps_its_layers(tmp_path):
    result = _lint(_copy_train_package(tmp_path), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(_train_contracts())} kept, 0 broken." in result.stdout


def test_an_upward_import_inside_a_function_is_caught(tmp_path):
    tree = _copy_train_package(tmp_path)
    path = os.path.join(tree, "ltfast", "train", "checkpoint.py")
    with open(path) as f:
        text = f.read()
    marker = "def resume_path(cfg: dict) -> Optional[str]:\n"
    assert marker in text
    with open(path, "w") as f:
        f.write(text.replace(marker, marker + "    from .trainer import train  # noqa: F401\n"))
    result = _lint(tree, tmp_path)
    assert result.returncode != 0
    assert "ltfast.train.checkpoint is not allowed to import ltfast.train.trainer" in result.stdout
