#!/usr/bin/env bash
# The main job on a CPU machine: set up, then the quick benchmark of the fused losses against
# eager and compiled PyTorch, with its JSON records in benchmarks/results/latest-cpu-quick.tmp.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" benchmarks/throughput.py --quick --json benchmarks/results/latest-cpu-quick.tmp.json "$@"
