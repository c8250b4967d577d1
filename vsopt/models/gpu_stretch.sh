#!/bin/bash
# One GPU call for the reference model (docs/MODEL.md): a training stretch resumed from a checkpoint,
# then samples and the attention structure at both clip sizes (python -m vsopt.models.stretch), and
# with CALIBRATE=1 the shipped plans recalibrated with the new weights at 4096 and 16384 tokens.
# Run from the repository root on the GPU machine:
#     MINUTES=7 RESUME=vsopt/models/assets/reference.safetensors bash vsopt/models/gpu_stretch.sh
# Resume the next stretch from the returned $OUT/reference.safetensors (copied into the worktree).
# Writes to $OUT (at most 8 files): reference.safetensors, samples.png, stretch.json, stretch.log and,
# with CALIBRATE=1, reference.plan.json/.safetensors (16x32x32) and reference_16x64x64.plan.json/.safetensors;
# the calibration reports are merged into stretch.json. CALIB_ARGS adds calibrate flags (e.g. --cuda-graphs;
# CALIB_ARGS="--steps 20 --guidance 3" calibrates and checks on the trajectories `vsopt demo` samples on a GPU).
# MINUTES=0 skips training (calibrate a checkpoint).
set -o pipefail
OUT=${OUT:-/tmp/vsopt-stretch-out}; mkdir -p "$OUT"
MINUTES=${MINUTES:-7}
RESUME=${RESUME:-vsopt/models/assets/reference.safetensors}
SIZES=${SIZES:-16x32x32,16x64x64}
LOG="$OUT/stretch.log"
source benchmarks/gpu_env.sh   # the package links, diffusers from .whl/model, PYTHONPATH
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$LOG"
[ -f "$RESUME" ] || { echo "no checkpoint at RESUME=$RESUME" | tee -a "$LOG"; exit 1; }
if [ "$MINUTES" != 0 ]; then
  python3 -m vsopt.models.stretch --out "$OUT" --minutes "$MINUTES" --compile --sizes "$SIZES" --resume "$RESUME" \
    --warmup 50 --shift "${SHIFT:-3}" --lr "${LR:-6e-4}" $TRAIN_ARGS 2>&1 | tee -a "$LOG" || exit 1
else
  cp "$RESUME" "$OUT/reference.safetensors"
fi
if [ "${CALIBRATE:-0}" = 1 ]; then
  cp "$OUT/reference.safetensors" vsopt/models/assets/reference.safetensors   # calibrate --reference loads the shipped one
  mkdir -p /tmp/calib
  for size in ${SIZES//,/ }; do
    name=reference_$size; [ "$size" = 16x32x32 ] && name=reference
    python3 -m vsopt.cli calibrate --reference --size "$size" --steps 8 --clips 2 --max-error 0.05 \
      --step-ranges 0:4,4: --out "/tmp/calib/$name.plan.json" --report "/tmp/calib/$name.report.json" \
      --check --quiet $CALIB_ARGS 2>&1 | tee -a "$LOG" && cp /tmp/calib/$name.plan.json /tmp/calib/$name.plan.safetensors "$OUT"/
  done
  python3 - "$OUT/stretch.json" /tmp/calib/*.report.json <<'PY' 2>&1 | tee -a "$LOG"
import json, sys, os
path = sys.argv[1]
doc = json.load(open(path)) if os.path.exists(path) else {}
doc["calibration"] = {os.path.basename(p).replace(".report.json", ""): json.load(open(p)) for p in sys.argv[2:]}
json.dump(doc, open(path, "w"), indent=1)
print("calibration reports merged into", path, list(doc["calibration"]))
PY
fi
ls -la "$OUT" | tee -a "$LOG"
