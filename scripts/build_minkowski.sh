#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 once per (ME, torch, python, cpu/cuda) and install it into a venv.
#
#   bash scripts/build_minkowski.sh [PYTHON]        # PYTHON defaults to .venv/bin/python
#
# ME has no wheel for modern torch, and its 2021 sdist needs patches (scripts/minkowski-0.5.4.patch)
# and ~4 min of compiling on 2 cores. The wheel is tied to the exact torch build, so it is cached
# outside the clone, in ${MIMSPARSE_CACHE:-~/.cache/mimsparse}/wheels/<key>/, and reinstalled
# from there in seconds. Background: shared/notes/minkowski.md.
#
# Environment:
#   MIMSPARSE_CACHE     cache root (default ~/.cache/mimsparse)
#   MINKOWSKI_FLAVOR    auto (default) | cpu | cuda. auto = cuda when torch sees a GPU and nvcc exists.
#                       The CUDA build of stock 0.5.4 is known not to compile against CUDA 13;
#                       set MINKOWSKI_FLAVOR=cpu on such GPU machines.
#   ME_BLAS             BLAS library for the patched setup.py (default openblas)
#   MAX_JOBS            parallel compile jobs (default 2, the core count of our CI machines)
set -euo pipefail

ME_VERSION=0.5.4
SDIST_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH_FILE=$SCRIPTS/minkowski-$ME_VERSION.patch

say() { echo "[minkowski] $*"; }

STEP="start"
LOG="(no log yet)"
WORK=""
TICKER=""
# One EXIT trap reports any failure (set -e exits from functions and subshells too).
finish() {
  local rc=$?
  if [ -n "$TICKER" ]; then kill "$TICKER" 2>/dev/null || true; fi
  if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
  if [ "$rc" -ne 0 ]; then
    if [ -f "$LOG" ]; then echo "----- last lines of $LOG -----" >&2; tail -n 25 "$LOG" >&2; fi
    say "build FAILED at step '$STEP'; full log: $LOG" >&2
  fi
  exit "$rc"
}
trap finish EXIT

# --- which python ------------------------------------------------------------------------------
STEP="check python"
PY=${1:-.venv/bin/python}
[ -x "$PY" ] || { say "no python at '$PY'" >&2; exit 1; }
# Absolute, but without resolving the venv's symlink (that would leave the venv).
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
VENV_BIN=$(dirname "$PY")

installed_ok() {
  OMP_NUM_THREADS=1 "$PY" -c "import MinkowskiEngine as ME, sys; sys.exit(ME.__version__ != '$ME_VERSION')" \
    >/dev/null 2>&1
}

smoke_check() {
  STEP="smoke check"
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$PY" - <<'EOF'
import warnings
warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY")
import torch
import MinkowskiEngine as ME
coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 2, 2]], dtype=torch.int32)  # [b, y, x]
x = ME.SparseTensor(torch.randn(4, 3), coordinates=coords)
y = ME.MinkowskiConvolution(3, 5, kernel_size=3, dimension=2)(x)
assert tuple(y.F.shape) == (4, 5), y.F.shape
print(f"[minkowski] smoke check ok: MinkowskiEngine {ME.__version__}, conv on CPU -> {tuple(y.F.shape)}")
EOF
}

if installed_ok; then
  say "MinkowskiEngine $ME_VERSION already importable from $PY; nothing to do"
  exit 0
fi

# --- cache key: the wheel only works with the exact torch it was compiled against -----------
STEP="compute cache key"
read -r TORCH_VERSION PY_TAG TORCH_CUDA < <("$PY" -c '
import sys, torch
print(torch.__version__, f"cp{sys.version_info[0]}{sys.version_info[1]}", int(torch.cuda.is_available()))' 2>/dev/null | tail -n 1)
[ -n "${PY_TAG:-}" ] || { say "cannot import torch with $PY" >&2; exit 1; }
FLAVOR=${MINKOWSKI_FLAVOR:-auto}
if [ "$FLAVOR" = auto ]; then
  if [ "$TORCH_CUDA" = 1 ] && command -v nvcc >/dev/null; then FLAVOR=cuda; else FLAVOR=cpu; fi
fi
case "$FLAVOR" in cpu|cuda) ;; *) say "MINKOWSKI_FLAVOR must be auto, cpu or cuda" >&2; exit 1;; esac
KEY="me$ME_VERSION-torch$TORCH_VERSION-$PY_TAG-$FLAVOR"
CACHE_ROOT=${MIMSPARSE_CACHE:-$HOME/.cache/mimsparse}
KEY_DIR=$CACHE_ROOT/wheels/$KEY
LOG=$CACHE_ROOT/build-$KEY.log
mkdir -p "$KEY_DIR"
say "cache key $KEY"

cached_wheel() { find "$KEY_DIR" -maxdepth 1 -name '*.whl' | sort | tail -n 1; }

install_wheel() {
  STEP="pip install wheel"
  say "installing $1"
  # --force-reinstall: a stale/broken install of the same version must be replaced.
  "$PY" -m pip install -q --no-deps --force-reinstall "$1" >>"$LOG" 2>&1
}

# Serialise concurrent runs on the same key (e.g. two set-ups sharing one cache).
exec 9>"$KEY_DIR/.lock"
flock 9

WHEEL=$(cached_wheel)
if [ -n "$WHEEL" ]; then
  : >"$LOG.install"; LOG="$LOG.install"   # keep the build log intact
  install_wheel "$WHEEL"
  smoke_check
  exit 0
fi

# --- build from source -------------------------------------------------------------------------
say "no cached wheel; building from source (about 4 min on 2 cores). Log: $LOG"
T0=$SECONDS
: >"$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/minkowski-build.XXXXXX")
[ "$FLAVOR" = cpu ] && export CUDA_VISIBLE_DEVICES=""  # setup.py picks CPU_ONLY iff torch sees no GPU
export PATH="$VENV_BIN:$PATH"  # torch looks for `ninja` on PATH; without it the build is serial

STEP="install BLAS headers"
# Needed at compile time (cblas.h, libopenblas.so) and already by `pip download` below, where
# the unpatched setup.py searches for BLAS with numpy.distutils.
if command -v dpkg >/dev/null && ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  say "installing libopenblas-dev with apt-get"
  { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y libopenblas-dev; } \
    >>"$LOG" 2>&1
fi

STEP="build tools in venv"
# numpy: ME imports it at runtime and the unpatched setup.py at download time;
# ninja: parallel compile honouring MAX_JOBS.
MISSING=""
"$PY" -c "import numpy" 2>/dev/null || MISSING="$MISSING numpy"
[ -x "$VENV_BIN/ninja" ] || command -v ninja >/dev/null || MISSING="$MISSING ninja"
if [ -n "$MISSING" ]; then
  say "installing build requirements into the venv:$MISSING"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $MISSING >>"$LOG" 2>&1
fi

STEP="download sdist"
# pip still runs the sdist's setup.py to read its metadata, and the unpatched setup.py runs
# `pip uninstall MinkowskiEngine` with whatever pip is on PATH: shadow it with a no-op.
mkdir -p "$WORK/nopip" "$WORK/dl"
printf '#!/bin/sh\nexit 0\n' >"$WORK/nopip/pip"
chmod +x "$WORK/nopip/pip"
PATH="$WORK/nopip:$PATH" SETUPTOOLS_USE_DISTUTILS=stdlib \
  "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$WORK/dl" \
  "minkowskiengine==$ME_VERSION" >>"$LOG" 2>&1
SDIST=$(find "$WORK/dl" -maxdepth 1 -iname "minkowskiengine-$ME_VERSION.tar.gz" | head -n 1)
[ -n "$SDIST" ] || { echo "sdist not found after pip download" >>"$LOG"; false; }

STEP="verify sha256"
GOT=$(sha256sum "$SDIST" | cut -d' ' -f1)
if [ "$GOT" != "$SDIST_SHA256" ]; then
  say "sha256 mismatch for $(basename "$SDIST"): expected $SDIST_SHA256, got $GOT" | tee -a "$LOG" >&2
  false
fi

STEP="unpack and patch"
tar xzf "$SDIST" -C "$WORK"
SRC="$WORK/MinkowskiEngine-$ME_VERSION"
patch -d "$SRC" -p1 --forward --batch <"$PATCH_FILE" >>"$LOG" 2>&1

STEP="compile"
# Report progress every 30 s from the last ninja line in the log ("  [k/N] c++ ... -c .../x.cpp -o ...").
(
  while sleep 30; do
    LINE=$(grep -E '^ *\[[0-9]+/[0-9]+\] ' "$LOG" | tail -n 1 || true)
    STATUS=$(sed -E 's/^ *(\[[0-9]+\/[0-9]+\]).*/\1/' <<<"$LINE")
    FILE=$(sed -nE 's/.* -c ([^ ]+).*/\1/p' <<<"$LINE")
    echo "[minkowski]   compiling... $((SECONDS - T0)) s  ${STATUS:-(configuring)} ${FILE##*/}"
  done
) &
TICKER=$!
mkdir -p "$WORK/out"
# -g0: no debug info, so a small (~0.6 MB) wheel and a faster link.
CFLAGS="${CFLAGS:-} -g0" MAX_JOBS=${MAX_JOBS:-2} ME_BLAS=${ME_BLAS:-openblas} \
  "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/out" "$SRC" >>"$LOG" 2>&1
kill "$TICKER" 2>/dev/null || true
wait "$TICKER" 2>/dev/null || true
TICKER=""

STEP="store wheel in cache"
BUILT=$(find "$WORK/out" -maxdepth 1 -name '*.whl' | head -n 1)
[ -n "$BUILT" ] || { echo "pip wheel produced no wheel" >>"$LOG"; false; }
# Copy next to its final place, then rename: a cache never holds a partial wheel.
cp "$BUILT" "$KEY_DIR/$(basename "$BUILT").partial"
mv "$KEY_DIR/$(basename "$BUILT").partial" "$KEY_DIR/$(basename "$BUILT")"
WHEEL="$KEY_DIR/$(basename "$BUILT")"
say "built $(basename "$WHEEL") in $((SECONDS - T0)) s; cached in $KEY_DIR"

install_wheel "$WHEEL"
smoke_check
