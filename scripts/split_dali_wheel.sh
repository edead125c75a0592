#!/usr/bin/env bash
# Cuts the DALI wheel (~199 MB) for the device machine into 4 parts (~50 MB each) under
# dali_parts/ (git-ignored), each under the 64 MiB a device call carries. Carry one part per
# call (carry: ["dali_parts/<name>.part<k>"]) and move it out of the repo copy on arrival:
#   mkdir -p /tmp/ltfast_dali_parts && mv dali_parts/* /tmp/ltfast_dali_parts/
# then scripts/gpu_check.sh joins and installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p dali_parts/download
# The wheel is py3-none-manylinux_2_28_x86_64: the same file serves the device's Python 3.12.
python3 -m pip download --quiet --no-deps -d dali_parts/download nvidia-dali-cuda130
wheel=$(ls dali_parts/download/*.whl | head -n 1)
split -n 4 -d -a 1 "$wheel" "dali_parts/$(basename "$wheel").part"
rm -rf dali_parts/download
ls -l dali_parts
