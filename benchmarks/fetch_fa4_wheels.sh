#!/usr/bin/env bash
# Download FlashAttention-4 (flash-attn-4, CuTe DSL) and its dependencies as cp312 manylinux x86_64
# wheels (the GPU machine's Python), and lay them out under .whl/fa4/ in parts that each fit one GPU
# run beside the working tree (at most 64 MiB travel with a run, and the tracked tree is ~23 MB): the
# 92 MB CUTLASS DSL library wheel is split into PART-sized pieces (31 MiB: three runs), one per run, the
# last run has the rest.
#     bash benchmarks/fetch_fa4_wheels.sh            (on this machine; writes .whl/fa4/run1 .. runK)
# Then on the GPU machine, K runs in a row on a warm machine (/tmp survives between them):
#     run i < K, carry [".whl/fa4/run<i>"]:  VSOPT_FA4=1 source benchmarks/gpu_env.sh  (keeps its part in /tmp/fa4)
#     run K,     carry [".whl/fa4/run<K>"]:  VSOPT_FA4=1 source benchmarks/gpu_env.sh && python3 benchmarks/attention.py ...
# The set: the CUTLASS DSL as three wheels, -libs-base (MLIR bindings), -libs-core (the cutlass
# Python package: without it `import flash_attn.cute` fails with "No module named 'cutlass.cute'", as
# session 7 saw with 4.8.1's meta wheel) and -libs-cu13 (the runtime for the image's CUDA 13 driver and
# its cuda-bindings; the DSL picks the newest flavour the driver supports). The meta wheel
# nvidia-cutlass-dsl holds only a .pth file, which --target installs do not run, so it is not carried;
# cuda-bindings and protobuf are on the image. With the same set for cp311, `import flash_attn.cute`
# works on the CPU machine (checked 2026-12-02).
# gpu_env.sh joins the parts, checks every wheel against benchmarks/fa4_wheels.sha256 and installs
# them with pip --target /tmp/site. .whl/ is git-ignored: the wheels are never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
dl=$(mktemp -d)
wheels=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1
        nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2
        torch-c-dlpack-ext==0.1.5 einops==0.8.2)
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any -d "$dl" "${wheels[@]}"
(cd "$dl" && sha256sum *.whl) > benchmarks/fa4_wheels.sha256.new
if ! cmp -s benchmarks/fa4_wheels.sha256.new benchmarks/fa4_wheels.sha256 2>/dev/null; then
    echo "note: benchmarks/fa4_wheels.sha256 updated (commit it)"
fi
mv benchmarks/fa4_wheels.sha256.new benchmarks/fa4_wheels.sha256
rm -rf .whl/fa4 && mkdir -p .whl/fa4
big=$(ls "$dl"/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -b "${PART:-31M}" -d -a 2 "$big" "$dl/$(basename "$big").part"
i=0
for part in "$dl/$(basename "$big")".part??; do
    i=$((i + 1)); mkdir -p .whl/fa4/run$i; mv "$part" .whl/fa4/run$i/
done
for w in "$dl"/*.whl; do [ "$w" = "$big" ] || cp "$w" .whl/fa4/run$i/; done
rm -rf "$dl"
du -sh .whl/fa4/run*
