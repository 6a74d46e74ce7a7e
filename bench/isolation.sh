#!/usr/bin/env bash
# Isolation under load: the rate and request latency seen by a healthy
# monitor (`good`, builtin:page-hinkley) without and with a hostile monitor
# (an infinite loop cut by a 50 ms deadline on every batch, never
# quarantined) on the same stream, same machine, same command.
#
#   cargo build --release && bench/isolation.sh
set -euo pipefail
BIN=${BIN:-target/release/visutility}
HOSTILE=${HOSTILE:-$(ls target/wasm-guests/wasm32-wasip2/guest/visutility_test_hostile.wasm)}
DURATION=${DURATION:-10s}
PORT=${PORT:-7991}

run() {
  local variant=$1 dir
  dir=$(mktemp -d)
  cat > "$dir/cfg.toml" <<TOML
listen = "127.0.0.1:$PORT"
db = "$dir/signals.db"
[[monitor]]
name = "good"
strategy = "builtin:page-hinkley"
TOML
  if [ "$variant" = with-hostile ]; then
    cat >> "$dir/cfg.toml" <<TOML
[[monitor]]
name = "hostile"
strategy = "$(realpath "$HOSTILE")"
config = { mode = "loop" }
limits = { deadline = "50ms", fuel = 100000000000 }
max_failures = 1000000
restart_backoff = "1ms"
TOML
  fi
  "$BIN" run --config "$dir/cfg.toml" > "$dir/out.log" 2> "$dir/err.log" &
  local pid=$!
  sleep 1.5
  echo "## $variant"
  "$BIN" loadgen --url "http://127.0.0.1:$PORT" --duration "$DURATION" --batch 10000 --connections 4 --monitor good || true
  if [ "$variant" = with-hostile ]; then
    curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^visutility_(strategy_traps_total|points_shed_total)\{monitor="hostile"\}' || true
  fi
  local t0=$SECONDS; kill -TERM "$pid"; wait "$pid" || true; echo "shutdown took $((SECONDS - t0)) s"
  rm -rf "$dir"
}

run alone
run with-hostile
