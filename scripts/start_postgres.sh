#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for shared Optuna studies (tests, CI, demos)
# and print its URL on stdout (everything else goes to stderr):
#
#   URL=$(scripts/start_postgres.sh)      # e.g. postgresql://postgres@127.0.0.1:54329/compress
#   scripts/start_postgres.sh stop        # stop it again
#
# Installs Debian's `postgresql` with apt-get when no server binaries are found (unless
# COMPRESS_PG_NO_INSTALL=1). The cluster lives in $COMPRESS_PG_DIR (default /tmp/compress-pg),
# listens on 127.0.0.1:$COMPRESS_PG_PORT (default 54329) only, trusts local connections, and is
# owned by the `postgres` user when run as root (the server refuses to run as root).
# Running it again while the server is up just prints the URL.
set -euo pipefail

PGDIR="${COMPRESS_PG_DIR:-/tmp/compress-pg}"
PORT="${COMPRESS_PG_PORT:-54329}"
DB="${COMPRESS_PG_DB:-compress}"
log() { echo "start_postgres: $*" >&2; }

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"; return 0
  fi
  return 1
}

BINDIR="$(find_bindir || true)"
if [ -z "$BINDIR" ]; then
  if [ "${COMPRESS_PG_NO_INSTALL:-0}" = "1" ]; then
    log "no PostgreSQL server binaries found (install Debian's postgresql package)"; exit 3
  fi
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    log "no PostgreSQL server binaries found and cannot apt-get install them here"; exit 3
  fi
  log "installing postgresql with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || true
  apt-get install -y -qq postgresql >&2
  BINDIR="$(find_bindir || true)"
  [ -n "$BINDIR" ] || { log "postgresql installed but pg_ctl/initdb not found"; exit 3; }
fi

# run a command as the cluster's owner
if [ "$(id -u)" = "0" ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  OWNER=postgres
  as_owner() { runuser -u postgres -- "$@"; }
else
  OWNER="$(id -un)"
  as_owner() { "$@"; }
fi

if [ "${1:-start}" = "stop" ]; then
  if [ -f "$PGDIR/data/postmaster.pid" ]; then
    as_owner "$BINDIR/pg_ctl" -D "$PGDIR/data" -m fast -w stop >&2 || true
  fi
  exit 0
fi

url="postgresql://${OWNER}@127.0.0.1:${PORT}/${DB}"
ready() { "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" 2>/dev/null; }

if ! ready; then
  mkdir -p "$PGDIR"
  if [ "$(id -u)" = "0" ]; then chown "$OWNER" "$PGDIR"; fi
  chmod 700 "$PGDIR"
  if [ ! -f "$PGDIR/data/PG_VERSION" ]; then
    log "initdb in $PGDIR/data"
    as_owner "$BINDIR/initdb" -D "$PGDIR/data" -U "$OWNER" -A trust -E UTF8 --no-sync >"$PGDIR/initdb.log" 2>&1 \
      || { cat "$PGDIR/initdb.log" >&2; exit 4; }
  fi
  rm -f "$PGDIR/data/postmaster.pid"  # a stale pid file from a killed server
  log "starting on 127.0.0.1:$PORT"
  as_owner "$BINDIR/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDIR -c max_connections=100 -c fsync=off" start >&2 \
    || { tail -20 "$PGDIR/server.log" >&2; exit 5; }
fi

for _ in $(seq 1 30); do ready && break; sleep 1; done
ready || { log "server did not become ready"; tail -20 "$PGDIR/server.log" >&2 || true; exit 5; }
if ! as_owner "$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U "$OWNER" -d postgres -tAc \
     "SELECT 1 FROM pg_database WHERE datname='${DB}'" | grep -q 1; then
  as_owner "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U "$OWNER" "$DB" >&2
fi
echo "$url"
