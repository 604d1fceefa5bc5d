//! The data that flows through the pipeline: raw events as received, mapped rows, dead letters.

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

/// One event exactly as the API sent it: the bytes are kept so `raw_event` is what Cloudflare
/// returned, unknown keys, key order and number formatting included.
pub type RawEvent = Box<RawValue>;

/// One `audit_logs` row. Both sinks write exactly these values.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRow {
    pub event_id: String,
    /// The event's `when`, normalised to UTC and truncated to microseconds (PostgreSQL's
    /// precision), so both sinks and the checkpoint agree on one value.
    pub timestamp: DateTime<Utc>,
    pub account_id: String,
    pub actor_email: Option<String>,
    pub actor_type: Option<String>,
    pub action_type: Option<String>,
    pub action_result: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub ip_address: Option<IpAddr>,
    /// `metadata` as compact JSON text; `None` when absent or JSON `null`.
    pub metadata: Option<String>,
    /// The whole event as received.
    pub raw_event: Arc<str>,
    pub ingestion_time: DateTime<Utc>,
}

/// An event that cannot become a row. It is stored with the reason and its exact bytes (even
/// when they are not valid UTF-8), counted, and the checkpoint moves past it: a bad event
/// never blocks the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub account_id: String,
    pub reason: String,
    pub raw_event: Vec<u8>,
    pub first_seen: DateTime<Utc>,
}

/// An event id with its time: how the dataset's event index knows an event.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SeenId {
    pub id: String,
    pub when: DateTime<Utc>,
}
