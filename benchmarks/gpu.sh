#!/usr/bin/env bash
# Every GPU check in one call: main.py's default path end to end on the GPU (tests/test_cuda_real.py: smoke,
# --sample_only, compiled vs eager over 200 steps, kill -9 + resume, torchrun x1 on NCCL with kill -9 + rerun),
# then the GPU benchmark (BENCH_AB=1: its A/B set of candidate step variants instead of the full table).
# Logs go to $1.
set -u
out=${1:-/tmp/gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"
timeout "${TESTS_S:-300}" python -m pytest -s -q -p no:cacheprovider tests/test_cuda_real.py 2>&1 | tee "$out/tests.log"
timeout "${BENCH_S:-340}" python benchmarks/bench.py train --gpu ${BENCH_AB:+--ab} 2>&1 | tee "$out/bench.log"
