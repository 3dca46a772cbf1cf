#!/usr/bin/env bash
# Every GPU check in one call: main.py's default path end to end on the GPU (tests/test_cuda_real.py: smoke,
# --sample_only, compiled vs eager over 200 steps, kill -9 + resume, torchrun x1 on NCCL with kill -9 + rerun),
# then the GPU benchmark (BENCH_AB=1: its A/B set of candidate step variants instead of the full table), then AdamW vs
# Muon at the Muon issue's scale (on a CPU without bf16 matmuls torch's Muon is too slow to measure it).
# Logs go to $1.
set -u
out=${1:-/tmp/gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"
timeout "${TESTS_S:-300}" python -m pytest -s -q -p no:cacheprovider tests/test_cuda_real.py 2>&1 | tee "$out/tests.log"
timeout "${BENCH_S:-340}" python benchmarks/bench.py train --gpu ${BENCH_AB:+--ab} 2>&1 | tee "$out/bench.log"
timeout "${MUON_S:-240}" python benchmarks/optimizers.py --data_files="${MUON_DATA:-tests/data/wiki_fixture.parquet}" \
  --seeds=1337,1338 --n_layer=4 --n_head=4 --n_embd=256 --seq_len=256 --batch_size=8 --steps=300 --warmup_steps=30 \
  --eval_every=20 --eval_iters=4 --device=cuda 2>&1 | tee "$out/optimizers.log"
