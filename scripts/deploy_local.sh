#!/usr/bin/env bash
# The local deployment round trip, all on 127.0.0.1:
#   prefect server → work pools cpu and gpu → prefect deploy --all → a cpu worker →
#   prefect deployment run DEPLOYMENT --watch
# then stops the worker and the server it started (KEEP=1 leaves both running).
#
# Usage: scripts/deploy_local.sh [RUN-ARGS...]   extra arguments go to `prefect deployment run`,
#        e.g. scripts/deploy_local.sh --param config=configs/smoke.yaml
# Env:   PORT (4200), PREFECT_HOME (.prefect in the repo), DEPLOYMENT (varmerge-front/front-nightly),
#        BIN (the venv's bin folder), KEEP=1.
# A server already answering on PORT is used as it is (and left running).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${BIN:-$ROOT/.venv/bin}
PORT=${PORT:-4200}
DEPLOYMENT=${DEPLOYMENT:-varmerge-front/front-nightly}
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$PREFECT_HOME"

healthy() {
  "$BIN/python" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" \
    "$PREFECT_API_URL/health" >/dev/null 2>&1
}

SERVER_PID="" WORKER_PID=""
stop_group() {  # SIGTERM to a process group started here (setsid), SIGKILL after $2 seconds
  kill -TERM -- "-$1" 2>/dev/null || return 0
  for _ in $(seq $(($2 * 2))); do kill -0 -- "-$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$1" 2>/dev/null || true
}
stop() {  # the worker (an idle Prefect 3.8 worker may ignore SIGTERM) before the server
  if [ -n "$WORKER_PID" ]; then stop_group "$WORKER_PID" 10; fi
  if [ -n "$SERVER_PID" ]; then stop_group "$SERVER_PID" 20; fi
}
if [ "${KEEP:-0}" != 1 ]; then trap stop EXIT INT TERM; fi

if healthy; then
  echo "using the Prefect server already on $PREFECT_API_URL"
else
  setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 240); do
    healthy && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$PREFECT_HOME/server.log"; exit 1; }
    sleep 0.5
  done
  healthy || { echo "the server did not start; see $PREFECT_HOME/server.log"; exit 1; }
  echo "Prefect server on $PREFECT_API_URL (log: $PREFECT_HOME/server.log)"
fi

for pool in cpu gpu; do
  "$BIN/prefect" work-pool inspect "$pool" >/dev/null 2>&1 ||
    "$BIN/prefect" work-pool create "$pool" --type process
done
"$BIN/prefect" --no-prompt deploy --all

setsid "$BIN/prefect" worker start --pool cpu >"$PREFECT_HOME/worker-cpu.log" 2>&1 &
WORKER_PID=$!
echo "worker on pool cpu (log: $PREFECT_HOME/worker-cpu.log)"

"$BIN/prefect" deployment run "$DEPLOYMENT" "$@" --watch

if [ "${KEEP:-0}" = 1 ]; then
  echo "left running: server ${SERVER_PID:-(not started here)}, worker $WORKER_PID;"
  echo "stop with: kill -TERM -- -$WORKER_PID${SERVER_PID:+; kill -TERM -- -$SERVER_PID}"
fi
