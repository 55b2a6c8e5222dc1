#!/usr/bin/env bash
# Start a throw-away MLflow tracking server on 127.0.0.1 (tests, CI, demos) and print its tracking
# URI on stdout (everything else goes to stderr):
#
#   URI=$(scripts/start_mlflow.sh)      # e.g. http://127.0.0.1:54330
#   scripts/start_mlflow.sh stop        # stop it again
#
# The server keeps runs in a SQLite backend store and artifacts in a local folder, both under
# $COMPRESS_MLFLOW_DIR (default /tmp/compress-mlflow), and listens on 127.0.0.1:$COMPRESS_MLFLOW_PORT
# (default 54330) only. It uses the `mlflow` of $PYTHON (default: .venv/bin/python when present,
# else python3): install it with `pip install 'compress-cli[mlflow]'`. Running it again while the
# server is up just prints the URI.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${COMPRESS_MLFLOW_DIR:-/tmp/compress-mlflow}"
PORT="${COMPRESS_MLFLOW_PORT:-54330}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
URI="http://127.0.0.1:${PORT}"
log() { echo "start_mlflow: $*" >&2; }
healthy() { "$PYTHON" - "$URI/health" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

if [ "${1:-start}" = "stop" ]; then
  if [ -f "$DIR/server.pid" ]; then
    pid="$(cat "$DIR/server.pid")"
    # the server runs in its own process group (setsid) with its web and job workers: stop the
    # group, and kill what is left after 15 s (a first SIGTERM may only start a graceful shutdown)
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 15); do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$DIR/server.pid"
  fi
  exit 0
fi

if healthy; then echo "$URI"; exit 0; fi
if ! "$PYTHON" -c "import mlflow" 2>/dev/null; then
  log "mlflow is not installed for $PYTHON (pip install 'compress-cli[mlflow]')"; exit 3
fi
mkdir -p "$DIR/artifacts"
log "starting on 127.0.0.1:$PORT (store $DIR/mlflow.db, artifacts $DIR/artifacts)"
setsid "$PYTHON" -m mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
  --backend-store-uri "sqlite:///$DIR/mlflow.db" \
  --artifacts-destination "$DIR/artifacts" \
  >"$DIR/server.log" 2>&1 </dev/null &
echo $! >"$DIR/server.pid"
for _ in $(seq 1 120); do
  healthy && break
  kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null || { log "server exited"; tail -20 "$DIR/server.log" >&2; exit 5; }
  sleep 1
done
healthy || { log "server did not become healthy in 120 s"; tail -20 "$DIR/server.log" >&2; exit 5; }
echo "$URI"
