#!/usr/bin/env bash
# Regenerates the README's result tables and leaderboards/embedded.{md,csv,html} from scratch.
# Usage: bash benchmarks/readme_results.sh [OUT]   (default runs/readme)
# The jobs are the `embedded` suite (leaderboards/embedded.toml): every preset on the embedded
# default at eps none / 0.5 / 0.1, seeds 0-2, under the server trust model, plus the private
# cells again under the client trust model. Same command, seed and machine kind: the same
# numbers (tests/test_reproducibility.py); rerunning resumes finished cells.
set -euo pipefail
OUT=${1:-runs/readme}
start=$(date +%s)
fpl-bench run --suite embedded --out "$OUT"
echo "suite wall time: $(( $(date +%s) - start )) s" >&2
fpl-bench leaderboard --runs "$OUT" --out leaderboards --name embedded \
  --title "fpl-bench on the embedded default (synthetic data, tiny CLIP)"
cat leaderboards/embedded.md
