#!/usr/bin/env bash
# Benchmark: a backfill of BENCH_EVENTS (default 200,000) emulator events with the release
# build, measured by /usr/bin/time -v: events/s and peak RSS, plus the run's counts; on plain
# PostgreSQL, then the same on TimescaleDB where ../shared/tools/timescaledb provides it; each
# for v1 (1,000 events a page) and v2 (its own data set of as many events, limit 1,000).
# BENCH_S3=1: the dataset in a bucket of a local S3-compatible server instead of a folder.
set -euo pipefail
bin=target/release/cfaudit
events=${BENCH_EVENTS:-200000}
port=${BENCH_EMULATOR_PORT:-18788}
db=cfaudit_bench
out=data/bench
mkdir -p "$out"

source "$(dirname "$0")/emulator-env.sh"
# v2 pages as large as v1's (the emulator caps them at 100 unless told, as one collector reports).
start_emulator "$(dirname "$bin")/cfaudit-emulator" "$port" "$events" "$out/emulator.log" \
  --v2-page-cap 1000
export PARQUET_URL="file://$PWD/$out/parquet"
if [ -n "${BENCH_S3:-}" ]; then
  # The dataset in a bucket of the S3-compatible test server (s3s-fs), on this machine.
  s3_port=${BENCH_S3_PORT:-18789}
  rm -rf "$out/s3" && mkdir -p "$out/s3/bench"
  "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" --host 127.0.0.1 --port "$s3_port" \
    --access-key bench-access --secret-key bench-secret-0123456789 "$out/s3" >"$out/s3.log" 2>&1 &
  S3_PID=$!
  trap 'kill $EMULATOR_PID $S3_PID 2>/dev/null || true' EXIT
  export PARQUET_URL=s3://bench/lake AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" \
    AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=bench-access AWS_SECRET_ACCESS_KEY=bench-secret-0123456789
  sleep 1
fi
export LOG_FORMAT=json RUST_LOG=warn
# The pipeline's own speed: without this, the client-side request budget (1,000 requests per
# 5 minutes plus a burst of 100, kept below Cloudflare's limit) sets the pace after 100 pages.
# BENCH_BUDGET=1000 measures a backfill as it runs against the real API.
export CLOUDFLARE_REQUESTS_PER_5_MINUTES=${BENCH_BUDGET:-1000000} CLOUDFLARE_REQUEST_BURST=${BENCH_BURST:-1000}

# One backfill of the emulator's events of API version $3 into a fresh database of the cluster
# at $1 (a URL of its maintenance database) and a fresh dataset folder; prints its figures under
# label $2.
bench_once() {
  local admin=$1 label=$2 version=$3 url
  export CLOUDFLARE_API_VERSIONS=$version CLOUDFLARE_V2_LIMIT=1000
  url="${admin%/*}/$db"
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
  rm -rf "$out/parquet" "$out/parquet.staging"
  if [ -n "${BENCH_S3:-}" ]; then rm -rf "$out/s3/bench" && mkdir -p "$out/s3/bench"; fi
  export DATABASE_URL=$url
  "$bin" migrate
  /usr/bin/time -v "$bin" run --once >"$out/summary.json" 2>"$out/time.txt"
  elapsed=$(grep 'Elapsed (wall clock)' "$out/time.txt" | awk '{print $NF}')
  rss_kb=$(grep 'Maximum resident set size' "$out/time.txt" | awk '{print $NF}')
  seconds=$(python3 -c "import sys; p=sys.argv[1].split(':'); print(sum(float(x)*60**i for i,x in enumerate(reversed(p))))" "$elapsed")
  python3 - "$out/summary.json" "$seconds" "$rss_kb" "$events" "$label" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
seconds, rss_kb, events, label = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = summary["rows_in_postgres"]
print(f"== {label}")
print(f"events in emulator: {events}")
print(f"rows in postgres:   {rows}   parquet rows: {summary['parquet_rows']}   parquet files: {summary['parquet_files']}   dead letters: {summary['dead_letters']}")
print(f"wall time:          {seconds:.1f} s")
print(f"throughput:         {rows / seconds:,.0f} events/s")
print(f"peak RSS:           {rss_kb / 1024:.1f} MiB")
PY
}

# BENCH_ACCOUNTS_ONLY=1: the many-accounts figures below only.
if [ -z "${BENCH_ACCOUNTS_ONLY:-}" ]; then
for version in v1 v2; do
  bench_once "postgres://postgres@127.0.0.1:5432/postgres" "$version, plain PostgreSQL (127.0.0.1:5432)" $version
done
# The same on TimescaleDB (a hypertable with 1-day chunks), where ../shared provides it.
timescale=$("$(dirname "$0")/ensure-timescaledb.sh")
if [ -n "$timescale" ]; then
  for version in v1 v2; do
    bench_once "$timescale" "$version, TimescaleDB (${timescale#postgres://postgres@})" $version
  done
fi
fi

# Many accounts on one token: ACCOUNTS (20) accounts of ACCOUNT_EVENTS (10,000) v1 events each,
# in one `run --once`, on plain PostgreSQL; then the resident memory of an idle service with
# IDLE_ACCOUNTS (100) accounts, and with one, read from /proc after its first sweeps.
accounts=${BENCH_ACCOUNTS:-20}
account_events=${BENCH_ACCOUNT_EVENTS:-10000}
idle_accounts=${BENCH_IDLE_ACCOUNTS:-100}
# An emulator with $1 accounts of $2 v1 events each (and next to no v2 events).
accounts_emulator() {
  kill "$EMULATOR_PID" 2>/dev/null || true
  wait "$EMULATOR_PID" 2>/dev/null || true
  start_emulator "$(dirname "$bin")/cfaudit-emulator" "$port" "$2" "$out/emulator.log" \
    --extra-accounts $(($1 - 1)) --v2-events 1
  # The emulator's accounts, as `GET /accounts` lists them (50 a page).
  all_accounts=$(python3 - "$CLOUDFLARE_API_BASE_URL" "$CLOUDFLARE_API_TOKEN" <<'PY'
import json, sys, urllib.request
base, token, ids, page = sys.argv[1], sys.argv[2], [], 1
while True:
    request = urllib.request.Request(f"{base}/accounts?per_page=50&page={page}",
                                     headers={"Authorization": f"Bearer {token}"})
    body = json.load(urllib.request.urlopen(request))
    ids += [a["id"] for a in body["result"]]
    if page >= body["result_info"]["total_pages"]:
        break
    page += 1
print(",".join(ids))
PY
)
}
accounts_emulator "$accounts" "$account_events"
first_accounts() { echo "$all_accounts" | tr ',' '\n' | head -n "$1" | paste -sd, -; }
unset CLOUDFLARE_ACCOUNT_ID
export CLOUDFLARE_API_VERSIONS=v1
admin=postgres://postgres@127.0.0.1:5432/postgres
export DATABASE_URL="${admin%/*}/$db"
psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
rm -rf "$out/parquet" "$out/parquet.staging"
export CLOUDFLARE_ACCOUNT_IDS=$(first_accounts "$accounts")
"$bin" migrate
/usr/bin/time -v "$bin" run --once >"$out/summary.json" 2>"$out/time.txt"
elapsed=$(grep 'Elapsed (wall clock)' "$out/time.txt" | awk '{print $NF}')
rss_kb=$(grep 'Maximum resident set size' "$out/time.txt" | awk '{print $NF}')
python3 - "$out/summary.json" "$elapsed" "$rss_kb" "$accounts" "$account_events" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
elapsed, rss_kb, accounts, each = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(elapsed.split(":"))))
rows = sum(s["rows_in_postgres"] for s in lines)
print(f"== {accounts} accounts x {each} events (v1), plain PostgreSQL, one process")
print(f"accounts summarised: {len(lines)}   rows in postgres: {rows}   parquet rows: {sum(s['parquet_rows'] for s in lines)}")
print(f"wall time:          {seconds:.1f} s")
print(f"throughput:         {rows / seconds:,.0f} events/s")
print(f"peak RSS:           {rss_kb / 1024:.1f} MiB")
PY

# An idle service: its accounts' backlogs are behind INITIAL_CHECKPOINT (now), so each sweep
# finds nothing new; RSS after 30 s of sweeps every 5 s.
idle_rss() {
  local n=$1 pid kb
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
  rm -rf "$out/parquet" "$out/parquet.staging"
  "$bin" migrate
  CLOUDFLARE_ACCOUNT_IDS=$(first_accounts "$n") INITIAL_CHECKPOINT=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
    POLL_INTERVAL_SECONDS=5 METRICS_ADDR=127.0.0.1:0 "$bin" run >"$out/idle.log" 2>&1 &
  pid=$!
  sleep 30
  kb=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  kill -TERM "$pid"
  wait "$pid" || true
  echo "$kb"
}
accounts_emulator "$idle_accounts" 10
one=$(idle_rss 1)
many=$(idle_rss "$idle_accounts")
python3 - "$one" "$many" "$idle_accounts" <<'PY'
import sys
one, many, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"== idle service (live, nothing new), v1, plain PostgreSQL")
print(f"RSS with 1 account:    {one / 1024:.1f} MiB")
print(f"RSS with {n} accounts:  {many / 1024:.1f} MiB   ({(many - one) / (n - 1):.0f} KiB per further account)")
PY
