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
# Opt-in (VSOPT_FA4=1): FlashAttention-4 as a peer of benchmarks/attention.py. Its wheels come in
# several runs (benchmarks/fetch_fa4_wheels.sh lays them out: carry .whl/fa4/run1 in one run, run2 in
# the next, and so on, on a machine still warm); each run adds its part to /tmp/fa4, and once every wheel there
# matches benchmarks/fa4_wheels.sha256 they are installed into /tmp/site (once).
if [ "${VSOPT_FA4:-0}" = 1 ]; then
    mkdir -p /tmp/fa4
    for f in .whl/fa4/run*/*; do [ -f "$f" ] && cp -f "$f" /tmp/fa4/; done
    for first in /tmp/fa4/*.whl.part00; do
        [ -f "$first" ] || continue
        whl=${first%.part00}
        cat "$whl".part?? > "$whl"   # joined again each run: a part may have arrived since
    done
    if (cd /tmp/fa4 && sha256sum --quiet -c "$OLDPWD/benchmarks/fa4_wheels.sha256") >/dev/null 2>&1; then
        if [ ! -f /tmp/fa4/.installed ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site \
                $(grep -o '[^ ]*\.whl$' benchmarks/fa4_wheels.sha256 | sed 's|^|/tmp/fa4/|'); then
            touch /tmp/fa4/.installed
        fi
        [ -f /tmp/fa4/.installed ] && echo "FA4: installed in /tmp/site" || echo "FA4: pip install failed"
    else
        echo "FA4: wheels incomplete in /tmp/fa4 ($(ls /tmp/fa4 | wc -l) files): carry the next part (.whl/fa4/run<i>) in the next run"
    fi
fi
# pip --target does not run .pth files: the CUTLASS DSL's packages go on the path by hand.
dsl=/tmp/site/nvidia_cutlass_dsl/dsl_packages
[ -d $dsl ] || dsl=
export PYTHONPATH=/tmp/site${dsl:+:$dsl}:$PWD${PYTHONPATH:+:$PYTHONPATH}
