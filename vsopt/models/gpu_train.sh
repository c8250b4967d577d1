#!/bin/bash
# The exact GPU job that produced vsopt/models/assets/: diffusers from carried wheels
# (.whl/model, see docs/MODEL.md), a few-second dry run (with torch.compile, dropped if it fails),
# the training run, then the attention-structure measurement at each trained size. Results go to $OUT.
# v1 (4096 tokens): MINUTES=5 bash vsopt/models/gpu_train.sh
# v2 (a stretch on two sizes from the shipped v1 weights, 4096 and 16384 tokens):
#     MINUTES=7 SIZES=16x32x32,16x64x64 RESUME=vsopt/models/assets/reference.safetensors DRY=0 bash vsopt/models/gpu_train.sh
set -o pipefail
OUT=${OUT:-/tmp/vsopt-train-out}; mkdir -p "$OUT"
MINUTES=${MINUTES:-5.5}
EXTRA=()
[ -n "$SIZES" ] && EXTRA+=(--sizes "$SIZES")
[ -n "$RESUME" ] && EXTRA+=(--resume "$RESUME" --warmup 50)
source benchmarks/gpu_env.sh   # the package links, diffusers from .whl/model, PYTHONPATH
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
COMPILE=--compile
if [ "${DRY:-1}" = 1 ] && ! python3 -m vsopt.models.train --out /tmp/dry --minutes 0.3 --max-steps 14 --probe-steps 10 --log-every 7 $COMPILE 2>&1 | tail -20; then
  echo "dry run with torch.compile failed: training eagerly"; COMPILE=
  python3 -m vsopt.models.train --out /tmp/dry --minutes 0.2 --max-steps 12 --probe-steps 8 --log-every 4 || exit 1
fi
python3 -m vsopt.models.train --out "$OUT" --minutes "$MINUTES" $COMPILE "${EXTRA[@]}" 2>&1 | tee "$OUT/train.log" || exit 1
if [ -z "$SIZES" ]; then
  python3 -m vsopt.models.structure --checkpoint "$OUT/reference.safetensors" --out "$OUT/structure.json" 2>&1 | tee "$OUT/structure.log"
else
  for size in ${SIZES//,/ }; do
    python3 -m vsopt.models.structure --checkpoint "$OUT/reference.safetensors" --size "$size" \
      --out "$OUT/structure_$size.json" 2>&1 | tee "$OUT/structure_$size.log"
  done
fi
ls -la "$OUT"
