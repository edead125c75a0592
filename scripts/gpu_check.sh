#!/usr/bin/env bash
# The one command to run on a lent GPU machine (device tool, from the repo root). It must fit one
# call: a command may run 10 minutes and a session has 15 minutes of device time including the
# machine's start (1-2 min), so everything ends within 540 s and every stage has its own timeout.
# Stages, most valuable first, each writing into $OUT as it goes (a cut-short run still returns
# what was measured):
#
#   stage                          cap (s)  what
#   0 machine                          10   nvidia-smi, python3/torch versions, DALI/yaml/xdist present?
#   1 build                           200   python3 setup.py build_ext --inplace, sm_90 only, 16 jobs
#   2 CUDA tests                      120   pytest -m cuda (DALI tests only with DALI; yaml-free if needed)
#   3 parity                           60   benchmarks/gpu_parity.py: CUDA vs CPU op vs reference, 65536x8142 bf16
#   4 compute-sanitizer                80   memcheck (45) and racecheck (35) on a few small CUDA test ids
#   5 traffic model vs profiler        35   benchmarks/traffic_model.py --measure at 65536x8142 bf16
#   6 loss + compat benchmark       rest    benchmarks/throughput.py --budget-s (JSON rewritten per row)
#
# Caps add to 505 s; each stage's timeout is its cap or what is left before 540 s, whichever is
# less, so a slow build eats into the benchmark, never past the deadline.
#
#   OUT=/some/folder bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run                   # CPU, no build, tiny sizes (CI; ~1 min on 2 cores)
#
# $OUT holds 7 files (the device tool brings back at most 8; the 8th is the benchmark's JSON while it
# is being rewritten): gpu_check.log (all this script prints), build.log, cuda-tests.log,
# sanitizer.log (memcheck + racecheck), checks.jsonl (parity and traffic-model records, one JSON
# line each), bench.json (throughput.py records), details.log (full output of parity, model, benchmark).
#
# Exit status: 1 when a stage fails (build, a test, a parity check, a sanitizer finding, the
# benchmark); else 2 when a stage was cut by its timeout (its results are partial); else 0.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
# The lent machine has python3 only (no `python`); CI's machine has both.
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # logs reach $OUT (and the reply's output tail) as they are written
if [ "$DRY_RUN" = 1 ]; then
  OUT=${OUT:-$(mktemp -d -t ltfast_gpu_check.XXXXXX)}
  TOTAL_S=${TOTAL_S:-300}
else
  OUT=${OUT:-$PWD/gpu_check_out}
  TOTAL_S=${TOTAL_S:-540}
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
work=$(mktemp -d -t ltfast_gpu_check_work.XXXXXX)  # stage outputs before they are appended to $OUT
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
deadline=$(( start + TOTAL_S ))
failed=()      # stages that failed
incomplete=()  # stages cut by their timeout (timeout's 124, or 137 after the -k kill)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }
# Seconds a stage may run: its cap, or what is left before the deadline less 15 s (the 10 s kill
# grace of run_for and 5 s for the summary), whichever is less.
budget() { local left=$(( deadline - $(date +%s) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
# timeout -s INT: pytest and Python print their summary on SIGINT; -k 10: SIGKILL 10 s later.
run_for() { local s=$1; shift; timeout -s INT -k 10 "$s" "$@"; }
# Files a stage's exit status: 0 ok, 124/137 cut by its timeout, anything else failed.
verdict() { case "$2" in 0) ;; 124|137) incomplete+=("$1") ;; *) failed+=("$1(rc=$2)") ;; esac; }

# ---------------------------------------------------------------------------- 0 machine
stamp "machine (out: $OUT, dry run: $DRY_RUN, deadline ${TOTAL_S}s)"
if [ "$DRY_RUN" = 0 ]; then
  timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
"$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
has() { "$PYTHON" -c "import $1" >/dev/null 2>&1 && echo 1 || echo 0; }
have_dali=$(has nvidia.dali); have_yaml=$(has yaml); have_xdist=$(has xdist)
echo "dali $have_dali yaml $have_yaml xdist $have_xdist"

# Test modules that import yaml at collection (through ltfast.train): without PyYAML their
# collection errors would abort `pytest -m cuda` with 0 tests run, so they are left out then.
pytest_ignores=()
if [ "$have_yaml" = 0 ]; then
  for f in $(grep -lE '^(import yaml|from yaml|import ltfast\.train|from ltfast\.train|from ltfast import .*train)' tests/*.py); do
    pytest_ignores+=("--ignore=$f")
  done
  echo "no PyYAML: ignoring ${pytest_ignores[*]}"
fi
[ "$have_dali" = 1 ] || pytest_ignores+=("--ignore=tests/test_dali.py")

# Small CUDA tests for compute-sanitizer: every kernel family, small shapes (129 x 1000, a
# 5000-wide row with a -inf tile, sampler tables, mixed / probability targets, 9 x 3 x 1000 expert
# logits); each id is checked to exist in --dry-run.
SANITIZER_TESTS=(
  "tests/test_cross_entropy.py::test_matches_reference[ldam_drw-129x1000-torch.bfloat16-mean-cuda]"
  "tests/test_cross_entropy.py::test_matches_reference[balanced_softmax-7x10-torch.float32-none-cuda]"
  "tests/test_cross_entropy.py::test_wide_rows_with_non_finite_tiles[torch.float32-cuda]"
  "tests/test_lade.py::test_matches_reference[lade-129x1000-torch.bfloat16-cuda]"
  "tests/test_equalization.py::test_seql_matches_reference_on_its_mask[129x1000-torch.bfloat16-mean-cuda]"
  "tests/test_equalization.py::test_eql_matches_reference[129x1000-torch.bfloat16-none-cuda]"
  "tests/test_samplers.py::test_class_aware_op_matches_reference[0-0-0-37-4-37-sizes4-cuda]"
  "tests/test_soft_targets.py::test_mixed_matches_lambda_combination[weighted_smoothing-129x1000-torch.float32-mean-cuda]"
  "tests/test_soft_targets.py::test_probability_targets_match_f_cross_entropy[balanced_softmax-129x1000-torch.bfloat16-mean-cuda]"
  "tests/test_multi_expert.py::test_diverse_expert_matches_reference[9x3x1000-torch.bfloat16-mean-cuda]"
  "tests/test_multi_expert.py::test_ride_matches_reference[9x3x1000-torch.float32-ldam-cuda]"
)
# racecheck instruments every shared-memory access (~10-100x slower): the kernels with
# block-level shared-memory reductions only (CE rows + finish, LADE columns + finish, EQL).
RACECHECK_TESTS=("${SANITIZER_TESTS[0]}" "${SANITIZER_TESTS[3]}" "${SANITIZER_TESTS[5]}")

# ---------------------------------------------------------------------------- 1 build
if [ "$DRY_RUN" = 1 ]; then
  stamp "build: skipped (dry run uses the existing build)"
  "$PYTHON" -c "import ltfast, sys; print('ltfast from', ltfast.__file__); sys.exit(0 if ltfast._extension.AVAILABLE else 1)" \
    || { echo "ERROR: ltfast._C is not built here"; exit 1; }
else
  t=$(budget 200)
  stamp "build (sm_90 only, 16 jobs, in place; timeout ${t}s)"
  # In place, not `pip install -e .`: the lent machine's system Python may refuse installs (PEP 668),
  # and the tests and benchmarks import ltfast from the repo root anyway.
  if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 LTFAST_CUDA=1 run_for "$t" \
      "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    echo "ERROR: build failed or timed out (log: $OUT/build.log)"
    exit 1
  fi
  "$PYTHON" -c "import ltfast, sys; ok = ltfast.has_cuda_kernels(); print('ltfast from', ltfast.__file__, '- CUDA kernels registered:', ok); sys.exit(0 if ok else 1)" \
    || exit 1
fi

# ---------------------------------------------------------------------------- 2 CUDA tests
if [ "$DRY_RUN" = 1 ]; then
  stamp "CUDA tests: not run (no GPU); checking that the sanitizer's test ids exist"
  if ! "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider "${SANITIZER_TESTS[@]}" >"$OUT/sanitizer.log" 2>&1; then
    tail -n 15 "$OUT/sanitizer.log"; failed+=("sanitizer-test-ids")
  else
    tail -n 1 "$OUT/sanitizer.log"
  fi
else
  t=$(budget 120)
  stamp "CUDA tests (timeout ${t}s)"
  extra=()
  # 8 workers: ~800 CUDA tests, some of them under torch.compile; one CUDA context each (~0.5 GB).
  [ "$have_xdist" = 1 ] && extra+=(-n 8)
  # --continue-on-collection-errors: a module failing to import must not take the others with it.
  run_for "$t" "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
    "${pytest_ignores[@]}" "${extra[@]}" --durations=10 >"$OUT/cuda-tests.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/cuda-tests.log"
  verdict cuda-tests "$rc"
fi

# ---------------------------------------------------------------------------- 3 parity
t=$(budget 60)
stamp "parity (timeout ${t}s)"
parity_args=(--out "$OUT/checks.jsonl" --budget-s $(( t > 20 ? t - 10 : t / 2 )))  # 10 s: start-up and summary
[ "$DRY_RUN" = 1 ] && parity_args+=(--dry-run)
echo "==== parity" >>"$OUT/details.log"
run_for "$t" "$PYTHON" benchmarks/gpu_parity.py "${parity_args[@]}" >"$work/parity.log" 2>&1
rc=$?
cat "$work/parity.log" >>"$OUT/details.log"
grep -E "^(FAIL|parity summary|  FAILED)" "$work/parity.log" | tail -n 25
verdict parity "$rc"; [ "$rc" -eq 0 ] || tail -n 5 "$work/parity.log"

# ---------------------------------------------------------------------------- 4 compute-sanitizer
if [ "$DRY_RUN" = 1 ]; then
  stamp "compute-sanitizer: skipped (dry run)"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
  stamp "compute-sanitizer: not installed"; failed+=("sanitizer(missing)")
else
  # PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor its own cudaMalloc, so memcheck sees an
  # out-of-bounds access past a tensor (the caching allocator would hide it inside a pooled block).
  # --error-exitcode 86 tells sanitizer findings (86) from test failures (1) and tool trouble.
  for tool in memcheck racecheck; do
    if [ "$tool" = memcheck ]; then cap=45; ids=("${SANITIZER_TESTS[@]}"); else cap=35; ids=("${RACECHECK_TESTS[@]}"); fi
    t=$(budget $cap)
    stamp "compute-sanitizer --tool $tool, ${#ids[@]} tests (timeout ${t}s)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_for "$t" compute-sanitizer --tool "$tool" --error-exitcode 86 \
      --print-limit 20 "$PYTHON" -m pytest -q -p no:cacheprovider "${ids[@]}" >"$work/sanitizer.log" 2>&1
    rc=$?
    { echo "==== compute-sanitizer --tool $tool (rc $rc)"; cat "$work/sanitizer.log"; } >>"$OUT/sanitizer.log"
    tail -n 6 "$work/sanitizer.log"
    if grep -q "Device not supported" "$work/sanitizer.log"; then
      echo "$tool: compute-sanitizer does not support this machine (seen on gVisor): not run"
      incomplete+=("$tool(unsupported)")
    else
      verdict "$tool" "$rc"  # 86: findings; 1: a test failed under the tool
      [ "$rc" -eq 0 ] && echo "$tool: clean"
    fi
  done
fi

# ---------------------------------------------------------------------------- 5 traffic model vs profiler
t=$(budget 35)
# The dry run prints the same 65536 x 8142 table and measures ltfast:: CPU ops at 64 x 100.
if [ "$DRY_RUN" = 1 ]; then model_args=(--measure --device cpu --measure-shape 64 100); else model_args=(--measure --device cuda); fi
stamp "traffic model, 65536x8142 bf16, vs profiler kernels (timeout ${t}s)"
echo "==== traffic model" >>"$OUT/details.log"
run_for "$t" "$PYTHON" benchmarks/traffic_model.py "${model_args[@]}" --json "$OUT/checks.jsonl" 2>&1 \
  | grep -v "USDT\|SyncActivityProfiler\|gpuGetDeviceCount" | tee -a "$OUT/details.log"
verdict traffic-model "${PIPESTATUS[0]}"

# ---------------------------------------------------------------------------- 6 benchmark
t=$(budget 400)
if [ "$DRY_RUN" = 1 ]; then
  bench_args=(--device cpu --suites loss compat --shapes 1x2 64x1000 --baselines eager --min-time 0.05 --max-reps 20)
  bench_budget=$(( t > 30 ? 20 : t / 2 ))
else
  # Eager baseline only by default: torch.compile of the reference costs ~10 s per row and mode,
  # which would leave 2-3 of the 18+ rows in the time left; BENCH_BASELINES="eager compile" adds it.
  read -r -a baselines <<<"${BENCH_BASELINES:-eager}"
  bench_args=(--device cuda --suites loss compat --baselines "${baselines[@]}" --min-time 0.2 --max-reps 100)
  bench_budget=$(( t > 40 ? t - 30 : t / 2 ))  # the row in flight and the table must fit after it
fi
stamp "loss + compat benchmark (timeout ${t}s, budget ${bench_budget}s)"
run_for "$t" "$PYTHON" benchmarks/throughput.py "${bench_args[@]}" --budget-s "$bench_budget" \
  --json "$OUT/bench.json" >"$work/bench.log" 2>&1
rc=$?
{ echo "==== benchmark"; cat "$work/bench.log"; } >>"$OUT/details.log"
grep -E "budget|wrote" "$work/bench.log"
verdict benchmark "$rc"; [ "$rc" -eq 0 ] || tail -n 20 "$work/bench.log"

# ---------------------------------------------------------------------------- summary
stamp "summary"
[ "$DRY_RUN" = 0 ] && [ -f "$OUT/cuda-tests.log" ] && tail -n 1 "$OUT/cuda-tests.log"
grep "parity summary" "$work/parity.log"
# The tables go to a file first: piping the summary into head broke its pipe mid-table.
[ -s "$OUT/bench.json" ] && "$PYTHON" benchmarks/summarize.py "$OUT/bench.json" > "$work/bench-tables.md" \
  && head -n 40 "$work/bench-tables.md"
ls "$OUT"
took=$(( $(date +%s) - start ))
[ "${#incomplete[@]}" -gt 0 ] && echo "gpu_check: INCOMPLETE (cut by their timeout or not runnable here): ${incomplete[*]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED stages: ${failed[*]} (${took} s)"
  exit 1
fi
[ "${#incomplete[@]}" -gt 0 ] && { echo "gpu_check: no failure, some stages incomplete (${took} s)"; exit 2; }
echo "gpu_check: all stages passed (${took} s)"
