#!/usr/bin/env bash
# The query benchmark: BENCH_QUERY_ROWS (10,000,000) synthetic audit rows over 90 days (one
# account; 500 actors, skewed so that a few do most; 2,000 IP addresses, four per actor and one
# event in twenty from any; 50,000 resources; 300 zones), built
# reproducibly (every value a hash of the row number) in a database of its own on plain
# PostgreSQL and on TimescaleDB (where ../shared/tools/timescaledb provides it), with cfaudit's
# own migrations; then the typical audit questions and the dashboards' own queries (read from
# grafana/dashboards, Grafana's macros expanded), each the best of 5 after a warm-up, in ms.
#
#   tests/support/bench-queries.sh            build (once per size) and time
#   BENCH_QUERY_REBUILD=1 ...                 build again
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${CFAUDIT_BIN:-target/release/cfaudit}
rows=${BENCH_QUERY_ROWS:-10000000}
db=cfaudit_bench_queries
python=${CFAUDIT_PYTHON:-python3}
out=$(mktemp -d)
# Says which rows a database holds: changed whenever the generator below changes.
generator="bench-rows-4"
migrations=$(ls migrations | sed -n 's/^\([0-9]*\)_.*/\1/p' | sort | tail -1)
trap 'rm -rf "$out"' EXIT

# Builds the rows into $1's database (skipped when it holds this many already).
build() {
  local server=$1 url=$1/$db
  local have
  # Built already when it holds this many rows of this generator, ending less than a day ago
  # ("the last 24 h"), and its migrations are this checkout's.
  have=$(psql -X -At "$url" -c "SELECT count(*) || ' ' || (max(timestamp) > now() - interval '1 day') \
      || ' ' || obj_description('audit_logs'::regclass) || ' ' \
      || (SELECT max(version) FROM _sqlx_migrations) FROM audit_logs" 2>/dev/null || echo none)
  if [ "$have" = "$rows true $generator $migrations" ] && [ -z "${BENCH_QUERY_REBUILD:-}" ]; then
    echo "   $rows rows there already (BENCH_QUERY_REBUILD=1 builds them again)"
    return
  fi
  psql -X -q "$server/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  DATABASE_URL=$url CLOUDFLARE_API_TOKEN=unused CLOUDFLARE_ACCOUNT_ID=0123456789abcdef0123456789abcdef \
    PARQUET_URL=file://$out/lake LOG_FORMAT=text "$bin" migrate >/dev/null
  local started=$SECONDS chunk=1000000 lo=1
  # Rows end at the hour the build starts: "the last 7 days" are the newest rows.
  local anchor
  anchor=$(psql -X -At "$url" -c "SELECT date_trunc('hour', now())")
  while [ "$lo" -le "$rows" ]; do
    local hi=$((lo + chunk - 1))
    [ "$hi" -gt "$rows" ] && hi=$rows
    psql -X -q -v ON_ERROR_STOP=1 "$url" -v lo="$lo" -v hi="$hi" -v n="$rows" -v anchor="$anchor" <<'SQL'
INSERT INTO audit_logs (event_id, timestamp, account_id, actor_email, actor_type, action_type,
                        action_result, resource_type, resource_id, ip_address, metadata,
                        raw_event, ingestion_time, api_version, actor_id, zone_name)
SELECT 'bench-' || lpad(i::text, 9, '0'), at, '0123456789abcdef0123456789abcdef',
       'user' || actor || '@example.com',
       CASE WHEN actor % 10 = 9 THEN 'token' ELSE 'user' END,
       action, result, resource_type, resource_id, ip, metadata,
       jsonb_build_object('id', 'bench-' || lpad(i::text, 9, '0'), 'when', at,
         'action', jsonb_build_object('type', action, 'result', result = 'success', 'info', ''),
         'actor', jsonb_build_object('email', 'user' || actor || '@example.com', 'ip', host(ip),
                                     'type', 'user', 'id', md5(actor::text)),
         'resource', jsonb_build_object('type', resource_type, 'id', resource_id),
         'interface', 'API', 'metadata', metadata),
       at, 'v1', md5(actor::text), metadata ->> 'zone_name'
FROM generate_series(:lo::bigint, :hi::bigint) AS i,
LATERAL (SELECT abs(hashint8(i)) AS h1, abs(hashint8(i + 1000000000)) AS h2,
                abs(hashint8(i + 2000000000)) AS h3, abs(hashint8(i + 3000000000)) AS h4) AS hashes,
LATERAL (SELECT floor(500 * power((h1 % 1000000) / 1000000.0, 3))::int AS actor) AS who,
LATERAL (SELECT CASE WHEN h4 % 20 = 0 THEN (h4 / 20) % 2000
                     ELSE (who.actor * 4 + (h4 / 20) % 4) % 2000 END AS ip_n) AS addr,
LATERAL (SELECT
  :'anchor'::timestamptz - (i - 1) * (interval '90 days' / :n) AS at,
  (ARRAY['login','update','create','delete','rotate','purge','deploy','read'])[1 + h2 % 8] AS action,
  CASE WHEN h2 % 50 = 7 THEN 'failure' ELSE 'success' END AS result,
  (ARRAY['zone','dns_record','worker','firewall_rule','account','member'])[1 + (h2 / 8) % 6] AS resource_type,
  'res-' || lpad((h3 % 50000)::text, 5, '0') AS resource_id,
  -- 2,000 addresses; an actor works from its own four, one event in twenty from anywhere.
  ('10.' || ip_n / 250 || '.' || ip_n % 250 || '.1')::inet AS ip,
  jsonb_build_object('zone_name', 'zone-' || (h3 / 50000) % 300 || '.example',
                     'reason', 'bench') AS metadata) AS v;
SQL
    printf '   %s of %s rows, %s s\n' "$hi" "$rows" $((SECONDS - started))
    lo=$((hi + 1))
  done
  # Every aggregate up to date over the whole range, as a long-running service has them
  # (TimescaleDB: their refresh policies cover the last days, cfaudit refreshes the rest;
  # plain PostgreSQL: cfaudit folds the days written into the daily aggregates).
  tests/support/refresh-aggregates.sh "$url"
  psql -X -q "$url" -c "VACUUM ANALYZE" -c "COMMENT ON TABLE audit_logs IS '$generator'"
  printf '   built in %s s; database %s\n' $((SECONDS - started)) \
    "$(psql -X -At "$url" -c "SELECT pg_size_pretty(pg_database_size(current_database()))")"
}

# Times every query on $1's database: one line of JSON per query, ms.
time_queries() {
  "$python" - "$1/$db" <<'PY'
import datetime, json, re, subprocess, sys
url = sys.argv[1]

def grafana(title, days):
    """A panel's SQL as Grafana sends it: the last `days`, every account and version, the
    range's ends as the literal timestamps Grafana's macros expand to."""
    until = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    since, until = (f"'{t.strftime('%Y-%m-%dT%H:%M:%SZ')}'"
                    for t in (until - datetime.timedelta(days=days), until))
    for panel in json.load(open("grafana/dashboards/audit-activity.json"))["panels"]:
        if panel.get("title") == title:
            sql = panel["targets"][0]["rawSql"]
            sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 BETWEEN {since} AND {until}", sql)
            sql = sql.replace("$__timeFrom()", since).replace("$__timeTo()", until)
            return sql.replace("$account", "'%'").replace("$version", "'v1','v2'")
    raise SystemExit(f"no panel {title!r}")

panels = [p["title"] for p in json.load(open("grafana/dashboards/audit-activity.json"))["panels"]
          if p.get("targets") and p["targets"][0].get("rawSql")]
queries = [
    ("one actor, last 7 days, newest 100",
     "SELECT * FROM audit_logs WHERE actor_email = 'user42@example.com' "
     "AND timestamp > now() - interval '7 days' ORDER BY timestamp DESC LIMIT 100"),
    ("one IP, last 30 days, newest 100",
     "SELECT * FROM audit_logs WHERE ip_address = '10.3.17.1' "
     "AND timestamp > now() - interval '30 days' ORDER BY timestamp DESC LIMIT 100"),
    ("one resource's history, newest 50",
     "SELECT * FROM audit_logs WHERE resource_id = 'res-01234' ORDER BY timestamp DESC LIMIT 50"),
    ("failed actions, last 24 h, newest 100",
     "SELECT * FROM audit_logs WHERE action_result IN ('false', 'failure') "
     "AND timestamp > now() - interval '24 hours' ORDER BY timestamp DESC LIMIT 100"),
    ("one zone, 30 days (count, zone_name)",
     "SELECT count(*) FROM audit_logs WHERE zone_name = 'zone-17.example' "
     "AND timestamp > now() - interval '30 days'"),
    ("one zone, 30 days, newest 100 (zone_name)",
     "SELECT * FROM audit_logs WHERE zone_name = 'zone-17.example' "
     "AND timestamp > now() - interval '30 days' ORDER BY timestamp DESC LIMIT 100"),
    ("one zone, 30 days (count, metadata @>, no index)",
     "SELECT count(*) FROM audit_logs WHERE metadata @> '{\"zone_name\": \"zone-17.example\"}' "
     "AND timestamp > now() - interval '30 days'"),
    ("events per day, 90 days",
     "SELECT date_trunc('day', bucket) AS day, sum(events) FROM audit_events_hourly "
     "WHERE bucket > now() - interval '90 days' GROUP BY 1 ORDER BY 1"),
] + [(f"dashboard: {title}, {days} days", grafana(title, days))
     for days in (7, 30) for title in panels]
for label, sql in queries:
    script = "\\timing on\n" + (sql.rstrip(";") + ";\n") * 6
    run = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", url],
                         input=script, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{label}: {run.stderr.strip()}")
    times = [float(t) for t in re.findall(r"Time: ([0-9.]+) ms", run.stdout)]
    print(json.dumps({"query": label, "ms": min(times[1:])}))
PY
}

timescale=$(tests/support/ensure-timescaledb.sh)
servers=("postgres://postgres@127.0.0.1:5432")
[ -n "$timescale" ] && servers+=("${timescale%/postgres}")
for server in "${servers[@]}"; do
  echo "== $rows rows on ${server#postgres://postgres@}"
  build "$server"
  time_queries "$server" > "$out/${server##*:}.jsonl"
done

"$python" - "$out" "${servers[@]}" <<'PY'
import json, sys
out, servers = sys.argv[1], sys.argv[2:]
columns = [json.loads(l) for s in servers for l in open(f"{out}/{s.rsplit(':', 1)[1]}.jsonl")]
names = ["plain PostgreSQL", "TimescaleDB"][: len(servers)]
rows = {}
for s, name in zip(servers, names):
    for line in open(f"{out}/{s.rsplit(':', 1)[1]}.jsonl"):
        q = json.loads(line)
        rows.setdefault(q["query"], {})[name] = q["ms"]
print()
print("| query (best of 5, warm, ms) | " + " | ".join(names) + " |")
print("|---|" + "---:|" * len(names))
for query, by in rows.items():
    cells = [f"{by[n]:,.1f}" + ("" if by[n] < 100 else " ✗") for n in names]
    print(f"| {query} | " + " | ".join(cells) + " |")
PY
