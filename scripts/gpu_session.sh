#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one run that fits the device budget
# (about 12 minutes on an H100), prepared on the CPU. Results go under ${OUT:-gpu_out}/.
#   bash scripts/gpu_session.sh            # on the GPU machine, from the repository root
# 1. correctness on CUDA (Triton kernels, the fused encoder + top-k, bf16 training)
# 2. the training step: llm_sae (+triton, +fused) against sparsify and SAELens
# 3. harvest against the bare forward on a GPT-2-small-shaped model, bf16 store
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" > "$OUT/versions.txt" 2>&1
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
PEERS=()
[ -x .peers/bin/python ] && PEERS=(--peers-python .peers/bin/python)
timeout 300 python3 scripts/bench_gpu.py --impls llm_sae+triton,llm_sae+fused,sparsify,saelens \
    "${PEERS[@]}" --json-out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
timeout 180 python3 scripts/bench_harvest.py --device cuda --dtype bfloat16 --d-model 768 --layers 12 \
    --hook-layer 6 --tokens 1000000 --json-out "$OUT/bench_harvest.json" > "$OUT/bench_harvest.txt" 2>&1
tail -n 30 "$OUT"/*.txt
