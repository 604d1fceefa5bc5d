#!/usr/bin/env python3
"""Independent reader of the Parquet dataset; prints one JSON line of counts so the Rust tests
compare the sinks by counting.

usage: parquet_check.py ROOT
  ROOT is a folder, or s3://bucket/prefix with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
  AWS_ENDPOINT_URL in the environment. PARQUET_CHECK_IDS=1 adds the sorted ids;
  PARQUET_CHECK_ROWS=1 adds every row, column by column, keyed by event id (timestamps as
  RFC 3339 with microseconds), for a comparison with the ground truth.

Local folders are read by pyarrow and, separately, by DuckDB (read_parquet, hive
partitioning). On S3, pyarrow lists and reads the bucket with its own S3 client; DuckDB's S3
support is an extension it downloads at run time, which this machine cannot fetch, so DuckDB
counts over the table pyarrow read. Staged files are looked for beside the root (ROOT.staging).
"""
import datetime
import json
import os
import sys

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs

root = sys.argv[1].rstrip("/")
if root.startswith("s3://"):
    scheme, host = os.environ["AWS_ENDPOINT_URL"].split("://", 1)
    filesystem = fs.S3FileSystem(
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=host,
        scheme=scheme,
        region=os.environ.get("AWS_REGION", "us-east-1"),
    )
    path = root[len("s3://"):]
else:
    filesystem, path = fs.LocalFileSystem(), root


def listing(prefix):
    selector = fs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return [i for i in filesystem.get_file_info(selector) if i.type == fs.FileType.File]


files = [i.path for i in listing(path) if i.path.endswith(".parquet")]
out = {
    "files": len(files),
    "other_objects": len([i for i in listing(path) if not i.path.endswith(".parquet")]),
    "staged_orphans": len(listing(path + ".staging")),
    "staged_names": [i.path.rsplit("/", 1)[-1] for i in listing(path + ".staging")][:5],
    "bytes": sum(i.size for i in listing(path)),
}
want_ids = bool(os.environ.get("PARQUET_CHECK_IDS"))
if files:
    # The listed files, not the prefix: no directory probe (s3s-fs answers a HEAD on a
    # "directory" key with 500).
    def open_dataset(schema=None):
        return ds.dataset(files, filesystem=filesystem, format="parquet", schema=schema,
                          partitioning=ds.partitioning(flavor="hive"), partition_base_dir=path)

    # Files from before the v2 columns hold a prefix of today's schema: merge the files'
    # schemas by name, as the README tells readers to.
    dataset = open_dataset()
    unified = pa.unify_schemas([dataset.schema] + [f.physical_schema for f in dataset.get_fragments()])
    dataset = open_dataset(unified)
    table = dataset.to_table()
    ids = table.column("event_id").to_pylist()
    out["pyarrow_rows"] = table.num_rows
    out["pyarrow_distinct_ids"] = len(set(ids))
    out["schema"] = {f.name: str(f.type) for f in table.schema}
    con = duckdb.connect()
    if root.startswith("s3://"):
        con.register("lake", table)
        source = "lake"
    else:
        source = ("read_parquet('" + os.path.join(path, "**", "*.parquet")
                  + "', hive_partitioning = true, union_by_name = true)")
    rows, distinct, misplaced = con.execute(
        "SELECT count(*), count(DISTINCT event_id), "
        "count(*) FILTER (WHERE year <> year(timestamp AT TIME ZONE 'UTC') OR month <> month(timestamp AT TIME ZONE 'UTC') "
        "  OR day <> day(timestamp AT TIME ZONE 'UTC') OR hour <> hour(timestamp AT TIME ZONE 'UTC')) "
        f"FROM {source}"
    ).fetchone()
    out["duckdb_rows"] = rows
    out["duckdb_distinct_ids"] = distinct
    out["rows_in_wrong_partition"] = misplaced
    out["ids"] = sorted(set(ids)) if want_ids else None
    if os.environ.get("PARQUET_CHECK_ROWS"):
        def stamp(nanos):
            # Microseconds, and any nanoseconds beyond them spelled out (a mismatch shows).
            if nanos is None:
                return None
            seconds, rest = divmod(nanos, 1_000_000_000)
            text = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            return f"{text}.{rest // 1000:06d}" + (f"{rest % 1000:03d}" if rest % 1000 else "") + "Z"

        columns = [f.name for f in table.schema if f.name not in ("year", "month", "day", "hour")]
        values = {}
        for c in columns:
            column = table.column(c)
            if pa.types.is_timestamp(column.type):
                values[c] = [stamp(v) for v in column.cast(pa.int64()).to_pylist()]
            else:
                values[c] = column.to_pylist()
        out["rows"] = {
            values["event_id"][i]: {c: values[c][i] for c in columns}
            for i in range(table.num_rows)
        }
    out["compression"] = sorted({
        fragment.metadata.row_group(0).column(0).compression
        for fragment in list(dataset.get_fragments())[:5]
    })
else:
    out.update(pyarrow_rows=0, pyarrow_distinct_ids=0, duckdb_rows=0, duckdb_distinct_ids=0,
               rows_in_wrong_partition=0, ids=[] if want_ids else None, compression=[])
print(json.dumps(out))
