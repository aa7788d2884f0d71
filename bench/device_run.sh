#!/usr/bin/env bash
# The one prepared GPU run: every measurement we need from a GPU, in priority order, within
# about 9 minutes (bench/device_run.py says what and how). Run from anywhere:
#
#   bench/device_run.sh            on the GPU machine; results in $OUT (default bench/results/)
#   bench/device_run.sh --cpu      tiny dimensions on CPU: what the test suite runs
#
# The GPU image lacks some pure-Python packages (datasets, tensorboardX, ...): when .whl/ holds
# wheels (bench/fetch_device_wheels.sh fetches them on a CPU machine), they are installed into
# a private folder first and put on PYTHONPATH. PYTHON chooses the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
cpu=0
for arg in "$@"; do [ "$arg" = "--cpu" ] && cpu=1; done
export IADA_WHEELS=none
if [ "$cpu" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/iada_device_site"
    echo "device_run: installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into $site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        export IADA_WHEELS="$(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        echo "device_run: installing the wheels failed; going on with the installed packages"
    fi
elif [ "$cpu" = 0 ]; then
    echo "device_run: no wheels in .whl/: using the installed packages only"
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.device_run "$@"
