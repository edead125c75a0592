#!/usr/bin/env bash
# Builds and tests ltfast against the other ends of the supported torch range (pyproject.toml:
# torch 2.11 through 2.15), each in a venv and a copy of the tree of its own: an in-place build of
# ltfast._C for another torch must not overwrite the main checkout's.
#
#   bash scripts/test_torch_versions.sh 2.11.0 2.15.0     # what .ci/run calls
#
# Per version:
#   1. a venv ($LTFAST_VENVS/torch-VERSION, reused when present) with torch==VERSION and only the
#      Python packages of the lent GPU machines' image that ltfast's build and op tests use (ninja,
#      pytest, pytest-xdist, numpy, PyYAML, matplotlib, hypothesis: no expecttest, no DALI), so a
#      test or a script that needs more fails here first;
#   2. the full build with CUDA (LTFAST_CUDA=1, every .cu against this torch's headers) for one
#      architecture: sm_90 for the lent machines' torch 2.11.0 (their H100/H200), sm_80 for the
#      others, so that with the main build's sm_90 (.ci/run) CI compiles every kernel for both;
#   3. the CPU tests of the ops (OP_TESTS below), in parallel over 2 workers;
#   4. for 2.11 (the lent GPU machines' torch) also scripts/gpu_check.sh --dry-run with that venv.
#      No version builds the SIMT emulator: it is test-only code, always compiled as C++20 (so it
#      does not check the C++17 headers of torch <= 2.13; nvcc's build in step 2 does), its kernels
#      are the .cu files' own, and the main suite runs every simt test; its build and simt op tests
#      took ~230 s of the ~800 s torch 2.11.0 run on the 2-core machine (CI's 40-minute budget).
# Exit status: non-zero when any version fails a step; each step's log tail is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENVS=${LTFAST_VENVS:-$HOME/.cache/ltfast/venvs}
LENT_MACHINE_TORCH=2.11.0
# The kernel-level tests: every op on cpu, autograd, the fast path, decompositions, samplers.
OP_TESTS=(tests/test_cross_entropy.py tests/test_equalization.py tests/test_lade.py tests/test_soft_targets.py
          tests/test_multi_expert.py tests/test_samplers.py tests/test_autograd.py tests/test_decompositions.py
          tests/test_fastcall.py tests/test_paco_op.py)
BASE_PYTHON=${BASE_PYTHON:-python3}
[ "$#" -gt 0 ] || { echo "usage: $0 TORCH_VERSION..." >&2; exit 2; }

failed=()
for version in "$@"; do
  start=$(date +%s)
  stamp() { echo "== [torch $version, $(( $(date +%s) - start ))s] $*"; }
  venv=$VENVS/torch-$version
  python=$venv/bin/python
  if ! "$python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    stamp "creating $venv"
    rm -rf "$venv"; mkdir -p "$VENVS"
    "$BASE_PYTHON" -m venv "$venv"
    # PIP_CONFIG_FILE=/dev/null: this machine's pip.conf caps torch at the 2.14.1 kept on its disk
    # (a constraints file); the other versions come from the registry.
    PIP_CONFIG_FILE=/dev/null "$python" -m pip install --quiet "torch==$version" ninja pytest pytest-xdist numpy \
      pyyaml matplotlib hypothesis "setuptools>=64" wheel
  fi
  "$python" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

  # The tree as it is (committed or not), without builds, caches or git objects.
  tree=$(mktemp -d -t "ltfast-torch-$version.XXXXXX")
  tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='*.so' --exclude='__pycache__' \
      --exclude=./.pytest_cache --exclude=./runs -cf - . | tar -C "$tree" -xf -
  log=$tree/build.log
  arch=8.0; [ "$version" = "$LENT_MACHINE_TORCH" ] && arch=9.0
  stamp "building ltfast._C with CUDA (sm_${arch/./}) in $tree"
  if ! (cd "$tree" && CFLAGS=-g0 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-2} LTFAST_CUDA=1 \
        "$python" setup.py build_ext --inplace >"$log" 2>&1); then
    tail -n 40 "$log"; failed+=("$version:build"); continue
  fi
  grep -oE "(nvcc|c\+\+) .* -c [^ ]+\.cu( |$)" "$log" | grep -oE "[^ /]+\.cu" | sort -u | tr '\n' ' ' || true; echo "compiled"
  if ! (cd "$tree" && "$python" -c "import ltfast, sys; sys.exit(0 if ltfast.has_cuda_kernels() else 1)"); then
    echo "ltfast._C built for torch $version has no CUDA kernels"; failed+=("$version:cuda-kernels"); continue
  fi
  stamp "op tests on cpu"
  if ! (cd "$tree" && "$python" -m pytest "${OP_TESTS[@]}" -q -p no:cacheprovider -n 2 -m "not cuda" \
        -k "not simt" >"$tree/tests.log" 2>&1); then
    tail -n 40 "$tree/tests.log"; failed+=("$version:tests")
  else
    tail -n 1 "$tree/tests.log"
  fi
  if [ "$version" = "$LENT_MACHINE_TORCH" ]; then
    stamp "gpu_check.sh --dry-run (the lent machines' torch and packages)"
    if ! (cd "$tree" && OUT=$tree/gpu-check-out PYTHON=$python bash scripts/gpu_check.sh --dry-run >"$tree/gpu-check.log" 2>&1); then
      tail -n 40 "$tree/gpu-check.log"; failed+=("$version:gpu-check-dry-run")
      grep -h -B2 -A12 "Traceback" "$tree"/gpu-check-out/*.log 2>/dev/null | head -n 60 || true
    else
      grep -E "^== \[|preflight|gpu_check:" "$tree/gpu-check.log"
    fi
  fi
  stamp "done"
  # A failing version keeps its tree (logs, build) for a look; a passing one is removed.
  if [ "${#failed[@]}" -gt 0 ] && [[ "${failed[*]}" == *"$version:"* ]]; then echo "kept $tree"; else rm -rf "$tree"; fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "test_torch_versions: FAILED: ${failed[*]}"
  exit 1
fi
echo "test_torch_versions: torch $* built with CUDA and passed the op tests on cpu"
