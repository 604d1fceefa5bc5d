#!/usr/bin/env bash
# Refreshes every continuous aggregate of the TimescaleDB database at $1 over [beginning, $2)
# ($2: an SQL timestamp expression, default NULL: the end of the data), one CALL each (it
# refuses a transaction), in the order they were made: an aggregate on another after that one,
# as cfaudit refreshes them.
set -euo pipefail
url=$1 until=${2:-NULL}
psql -X -At "$url" -c "SELECT view_name FROM timescaledb_information.continuous_aggregates \
    ORDER BY substring(materialization_hypertable_name FROM '[0-9]+$')::int" |
  while read -r view; do
    psql -X -q "$url" -c "CALL refresh_continuous_aggregate('$view', NULL, $until)"
  done
