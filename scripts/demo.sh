#!/usr/bin/env bash
# The main job on a fresh machine (after scripts/install.sh): start the daemon with the small real models, ask one
# typed and one spoken question, print transcript, streamed answer and timings, then stop the daemon cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export SOTTOVOCE_MODELS_DIR=${SOTTOVOCE_MODELS_DIR:-$ROOT/.work/models}
export SOTTOVOCE_RUNTIME_DIR=${SOTTOVOCE_RUNTIME_DIR:-$ROOT/.work/run}
export SOTTOVOCE_ENDPOINT="ipc://$SOTTOVOCE_RUNTIME_DIR/daemon.sock"
export HF_HUB_OFFLINE=1
SV=.venv/bin/sottovoce
WORK=$(mktemp -d)
trap 'kill "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "== starting the daemon (log: $WORK/daemon.log)"
$SV daemon >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 600); do
  if $SV status --timeout 2 >/dev/null 2>&1; then break; fi
  kill -0 "$DAEMON" 2>/dev/null || { cat "$WORK/daemon.log"; exit 1; }
  sleep 0.5
done
$SV status

echo
echo "== typed question"
echo "? What is the capital of France?"
$SV ask "What is the capital of France?"

echo
echo "== spoken question (espeak-ng)"
espeak-ng -w "$WORK/question.wav" "What is the capital of France?"
$SV ask --audio "$WORK/question.wav"

echo
echo "== stopping the daemon"
kill -TERM "$DAEMON"
wait "$DAEMON" && echo "daemon stopped cleanly"
