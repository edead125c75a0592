#!/usr/bin/env bash
# The test command: set up (install + build) and run the whole suite. CUDA tests run wherever a
# GPU is present and are skipped elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
