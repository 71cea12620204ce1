#!/usr/bin/env bash
# Copy a budget's finished ablation runs into the docs: every <variant>/s<seed>/result.json as
# <variant>-s<seed>.json, its budget.json, and summary.md + collapse.png regenerated from them.
#   scripts/ablation_publish.sh runs/ablation-search/e4 docs/ablations/search-e4
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?the budget folder, e.g. runs/ablation-search/e4}
DEST=${2:?the docs folder, e.g. docs/ablations/search-e4}
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST"
for f in "$SRC"/*/s*/result.json; do
  [ -e "$f" ] || continue
  seed=$(basename "$(dirname "$f")"); variant=$(basename "$(dirname "$(dirname "$f")")")
  cp "$f" "$DEST/$variant-$seed.json"
done
cp "$SRC/budget.json" "$DEST/"
# the tables and the figure from the copies, so the docs folder reproduces itself
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for f in "$DEST"/*-s[0-9]*.json; do
  name=$(basename "$f" .json); variant=${name%-s*}; seed=${name##*-}
  mkdir -p "$tmp/$variant/$seed" && cp "$f" "$tmp/$variant/$seed/result.json"
done
"$PY" tools/ablate.py --summary-only --out "$tmp" > /dev/null
cp "$tmp/summary.md" "$DEST/"
[ -e "$tmp/collapse.png" ] && cp "$tmp/collapse.png" "$DEST/"
echo "published $(ls "$DEST"/*-s[0-9]*.json | wc -l) runs of $SRC in $DEST"
