#!/usr/bin/env bash
# One short GPU session (<= 8 minutes): the device; correctness against the oracle and of the
# Triton LIF on the GPU; seconds per epoch of the benchmark configurations; the study-file speed
# options (tf32, bf16, Triton LIF, torch.compile with CUDA graphs); `c5snn workers` scaling at
# 1/2/4/8 workers per GPU; an estimate of the whole phase-C sweep. Writes $OUT/gpu_check.md
# (or ./gpu_check.md). CPU dry run: DEVICE=cpu QUICK=1 benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "$DEVICE" != "cpu" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
args=(--device "$DEVICE" --out "${OUT:-.}")
[ "${QUICK:-0}" = "1" ] && args+=(--quick)
timeout 480 "$PY" benchmarks/gpu_check.py "${args[@]}"
