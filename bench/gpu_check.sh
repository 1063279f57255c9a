#!/usr/bin/env bash
# One short check of a machine with a CUDA GPU, bounded to 5 minutes, installing nothing beyond the
# project (run scripts/setup.sh first): trains ddpm-35m with bf16 autocast and channels_last for a
# fixed number of steps, reports images/s and achieved TFLOP/s against the card's peak, runs the
# pipeline's training loop and extracts features. Without a GPU it stops at once, saying so.
#
#   bash bench/gpu_check.sh                      # on the GPU machine
#   bash bench/gpu_check.sh --device cpu --steps 2 --batch 4   # dry run of the same code on a CPU
#   bash bench/gpu_check.sh --out gpu_check.json # also keep the JSON summary
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { echo "gpu_check: $PY not found: run 'bash scripts/setup.sh' first (or set PYTHON)" >&2; exit 2; }
case " $* " in
  *" --device cpu "*) ;;
  *)
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
      echo "gpu_check: no NVIDIA GPU or driver here (nvidia-smi missing or failing);" \
           "for a dry run on the CPU: bash bench/gpu_check.sh --device cpu --steps 2 --batch 4" >&2
      exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
esac
export OMP_WAIT_POLICY=PASSIVE DO_NOT_TRACK=true
exec timeout --signal=TERM --kill-after=10 300 "$PY" bench/gpu_check.py "$@"
