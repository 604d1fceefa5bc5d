#!/usr/bin/env bash
# Starts the TimescaleDB cluster of ../shared/tools/timescaledb (127.0.0.1:5440) and prints its
# admin URL on stdout, for CFAUDIT_TEST_TIMESCALE_URL. Where the archive is absent (a clone
# without ../shared) it prints nothing and says loudly that TimescaleDB will not be tested;
# with CFAUDIT_REQUIRE_TIMESCALEDB=1 (CI) that, or a cluster that does not start, fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
install="$root/../shared/tools/timescaledb/install.sh"
port=${CFAUDIT_TIMESCALE_PORT:-5440}
if [ ! -x "$install" ]; then
  echo "ensure-timescaledb: WARNING: $install is absent: TimescaleDB will NOT be tested" >&2
  if [ "${CFAUDIT_REQUIRE_TIMESCALEDB:-}" = 1 ]; then
    echo "ensure-timescaledb: CFAUDIT_REQUIRE_TIMESCALEDB=1: failing" >&2
    exit 1
  fi
  exit 0
fi
"$install" --cluster "$port" >&2
for _ in $(seq 1 60); do
  pg_isready -h 127.0.0.1 -p "$port" -q 2>/dev/null && break
  sleep 0.5
done
url="postgres://postgres@127.0.0.1:$port/postgres"
if ! psql "$url" -tAc "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'" | grep -q 1; then
  echo "ensure-timescaledb: the cluster on $port answers without TimescaleDB" >&2
  exit 1
fi
echo "ensure-timescaledb: TimescaleDB ready on 127.0.0.1:$port" >&2
echo "$url"
