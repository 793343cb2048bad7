#!/usr/bin/env bash
# The GPU checks of offloading (issue 17), as one command for a lent GPU machine (`device run`).
#
# 1. tests/runtime/test_offload_gpu.py: logits and greedy text on the GPU equal the fully
#    loaded model's with a pinned CPU-memory tier, prefetch on a CUDA stream, and misses
#    computed on the CPU (never / always / auto), and from the disk tier;
# 2. benchmarks/offload_speed.py --device cuda on a synthetic Qwen3-MoE written to /tmp:
#    accelerate's CPU offload against moekit (LRU, + prefetch, + CPU compute of misses,
#    + both) at the same GPU budget. Results land in $OUT (or benchmarks/results).
#
# The machine's image lacks pydantic and has an older transformers: carry them as wheels.
# Here, once (`.whl` is in .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.24.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
# Then: run(command="bash benchmarks/gpu_offload.sh", carry=[".whl"], timeout_s=540)
# Sizes: PRESET (default s8: 8 layers of the s24 shapes, about 5 GB of bf16) and BUDGET.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PRESET_ARGS=${PRESET_ARGS:---layers 8 --hidden 2048 --experts 64 --expert-width 768 --top-k 8}
BUDGET=${BUDGET:-1GB}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu_offload.log"
python3 -m pytest -q -p no:cacheprovider tests/runtime/test_offload_gpu.py tests/runtime/test_offload_miss_compute.py \
    2>&1 | tail -15 | tee -a "$OUT/gpu_offload.log"
python3 benchmarks/synthetic.py /tmp/moekit-gpu-syn $PRESET_ARGS 2>&1 | tail -2 | tee -a "$OUT/gpu_offload.log"
python3 benchmarks/offload_speed.py /tmp/moekit-gpu-syn --device cuda --expert-memory "$BUDGET" \
    --prompt-tokens 16 --new-tokens 16 --repeats 2 --out "$OUT/offload_speed-gpu.json" 2>&1 \
    | tail -15 | tee -a "$OUT/gpu_offload.log"
rm -rf /tmp/moekit-gpu-syn
