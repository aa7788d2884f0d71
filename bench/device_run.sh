#!/usr/bin/env bash
# The one prepared GPU run: every measurement we need from a GPU, in priority order, within
# about 9 minutes (bench/device_run.py says what and how). Run from anywhere:
#
#   bench/device_run.sh            on the GPU machine; results in $OUT (default bench/results/)
#   bench/device_run.sh --cpu      tiny dimensions on CPU: what the test suite runs
#
# On the GPU machine, wheels carried in .whl/ are installed first (bench/device_wheels.sh).
# PYTHON chooses the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
cpu=0
for arg in "$@"; do [ "$arg" = "--cpu" ] && cpu=1; done
export IADA_WHEELS=none
[ "$cpu" = 0 ] && source bench/device_wheels.sh
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.device_run "$@"
