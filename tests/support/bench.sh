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
