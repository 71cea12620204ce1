#!/usr/bin/env bash
# The GPU check for a machine without internet: prepare the environment offline, then run
# tools/gpu_check.py (pytest -m cuda, then the GPU benchmark). Results: OUT_DIR/gpu_check.{json,md},
# cuda_tests.{log,xml}, summary.txt; the last line printed is the one-line summary.
#
#   scripts/gpu_check.sh OUT_DIR               # on the GPU machine (about 8-15 minutes on an H100)
#   scripts/gpu_check.sh OUT_DIR --cpu-smoke   # the same steps on CPU at toy size (what the tests run)
#
# Environment:
#   MIMSPARSE_WHEELS=DIR        local wheel folder; missing packages (timm, spconv-cu1xx + cumm, pyyaml,
#                               tqdm, pillow, matplotlib, pytest) are installed from it only (--no-index)
#   MIMSPARSE_BUILD_MINKOWSKI=1 build MinkowskiEngine (scripts/build_minkowski.sh); never done otherwise
#   PYTHON=python3              interpreter whose torch to use when the project's .venv has none
set -euo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke] [tools/gpu_check.py options]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
say() { echo "gpu_check.sh: $*"; }

# 1. Python: the project's venv when its (pinned) torch imports; else a venv over the machine's own
#    Python, with --system-site-packages so that the torch already installed there is the one used.
if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"
else
    BASE=${PYTHON:-python3}
    if ! "$BASE" -c "import torch" 2>/dev/null; then
        say "no torch in $ROOT/.venv nor in $BASE; install torch (or set PYTHON=...) and rerun"; exit 2
    fi
    if [ ! -x "$ROOT/.venv-gpu/bin/python" ]; then
        "$BASE" -m venv --system-site-packages "$ROOT/.venv-gpu"
    fi
    PY="$ROOT/.venv-gpu/bin/python"
fi
say "python $PY, torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"

# 2. Missing packages, from the local wheel folder only.
missing=()
for mod_pkg in timm:timm yaml:pyyaml tqdm:tqdm PIL:pillow matplotlib:matplotlib pytest:pytest; do
    "$PY" -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg##*:}")
done
if ! "$PY" -c "import spconv" 2>/dev/null; then
    spconv_wheel=$(ls "${MIMSPARSE_WHEELS:-/nonexistent}"/spconv_cu*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$spconv_wheel" ]; then missing+=("$spconv_wheel"); else say "spconv not installed and no spconv wheel in MIMSPARSE_WHEELS: its tests and rows are skipped"; fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ -n "${MIMSPARSE_WHEELS:-}" ]; then
        say "installing from $MIMSPARSE_WHEELS: ${missing[*]}"
        "$PY" -m pip install --no-index --find-links "$MIMSPARSE_WHEELS" "${missing[@]}"
    else
        say "missing ${missing[*]} and MIMSPARSE_WHEELS is not set (no internet: give a wheel folder)"
    fi
fi

# 3. mimsparse itself from this checkout (no dependencies resolved, nothing downloaded).
where=$(cd /tmp && "$PY" -c "import mimsparse.backends, os; print(os.path.dirname(os.path.dirname(mimsparse.backends.__file__)))" 2>/dev/null || true)
if [ "$where" != "$ROOT" ]; then
    say "installing mimsparse from $ROOT (editable, --no-deps --no-index)"
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" >/dev/null
fi

# 4. MinkowskiEngine only when asked (a CUDA build takes long).
if [ "${MIMSPARSE_BUILD_MINKOWSKI:-0}" = "1" ]; then
    # idempotent; with torch seeing the GPU it wants the CUDA flavour (a CPU-only ME is replaced), and a
    # wheel already in its cache (e.g. built elsewhere by `make minkowski-cuda`) installs offline
    bash "$ROOT/scripts/build_minkowski.sh" "$PY"
fi

# 5. The check; its last line is the summary.
cd "$ROOT"
"$PY" tools/gpu_check.py "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
