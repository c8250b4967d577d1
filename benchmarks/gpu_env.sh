# Source from the repository root on the GPU machine (vsopt is not installed there):
#     source benchmarks/gpu_env.sh
# Links the kernels/, passes/ and plugins/ folders into the package (setup.py maps them there),
# installs the wheels carried under .whl/ into /tmp/site (diffusers and its hub client for the
# model benchmarks; sageattention and fa3-fwd for the peers), registers vsopt's torch.compile
# backend entry point, and puts both on PYTHONPATH.
for d in kernels passes plugins; do ln -sfn ../$d vsopt/$d; done
mkdir -p /tmp/site
# The hub client only where the image has none (its transformers pins its own version).
hub=.whl/model/hub/*.whl
python3 -c "import huggingface_hub" 2>/dev/null && hub=
for w in .whl/model/*.whl $hub .whl/kernels/*.whl; do
    [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$w" 2>&1 | grep -v WARNING
done
mkdir -p /tmp/site/vsopt_gpu-0.dist-info
printf 'Metadata-Version: 2.1\nName: vsopt-gpu\nVersion: 0\n' > /tmp/site/vsopt_gpu-0.dist-info/METADATA
printf '[torch_dynamo_backends]\nvsopt = vsopt.backend:vsopt_backend\n' > /tmp/site/vsopt_gpu-0.dist-info/entry_points.txt
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
