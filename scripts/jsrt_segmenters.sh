#!/usr/bin/env bash
# The JSRT segmenter runs behind results/jsrt_segmenters.json (CPU, 2 cores; see book/reference.md, "Measured results").
# Usage: scripts/jsrt_segmenters.sh DATA_ROOT   (checkpoints go to runs/, resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-../shared/data/jsrt}
PY=${PYTHON:-.venv/bin/python}
run() {  # arch size epochs
  local ckpt="runs/jsrt_$1_$2.pt"
  "$PY" -m medcert_core train --dataset jsrt --data-root "$ROOT" --image-size "$2" --arch "$1" --preset tiny --epochs "$3" --checkpoint "$ckpt"
  "$PY" -m medcert_core evaluate --dataset jsrt --data-root "$ROOT" --image-size "$2" --checkpoint "$ckpt" --results results/jsrt_segmenters.json
}
run unet 256 40
run deeplabv2 128 30
run resunetpp 128 30
