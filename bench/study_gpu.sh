#!/usr/bin/env bash
# The reasoning-tax study on the GPU machine (the device tool), inside a time limit: wheels from
# .whl/ (bench/device_wheels.sh), then `python -m iada_jax.study.reasoning_tax` with the given
# flags; its log, table, results and figures land in $OUT (default bench/results/) as study_*.
#
#   bench/study_gpu.sh SECONDS [study flags ...]      e.g. bench/study_gpu.sh 300 --jobs 4
#
# The study reuses finished runs in its --out (/tmp/iada_study here), so a second call on a warm
# machine continues where the first one stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
limit="${1:?seconds}"; shift
out="${OUT:-bench/results}"
mkdir -p "$out"
source bench/device_wheels.sh  # the wheels carried in .whl/
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/study.log"
start=$(date +%s)
timeout "$limit" "${PYTHON:-python3}" -m iada_jax.study.reasoning_tax --out /tmp/iada_study "$@" 2>&1 | tee -a "$out/study.log"
echo "study_gpu: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$out/study.log"
for f in table.md results.json reasoning_tax.png depth_weights.png; do
    [ -f "/tmp/iada_study/$f" ] && cp "/tmp/iada_study/$f" "$out/study_$f"
done
exit 0
