#!/usr/bin/env bash
# Regenerates leaderboards/embedded*.{md,csv,html}, the README's result tables and docs/results.md.
# Usage: bash benchmarks/readme_results.sh [OUT]   (default runs/readme)
# Two suites (leaderboards/embedded.toml, embedded-client.toml): every preset on the embedded
# default at eps none / 0.5 / 0.1, seeds 0-2, under the server trust model, and the private
# cells again under the client trust model; one process per suite, one thread each. Same
# command, seed and machine kind: the same numbers (tests/test_reproducibility.py); rerunning
# resumes finished cells.
set -euo pipefail
OUT=${1:-runs/readme}
start=$(date +%s)
fpl-bench run --suite embedded --out "$OUT/server" --threads 1 &
fpl-bench run --suite embedded-client --out "$OUT/client" --threads 1 &
wait
echo "suites' wall time: $(( $(date +%s) - start )) s on $(nproc) cores" >&2
fpl-bench leaderboard --runs "$OUT/server" --out leaderboards --name embedded \
  --title "fpl-bench on the embedded default, server trust"
fpl-bench leaderboard --runs "$OUT/client" --out leaderboards --name embedded-client \
  --title "fpl-bench on the embedded default, client trust"
python benchmarks/readme_tables.py   # the README section and docs/results.md, from the leaderboards
