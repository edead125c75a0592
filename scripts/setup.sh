#!/usr/bin/env bash
# Sets up a fresh machine for ltfast: installs torch (the CUDA 13.0 build, whose headers let nvcc
# compile the .cu files even without a GPU), the test tools, and builds ltfast._C in place.
#
#   bash scripts/setup.sh            # LTFAST_CUDA=auto: CUDA kernels when nvcc is found
#   LTFAST_CUDA=1 bash scripts/setup.sh   # CI: the CUDA kernels must build, or this fails
#
# Idempotent: a second run reuses what is installed and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
PYTHON=${PYTHON:-python3}

have_torch=$("$PYTHON" -c "import torch, torchvision; print(torch.__version__.split('+')[0], torchvision.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$have_torch" != "$TORCH_VERSION $TORCHVISION_VERSION" ]; then
  echo "== installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
  "$PYTHON" -m pip install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
"$PYTHON" -m pip install --quiet ninja "pytest>=7" pytest-xdist expecttest numpy "setuptools>=64" wheel \
  pyyaml matplotlib tqdm pillow "import-linter>=2.17" ruff
# DALI (CPU pipelines here, nvJPEG where a GPU is present). The cuda130 build matches torch's CUDA.
if ! "$PYTHON" -c "import nvidia.dali" >/dev/null 2>&1; then
  echo "== installing nvidia-dali-cuda130"
  "$PYTHON" -m pip install --quiet nvidia-dali-cuda130
fi

# Real data without downloads: Fashion-MNIST (the CPU long-tail benchmark) and JPEG photos (the
# decoder tests and the data benchmark), both Debian packages.
DEBIAN_DATA_PACKAGES="dataset-fashion-mnist lomiri-wallpapers-16.04"
missing=""
for package in $DEBIAN_DATA_PACKAGES; do
  dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -n "$missing" ]; then
  echo "== installing Debian packages:$missing"
  if [ "$(id -u)" = "0" ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "ERROR: need root (or sudo) to apt-get install$missing" >&2; exit 1; fi
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

mode=${LTFAST_CUDA:-auto}
if [ "$mode" = "1" ] && ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  echo "ERROR: LTFAST_CUDA=1 but nvcc is not on PATH and CUDA_HOME is not set" >&2
  exit 1
fi

echo "== building ltfast._C (LTFAST_CUDA=$mode)"
log=$(mktemp)
if ! LTFAST_CUDA="$mode" "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "ERROR: building ltfast failed (full log: $log)" >&2
  exit 1
fi
# What was compiled, from the build log: the setup summary and one line per compiled source.
grep -E "\[ltfast setup\]" "$log" || true
grep -oE "(nvcc|c\+\+) .* -c [^ ]+\.(cu|cpp)" "$log" | sed -E 's/^(nvcc|c\+\+) .* -c ([^ ]+)$/  compiled \2 with \1/' | sort -u || true

# The test-only SIMT emulator library (tests/simt_support.py): ltfast's CUDA kernels compiled for the
# host, so that the `simt` tests run every kernel on this CPU. Never part of the installed package.
echo "== building the SIMT emulator library (build/simt/)"
if ! "$PYTHON" tests/simt_support.py --build >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "ERROR: building the SIMT emulator library failed (full log: $log)" >&2
  exit 1
fi
tail -n 1 "$log"

"$PYTHON" - "$mode" <<'PY'
import sys
import ltfast
if not ltfast._extension.AVAILABLE:
    sys.exit(f"ERROR: ltfast._C does not load: {ltfast._extension.LOAD_ERROR}")
cuda = ltfast.has_cuda_kernels()
print(f"== ltfast._C loaded; CUDA kernels compiled in: {cuda}")
if sys.argv[1] == "1" and not cuda:
    sys.exit("ERROR: LTFAST_CUDA=1 but ltfast._C has no CUDA kernels")
PY
