#!/usr/bin/env bash
# Creates .venv with the independent Parquet readers (pyarrow, DuckDB) if it is missing.
set -euo pipefail
venv=${1:-.venv}
if "$venv/bin/python" -c 'import pyarrow, duckdb' >/dev/null 2>&1; then
  exit 0
fi
echo "ensure-python: creating $venv with pyarrow and duckdb" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check pyarrow duckdb
"$venv/bin/python" -c 'import pyarrow, duckdb'
