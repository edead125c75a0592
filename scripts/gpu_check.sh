#!/usr/bin/env bash
# The one command to run on a lent GPU machine (device tool, from the repo root). It must fit one
# call: a command may run 10 minutes and a session has 15 minutes of device time including the
# machine's start (1-2 min), so everything ends within 480 s (60 s of margin inside 540 s) and every
# stage has its own timeout.
# Stages, most valuable first, each writing into $OUT as it goes (a cut-short run still returns
# what was measured):
#
#   stage                          cap (s)  what
#   0 preflight                        15   nvidia-smi; python/torch/CUDA/nvcc versions; torch's and nvcc's
#                                           CUDA majors agree (else CUDA_HOME -> a matching toolkit, or stop);
#                                           ninja, pytest, numpy, a C++ compiler: a build that cannot work
#                                           stops here in seconds, not at 200 s
#   1 build                           200   setup.py build_ext --inplace, sm_90 only, CFLAGS=-g0, $(nproc) jobs
#   2 parity                           60   benchmarks/gpu_parity.py: CUDA vs CPU op vs reference, 65536x8142 bf16
#   3 CUDA tests, fast pass            90   pytest -m cuda -n 8, all but opcheck/gradcheck/compile, --maxfail=50
#   4 CUDA tests, slow pass            60   the opcheck/gradcheck/torch.compile tests, in the time left
#   5 compute-sanitizer                50   memcheck (30) and racecheck (20) on scripts/sanitizer_driver.py,
#                                           ltfast's kernels only (--kernel-name kns=ltfast)
#   6 traffic model vs profiler        30   benchmarks/traffic_model.py --measure at 65536x8142 bf16
#   6b ncu vs the emulator             40   benchmarks/ncu_sectors.py: ncu sector efficiency, DRAM bytes, GB/s of one
#                                           op per family at 64x8142 bf16 beside the emulator's (memory_model.json)
#   7 loss + compat benchmark       rest    benchmarks/throughput.py --budget-s (JSON rewritten per row)
#
# Every stage's timeout is its cap or what is left before the deadline, whichever is less, so a
# slow build eats into the benchmark, never past the deadline. The deadline is 480 s, not 540: 60 s
# of margin inside the 540 s a call may take after the machine's start.
#
# Measured, dry run on this project's 2-core AMD EPYC with torch 2.11: idle, preflight 2 s, parity
# 2 s, collecting the 1,407 CUDA tests twice 11 s, sanitizer driver on the CPU 2 s, traffic model
# 4 s, benchmark 5 s: 27 s in all (151 s at load ~6 from other builds). Estimated on the H100 (16 cores), unmeasured:
# preflight 5 s; build ~150 s (the generic sources and the 6 .cu files in parallel, the heaviest
# .cu ~60-90 s for sm_90 alone, then the CPU kernels' three capability groups one after another,
# ~20-30 s each); parity ~45 s; fast tests 90 s (cap; 1,378 tests on 8 workers); slow tests 60 s
# (cap; 29 opcheck/gradcheck/compile tests); sanitizer ~40 s; traffic model ~15 s; ncu ~30 s
# (estimated: its start-up and 5 metrics over ~15 small kernels): ~435 s, which leaves the
# benchmark ~30 s before the 480 s deadline.
#
#   OUT=/some/folder bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run                   # CPU, no build, tiny sizes (CI; ~1-2 min on 2 cores)
#   PYTHON=/path/to/venv/bin/python bash scripts/gpu_check.sh --dry-run   # with another torch (CI: 2.11)
#
# $OUT holds 7 files (the device tool brings back at most 8; the 8th is the benchmark's JSON while it
# is being rewritten): gpu_check.log (all this script prints), build.log, cuda-tests.log (both
# passes), sanitizer.log (memcheck + racecheck), checks.jsonl (parity and traffic-model records, one
# JSON line each), bench.json (throughput.py records), details.log (full output of parity, model,
# benchmark).
#
# Exit status: 1 when a stage fails (preflight, build, a test, a parity check, a sanitizer finding,
# the benchmark); else 2 when a stage was cut by its timeout (its results are partial); else 0.
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
  TOTAL_S=${TOTAL_S:-480}
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
work=$(mktemp -d -t ltfast_gpu_check_work.XXXXXX)  # stage outputs before they are appended to $OUT
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
deadline=$(( start + TOTAL_S ))
failed=()      # stages that failed
incomplete=()  # stages cut by their timeout (timeout's 124, or 137 after the -k kill)
stage_times=() # "stage=seconds" for the summary
stage_start=$start
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }
# Closes the running stage's clock: records how long it took.
stage_done() { local now; now=$(date +%s); stage_times+=("$1=$(( now - stage_start ))s"); stage_start=$now; }
# Seconds a stage may run: its cap, or what is left before the deadline less 15 s (the 10 s kill
# grace of run_for and 5 s for the summary), whichever is less.
budget() { local left=$(( deadline - $(date +%s) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
# timeout -s INT: pytest and Python print their summary on SIGINT; -k 10: SIGKILL 10 s later.
run_for() { local s=$1; shift; timeout -s INT -k 10 "$s" "$@"; }
# Files a stage's exit status: 0 ok, 124/137 cut by its timeout, anything else failed.
verdict() { case "$2" in 0) ;; 124|137) incomplete+=("$1") ;; *) failed+=("$1(rc=$2)") ;; esac; }

# ---------------------------------------------------------------------------- 0 preflight
stamp "preflight (out: $OUT, dry run: $DRY_RUN, deadline ${TOTAL_S}s)"
preflight_fail() { echo "PREFLIGHT FAILED: $*"; echo "gpu_check: FAILED stages: preflight (nothing built or run)"; exit 1; }
if [ "$DRY_RUN" = 0 ]; then
  timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    || preflight_fail "nvidia-smi does not answer: no usable GPU"
fi
versions=$("$PYTHON" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda or 'none', int(torch.cuda.is_available()))" 2>&1) \
  || preflight_fail "$PYTHON cannot import torch: $versions"
read -r py_version torch_version torch_cuda cuda_ok <<<"$versions"
echo "python $py_version, torch $torch_version, torch's CUDA $torch_cuda, GPU visible to torch: $cuda_ok"
[ "$torch_cuda" = none ] && preflight_fail "torch $torch_version is a CPU build: the CUDA kernels cannot be built"
[ "$DRY_RUN" = 0 ] && [ "$cuda_ok" != 1 ] && preflight_fail "torch.cuda.is_available() is False"
# The toolkit the build will use: CUDA_HOME, else the nvcc on PATH. Its CUDA major must be torch's
# (headers and runtime of one major); otherwise look for a matching /usr/local/cuda-<major>*.
nvcc_of() { if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME/bin/nvcc"; else command -v nvcc || true; fi; }
nvcc_release() { "$1" --version 2>/dev/null | sed -nE 's/.*release ([0-9]+)\.([0-9]+).*/\1.\2/p' | head -n 1; }
nvcc_bin=$(nvcc_of)
nvcc_version=$([ -n "$nvcc_bin" ] && nvcc_release "$nvcc_bin")
echo "nvcc: ${nvcc_bin:-not found} (release ${nvcc_version:-?})"
if [ "${nvcc_version%%.*}" != "${torch_cuda%%.*}" ]; then
  match=""
  for home in /usr/local/cuda-"${torch_cuda%%.*}"* /usr/local/cuda; do
    [ -x "$home/bin/nvcc" ] && [ "$(nvcc_release "$home/bin/nvcc" | cut -d. -f1)" = "${torch_cuda%%.*}" ] && { match=$home; break; }
  done
  [ -z "$match" ] && preflight_fail "nvcc ${nvcc_version:-missing} does not match torch's CUDA $torch_cuda, and no /usr/local/cuda-${torch_cuda%%.*}* toolkit was found"
  export CUDA_HOME=$match PATH=$match/bin:$PATH
  echo "CUDA_HOME=$CUDA_HOME (matches torch's CUDA ${torch_cuda%%.*})"
fi
missing=$("$PYTHON" -c "
import importlib.util as u
print(' '.join(m for m in ('ninja', 'pytest', 'numpy', 'setuptools') if u.find_spec(m) is None))")
[ -n "$missing" ] && preflight_fail "missing Python packages: $missing"
command -v "${CXX:-c++}" >/dev/null 2>&1 || preflight_fail "no C++ compiler (${CXX:-c++})"
has() { "$PYTHON" -c "import $1" >/dev/null 2>&1 && echo 1 || echo 0; }
have_dali=$(has nvidia.dali); have_yaml=$(has yaml); have_xdist=$(has xdist)
echo "optional: dali $have_dali yaml $have_yaml xdist $have_xdist; $(nproc) cores"
command -v compute-sanitizer >/dev/null 2>&1 && echo "compute-sanitizer: $(compute-sanitizer --version 2>/dev/null | tail -n 1)"

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
# The slow CUDA tests (inductor compiles, float64 gradcheck, opcheck's several passes): a second pass.
SLOW_TESTS="opcheck or gradcheck or compile"
stage_done preflight

# ---------------------------------------------------------------------------- 1 build
if [ "$DRY_RUN" = 1 ]; then
  stamp "build: skipped (dry run uses the existing build)"
  "$PYTHON" -c "import ltfast, sys; print('ltfast from', ltfast.__file__); sys.exit(0 if ltfast._extension.AVAILABLE else 1)" \
    || { echo "ERROR: ltfast._C is not built here"; exit 1; }
else
  t=$(budget 200)
  stamp "build (sm_90 only, $(nproc) jobs, -g0, in place; timeout ${t}s)"
  # In place, not `pip install -e .`: the lent machine's system Python may refuse installs (PEP 668),
  # and the tests and benchmarks import ltfast from the repo root anyway. -g0: no debug info (the
  # .cu objects' DWARF roughly doubled their compile and link time).
  if ! CFLAGS=-g0 CXXFLAGS=-g0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) LTFAST_CUDA=1 run_for "$t" \
      "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    echo "ERROR: build failed or timed out (log: $OUT/build.log)"
    exit 1
  fi
  "$PYTHON" -c "import ltfast, sys; ok = ltfast.has_cuda_kernels(); print('ltfast from', ltfast.__file__, '- CUDA kernels registered:', ok); sys.exit(0 if ok else 1)" \
    || exit 1
fi
stage_done build

# ---------------------------------------------------------------------------- 2 parity
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
stage_done parity

# ---------------------------------------------------------------------------- 3-4 CUDA tests
# Tests that can make a device-side assert run their cuda variant in a child process
# (tests/conftest.py, marker device_assert), and the run stops with one message if the context is
# ever poisoned, so the ~1,380 tests in 8 workers cannot be sunk by one assert.
xdist=()
[ "$have_xdist" = 1 ] && xdist+=(-n 8)
if [ "$DRY_RUN" = 1 ]; then
  stamp "CUDA tests: not run (no GPU); collecting them as the GPU run would (fast and slow pass)"
  for pass in "not ($SLOW_TESTS)" "$SLOW_TESTS"; do
    # The cuda variants are collected (then skipped here): a module that fails to import with this
    # Python's packages shows up now, not on the GPU machine.
    if ! "$PYTHON" -m pytest tests -m cuda -k "$pass" --collect-only -q -p no:cacheprovider "${pytest_ignores[@]}" \
        >"$work/collect.log" 2>&1; then
      tail -n 15 "$work/collect.log"; failed+=("cuda-test-collection")
    else
      echo "-k '$pass': $(grep -cE '::' "$work/collect.log") CUDA tests collected"
    fi
  done
  stage_done cuda-tests
else
  : >"$OUT/cuda-tests.log"
  for pass in fast slow; do
    if [ "$pass" = fast ]; then cap=90; select="not ($SLOW_TESTS)"; extra=(--maxfail=50); else cap=60; select="$SLOW_TESTS"; extra=(); fi
    t=$(budget $cap)
    stamp "CUDA tests, $pass pass (timeout ${t}s)"
    # --continue-on-collection-errors: a module failing to import must not take the others with it.
    run_for "$t" "$PYTHON" -m pytest tests -m cuda -k "$select" -q -p no:cacheprovider --continue-on-collection-errors \
      "${pytest_ignores[@]}" "${xdist[@]}" "${extra[@]}" --durations=5 >"$work/cuda-tests.log" 2>&1
    rc=$?
    { echo "==== $pass pass (rc $rc)"; cat "$work/cuda-tests.log"; } >>"$OUT/cuda-tests.log"
    tail -n 15 "$work/cuda-tests.log"
    verdict "cuda-tests-$pass" "$rc"
    stage_done "cuda-tests-$pass"
  done
fi

# ---------------------------------------------------------------------------- 5 compute-sanitizer
if [ "$DRY_RUN" = 1 ]; then
  stamp "compute-sanitizer: not run (no GPU); its driver on the CPU kernels"
  run_for "$(budget 60)" "$PYTHON" scripts/sanitizer_driver.py --device cpu >"$OUT/sanitizer.log" 2>&1
  rc=$?; tail -n 1 "$OUT/sanitizer.log"; verdict sanitizer-driver "$rc"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
  stamp "compute-sanitizer: not installed"; failed+=("sanitizer(missing)")
else
  # Only ltfast's kernels are instrumented (kernel-name filter, substring "ltfast": every kernel is
  # in namespace ltfast); torch's own kernels of the driver run uninstrumented. The option is
  # --kernel-name in the 2022+ tools (--filter before); the help text decides.
  kernel_filter=(--kernel-name kns=ltfast)
  compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name" || kernel_filter=(--filter kns=ltfast)
  # PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor its own cudaMalloc, so memcheck sees an
  # out-of-bounds access past a tensor (the caching allocator would hide it inside a pooled block).
  # --error-exitcode 86 tells sanitizer findings (86) from driver failures (1) and tool trouble.
  for tool in memcheck racecheck; do
    if [ "$tool" = memcheck ]; then cap=30; else cap=20; fi
    t=$(budget $cap)
    stamp "compute-sanitizer --tool $tool ${kernel_filter[*]} on scripts/sanitizer_driver.py (timeout ${t}s)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_for "$t" compute-sanitizer --tool "$tool" "${kernel_filter[@]}" \
      --error-exitcode 86 --print-limit 20 "$PYTHON" scripts/sanitizer_driver.py --device cuda >"$work/sanitizer.log" 2>&1
    rc=$?
    { echo "==== compute-sanitizer --tool $tool (rc $rc)"; cat "$work/sanitizer.log"; } >>"$OUT/sanitizer.log"
    tail -n 4 "$work/sanitizer.log"
    if grep -q "Device not supported" "$work/sanitizer.log"; then
      echo "$tool: compute-sanitizer does not support this machine (seen on gVisor): not run"
      incomplete+=("$tool(unsupported)")
    else
      verdict "$tool" "$rc"  # 86: findings; 1: a driver case failed under the tool
      [ "$rc" -eq 0 ] && echo "$tool: clean"
    fi
  done
fi
stage_done sanitizer

# ---------------------------------------------------------------------------- 6 traffic model vs profiler
t=$(budget 30)
# The dry run prints the same 65536 x 8142 table and measures ltfast:: CPU ops at 64 x 100.
if [ "$DRY_RUN" = 1 ]; then model_args=(--measure --device cpu --measure-shape 64 100); else model_args=(--measure --device cuda); fi
stamp "traffic model, 65536x8142 bf16, vs profiler kernels (timeout ${t}s)"
echo "==== traffic model" >>"$OUT/details.log"
run_for "$t" "$PYTHON" benchmarks/traffic_model.py "${model_args[@]}" --json "$OUT/checks.jsonl" 2>&1 \
  | grep -v "USDT\|SyncActivityProfiler\|gpuGetDeviceCount" >>"$OUT/details.log"
rc=${PIPESTATUS[0]}
tail -n 3 "$OUT/details.log"
verdict traffic-model "$rc"
stage_done traffic-model

# ---------------------------------------------------------------------------- 6b ncu vs the emulator
# Nsight Compute's sector efficiency (bytes used per 32-byte sector, loads and stores), DRAM bytes and
# GB/s of one op per family at 64x8142 bf16, beside the SIMT emulator's numbers for the same kernels
# (benchmarks/results/memory_model.json): the first GPU run calibrates the emulator's traffic model.
t=$(budget 40)
if [ "$DRY_RUN" = 1 ]; then ncu_args=(--dry-run); else ncu_args=(--timeout $(( t > 10 ? t - 5 : t ))); fi
stamp "ncu sectors and DRAM bytes vs the SIMT emulator, 64x8142 bf16 (timeout ${t}s)"
echo "==== ncu sectors" >>"$OUT/details.log"
run_for "$t" "$PYTHON" benchmarks/ncu_sectors.py "${ncu_args[@]}" --json "$OUT/checks.jsonl" >"$work/ncu.log" 2>&1
rc=$?
cat "$work/ncu.log" >>"$OUT/details.log"
tail -n 16 "$work/ncu.log"
if [ "$rc" -eq 2 ]; then incomplete+=("ncu(missing)"); else verdict ncu-sectors "$rc"; fi
stage_done ncu-sectors

# ---------------------------------------------------------------------------- 7 benchmark
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
stage_done benchmark

# ---------------------------------------------------------------------------- summary
stamp "summary"
[ "$DRY_RUN" = 0 ] && [ -f "$OUT/cuda-tests.log" ] && tail -n 1 "$OUT/cuda-tests.log"
grep "parity summary" "$work/parity.log"
# The tables go to a file first: piping the summary into head broke its pipe mid-table.
[ -s "$OUT/bench.json" ] && "$PYTHON" benchmarks/summarize.py "$OUT/bench.json" > "$work/bench-tables.md" \
  && head -n 40 "$work/bench-tables.md"
ls "$OUT"
echo "stage times: ${stage_times[*]}"
took=$(( $(date +%s) - start ))
[ "${#incomplete[@]}" -gt 0 ] && echo "gpu_check: INCOMPLETE (cut by their timeout or not runnable here): ${incomplete[*]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED stages: ${failed[*]} (${took} s)"
  exit 1
fi
[ "${#incomplete[@]}" -gt 0 ] && { echo "gpu_check: no failure, some stages incomplete (${took} s)"; exit 2; }
echo "gpu_check: all stages passed (${took} s)"
