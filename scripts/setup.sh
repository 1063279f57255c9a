#!/usr/bin/env bash
# Set up ddae on a fresh Debian/Ubuntu machine: the Fashion-MNIST package (when we may install it),
# a virtual environment in .venv, torch first (the CPU build where there is no CUDA GPU), then ddae.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${DDAE_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

# 1. The embedded default dataset (Debian's dataset-fashion-mnist). Optional: prepare explains
#    what to do if it is missing.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
  if $SUDO true 2>/dev/null; then
    echo "==> installing dataset-fashion-mnist (Debian package)"
    $SUDO apt-get update -qq || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
      || echo "warning: could not install dataset-fashion-mnist; see README (Data)" >&2
  else
    echo "warning: not root and no passwordless sudo: install the dataset with" >&2
    echo "         sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi

# 2. The virtual environment.
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
# --no-compile: Python compiles what it imports on first use (about a quarter of the 20,000 modules);
# compiling all of them at install took longer than the rest of the install (2 min of 5 on 2 cores).
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
INSTALL=(install --no-compile)

# 3. torch before anything that depends on it, so pip never resolves a bare `torch` to a CUDA build
#    on a machine without a GPU.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "==> installing torch ${TORCH_VERSION}"
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "${INSTALL[@]}" "torch==${TORCH_VERSION}"
  else  # few retries: where that index is unreachable, pip would retry it 5 times per package (minutes)
    "${PIP[@]}" "${INSTALL[@]}" --retries 2 --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
      || "${PIP[@]}" "${INSTALL[@]}" "torch==${TORCH_VERSION}"
  fi
fi

# 4. ddae itself (editable) with the test tools; torch is named again so the resolver keeps it.
echo "==> installing ddae"
"${PIP[@]}" "${INSTALL[@]}" -e ".[test]" "torch==${TORCH_VERSION}"

# 5. Repository-local tool state: DVC without analytics.
# DVC analytics are off in .dvc/config (core.analytics = false).
echo "==> ready: run the pipeline with  .venv/bin/ddae run"
