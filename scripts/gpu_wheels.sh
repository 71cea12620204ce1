#!/usr/bin/env bash
# Wheels that the GPU check needs on a machine without internet, fetched here (where pip reaches a
# registry) for that machine's Python, and laid out in carry folders of at most MAX_MB each.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION] [CUDA_TAG]      # default: 3.12 cu126
#
# The GPU images this project meets hold torch, timm, pytest, numpy, pybind11, ninja, sympy and
# portalocker; what they lack is spconv and its own dependencies. spconv's wheel (~70 MB) is larger than
# one transfer may be, so each file over MAX_MB is split into NAME.whl.part-00, -01, ... and the pieces
# are spread over the folders .whl-a, .whl-b, ... (git-ignored, at the project root).
# scripts/gpu_check.sh joins them again: MIMSPARSE_WHEELS=.whl-a:.whl-b scripts/gpu_check.sh OUT_DIR
set -euo pipefail
PYVER=${1:-3.12}
CUDA_TAG=${2:-cu126}
MAX_MB=${MAX_MB:-56}  # a transfer holds 64 MiB with the checkout (~3 MB)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MIMSPARSE_GPU_WHEEL_CACHE:-$HOME/.cache/mimsparse/gpu-wheels/py$PYVER-$CUDA_TAG}
PY=${PY:-python3}
mkdir -p "$CACHE"
# spconv 2.3.8 is the release with CPython 3.12 wheels; cumm within spconv's range; their pure-Python needs
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CACHE" \
    "spconv-$CUDA_TAG==2.3.8" "cumm-$CUDA_TAG>=0.7.11,<0.8" "pccm>=0.4.16" "ccimport>=0.4.4" fire lark termcolor
rm -rf "$ROOT"/.whl-?
"$PY" - "$CACHE" "$ROOT" "$MAX_MB" <<'PY'
import sys
from pathlib import Path
cache, root, max_mb = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
limit = max_mb * 2**20
pieces = []  # (name, bytes) in file order, each at most `limit`
for whl in sorted(cache.glob("*.whl"), key=lambda p: -p.stat().st_size):
    data = whl.read_bytes()
    if len(data) <= limit:
        pieces.append((whl.name, data))
    else:
        for i in range(0, len(data), limit):
            pieces.append((f"{whl.name}.part-{i // limit:02d}", data[i:i + limit]))
folders = []  # first fit: fill a folder up to the limit, then start the next
for name, data in pieces:
    for f in folders:
        if f["size"] + len(data) <= limit:
            break
    else:
        f = {"path": root / f".whl-{chr(ord('a') + len(folders))}", "size": 0}
        folders.append(f)
        f["path"].mkdir()
    (f["path"] / name).write_bytes(data)
    f["size"] += len(data)
for f in folders:
    names = sorted(p.name for p in f["path"].iterdir())
    print(f"{f['path'].name}: {f['size'] / 2**20:.1f} MiB: {', '.join(names)}")
print("MIMSPARSE_WHEELS=" + ":".join(f["path"].name for f in folders))
PY
