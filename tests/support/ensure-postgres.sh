#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with trust auth for user postgres:
# uses the one that runs, starts an installed cluster, or installs one from the distribution.
set -euo pipefail

ready() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
can_login() { psql -h 127.0.0.1 -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; }

if ! command -v pg_isready >/dev/null 2>&1; then
  echo "ensure-postgres: installing PostgreSQL" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq postgresql >/dev/null
fi

if ! ready; then
  for conf in /etc/postgresql/*/main; do
    [ -d "$conf" ] || continue
    version=$(basename "$(dirname "$conf")")
    echo "ensure-postgres: starting cluster $version/main" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
fi

for _ in $(seq 1 60); do ready && break; sleep 0.5; done
ready || { echo "ensure-postgres: PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }

if ! can_login; then
  # A fresh distribution install asks for passwords on TCP: trust local TCP logins, as the
  # tests and the demo expect (this is a development/CI machine, never production).
  hba=$(su postgres -c "psql -tAc 'SHOW hba_file'")
  sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  su postgres -c "psql -tAc 'SELECT pg_reload_conf()'" >/dev/null
  sleep 1
fi
can_login || { echo "ensure-postgres: cannot log in as postgres on 127.0.0.1:5432" >&2; exit 1; }
echo "ensure-postgres: PostgreSQL ready on 127.0.0.1:5432" >&2
