#!/usr/bin/env bash
# One short check of a machine with a CUDA GPU, bounded to 10 minutes, installing nothing beyond the
# project (run scripts/setup.sh first): training images/s and MFU of ddpm-35m and ddpmpp-56m (bf16
# autocast, channels_last), the pipeline's training loop, feature extraction, the online probe's
# images/s, and a slice of the cifar10-ddpm profile end to end (ddae profile + ddae run in a copy of
# the project). Without a GPU it stops at once, saying so. Results: gpu_check.json and gpu_check.md
# in $OUT_DIR (default /tmp/ddae-gpu-check).
#
#   bash bench/gpu_check.sh                      # on the GPU machine
#   bash bench/gpu_check.sh --dry-run            # (or DRY_RUN=1) every part at toy scale on the CPU, ~3 min
#   DDAE_CIFAR10=/data/cifar-10-binary.tar.gz bash bench/gpu_check.sh   # the slice on real CIFAR-10
#   DDAE_PEAK_TFLOPS=989 bash bench/gpu_check.sh # the card's dense bf16 peak, if the table lacks it
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { echo "gpu_check: $PY not found: run 'bash scripts/setup.sh' first (or set PYTHON)" >&2; exit 2; }
OUT_DIR="${OUT_DIR:-${TMPDIR:-/tmp}/ddae-gpu-check}"
mkdir -p "$OUT_DIR"
ARGS=("$@")
[ "${DRY_RUN:-0}" = "1" ] && ARGS+=(--dry-run)
case " ${ARGS[*]:-} " in
  *" --dry-run "*|*" --device cpu "*) ;;
  *)
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
      echo "gpu_check: no NVIDIA GPU or driver here (nvidia-smi missing or failing);" \
           "for a dry run on the CPU: bash bench/gpu_check.sh --dry-run" >&2
      exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
esac
export OMP_WAIT_POLICY=PASSIVE DO_NOT_TRACK=true
exec timeout --signal=TERM --kill-after=10 600 "$PY" bench/gpu_check.py \
  --out "$OUT_DIR/gpu_check.json" --markdown "$OUT_DIR/gpu_check.md" "${ARGS[@]}"
