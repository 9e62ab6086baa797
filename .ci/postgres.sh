#!/usr/bin/env bash
# A PostgreSQL server on loopback for the multi-machine tuning tests (tests/test_tune.py).
#
# Installs Debian's postgresql when it is missing, creates a private cluster (its own data
# directory and port, so it never touches a system cluster), starts it listening on 127.0.0.1
# only, creates a user and a database, and prints the URL to give the tests:
#
#     export FPL_TEST_POSTGRES_URL="$(.ci/postgres.sh)"
#
# Idempotent: a second call finds the cluster running and prints the same URL. Everything but
# the URL goes to stderr. Knobs (environment): FPL_PG_DIR (data directory, default
# /tmp/fpl-postgres), FPL_PG_PORT (default 55432), FPL_PG_USER / FPL_PG_PASSWORD / FPL_PG_DB.
set -euo pipefail

DIR="${FPL_PG_DIR:-/tmp/fpl-postgres}"
PORT="${FPL_PG_PORT:-55432}"
USER_NAME="${FPL_PG_USER:-fpl}"
PASSWORD="${FPL_PG_PASSWORD:-fpl}"
DB="${FPL_PG_DB:-fpl_optuna}"
say() { echo "postgres.sh: $*" >&2; }

pg_bin() {  # the newest installed server's bin folder (Debian keeps them off PATH)
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

if [[ -z "$(pg_bin)" ]]; then
    say "installing postgresql (apt-get)"
    SUDO=""
    [[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq postgresql >&2
fi
BIN="$(pg_bin)"
[[ -x "$BIN/initdb" ]] || { say "no initdb under /usr/lib/postgresql/*/bin"; exit 1; }

# The server refuses to run as root: as root, run it as the `postgres` user Debian creates.
if [[ "$(id -u)" -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    as_owner() { runuser -u postgres -- "$@"; }
else
    as_owner() { "$@"; }
fi

if [[ ! -s "$DIR/PG_VERSION" ]]; then
    say "creating a cluster in $DIR"
    mkdir -p "$DIR"
    [[ "$(id -u)" -ne 0 ]] || chown postgres: "$DIR"
    chmod 700 "$DIR"
    as_owner "$BIN/initdb" -D "$DIR" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 >/dev/null
fi

if ! as_owner "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
    say "starting the server on 127.0.0.1:$PORT"
    # The socket lives in the data directory, so no system folder needs to be writable.
    as_owner "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w -t 60 start \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -k $DIR -c max_connections=200" >/dev/null
fi

psql_admin() {  # as the superuser, over the cluster's own socket
    as_owner "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}
if [[ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$USER_NAME'")" != "1" ]]; then
    psql_admin -c "CREATE ROLE $USER_NAME LOGIN PASSWORD '$PASSWORD'"
fi
if [[ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != "1" ]]; then
    psql_admin -c "CREATE DATABASE $DB OWNER $USER_NAME"
fi

echo "postgresql://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB"
