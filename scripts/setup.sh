#!/usr/bin/env bash
# One-shot, idempotent set-up: .venv with torch, timm, spconv, MinkowskiEngine (built once, cached)
# and mimsparse itself (editable). Re-running skips everything already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.mimsparse-installed
REQS="torch==2.14.1 torchvision==0.29.1 timm>=1.0.20 pyyaml tqdm pillow matplotlib safetensors tensorboard webdataset pytest pytest-xdist scikit-image spconv-cu120 transformers"
# Any change to the requirements or to pyproject.toml re-runs pip; otherwise nothing happens.
KEY=$( (echo "$REQS"; cat pyproject.toml scripts/build_minkowski.sh scripts/minkowski-0.5.4.patch scripts/install_fashion_mnist.sh) | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  $PY -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$KEY" ]; then
  echo "[setup] installing python packages"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $REQS
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  # foolbox only for the labelled ImageNet/CIFAR/MNIST samples its wheel ships (no deps needed)
  "$VENV/bin/python" -m pip install -q --no-deps foolbox==3.3.4
  bash scripts/install_fashion_mnist.sh || echo "[setup] Fashion-MNIST not installed (optional: only the fashion-mnist dataset needs it)"
  bash scripts/build_minkowski.sh "$VENV/bin/python"
  echo "$KEY" > "$STAMP"
else
  echo "[setup] $VENV is up to date"
fi
