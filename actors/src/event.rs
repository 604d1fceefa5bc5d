//! The data that flows through the pipeline: raw events as received, mapped rows, dead letters.

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

/// One event exactly as the API sent it: the bytes are kept so `raw_event` is what Cloudflare
/// returned, unknown keys, key order and number formatting included.
pub type RawEvent = Box<RawValue>;

/// Which Cloudflare audit-log API an event came from. The two are different record sets
/// (different ids for the same action; logins only in v2), collected side by side.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    /// `/accounts/{id}/audit_logs`: page numbers, the time in `when`.
    #[default]
    V1,
    /// `/accounts/{id}/logs/audit`: cursors, the time in `action.time`.
    V2,
}

impl ApiVersion {
    /// As stored in the `api_version` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V2 => "v2",
        }
    }

    pub fn parse(text: &str) -> Option<ApiVersion> {
        match text {
            "v1" => Some(ApiVersion::V1),
            "v2" => Some(ApiVersion::V2),
            _ => None,
        }
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `audit_logs` row. Both sinks write exactly these values. The core columns mean the same
/// for both API versions; a field only one version has is `None` in the other's rows.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRow {
    pub event_id: String,
    /// The event's time (v1 `when`, v2 `action.time`), normalised to UTC and truncated to
    /// microseconds (PostgreSQL's precision), so both sinks and the checkpoint agree on one value.
    pub timestamp: DateTime<Utc>,
    pub account_id: String,
    pub api_version: ApiVersion,
    pub actor_email: Option<String>,
    pub actor_type: Option<String>,
    pub action_type: Option<String>,
    pub action_result: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// v1 `actor.ip`, v2 `actor.ip_address`.
    pub ip_address: Option<IpAddr>,
    /// v1 `metadata` as compact JSON text; `None` when absent or JSON `null`, and for v2.
    pub metadata: Option<String>,
    pub detail: EventDetail,
    /// The whole event as received.
    pub raw_event: Arc<str>,
    pub ingestion_time: DateTime<Utc>,
}

/// The fields an investigator filters on beyond the core columns: v2's, and those v1 has too
/// (`actor.id`; the zone named in `metadata.zone_name`) in the same columns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventDetail {
    pub actor_id: Option<String>,
    /// How the actor acted: `dash`, `api_token`, `api_key`, `oauth`, … (v2).
    pub actor_context: Option<String>,
    pub actor_token_id: Option<String>,
    pub actor_token_name: Option<String>,
    pub action_description: Option<String>,
    pub resource_product: Option<String>,
    /// A string (`accounts`, `zones`, …) or, as the API may send it, compact JSON.
    pub resource_scope: Option<String>,
    pub zone_id: Option<String>,
    pub zone_name: Option<String>,
    /// The HTTP request behind the event (v2 `raw`).
    pub raw_method: Option<String>,
    pub raw_uri: Option<String>,
    pub raw_status_code: Option<i32>,
    pub raw_cf_ray_id: Option<String>,
    pub raw_user_agent: Option<String>,
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
