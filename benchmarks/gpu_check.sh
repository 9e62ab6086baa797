#!/usr/bin/env bash
# CUDA vs CPU on one seed (bf16 tolerances), then the bench table; under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh            # writes $OUT/bench-cuda.json when OUT is set, else /tmp
#
# Stage 1 (benchmarks/gpu_check.py, <= 3 min): tower features, per-sample gradients, two short
# runs CUDA bf16 vs CPU fp32, and host syncs per round under torch.cuda.set_sync_debug_mode.
# Stage 2 (<= 4.5 min): `fpl-bench bench` on CUDA (embedded and ViT-B-16 with random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python -c "import fpl_bench" 2>/dev/null || pip install -q -e .
out="${OUT:-/tmp}"
status=0
timeout 180 python benchmarks/gpu_check.py || status=$?
timeout 270 fpl-bench bench --device cuda --methods promptfl,dpfpl,fedotp \
    --clients 10,50,100 --json "$out/bench-cuda.json" || status=$?
exit "$status"
