#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 once per (ME, torch, python, cpu/cuda) and install it into a venv.
#
#   bash scripts/build_minkowski.sh [PYTHON]        # PYTHON defaults to .venv/bin/python
#   MINKOWSKI_FLAVOR=cuda bash scripts/build_minkowski.sh   # the CUDA build (`make minkowski-cuda`)
#
# ME has no wheel for modern torch, and its 2021 sdist needs patches (scripts/minkowski-0.5.4.patch)
# and compiling: ~4 min on 2 cores for CPU, ~35 min per GPU architecture for CUDA. The wheel is tied to the exact torch
# build, so it is cached outside the clone, in ${MIMSPARSE_CACHE:-~/.cache/mimsparse}/wheels/<key>/,
# and reinstalled from there in seconds. Background: shared/notes/minkowski.md.
#
# The CUDA build needs no GPU (only to run it). It uses the CUDA toolkit found via $CUDA_HOME or the
# `nvcc` on PATH; without one it installs nvcc/CCCL/runtime headers of torch's CUDA version from PyPI
# into ${MIMSPARSE_CACHE}/cuda-toolchain/ (a build-only location, not the venv). cuBLAS/cuSPARSE/cuRAND
# headers and libraries missing from the toolkit are taken from the nvidia-* packages torch installed.
#
# Environment:
#   MIMSPARSE_CACHE       cache root (default ~/.cache/mimsparse)
#   MINKOWSKI_FLAVOR      auto (default) | cpu | cuda. auto = cuda when torch sees a GPU.
#   TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA build (default "8.0;9.0" plus any visible GPU's)
#   CUDA_HOME             CUDA toolkit to compile with (default: the one of `nvcc` on PATH, else PyPI)
#   ME_BLAS               BLAS library for the patched setup.py (default openblas)
#   MAX_JOBS              parallel compile jobs (default 2, the core count of our CI machines)
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
    if [ -f "$LOG" ]; then
      # a compile failure's cause is far above the traceback that ends the log
      if [ "$STEP" = compile ] && grep -qE '(error|Error)[: ]' "$LOG"; then
        echo "----- first errors in $LOG -----" >&2; grep -m 12 -E '(error|Error)[: ]' "$LOG" >&2
      fi
      echo "----- last lines of $LOG -----" >&2; tail -n 25 "$LOG" >&2
    fi
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

# An installed 0.5.4 will do, unless a CUDA build is wanted and the installed one is CPU-only
# (a CUDA build also runs CPU tensors, so it is kept for the cpu flavour).
installed_ok() {
  OMP_NUM_THREADS=1 "$PY" -c "
import sys, MinkowskiEngine as ME
sys.exit(ME.__version__ != '$ME_VERSION' or ('$FLAVOR' == 'cuda' and not ME.is_cuda_available()))" \
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
built = "CUDA" if ME.is_cuda_available() else "CPU-only"
where = "CPU"
if ME.is_cuda_available() and torch.cuda.is_available():  # the same conv on the GPU, same answer
    conv = ME.MinkowskiConvolution(3, 5, kernel_size=3, dimension=2)
    ref = conv(x).F
    x_gpu = ME.SparseTensor(x.F.cuda(), coordinates=coords.cuda())
    out = conv.cuda()(x_gpu)
    order = [x_gpu.C.cpu().tolist().index(c) for c in x.C.tolist()]  # rows may come back permuted
    assert torch.allclose(out.F.cpu()[order], ref, atol=1e-4), (out.F, ref)
    where = "CPU and GPU"
print(f"[minkowski] smoke check ok: MinkowskiEngine {ME.__version__} ({built} build), conv on {where} "
      f"-> {tuple(y.F.shape)}")
EOF
}

# --- flavour and cache key: the wheel only works with the exact torch (and CUDA) it was built for ---
STEP="compute cache key"
read -r TORCH_VERSION PY_TAG TORCH_GPU TORCH_CUDA GPU_ARCHS < <("$PY" -c '
import sys, torch
caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(torch.__version__, f"cp{sys.version_info[0]}{sys.version_info[1]}", int(torch.cuda.is_available()),
      torch.version.cuda or "none", ";".join(caps) or "none")' 2>/dev/null | tail -n 1)
[ -n "${PY_TAG:-}" ] || { say "cannot import torch with $PY" >&2; exit 1; }
FLAVOR=${MINKOWSKI_FLAVOR:-auto}
if [ "$FLAVOR" = auto ]; then
  if [ "$TORCH_GPU" = 1 ]; then FLAVOR=cuda; else FLAVOR=cpu; fi
fi
case "$FLAVOR" in cpu|cuda) ;; *) say "MINKOWSKI_FLAVOR must be auto, cpu or cuda" >&2; exit 1;; esac
KEY="me$ME_VERSION-torch$TORCH_VERSION-$PY_TAG-$FLAVOR"
if [ "$FLAVOR" = cuda ]; then
  if [ "$TORCH_CUDA" = none ]; then
    say "torch $TORCH_VERSION is a CPU-only build; a CUDA MinkowskiEngine needs a CUDA build of torch" \
        "(or set MINKOWSKI_FLAVOR=cpu)" >&2
    exit 1
  fi
  # sm_80 (A100) and sm_90 (H100/H200) by default, plus whatever GPU this machine has
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="8.0;9.0"
    for cap in ${GPU_ARCHS//;/ }; do
      [ "$cap" = none ] && continue
      case ";$TORCH_CUDA_ARCH_LIST;" in *";$cap;"*) ;; *) TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST;$cap";; esac
    done
  fi
  export TORCH_CUDA_ARCH_LIST
  ARCH_TAG=$(tr ' ;,' '\n\n\n' <<<"$TORCH_CUDA_ARCH_LIST" | sed -E '/^$/d; s/\+PTX$/ptx/I; s/\.//; s/^/sm/' \
    | paste -sd- -)  # "8.0;9.0+PTX" -> sm80-sm90ptx
  KEY="$KEY$TORCH_CUDA-$ARCH_TAG"
fi
CACHE_ROOT=${MIMSPARSE_CACHE:-$HOME/.cache/mimsparse}
KEY_DIR=$CACHE_ROOT/wheels/$KEY
LOG=$CACHE_ROOT/build-$KEY.log

if installed_ok; then
  say "MinkowskiEngine $ME_VERSION ($FLAVOR) already importable from $PY; nothing to do"
  exit 0
fi
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
if [ "$FLAVOR" = cuda ]; then ETA="~35 min on 2 cores per GPU architecture"; else ETA="about 4 min on 2 cores"; fi
say "no cached wheel; building the $FLAVOR flavour from source ($ETA). Log: $LOG"
T0=$SECONDS
: >"$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/minkowski-build.XXXXXX")
if [ "$FLAVOR" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""  # setup.py picks CPU_ONLY iff torch sees no GPU
else
  export ME_FORCE_CUDA=1  # (patched setup.py) compile the CUDA kernels even where torch sees no GPU
fi
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

# The CUDA toolkit: $CUDA_HOME, else the one of `nvcc` on PATH, else nvcc/CCCL/runtime of torch's
# CUDA version from PyPI into the cache (a build-only location). Exports CUDA_HOME, PATH, CPATH and
# LIBRARY_PATH for the compile step.
cuda_toolchain() {
  local major=${TORCH_CUDA%%.*} nv_site tc
  if [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] || { say "CUDA_HOME=$CUDA_HOME has no bin/nvcc" | tee -a "$LOG" >&2; return 1; }
  elif command -v nvcc >/dev/null; then
    # the toolkit root as nvcc itself sees it (`nvcc` may be a wrapper script or a symlink)
    : >"$WORK/empty.cu"
    CUDA_HOME=$(nvcc --dryrun -c "$WORK/empty.cu" -o "$WORK/empty.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    CUDA_HOME=$(cd "$CUDA_HOME" && pwd -P)
  else
    if [ "$major" -lt 13 ]; then
      say "no nvcc found: install the CUDA $TORCH_CUDA toolkit or set CUDA_HOME (the PyPI toolchain" \
          "is set up for CUDA >= 13 only)" | tee -a "$LOG" >&2
      return 1
    fi
    tc=$CACHE_ROOT/cuda-toolchain/cuda$TORCH_CUDA
    if [ ! -x "$tc/nvidia/cu$major/bin/nvcc" ]; then
      say "no nvcc on this machine: installing CUDA $TORCH_CUDA's compiler from PyPI into $tc"
      rm -rf "$tc.partial"
      "$PY" -m pip install -q --no-deps --target "$tc.partial" "nvidia-cuda-nvcc==$TORCH_CUDA.*" \
        "nvidia-cuda-cccl==$TORCH_CUDA.*" "nvidia-cuda-crt==$TORCH_CUDA.*" "nvidia-nvvm==$TORCH_CUDA.*" \
        "nvidia-cuda-runtime==$TORCH_CUDA.*" >>"$LOG" 2>&1
      rm -rf "$tc" && mv "$tc.partial" "$tc"
    fi
    CUDA_HOME=$tc/nvidia/cu$major
  fi
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  local nvcc_version
  nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  say "CUDA toolkit $CUDA_HOME (nvcc $nvcc_version, torch's CUDA $TORCH_CUDA), architectures $TORCH_CUDA_ARCH_LIST"
  if [ "${nvcc_version%%.*}" != "$major" ]; then
    say "nvcc $nvcc_version does not match torch's CUDA $TORCH_CUDA: set CUDA_HOME to a CUDA $major toolkit" \
      | tee -a "$LOG" >&2
    return 1
  fi

  # cuSPARSE/cuBLAS/cuRAND headers and the link-time names libcudart.so / libcusparse.so: the
  # toolkit's where it has them, else those of the nvidia-* packages torch runs with (PyPI wheels
  # ship only libX.so.N), else the same packages from PyPI into the cache.
  nv_site=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu$major'))")
  local header missing="" inc_dirs="" lib dir lib_dirs="$CUDA_HOME/lib64 $CUDA_HOME/lib $nv_site/lib" found pkgs
  for header in cusparse.h cublas_v2.h curand.h; do
    [ -f "$CUDA_HOME/include/$header" ] && continue
    if [ -f "$nv_site/include/$header" ]; then inc_dirs="$nv_site/include"; else missing="$missing $header"; fi
  done
  if [ -n "$missing" ]; then
    tc=$CACHE_ROOT/cuda-toolchain/cuda$TORCH_CUDA-libs
    if [ ! -d "$tc/nvidia/cu$major/include" ]; then
      # the versions torch was installed with, so headers and runtime libraries agree
      pkgs=$("$PY" -c "
from importlib.metadata import version, PackageNotFoundError
for p in ('nvidia-cublas', 'nvidia-cusparse', 'nvidia-curand'):
    try: print(f'{p}=={version(p)}')
    except PackageNotFoundError: print(p)")
      say "installing$missing from PyPI into $tc"
      rm -rf "$tc.partial"
      # shellcheck disable=SC2086
      "$PY" -m pip install -q --no-deps --target "$tc.partial" $pkgs >>"$LOG" 2>&1
      rm -rf "$tc" && mv "$tc.partial" "$tc"
    fi
    inc_dirs="$inc_dirs $tc/nvidia/cu$major/include"
    lib_dirs="$lib_dirs $tc/nvidia/cu$major/lib"
  fi
  mkdir -p "$WORK/cuda-lib"
  for lib in cudart cusparse; do
    found=""
    for dir in $lib_dirs; do  # in order of preference
      [ -d "$dir" ] && found=$(find "$dir" -maxdepth 1 -name "lib$lib.so*" | sort | head -n 1)
      [ -n "$found" ] && break
    done
    [ -n "$found" ] || { say "lib$lib.so not found in $lib_dirs" | tee -a "$LOG" >&2; return 1; }
    ln -sf "$found" "$WORK/cuda-lib/lib$lib.so"
  done
  CPATH=$(tr ' ' ':' <<<"${inc_dirs# }")${CPATH:+:$CPATH}
  export CPATH="${CPATH#:}" LIBRARY_PATH="$WORK/cuda-lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  echo "CUDA_HOME=$CUDA_HOME CPATH=$CPATH LIBRARY_PATH=$LIBRARY_PATH" >>"$LOG"
}

if [ "$FLAVOR" = cuda ]; then
  STEP="CUDA toolchain"
  cuda_toolchain
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
