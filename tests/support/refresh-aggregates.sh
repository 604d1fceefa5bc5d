#!/usr/bin/env bash
# Brings the dashboards' aggregates of the database at $1 up to date, as cfaudit does behind
# its writers. TimescaleDB: refreshes every continuous aggregate over [beginning, $2) ($2: an
# SQL timestamp expression, default NULL: the end of the data), one CALL each (it refuses a
# transaction), in the order they were made: an aggregate on another after that one. Plain
# PostgreSQL: folds the days written since the last fold into the daily aggregates.
set -euo pipefail
url=$1 until=${2:-NULL}
if [ "$(psql -X -At "$url" -c "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")" != 1 ]; then
  psql -X -q -At "$url" -c "SELECT cfaudit_fold_days()" >/dev/null
  exit
fi
psql -X -At "$url" -c "SELECT view_name FROM timescaledb_information.continuous_aggregates \
    ORDER BY substring(materialization_hypertable_name FROM '[0-9]+$')::int" |
  while read -r view; do
    psql -X -q "$url" -c "CALL refresh_continuous_aggregate('$view', NULL, $until)"
  done
