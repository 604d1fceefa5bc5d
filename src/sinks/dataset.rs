//! The Parquet dataset's rows: one schema, how rows are written in it and read back from it.
//! The writer (`lake.rs`) and `cfaudit replay` both go through here.
//!
//! The columns of the original spec come first, then those added for the v2 API, at the end:
//! a file written before them holds a prefix of today's schema, and a reader that merges
//! schemas by name (DuckDB `union_by_name`, pyarrow `unify_schemas`, Spark `mergeSchema`)
//! reads old and new files together, the new columns null in the old (all v1) rows.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, RecordBatch, StringArray, TimestampNanosecondArray,
};
use arrow::datatypes::{
    DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit, TimestampNanosecondType,
};
use cfaudit_actors::{ApiVersion, AuditRow, EventDetail};
use chrono::{DateTime, Utc};

/// How one text column of [`EventDetail`] is read.
pub type DetailField = fn(&EventDetail) -> Option<&str>;
/// How one text column of [`EventDetail`] is filled when a file is read back.
pub type DetailSetter = fn(&mut EventDetail, Option<String>);

/// The text columns of [`EventDetail`], in the order of the Parquet schema and of the
/// `audit_logs` insert, with how to read and fill them.
pub const DETAIL_TEXT: [(&str, DetailField, DetailSetter); 13] = [
    ("actor_id", |d| d.actor_id.as_deref(), |d, v| d.actor_id = v),
    (
        "actor_context",
        |d| d.actor_context.as_deref(),
        |d, v| d.actor_context = v,
    ),
    (
        "actor_token_id",
        |d| d.actor_token_id.as_deref(),
        |d, v| d.actor_token_id = v,
    ),
    (
        "actor_token_name",
        |d| d.actor_token_name.as_deref(),
        |d, v| d.actor_token_name = v,
    ),
    (
        "action_description",
        |d| d.action_description.as_deref(),
        |d, v| d.action_description = v,
    ),
    (
        "resource_product",
        |d| d.resource_product.as_deref(),
        |d, v| d.resource_product = v,
    ),
    (
        "resource_scope",
        |d| d.resource_scope.as_deref(),
        |d, v| d.resource_scope = v,
    ),
    ("zone_id", |d| d.zone_id.as_deref(), |d, v| d.zone_id = v),
    (
        "zone_name",
        |d| d.zone_name.as_deref(),
        |d, v| d.zone_name = v,
    ),
    (
        "raw_method",
        |d| d.raw_method.as_deref(),
        |d, v| d.raw_method = v,
    ),
    ("raw_uri", |d| d.raw_uri.as_deref(), |d, v| d.raw_uri = v),
    (
        "raw_cf_ray_id",
        |d| d.raw_cf_ray_id.as_deref(),
        |d, v| d.raw_cf_ray_id = v,
    ),
    (
        "raw_user_agent",
        |d| d.raw_user_agent.as_deref(),
        |d, v| d.raw_user_agent = v,
    ),
];

/// The text columns whose every value is its own (one event's): a dictionary of them only
/// costs the writer hashing every value, and the file a dictionary as large as the column.
pub const DISTINCT_TEXT: [&str; 4] = ["event_id", "metadata", "raw_event", "raw_cf_ray_id"];

/// The Parquet schema of the original spec plus `raw_event` (replay needs it), then the
/// columns of both API versions.
pub fn schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    let mut fields = vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("timestamp", ts(), false),
        text("account_id"),
        text("actor_email"),
        text("actor_type"),
        text("action_type"),
        text("action_result"),
        text("resource_type"),
        text("resource_id"),
        text("ip_address"),
        text("metadata"),
        text("raw_event"),
        Field::new("ingestion_time", ts(), true),
        // Nullable in the schema only so that it merges with files from before it: written
        // in every row.
        text("api_version"),
    ];
    fields.extend(DETAIL_TEXT.iter().map(|(name, _, _)| text(name)));
    fields.push(Field::new("raw_status_code", DataType::Int32, true));
    Arc::new(Schema::new(fields))
}

fn nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// The rows as one Arrow batch in the dataset schema.
pub fn record_batch(rows: &[&AuditRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let text = |f: &dyn Fn(&AuditRow) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(|r| f(r)).collect::<StringArray>())
    };
    let ts = |f: fn(&AuditRow) -> DateTime<Utc>| -> ArrayRef {
        Arc::new(
            TimestampNanosecondArray::from(rows.iter().map(|r| nanos(f(r))).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    };
    let ips: ArrayRef = Arc::new(
        rows.iter()
            .map(|r| r.ip_address.map(|ip| ip.to_string()))
            .collect::<StringArray>(),
    );
    let mut columns = vec![
        text(&|r| Some(&r.event_id)),
        ts(|r| r.timestamp),
        text(&|r| Some(&r.account_id)),
        text(&|r| r.actor_email.as_deref()),
        text(&|r| r.actor_type.as_deref()),
        text(&|r| r.action_type.as_deref()),
        text(&|r| r.action_result.as_deref()),
        text(&|r| r.resource_type.as_deref()),
        text(&|r| r.resource_id.as_deref()),
        ips,
        text(&|r| r.metadata.as_deref()),
        text(&|r| Some(&r.raw_event)),
        ts(|r| r.ingestion_time),
        text(&|r| Some(r.api_version.as_str())),
    ];
    for (_, field, _) in DETAIL_TEXT {
        columns.push(text(&|r| field(&r.detail)));
    }
    columns.push(Arc::new(
        rows.iter()
            .map(|r| r.detail.raw_status_code)
            .collect::<Int32Array>(),
    ));
    RecordBatch::try_new(schema(), columns)
}

/// The rows of one batch as [`record_batch`] wrote them, or as a file from before the v2
/// columns holds them (those are then v1 rows with no detail beyond the original columns).
pub fn rows_from(batch: &RecordBatch) -> Result<Vec<AuditRow>, String> {
    let text = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| format!("column {name} is missing or not a string"))
    };
    // A column added with the v2 API: absent from older files.
    let added_text = |name: &str| match batch.column_by_name(name) {
        None => Ok(None),
        Some(column) => column
            .as_string_opt::<i32>()
            .map(Some)
            .ok_or_else(|| format!("column {name} is not a string")),
    };
    let time = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
            .ok_or_else(|| format!("column {name} is missing or not a timestamp"))
    };
    let (event_id, account_id, raw_event) =
        (text("event_id")?, text("account_id")?, text("raw_event")?);
    let (actor_email, actor_type, action_type) = (
        text("actor_email")?,
        text("actor_type")?,
        text("action_type")?,
    );
    let (action_result, resource_type, resource_id) = (
        text("action_result")?,
        text("resource_type")?,
        text("resource_id")?,
    );
    let (ip_address, metadata) = (text("ip_address")?, text("metadata")?);
    let (timestamp, ingestion_time) = (time("timestamp")?, time("ingestion_time")?);
    let api_version = added_text("api_version")?;
    let detail: Vec<Option<&StringArray>> = DETAIL_TEXT
        .iter()
        .map(|(name, _, _)| added_text(name))
        .collect::<Result<_, _>>()?;
    let status = match batch.column_by_name("raw_status_code") {
        None => None,
        Some(column) => Some(
            column
                .as_primitive_opt::<Int32Type>()
                .ok_or("column raw_status_code is not a 32-bit integer")?,
        ),
    };
    let opt =
        |column: &StringArray, i: usize| (!column.is_null(i)).then(|| column.value(i).to_owned());
    let added = |column: Option<&StringArray>, i: usize| column.and_then(|c| opt(c, i));
    let at = |nanos: i64| DateTime::<Utc>::from_timestamp_nanos(nanos);
    (0..batch.num_rows())
        .map(|i| {
            let version = match added(api_version, i) {
                None => ApiVersion::V1,
                Some(text) => ApiVersion::parse(&text)
                    .ok_or_else(|| format!("api_version {text:?} is neither v1 nor v2"))?,
            };
            let mut detail_of_row = EventDetail {
                raw_status_code: status.and_then(|s| (!s.is_null(i)).then(|| s.value(i))),
                ..EventDetail::default()
            };
            for ((_, _, set), column) in DETAIL_TEXT.iter().zip(&detail) {
                set(&mut detail_of_row, added(*column, i));
            }
            Ok(AuditRow {
                event_id: event_id.value(i).to_owned(),
                timestamp: at(timestamp.value(i)),
                account_id: account_id.value(i).to_owned(),
                api_version: version,
                actor_email: opt(actor_email, i),
                actor_type: opt(actor_type, i),
                action_type: opt(action_type, i),
                action_result: opt(action_result, i),
                resource_type: opt(resource_type, i),
                resource_id: opt(resource_id, i),
                ip_address: opt(ip_address, i).and_then(|ip| ip.parse().ok()),
                metadata: opt(metadata, i),
                detail: detail_of_row,
                raw_event: Arc::from(raw_event.value(i)),
                ingestion_time: if ingestion_time.is_null(i) {
                    Utc::now()
                } else {
                    at(ingestion_time.value(i))
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfaudit_actors::mapping::{map_v1, map_v2};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// Every column of a v1 and a v2 row survives the round trip through Arrow.
    #[test]
    fn rows_of_both_versions_read_back_as_written() {
        let v1 = map_v1(
            r#"{"id":"a","when":"2026-05-01T09:00:00.123456Z","actor":{"id":"u1","email":"a@b.c","ip":"::1","type":"user"},"metadata":{"zone_name":"example.com"},"action":{"type":"add","result":true}}"#,
            "acc",
            now(),
        )
        .unwrap();
        let v2 = map_v2(
            r#"{"id":"b","action":{"time":"2026-05-01T09:30:00Z","type":"create","result":"success","description":"Add Member"},"actor":{"id":"u2","context":"api_token","token_id":"t1","token_name":"ci","ip_address":"198.51.100.7","type":"user","email":"x@y.z"},"resource":{"id":"r","type":"member","product":"members","scope":"accounts"},"zone":{"id":"z1","name":"example.org"},"raw":{"method":"POST","uri":"/accounts/acc/members","status_code":200,"cf_ray_id":"8e9b","user_agent":"curl/8"}}"#,
            "acc",
            now(),
        )
        .unwrap();
        let batch = record_batch(&[&v1, &v2]).unwrap();
        assert_eq!(rows_from(&batch).unwrap(), vec![v1, v2]);
    }

    /// The writer's per-column settings name columns by text, and a name that is not one is
    /// silently ignored: each of these must be a text column of the schema.
    #[test]
    fn the_columns_without_a_dictionary_are_text_columns_of_the_schema() {
        let schema = schema();
        for name in DISTINCT_TEXT {
            let field = schema
                .field_with_name(name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(field.data_type(), &DataType::Utf8, "{name}");
        }
    }

    /// A file from before the v2 columns: its rows are v1 rows, the added columns empty.
    #[test]
    fn a_batch_without_the_added_columns_reads_as_v1() {
        let v1 = map_v1(
            r#"{"id":"a","when":"2026-05-01T09:00:00Z","actor":{"id":"u1"}}"#,
            "acc",
            now(),
        )
        .unwrap();
        let batch = record_batch(&[&v1]).unwrap();
        let original = batch.project(&(0..13).collect::<Vec<_>>()).unwrap();
        assert_eq!(original.schema().fields().len(), 13);
        let read = rows_from(&original).unwrap();
        assert_eq!(read[0].api_version, ApiVersion::V1);
        assert_eq!(read[0].detail, EventDetail::default());
        assert_eq!(read[0].event_id, "a");
    }
}
