"""The import contracts of pyproject.toml ([tool.importlinter], DESIGN.md "Layers"): ``lint-imports``
passes on ltfast; it catches a layer violation and a cycle made by an import placed inside a
function (grimp, which builds import-linter's graph, reads every import statement); and no module
of ltfast is in an import cycle, counting the cycles through a package's ``__init__`` that the
``acyclic_siblings`` contract does not look at."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("importlinter", reason="import-linter is a test dependency (pyproject [test], scripts/setup.sh)")
grimp = pytest.importorskip("grimp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `from . import _C` in ltfast/_extension.py: the compiled extension, which grimp (it reads .py files
# only) records as an import of the package `ltfast` itself. pyproject.toml ignores the same import.
COMPILED_EXTENSION_IMPORT = ("ltfast._extension", "ltfast")


def _lint_imports(config: str, cwd: str, pythonpath: str) -> subprocess.CompletedProcess:
    """`lint-imports <config>` in a fresh interpreter (this one's), without the on-disk cache."""
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", code, config, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _write_package(root, with_function_level_import: bool) -> None:
    """layerpkg: `high` imports `low` at module level; `low` imports `high` only inside a function
    when asked, the kind of import that used to hold ltfast's cycles together."""
    package = root / "layerpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "high.py").write_text("from layerpkg import low\n\n\ndef run():\n    return low.value()\n")
    body = "def value():\n    return 1\n"
    if with_function_level_import:
        body += textwrap.dedent("""

            def describe():
                from layerpkg.high import run  # inside a function: still an import of a higher layer
                return run()
            """)
    (package / "low.py").write_text(body)
    (root / "contracts.toml").write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "layerpkg"

        [[tool.importlinter.contracts]]
        name = "high over low"
        type = "layers"
        containers = ["layerpkg"]
        layers = ["high", "low"]

        [[tool.importlinter.contracts]]
        name = "no cycles"
        type = "acyclic_siblings"
        ancestors = ["layerpkg"]
        """))


def test_an_import_inside_a_function_breaks_the_layers_and_the_acyclic_contract(tmp_path):
    _write_package(tmp_path, with_function_level_import=True)
    result = _lint_imports(str(tmp_path / "contracts.toml"), str(tmp_path), str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "high over low BROKEN" in out, out
    assert "layerpkg.low is not allowed to import layerpkg.high" in out, out
    source = (tmp_path / "layerpkg" / "low.py").read_text().splitlines()
    line = next(number for number, text in enumerate(source, 1) if "from layerpkg.high import" in text)
    assert source[line - 2].startswith("def describe"), source   # the import is inside a function
    assert f"layerpkg.low -> layerpkg.high (l.{line})" in out, out
    assert "no cycles BROKEN" in out and "No cycles are allowed in layerpkg." in out, out
    assert "Contracts: 0 kept, 2 broken." in out, out


def test_the_same_package_without_that_import_keeps_both_contracts(tmp_path):
    _write_package(tmp_path, with_function_level_import=False)
    result = _lint_imports(str(tmp_path / "contracts.toml"), str(tmp_path), str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Contracts: 2 kept, 0 broken." in out, out


def test_ltfast_keeps_its_import_contracts():
    result = _lint_imports(os.path.join(ROOT, "pyproject.toml"), ROOT, ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "BROKEN" not in out and ", 0 broken." in out, out


def _cycles(edges: dict) -> list:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle_through_a_package_init():
    # layerpkg -> layerpkg.a -> layerpkg (its own package): the shape acyclic_siblings cannot see.
    edges = {"p": {"p.a"}, "p.a": {"p"}, "p.b": {"p.a"}}
    assert _cycles(edges) == [["p", "p.a"]]
    assert _cycles({"p": {"p.a"}, "p.a": set()}) == []


def test_no_module_of_ltfast_is_in_an_import_cycle():
    sys.path.insert(0, ROOT)
    try:
        graph = grimp.build_graph("ltfast", cache_dir=None)
    finally:
        sys.path.remove(ROOT)
    edges = {}
    for module in graph.modules:
        edges[module] = {imported for imported in graph.find_modules_directly_imported_by(module)
                         if (module, imported) != COMPILED_EXTENSION_IMPORT}
    assert "ltfast.nn.cross_entropy" in edges and "ltfast.ops" in edges["ltfast.nn.cross_entropy"]
    assert "ltfast.train.trainer" in edges and "ltfast.train.engine" in edges["ltfast.train.trainer"]
    assert _cycles(edges) == []
