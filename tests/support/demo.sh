#!/usr/bin/env bash
# The demo: the emulator, a local PostgreSQL and a local Parquet folder, one backfill, counts.
set -euo pipefail
bin=${CFAUDIT_BIN:-target/debug/cfaudit}
events=${DEMO_EVENTS:-20000}
port=${DEMO_EMULATOR_PORT:-18787}

"$bin" emulator --listen "127.0.0.1:$port" --events "$events" >/dev/null 2>data/demo-emulator.log &
emulator=$!
trap 'kill $emulator 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -s "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done

export CLOUDFLARE_API_BASE_URL="http://127.0.0.1:$port/client/v4"
export CLOUDFLARE_API_TOKEN=demo-token-not-a-secret
export CLOUDFLARE_ACCOUNT_ID=0123456789abcdef0123456789abcdef
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cfaudit_demo}
export PARQUET_URL=${PARQUET_URL:-file://$PWD/data/parquet}
export INITIAL_CHECKPOINT=${INITIAL_CHECKPOINT:-2000-01-01}
export LOG_FORMAT=${LOG_FORMAT:-text}

"$bin" migrate
echo "== backfill of $events emulator events"
summary=$("$bin" run --once)
echo "$summary"
echo "== a second run adds nothing"
"$bin" run --once
cat <<MSG

Done. Look at:
  PostgreSQL:  psql ${DATABASE_URL} -c 'SELECT action_type, count(*) FROM audit_logs GROUP BY 1 ORDER BY 2 DESC'
  Parquet:     ${PARQUET_URL#file://}/year=*/month=*/day=*/hour=*/part-*.parquet
  The service: $bin run   (with the same environment; /metrics on 127.0.0.1:9464)
MSG
