#!/usr/bin/env bash
# Regenerates the privacy audit's results: leaderboards/audit-embedded-rows.csv, the
# leaderboards and attack-vs-eps figures leaderboards/audit-embedded{,-client}.*, README.md's
# audit table and docs/audit.md's table of every preset.
# Usage: bash benchmarks/audit_results.sh [OUT]   (default runs/audit); rerunning reuses the
# runs and attacks already in OUT.
set -euo pipefail
OUT=${1:-runs/audit}
PAPER=coop,promptfl,fedotp,fedpgp,dpfpl   # the DP-FPL paper's methods
fpl-bench audit --methods "$PAPER" --eps none,1,0.5 --trust server --out "$OUT/server"
fpl-bench audit --methods "$PAPER" --eps 1,0.5 --trust client --out "$OUT/client"
start=$(date +%s)
fpl-bench audit --methods all --eps 0.5 --out "$OUT/all"
echo "audit --methods all --eps 0.5: $(( $(date +%s) - start )) s on $(nproc) cores" >&2
fpl-bench leaderboard --runs "$OUT/server" --out leaderboards --name audit-embedded \
  --title "fpl-bench audit on the embedded default, server trust"
fpl-bench leaderboard --runs "$OUT/client" --out leaderboards --name audit-embedded-client \
  --title "fpl-bench audit on the embedded default, client trust"
python benchmarks/audit_tables.py --collect "$OUT"
