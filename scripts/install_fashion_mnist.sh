#!/usr/bin/env bash
# Fashion-MNIST (60k/10k, IDX files) from Debian's dataset-fashion-mnist package: offline real
# labelled data for `--data fashion-mnist`. Needs apt and root (or sudo); skipped when present.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  echo "[fashion-mnist] already in $DIR"
  exit 0
fi
if ! command -v apt-get > /dev/null; then
  echo "[fashion-mnist] apt-get not found: put the four IDX .gz files in $DIR by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo > /dev/null; then SUDO="sudo -n"; else
    echo "[fashion-mnist] needs root: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi
fi
echo "[fashion-mnist] installing dataset-fashion-mnist with apt-get (30 MB)"
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"
# try without a (slow) index update first
$APT install -y -q dataset-fashion-mnist > /dev/null 2>&1 \
  || { $APT update -q > /dev/null 2>&1 && $APT install -y -q dataset-fashion-mnist > /dev/null; }
ls "$DIR"
