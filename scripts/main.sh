#!/usr/bin/env bash
# The main job on a CPU machine: set up everything (scripts/setup.sh), then
#   1. the long-tail demo: CE, Balanced Softmax and LADE trained on Fashion-MNIST-LT (one seed),
#      one table of overall / many / medium / few-shot accuracy and the per-class plot paths;
#   2. the quick benchmark: fused losses against eager and compiled PyTorch, the DALI pipeline
#      against the PIL DataLoader, the sampler draw, the compat classes against the originals.
# About 8 minutes on 2 cores after set-up. Records go to benchmarks/results/latest-cpu-*.tmp.*
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3}
echo "== long-tail demo: Fashion-MNIST-LT (imbalance 100), CE vs Balanced Softmax vs LADE"
"$PYTHON" benchmarks/accuracy.py --quick
echo "== quick benchmark"
exec "$PYTHON" benchmarks/throughput.py --quick --json benchmarks/results/latest-cpu-quick.tmp.json "$@"
