#!/usr/bin/env bash
# The GPU check for a machine without internet: prepare the environment offline, then run
# tools/gpu_check.py (pytest -m cuda, then the GPU benchmark). Results: OUT_DIR/gpu_check.{json,md},
# cuda_tests.{log,xml}, conv_ab.txt, summary.txt; the last line printed is the one-line summary.
#
#   scripts/gpu_check.sh OUT_DIR                  # on the GPU machine (--budget-s 450 by default: ~8 min)
#   scripts/gpu_check.sh OUT_DIR --cpu-smoke      # the same steps on CPU at toy size (what the tests run)
#   scripts/gpu_check.sh OUT_DIR --prepare-only   # steps 1-4 alone: the environment, then stop
#
# Environment:
#   MIMSPARSE_WHEELS=DIR[:DIR...] local wheel folders (scripts/gpu_wheels.sh fills them): every wheel there
#                               whose distribution is not installed yet is installed (--no-index --no-deps);
#                               a wheel split into NAME.whl.part-00, -01, ... (across the folders) is joined
#   MIMSPARSE_BUILD_MINKOWSKI=1 build MinkowskiEngine (scripts/build_minkowski.sh); never done otherwise
#   PYTHON=python3              interpreter whose torch to use when the project's .venv has none
#   MIMSPARSE_GPU_SITE=DIR      where that interpreter's missing packages go (default ROOT/.gpu-site)
set -euo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke] [--prepare-only] [tools/gpu_check.py options]}
shift
PREPARE_ONLY=0
args=()
for a in "$@"; do
    if [ "$a" = "--prepare-only" ]; then PREPARE_ONLY=1; else args+=("$a"); fi
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
say() { echo "gpu_check.sh: $*"; }

# 1. Python: the project's venv when its (pinned) torch imports; else the machine's own interpreter, used
#    as it is. Not a venv over it: on a GPU image that interpreter is often a venv itself, and a venv made
#    from a venv does not see the first one's packages (its torch). What it lacks goes into
#    $SITE (pip --target), put first on PYTHONPATH, so nothing of the machine's is changed.
SITE=${MIMSPARSE_GPU_SITE:-$ROOT/.gpu-site}
if [ "${MIMSPARSE_NO_VENV:-0}" != "1" ] && [ -x "$ROOT/.venv/bin/python" ] \
        && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"; TARGET=()
else
    PY=${PYTHON:-python3}
    if ! "$PY" -c "import torch" 2>/dev/null; then
        say "no torch in $ROOT/.venv nor in $PY; install torch (or set PYTHON=...) and rerun"; exit 2
    fi
    mkdir -p "$SITE/deps" "$SITE/mimsparse"
    export PYTHONPATH="$SITE/mimsparse:$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
    TARGET=(--target "$SITE/deps" --upgrade)
fi
say "python $PY, torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"

# 2. Wheels from the local folders only, each one whose distribution is missing, without resolving
#    dependencies (nothing can be downloaded: the folder holds what is needed, see scripts/gpu_wheels.sh).
if [ -n "${MIMSPARSE_WHEELS:-}" ]; then
    joined="$SITE/joined-wheels"
    wheels=$("$PY" - "$MIMSPARSE_WHEELS" "$joined" <<'PY'
import importlib.metadata as md, os, re, sys, zipfile
from pathlib import Path
folders = [Path(f) for f in sys.argv[1].split(":") if f]
joined = Path(sys.argv[2])
found, parts = {}, {}
for folder in folders:
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        m = re.fullmatch(r"(.+\.whl)\.part-(\d+)", p.name)
        if m:
            parts.setdefault(m.group(1), []).append((int(m.group(2)), p))
        elif p.name.endswith(".whl"):
            found[p.name] = p
for name, pieces in parts.items():  # carried in pieces (a transfer limit): join, then check the zip
    joined.mkdir(parents=True, exist_ok=True)
    pieces.sort()
    if [i for i, _ in pieces] != list(range(len(pieces))):
        print(f"gpu_check.sh: {name}: parts {[i for i, _ in pieces]} found, not 0..n-1: skipped", file=sys.stderr)
        continue
    out = joined / name
    with open(out, "wb") as f:
        for _, p in pieces:
            f.write(p.read_bytes())
    try:
        bad = zipfile.ZipFile(out).testzip()
    except zipfile.BadZipFile as e:
        bad = str(e)
    if bad:
        print(f"gpu_check.sh: {name}: joined parts are not a whole wheel ({bad}): skipped", file=sys.stderr)
        continue
    found[name] = out
try:  # wheels built for another Python or platform would stop pip: leave them out, say which
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
    supported = set(sys_tags())
    fits = lambda name: bool(parse_wheel_filename(name)[3] & supported)  # noqa: E731
except ImportError:
    fits = lambda name: True  # noqa: E731
for name, path in sorted(found.items()):
    dist = name.split("-")[0]
    try:
        md.version(dist)
        continue
    except md.PackageNotFoundError:
        pass
    if fits(name):
        print(path)
    else:
        print(f"gpu_check.sh: {name} is not for this Python/platform: skipped", file=sys.stderr)
PY
)
    if [ -n "$wheels" ]; then
        say "installing from $MIMSPARSE_WHEELS: $(echo $wheels | xargs -n1 basename | tr '\n' ' ')"
        # shellcheck disable=SC2086
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir ${TARGET[@]+"${TARGET[@]}"} $wheels; then
            say "pip could not install those wheels (see above): going on without them"
        fi
    fi
fi
# one interpreter start for all the checks (each import of torch costs seconds)
"$PY" - <<'PY'
import importlib
import warnings
warnings.simplefilter("ignore")  # libraries' deprecation chatter is not what this step reports
missing = []
for module, package in (("timm", "timm"), ("yaml", "pyyaml"), ("tqdm", "tqdm"), ("PIL", "pillow"),
                        ("matplotlib", "matplotlib"), ("pytest", "pytest")):
    try:
        importlib.import_module(module)
    except ImportError:
        missing.append(package)
if missing:
    print(f"gpu_check.sh: still missing: {' '.join(missing)} (put their wheels in MIMSPARSE_WHEELS): the check may fail")
try:
    importlib.import_module("spconv.pytorch")
except Exception as e:  # ImportError, or a CUDA library the wheel wants
    print(f"gpu_check.sh: spconv does not import ({type(e).__name__}: {e}): its tests and rows are skipped "
          "(wheels: scripts/gpu_wheels.sh)")
PY

# 3. mimsparse itself from this checkout (no dependencies resolved, nothing downloaded): editable into the
#    project's venv; into $SITE as a fresh copy each run otherwise, so that the check runs this checkout.
if [ ${#TARGET[@]} -gt 0 ]; then
    say "installing mimsparse from $ROOT into $SITE/mimsparse"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
        --target "$SITE/mimsparse" "$ROOT" >/dev/null
else
    where=$(cd /tmp && "$PY" -c "import mimsparse.backends, os; print(os.path.dirname(os.path.dirname(mimsparse.backends.__file__)))" 2>/dev/null || true)
    if [ "$where" != "$ROOT" ]; then
        say "installing mimsparse from $ROOT (editable, --no-deps --no-index)"
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" >/dev/null
    fi
fi
say "mimsparse from $(cd /tmp && "$PY" -c 'import mimsparse.backends as b; print(b.__file__)')"

# 4. MinkowskiEngine only when asked (a CUDA build takes long).
if [ "${MIMSPARSE_BUILD_MINKOWSKI:-0}" = "1" ]; then
    # idempotent; with torch seeing the GPU it wants the CUDA flavour (a CPU-only ME is replaced), and a
    # wheel already in its cache (e.g. built elsewhere by `make minkowski-cuda`) installs offline
    bash "$ROOT/scripts/build_minkowski.sh" "$PY"
fi
if [ "$PREPARE_ONLY" = "1" ]; then
    say "prepared (--prepare-only): $PY"; exit 0
fi

# 5. The check; its last line is the summary.
cd "$ROOT"
"$PY" tools/gpu_check.py "$OUT" ${args[@]+"${args[@]}"} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
