#!/usr/bin/env python3
"""Independent reader of the Parquet dataset: reads it with pyarrow AND DuckDB (hive
partitioning) and prints one JSON line of counts, so the Rust tests compare sinks by counting.

usage: parquet_check.py DATASET_ROOT [STAGING_DIR]
"""
import glob
import json
import os
import sys

import duckdb
import pyarrow.dataset as ds

root = sys.argv[1]
staging = sys.argv[2] if len(sys.argv) > 2 else root.rstrip("/") + ".staging"
files = glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)
out = {"files": len(files), "staged_orphans": len(glob.glob(os.path.join(staging, "*")))}
if files:
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    ids = table.column("event_id").to_pylist()
    out["pyarrow_rows"] = table.num_rows
    out["pyarrow_distinct_ids"] = len(set(ids))
    out["schema"] = {f.name: str(f.type) for f in table.schema}
    con = duckdb.connect()
    rows, distinct, bad_partition = con.execute(
        "SELECT count(*), count(DISTINCT event_id), "
        "count(*) FILTER (WHERE year <> year(timestamp AT TIME ZONE 'UTC') OR month <> month(timestamp AT TIME ZONE 'UTC') "
        "  OR day <> day(timestamp AT TIME ZONE 'UTC') OR hour <> hour(timestamp AT TIME ZONE 'UTC')) "
        "FROM read_parquet(?, hive_partitioning = true)",
        [os.path.join(root, "**", "*.parquet")],
    ).fetchone()
    out["duckdb_rows"] = rows
    out["duckdb_distinct_ids"] = distinct
    out["rows_in_wrong_partition"] = bad_partition
    out["ids"] = sorted(set(ids)) if os.environ.get("PARQUET_CHECK_IDS") else None
    codec = {
        table_file.metadata.row_group(0).column(0).compression
        for table_file in (ds.dataset(f, format="parquet").get_fragments().__next__() for f in files[:5])
    }
    out["compression"] = sorted(codec)
else:
    out.update(pyarrow_rows=0, pyarrow_distinct_ids=0, duckdb_rows=0, duckdb_distinct_ids=0, rows_in_wrong_partition=0, ids=[] if os.environ.get("PARQUET_CHECK_IDS") else None)
print(json.dumps(out))
