#!/usr/bin/env bash
# Fetch, on a CPU machine with network, the pure-Python packages the GPU machine's image lacks
# (it has jax 0.11, flax, optax, orbax, transformers, torch, pandas, pyarrow, ... but no
# datasets and no tensorboardX, and no registry to install from). They land in .whl/
# (git-ignored); bench/device_run.sh installs them there. Versions: our pins (pyproject.toml)
# and what datasets needs beside them. Carry the folder: run(..., carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "tensorboardX==2.6.5"
du -sh .whl
ls .whl
