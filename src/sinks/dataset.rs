//! The Parquet dataset's rows: one schema, how rows are written in it and read back from it.
//! The writer (`lake.rs`) and `cfaudit replay` both go through here.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampNanosecondType};
use cfaudit_actors::AuditRow;
use chrono::{DateTime, Utc};

/// The Parquet schema of the original spec, plus `raw_event` (replay needs it).
pub fn schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
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
    ]))
}

fn nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// The rows as one Arrow batch in the dataset schema.
pub fn record_batch(rows: &[&AuditRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let text = |f: fn(&AuditRow) -> Option<&str>| -> ArrayRef {
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
    RecordBatch::try_new(
        schema(),
        vec![
            text(|r| Some(&r.event_id)),
            ts(|r| r.timestamp),
            text(|r| Some(&r.account_id)),
            text(|r| r.actor_email.as_deref()),
            text(|r| r.actor_type.as_deref()),
            text(|r| r.action_type.as_deref()),
            text(|r| r.action_result.as_deref()),
            text(|r| r.resource_type.as_deref()),
            text(|r| r.resource_id.as_deref()),
            ips,
            text(|r| r.metadata.as_deref()),
            text(|r| Some(&r.raw_event)),
            ts(|r| r.ingestion_time),
        ],
    )
}

/// The rows of one batch in the dataset schema, as [`record_batch`] wrote them.
pub fn rows_from(batch: &RecordBatch) -> Result<Vec<AuditRow>, String> {
    let text = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| format!("column {name} is missing or not a string"))
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
    let opt = |column: &arrow::array::StringArray, i: usize| {
        (!column.is_null(i)).then(|| column.value(i).to_owned())
    };
    let at = |nanos: i64| DateTime::<Utc>::from_timestamp_nanos(nanos);
    Ok((0..batch.num_rows())
        .map(|i| AuditRow {
            event_id: event_id.value(i).to_owned(),
            timestamp: at(timestamp.value(i)),
            account_id: account_id.value(i).to_owned(),
            actor_email: opt(actor_email, i),
            actor_type: opt(actor_type, i),
            action_type: opt(action_type, i),
            action_result: opt(action_result, i),
            resource_type: opt(resource_type, i),
            resource_id: opt(resource_id, i),
            ip_address: opt(ip_address, i).and_then(|ip| ip.parse().ok()),
            metadata: opt(metadata, i),
            raw_event: Arc::from(raw_event.value(i)),
            ingestion_time: if ingestion_time.is_null(i) {
                Utc::now()
            } else {
                at(ingestion_time.value(i))
            },
        })
        .collect())
}
