#!/usr/bin/env bash
# The one script to run on a GPU machine (e.g. through the device tool, from the repo root):
# builds ltfast against the torch installed there, runs the CUDA tests, runs the CUDA benchmark
# into $OUT, and prints a short table last. Budget: under 8 minutes on an H100 (16 cores).
#
#   OUT=/some/folder bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
status=0
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
"$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$OUT/versions.txt"
for module in pytest ninja; do
  "$PYTHON" -c "import $module" 2>/dev/null || echo "WARNING: python module $module is missing here (no network: carry it)" | tee -a "$OUT/versions.txt"
done

# DALI is not installed on the device and its wheel (~199 MB) exceeds one call's 64 MiB transfer:
# scripts/split_dali_wheel.sh cuts it into parts here; each device call carries one part and moves
# it to $DALI_PARTS (outside the repo copy); the last call joins and installs them.
DALI_PARTS=${DALI_PARTS:-/tmp/ltfast_dali_parts}
if ! "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then
  if ls "$DALI_PARTS"/*.whl.part* >/dev/null 2>&1; then
    stamp "installing DALI from $(ls "$DALI_PARTS"/*.whl.part* | wc -l) parts"
    wheel_name=$(basename "$(ls "$DALI_PARTS"/*.whl.part* | head -n 1)" | sed -E 's/\.part[0-9]+$//')
    cat "$DALI_PARTS"/"$wheel_name".part* > "/tmp/$wheel_name"
    "$PYTHON" -m pip install --no-deps --quiet "/tmp/$wheel_name" || echo "WARNING: DALI install failed"
  else
    echo "WARNING: DALI missing and no parts in $DALI_PARTS: the data suite and DALI tests will not run"
  fi
fi
have_dali=$("$PYTHON" -c "import nvidia.dali" 2>/dev/null && echo 1 || echo 0)

stamp "build (sm_90 only, 16 jobs)"
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} LTFAST_CUDA=1 \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  echo "ERROR: build failed (log: $OUT/build.log)"
  exit 1
fi
"$PYTHON" -c "import ltfast, sys; ok = ltfast.has_cuda_kernels(); print('CUDA kernels registered:', ok); sys.exit(0 if ok else 1)" || exit 1

stamp "CUDA tests"
deselect_dali=""
[ "$have_dali" = "1" ] || deselect_dali="--ignore=tests/test_dali.py"
timeout 240 "$PYTHON" -m pytest tests -m cuda -q $deselect_dali -p no:cacheprovider --junitxml="$OUT/cuda-tests.xml" 2>&1 | tee "$OUT/cuda-tests.log" | tail -n 25
test_status=${PIPESTATUS[0]}
[ "$test_status" -eq 0 ] || status=1

stamp "CUDA benchmark"
suites="loss compat"
[ "$have_dali" = "1" ] && suites="loss data compat"
timeout 300 "$PYTHON" benchmarks/throughput.py --device cuda --suites $suites --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
bench_status=$?
[ "$bench_status" -eq 0 ] || { status=1; tail -n 30 "$OUT/bench.txt"; }

stamp "training step (ResNeXt-50, 64 per GPU, bf16)"
timeout 150 "$PYTHON" benchmarks/train_step.py --device cuda --json "$OUT/train_step.json" > "$OUT/train_step.txt" 2>&1 \
  || { status=1; tail -n 20 "$OUT/train_step.txt"; }
tail -n 6 "$OUT/train_step.txt"

stamp "profiler launch counts"
timeout 60 "$PYTHON" benchmarks/launch_counts.py --json "$OUT/launch_counts.json" 2>&1 | tee "$OUT/launch_counts.txt" | tail -n 12

stamp "summary (tests exit $test_status, benchmark exit $bench_status)"
tail -n 5 "$OUT/cuda-tests.log"
[ -f "$OUT/bench.json" ] && "$PYTHON" benchmarks/summarize.py "$OUT/bench.json"
exit $status
