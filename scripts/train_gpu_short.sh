#!/usr/bin/env bash
# The short GPU training run (needs a CUDA GPU for its figures; runs on a CPU too, slowly):
#   bash scripts/train_gpu_short.sh OUT_DIR [--preset demo-gpu] [--minutes 8] [--bundle work/gpu-bundle]
#                                   [--wheels DIR] [--report-to DIR]
# 1. installs the packages of the bundle's wheels (default BUNDLE/wheels) by name, pip --no-index (nothing
#    is downloaded; what is installed already stays); skipped when the folder holds none or
#    BIOMEDJOURNEY_SKIP_WHEELS=1;
# 2. runs scripts/train_gpu_short.py: benchmark, stages 1 and 2 of the preset sized to the time left,
#    OUT_DIR/model (fp16 pipeline folder), OUT_DIR/figures.json; the whole run, this install included,
#    stops within --minutes. Output goes to OUT_DIR/train.log too. Rerun the same command to resume.
# Build the bundle first, on any machine with the dataset: train/build_gpu_bundle.py (README, "Speed").
set -euo pipefail
T0=$(date +%s.%N)
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
OUT=$1
shift
BUNDLE=work/gpu-bundle
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
WHEELS=${WHEELS:-$BUNDLE/wheels}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/train.log") 2>&1
shopt -s nullglob
WHL=("$WHEELS"/*.whl)
if [ "${BIOMEDJOURNEY_SKIP_WHEELS:-0}" = 1 ] || [ ${#WHL[@]} -eq 0 ]; then
  echo "wheels: none installed (folder '$WHEELS' holds none, or BIOMEDJOURNEY_SKIP_WHEELS=1)"
else
  # by name: a package already installed (in a version that satisfies) is kept, the folder fills the gaps
  NAMES=()
  for w in "${WHL[@]}"; do NAMES+=("$(basename "$w" | cut -d- -f1)"); done
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "${NAMES[@]}"
  echo "wheels: installed ${#WHL[@]} from $WHEELS"
fi
"$PYTHON" scripts/train_gpu_short.py --out "$OUT" --bundle "$BUNDLE" --t0 "$T0" "${ARGS[@]}"
