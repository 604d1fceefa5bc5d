#!/usr/bin/env bash
# Benchmark: a backfill of BENCH_EVENTS (default 200,000) emulator events with the release
# build, measured by /usr/bin/time -v: events/s and peak RSS, plus the run's counts; on plain
# PostgreSQL, then the same on TimescaleDB where ../shared/tools/timescaledb provides it; each
# for v1 (1,000 events a page) and v2 (its own data set of as many events, limit 1,000); v1
# once more with BENCH_LARGE_EVENTS (1,000,000), against the first.
# BENCH_S3=1: the dataset in a bucket of a local S3-compatible server instead of a folder throughout;
# otherwise (where s3s-fs is installed) the v2 backfill runs once more on it, for the comparison.
# Each backfill is followed by psql's \copy of the rows it stored into a fresh table of the same
# schema, timed: the database's own bulk-load speed, the yardstick; a second one adds the
# aggregates' refresh, which cfaudit does behind its writers and at the end of its run and
# \copy leaves undone (TimescaleDB: the continuous aggregates; plain PostgreSQL: the fold of
# the daily aggregates). Each backfill and its yardstick run BENCH_ROUNDS (2) times, alternating,
# and the figures take the best of each. One table of figures ends it.
set -euo pipefail
bin=target/release/cfaudit
events=${BENCH_EVENTS:-200000}
# BENCH_ROUNDS (2) rounds of each backfill and of its yardstick, alternating; the figures take
# the best of each (the machine's noise moves single runs by 10-20 %, either way), and the
# largest peak RSS.
rounds=${BENCH_ROUNDS:-2}
if ! [ "$rounds" -ge 1 ] 2>/dev/null; then
  echo "BENCH_ROUNDS is '$rounds': set it to a whole number of rounds, 1 or more" >&2
  exit 1
fi
port=${BENCH_EMULATOR_PORT:-18788}
db=cfaudit_bench
out=data/bench
mkdir -p "$out"
# Every figure, one "what<TAB>value" line each, printed as one table at the end.
figures=$out/figures.tsv
: >"$figures"
figure() { printf '%s\t%s\n' "$1" "$2" >>"$figures"; }

source "$(dirname "$0")/emulator-env.sh"
# With the client's request budget lifted (below), the emulator's lockout is lifted too: five
# backfills of 200 pages on one emulator come near Cloudflare's 1,200 requests per 5 minutes,
# and a locked-out credential waits 5 minutes, which measured the lockout, not cfaudit. With
# BENCH_BUDGET the limits are Cloudflare's.
emulator_limit=()
if [ -z "${BENCH_BUDGET:-}" ]; then emulator_limit=(--rate-limit 1000000000); fi
# v2 pages as large as v1's (the emulator caps them at 100 unless told, as one collector reports).
start_emulator "$(dirname "$bin")/cfaudit-emulator" "$port" "$events" "$out/emulator.log" \
  --v2-page-cap 1000 "${emulator_limit[@]}"
# The dataset in a local folder, or from use_s3 on in a bucket of the S3-compatible test server
# (s3s-fs) on this machine.
use_folder() {
  export PARQUET_URL="file://$PWD/$out/parquet"
  unset AWS_ENDPOINT_URL AWS_ALLOW_HTTP AWS_REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
}
s3s=${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs
use_s3() {
  if [ -z "${S3_PID:-}" ]; then
    s3_port=${BENCH_S3_PORT:-18789}
    rm -rf "$out/s3" && mkdir -p "$out/s3/bench"
    "$s3s" --host 127.0.0.1 --port "$s3_port" \
      --access-key bench-access --secret-key bench-secret-0123456789 "$out/s3" >"$out/s3.log" 2>&1 &
    S3_PID=$!
    trap 'kill $EMULATOR_PID ${S3_PID:-} 2>/dev/null || true' EXIT
    sleep 1
  fi
  export PARQUET_URL=s3://bench/lake AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" \
    AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=bench-access AWS_SECRET_ACCESS_KEY=bench-secret-0123456789
}
use_folder
if [ -n "${BENCH_S3:-}" ]; then use_s3; fi
export LOG_FORMAT=json RUST_LOG=warn
# The pipeline's own speed: without this, the client-side request budget (1,000 requests per
# 5 minutes plus a burst of 100, kept below Cloudflare's limit) sets the pace after 100 pages.
# BENCH_BUDGET=1000 measures a backfill as it runs against the real API.
export CLOUDFLARE_REQUESTS_PER_5_MINUTES=${BENCH_BUDGET:-1000000} CLOUDFLARE_REQUEST_BURST=${BENCH_BURST:-1000}

# BENCH_ROUNDS backfills of the emulator's events of API version $3, each into a fresh database
# of the cluster at $1 (a URL of its maintenance database) and a fresh dataset folder, each
# followed by its yardstick; prints its figures under label $2 and leaves the best wall time in
# $seconds and the largest peak RSS in $rss_kb.
# The least of the numbers given, the empty ones left out (the first round has no best yet).
least() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:] if x))" "$@"; }

bench_once() {
  local admin=$1 label=$2 version=$3 url round run_seconds run_rss_kb
  local copy_db=${db}_copy copy_url t0 t1 t2 copy= refreshed=
  export CLOUDFLARE_API_VERSIONS=$version CLOUDFLARE_V2_LIMIT=1000
  url="${admin%/*}/$db"
  copy_url="${admin%/*}/$copy_db"
  seconds= rss_kb=0
  for round in $(seq "$rounds"); do
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
    rm -rf "$out/parquet" "$out/parquet.staging"
    if [[ $PARQUET_URL == s3://* ]]; then rm -rf "$out/s3/bench" && mkdir -p "$out/s3/bench"; fi
    export DATABASE_URL=$url
    "$bin" migrate
    /usr/bin/time -v "$bin" run --once >"$out/summary.json" 2>"$out/time.txt"
    elapsed=$(grep 'Elapsed (wall clock)' "$out/time.txt" | awk '{print $NF}')
    run_rss_kb=$(grep 'Maximum resident set size' "$out/time.txt" | awk '{print $NF}')
    run_seconds=$(python3 -c "import sys; p=sys.argv[1].split(':'); print(sum(float(x)*60**i for i,x in enumerate(reversed(p))))" "$elapsed")
    python3 - "$out/summary.json" "$run_seconds" "$run_rss_kb" "$events" "$label (round $round of $rounds)" <<'PY'
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
    seconds=$(least "$run_seconds" "$seconds")
    [ "$run_rss_kb" -gt "$rss_kb" ] && rss_kb=$run_rss_kb
    # The database's own bulk load: the rows cfaudit stored, exported and loaded by psql's
    # \copy into a fresh table of the same schema (indexes and triggers included).
    psql -X -q "$url" -c "\\copy (SELECT * FROM audit_logs) TO '$out/rows.copy'"
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $copy_db WITH (FORCE)" 2>/dev/null
    DATABASE_URL=$copy_url "$bin" migrate
    t0=$(date +%s.%N)
    psql -X -q "$copy_url" -c "\\copy audit_logs FROM '$out/rows.copy'"
    t1=$(date +%s.%N)
    # \copy leaves TimescaleDB's continuous aggregates without the loaded hours, and plain
    # PostgreSQL's daily aggregates without the loaded days, which cfaudit brings up to date
    # behind its writers and at the end of its run; the same, timed, for the second yardstick.
    "$(dirname "$0")/refresh-aggregates.sh" "$copy_url" "now() + interval '1 day'"
    t2=$(date +%s.%N)
    psql -q "$admin" -c "DROP DATABASE $copy_db WITH (FORCE)" 2>/dev/null
    rm -f "$out/rows.copy"
    python3 -c "import sys; t0, t1, t2 = map(float, sys.argv[1:]); print(f'psql \\\\copy, same rows: {t1 - t0:.1f} s   and the aggregates\' refresh: {t2 - t1:.1f} s')" "$t0" "$t1" "$t2"
    copy=$(least "$(python3 -c "print($t1 - $t0)")" "$copy")
    refreshed=$(least "$(python3 -c "print($t2 - $t0)")" "$refreshed")
  done
  python3 - "$out/summary.json" "$seconds" "$rss_kb" "$copy" "$refreshed" "$label" "$figures" "$rounds" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows_in_postgres"]
seconds, rss_kb, copy, refreshed, label = float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
print(f"-- {label}, best of {sys.argv[8]}: cfaudit {seconds:.1f} s, \\copy {copy:.1f} s (cfaudit at {copy / seconds:.2f}x its speed), "
      f"with the aggregates' refresh {refreshed:.1f} s ({refreshed / seconds:.2f}x)")
with open(sys.argv[7], "a") as figures:
    figures.write(f"{label}: events/s\t{rows / seconds:,.0f}\n")
    figures.write(f"{label}: speed against psql \\copy of the same rows (goal >= 0.9)\t{copy / seconds:.2f}\n")
    figures.write(f"{label}: speed against \\copy and the aggregates' refresh cfaudit does too\t{refreshed / seconds:.2f}\n")
    figures.write(f"{label}: peak RSS, MiB (goal <= 64)\t{rss_kb / 1024:.1f}\n")
PY
}

# BENCH_ACCOUNTS_ONLY=1: the many-accounts figures below only.
if [ -z "${BENCH_ACCOUNTS_ONLY:-}" ]; then
for version in v1 v2; do
  bench_once "postgres://postgres@127.0.0.1:5432/postgres" "$version, plain PostgreSQL (127.0.0.1:5432)" $version
  if [ "$version" = v1 ]; then v1_seconds=$seconds v1_rss_kb=$rss_kb; fi
done
# Lake queries: DuckDB counting one hour and one day by action type in the dataset of the last
# run reads only that hour's or that day's files (hive partition pruning), from its profile.
pruning() {
  local python=${CFAUDIT_PYTHON:-python3}
  if ! "$python" -c "import duckdb" 2>/dev/null; then
    echo "DuckDB partition pruning: not measured ($python has no duckdb; make bench installs it)"
    return
  fi
  "$python" - "$out/parquet" "$figures" <<'PY'
import duckdb, pathlib, re, sys
root, figures = sys.argv[1], sys.argv[2]
files = sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*.parquet"))
year, month, day, hour = re.match(r"year=(\d+)/month=(\d+)/day=(\d+)/hour=(\d+)", files[len(files) // 2]).groups()
con = duckdb.connect()
source = f"read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
for label, where in [(f"one hour ({year}-{month}-{day} {hour}h)",
                      f"year = {year} AND month = {month} AND day = {day} AND hour = {hour}"),
                     (f"one day ({year}-{month}-{day})", f"year = {year} AND month = {month} AND day = {day}")]:
    plan = con.execute(f"EXPLAIN ANALYZE SELECT action_type, count(*) FROM {source} "
                       f"WHERE {where} GROUP BY 1").fetchall()[0][1]
    read = re.search(r"Total Files Read: (\d+)", plan).group(1)
    print(f"DuckDB, {label} by action type: {read} of {len(files)} files read")
    with open(figures, "a") as f:
        f.write(f"DuckDB, count by action type of {label}: files read of {len(files)}\t{read}\n")
PY
}
pruning

# The v2 backfill again with the dataset on the S3-compatible server, against the folder's time.
if [ -z "${BENCH_S3:-}" ] && [ -x "$s3s" ]; then
  folder_seconds=$seconds
  use_s3
  bench_once "postgres://postgres@127.0.0.1:5432/postgres" "v2, plain PostgreSQL, dataset on S3" v2
  use_folder
  figure "v2, plain PostgreSQL: time with the dataset on S3 / in a folder (goal <= 1.2)" \
    "$(python3 -c "print(f'{$seconds / $folder_seconds:.2f}')")"
fi
# The same on TimescaleDB (a hypertable with 1-day chunks), where ../shared provides it.
timescale=$("$(dirname "$0")/ensure-timescaledb.sh")
if [ -n "$timescale" ]; then
  for version in v1 v2; do
    bench_once "$timescale" "$version, TimescaleDB (${timescale#postgres://postgres@})" $version
  done
fi

# A backlog BENCH_LARGE_EVENTS (1,000,000) long: v1 on plain PostgreSQL again, its throughput
# and peak RSS against the run of BENCH_EVENTS above (neither may depend on the backlog).
# BENCH_LARGE_EVENTS=0 skips it.
large=${BENCH_LARGE_EVENTS:-1000000}
if [ "$large" -gt 0 ]; then
  kill "$EMULATOR_PID" 2>/dev/null || true
  wait "$EMULATOR_PID" 2>/dev/null || true
  start_emulator "$(dirname "$bin")/cfaudit-emulator" "$port" "$large" "$out/emulator.log" \
    --v2-page-cap 1000 "${emulator_limit[@]}"
  small=$events events=$large
  bench_once "postgres://postgres@127.0.0.1:5432/postgres" "v1, plain PostgreSQL, $large events" v1
  events=$small
  figure "v1, plain PostgreSQL: throughput with $large events against $events (goal >= 0.9)" \
    "$(python3 -c "print(f'{($large / $seconds) / ($events / $v1_seconds):.2f}')")"
  figure "v1, plain PostgreSQL: peak RSS with $large events against $events, MiB" \
    "$(python3 -c "print(f'{$rss_kb / 1024:.1f} / {$v1_rss_kb / 1024:.1f}')")"
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
    --extra-accounts $(($1 - 1)) --v2-events 1 "${emulator_limit[@]}"
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
python3 - "$out/summary.json" "$elapsed" "$rss_kb" "$accounts" "$account_events" "$figures" <<'PY'
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
with open(sys.argv[6], "a") as figures:
    figures.write(f"{accounts} accounts x {each} events, one process: events/s\t{rows / seconds:,.0f}\n")
    figures.write(f"{accounts} accounts x {each} events, one process: peak RSS, MiB\t{rss_kb / 1024:.1f}\n")
PY

# An idle service: its accounts' backlogs are behind INITIAL_CHECKPOINT (now), so each sweep
# finds nothing new; RSS after 30 s of sweeps every 5 s, and the share of a core it used
# between 10 s and 30 s (after start-up), from /proc.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
idle_rss() {
  local n=$1 pid kb ticks
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
  rm -rf "$out/parquet" "$out/parquet.staging"
  "$bin" migrate
  CLOUDFLARE_ACCOUNT_IDS=$(first_accounts "$n") INITIAL_CHECKPOINT=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
    POLL_INTERVAL_SECONDS=5 METRICS_ADDR=127.0.0.1:0 "$bin" run >"$out/idle.log" 2>&1 &
  pid=$!
  sleep 10
  ticks=$(cpu_ticks "$pid")
  sleep 20
  kb=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  ticks=$(($(cpu_ticks "$pid") - ticks))
  kill -TERM "$pid"
  wait "$pid" || true
  echo "$kb $ticks"
}
accounts_emulator "$idle_accounts" 10
read -r one one_ticks < <(idle_rss 1)
read -r many many_ticks < <(idle_rss "$idle_accounts")
python3 - "$one" "$many" "$idle_accounts" "$one_ticks" "$many_ticks" "$(getconf CLK_TCK)" "$figures" <<'PY'
import sys
one, many, n, one_ticks, many_ticks, hz = (int(x) for x in sys.argv[1:7])
cpu = lambda ticks: 100 * ticks / hz / 20
print(f"== idle service (live, nothing new), v1, plain PostgreSQL")
print(f"RSS with 1 account:    {one / 1024:.1f} MiB   CPU {cpu(one_ticks):.2f} % of a core")
print(f"RSS with {n} accounts:  {many / 1024:.1f} MiB   ({(many - one) / (n - 1):.0f} KiB per further account)   CPU {cpu(many_ticks):.2f} % of a core")
with open(sys.argv[7], "a") as figures:
    figures.write(f"idle, 1 account: RSS, MiB (goal < 20)\t{one / 1024:.1f}\n")
    figures.write(f"idle, 1 account: CPU, % of a core (goal < 0.5)\t{cpu(one_ticks):.2f}\n")
    figures.write(f"idle, {n} accounts: RSS, MiB\t{many / 1024:.1f}\n")
    figures.write(f"idle, {n} accounts: CPU, % of a core\t{cpu(many_ticks):.2f}\n")
PY

echo
echo "| figure ($(date -u +%Y-%m-%d), $(nproc) cores, BENCH_EVENTS=$events$([ -n "${BENCH_S3:-}" ] && echo ", S3")) | value |"
echo "|---|---:|"
awk -F'\t' '{printf "| %s | %s |\n", $1, $2}' "$figures"
