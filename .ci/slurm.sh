#!/usr/bin/env bash
# A single-node Slurm cluster (slurmctld + slurmd, munge authentication) on this machine for the
# cluster executor tests (tests/test_executors_cluster.py).
#
# Installs Debian's slurm-wlm and munge when missing, writes a private configuration (its own
# ports, state and spool folders, munge socket and key under FPL_SLURM_DIR, so a system
# Slurm or munge is never touched), starts munged, slurmctld and slurmd, waits until the node
# is idle and prints the configuration file to give the tests:
#
#     export FPL_TEST_SLURM_CONF="$(.ci/slurm.sh)"
#
# Idempotent: a second call finds the daemons running and prints the same path. Everything but
# the path goes to stderr. Knobs (environment): FPL_SLURM_DIR (default /tmp/fpl-slurm),
# FPL_SLURM_PORT (slurmctld's port, default 56817; slurmd's is the next one).
set -euo pipefail

DIR="${FPL_SLURM_DIR:-/tmp/fpl-slurm}"
PORT="${FPL_SLURM_PORT:-56817}"
say() { echo "slurm.sh: $*" >&2; }

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    say "installing slurm-wlm and munge (apt-get)"
    SUDO=""
    [[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq slurm-wlm munge >&2
fi
[[ "$(id -u)" -eq 0 ]] || { say "slurmd must run as root here (it starts jobs as their user)"; exit 1; }

mkdir -p "$DIR/spool" "$DIR/state" "$DIR/munge" "$DIR/log"
chmod 700 "$DIR/munge"
export SLURM_CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"

if [[ ! -s "$DIR/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    chmod 400 "$DIR/munge/munge.key"
fi
if [[ ! -S "$DIR/munge/munge.socket" ]] || ! kill -0 "$(cat "$DIR/munge/munged.pid" 2>/dev/null)" 2>/dev/null; then
    say "starting munged"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/seed"
fi

MEMORY=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 2 ))
cat > "$SLURM_CONF" <<CONF
ClusterName=fpl
SlurmctldHost=$NODE
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
KillWait=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=$NODE CPUs=$(nproc) RealMemory=$MEMORY State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

running() { kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
if ! running "$DIR/slurmctld.pid"; then say "starting slurmctld"; slurmctld -c; fi
if ! running "$DIR/slurmd.pid"; then say "starting slurmd"; slurmd; fi
for _ in $(seq 1 120); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
        echo "$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
say "the node did not come up in 120 s; see $DIR/log/"
exit 1
