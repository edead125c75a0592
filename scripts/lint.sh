#!/usr/bin/env bash
# The lint checks CI runs (.ci/run), both on this checkout: the import contracts of pyproject.toml's
# [tool.importlinter] (DESIGN.md "Layers": imports only go down, no cycles, imports inside functions
# included) and ruff's rules ([tool.ruff]). Both run; the script fails when either fails.
#
#   bash scripts/lint.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
status=0

echo "== lint-imports"
# This tree's ltfast, not an installed one: grimp finds the package on sys.path.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
  "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-cache || status=1

echo "== ruff check"
"$PYTHON" -m ruff check . || status=1

exit $status
