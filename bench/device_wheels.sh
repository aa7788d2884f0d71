# Sourced (not run) by bench/device_run.sh and bench/study_gpu.sh on the GPU machine, from the
# repository root: the GPU image lacks some pure-Python packages (datasets, tensorboardX, ...);
# when .whl/ holds wheels (bench/fetch_device_wheels.sh fetches them on a CPU machine), they are
# installed into a private folder and put on PYTHONPATH. IADA_WHEELS names them (or "none").
export IADA_WHEELS=none
if compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/iada_device_site"
    echo "device: installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into $site"
    if "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        export IADA_WHEELS="$(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        echo "device: installing the wheels failed; going on with the installed packages"
    fi
else
    echo "device: no wheels in .whl/: using the installed packages only"
fi
