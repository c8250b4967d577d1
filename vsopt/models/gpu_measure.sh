#!/bin/bash
# GPU job after training: install vsopt as a plain (non-editable) package, then from outside the
# source tree measure the attention structure (docs/MODEL.md) and run `vsopt demo`.
set -o pipefail
OUT=${OUT:-/tmp/vsopt-measure-out}; mkdir -p "$OUT/demo"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/model/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
if ! python3 -c "from diffusers import WanTransformer3DModel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/model/hub/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
CKPT=$(cd /tmp && python3 -c "import vsopt.models.model as m, importlib.resources as r; print(m.shipped_checkpoint())")
echo "checkpoint found by importlib.resources: $CKPT"
cd /tmp || exit 1
python3 -m vsopt.models.structure --checkpoint "$CKPT" --out "$OUT/structure.json" 2>&1 | tee "$OUT/structure.log"
python3 -m vsopt.cli demo --out "$OUT/demo" 2>&1 | tee "$OUT/demo.log"
