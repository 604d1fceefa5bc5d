//! `cfaudit replay`: rebuild `audit_logs` from the Parquet dataset. Every row goes through the
//! same idempotent insert as the pipeline (keyed on the primary key; a row already there only takes
//! the file's `ingestion_time`), so replaying into an empty table, a partial one or a full one gives
//! each event exactly once.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampNanosecondType;
use cfaudit_actors::{AuditRow, RowSink};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use crate::config::Config;
use crate::lake::ParquetLake;
use crate::postgres::Postgres;

#[derive(Debug, Default, Serialize)]
pub struct ReplaySummary {
    pub files: u64,
    pub rows_read: u64,
    pub inserted: u64,
    pub already_present: u64,
}

pub async fn replay(config: &Config) -> anyhow::Result<ReplaySummary> {
    let postgres = Postgres::connect(&config.database_url, 2, None).await?;
    postgres.migrate().await?;
    let lake = ParquetLake::open(&config.parquet_url, &config.storage_options)?;
    let mut summary = ReplaySummary::default();
    let mut span: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
    let files: Vec<_> = lake
        .store()
        .list(Some(lake.dataset_root()))
        .try_collect()
        .await
        .map_err(|e| anyhow::anyhow!("listing the dataset: {e}"))?;
    for file in files
        .iter()
        .filter(|f| f.location.as_ref().ends_with(".parquet"))
    {
        let bytes = lake.store().get(&file.location).await?.bytes().await?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.with_batch_size(10_000).build())
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.location))?;
        for batch in reader {
            let rows = rows_of(&batch.map_err(|e| anyhow::anyhow!("{}: {e}", file.location))?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.location))?;
            let report = postgres
                .write_rows(None, &rows)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for row in &rows {
                span = Some(span.map_or((row.timestamp, row.timestamp), |(a, b)| {
                    (a.min(row.timestamp), b.max(row.timestamp))
                }));
            }
            summary.rows_read += rows.len() as u64;
            summary.inserted += report.inserted;
            summary.already_present += report.duplicates;
        }
        summary.files += 1;
    }
    if let Some((first, last)) = span {
        postgres.refresh_aggregates(first, last).await;
    }
    Ok(summary)
}

/// The rows of one batch in the dataset schema (see `lake::schema`).
fn rows_of(batch: &RecordBatch) -> Result<Vec<AuditRow>, String> {
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
