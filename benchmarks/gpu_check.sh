#!/usr/bin/env bash
# CUDA vs CPU on one seed (bf16 tolerances), the bench table, then one preset per learner on
# CUDA's default precision (bf16); under 9 minutes on one GPU.
#
#   benchmarks/gpu_check.sh            # writes $OUT/bench-cuda.json when OUT is set, else /tmp
#
# Stage 1 (benchmarks/gpu_check.py, <= 3 min): tower features, per-sample gradients, two short
# runs CUDA bf16 vs CPU fp32, and host syncs per round under torch.cuda.set_sync_debug_mode.
# Stage 2 (<= 4 min): `fpl-bench bench` on CUDA (embedded and ViT-B-16 with random weights).
# Stage 3 (<= 2 min): a preset of each learner for one tiny round with and without DP, under
# bf16 autocast (MaPLe, IVLP and PromptSRC once crashed there without DP; tested on CPU by
# tests/test_new_presets_cli.py with --precision bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python -c "import fpl_bench" 2>/dev/null || pip install -q -e .
out="${OUT:-/tmp}"
status=0
timeout 180 python benchmarks/gpu_check.py || status=$?
timeout 240 fpl-bench bench --device cuda --methods promptfl,dpfpl,fedotp \
    --clients 10,50,100 --json "$out/bench-cuda.json" || status=$?
timeout 120 fpl-bench run --device cuda --eps none,2 --rounds 1 --clients 2 --shots 2 \
    --methods coop,fedkgcoop,fedotp,plot,proda,prograd,fedtpg,fedclip,cocoop,maple,ivlp,promptsrc,bpl \
    --out "$out/bf16-presets" --cache-dir "$out/cache" || status=$?
exit "$status"
