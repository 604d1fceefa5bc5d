#!/usr/bin/env bash
# The demo: the emulator, a local PostgreSQL and a local Parquet folder, one backfill, counts.
set -euo pipefail
bin=${CFAUDIT_BIN:-target/debug/cfaudit}
events=${DEMO_EVENTS:-20000}
port=${DEMO_EMULATOR_PORT:-18787}
mkdir -p data

source "$(dirname "$0")/emulator-env.sh"
start_emulator "$(dirname "$bin")/cfaudit-emulator" "$port" "$events" data/demo-emulator.log
# The demo starts from scratch each time: its own database and folder, emptied first.
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/cfaudit_demo
export PARQUET_URL=file://$PWD/data/parquet
export LOG_FORMAT=${LOG_FORMAT:-text}
psql -q -h 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE IF EXISTS cfaudit_demo WITH (FORCE)'
rm -rf data/parquet data/parquet.staging

"$bin" migrate
echo "== backfill of $events emulator events"
summary=$("$bin" run --once)
echo "$summary"
echo "== a second run adds nothing"
"$bin" run --once
cat <<MSG

Done: the database cfaudit_demo and the folder data/parquet hold every event once. Look at:
  PostgreSQL:  psql ${DATABASE_URL} -c 'SELECT action_type, count(*) FROM audit_logs GROUP BY 1 ORDER BY 2 DESC'
  Parquet:     ${PARQUET_URL#file://}/year=*/month=*/day=*/hour=*/part-*.parquet
  The service: $bin run   (with the same environment; /metrics on 127.0.0.1:9464)
MSG
