#!/usr/bin/env bash
# The test command: set up (install + build) and run the whole suite. CUDA tests run wherever a
# GPU is present and are skipped elsewhere.
#
# The suite runs on pytest-xdist workers, one per core up to 4 (LTFAST_TEST_WORKERS overrides; 0 runs
# it in this process): on the 2-core machine 2 workers ran the suite in 395 s where one process took
# 568 s (clean-clone .ci/run, 2026-12-08 and -07).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores=$(nproc 2>/dev/null || echo 1)
workers=${LTFAST_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec "${PYTHON:-python3}" -m pytest tests -q -n "$workers" "$@"
