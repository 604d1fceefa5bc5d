//! The Cloudflare audit-log client, v1 and v2: the real [`AuditSource`]. The same code talks
//! to the emulator; only the base URL differs. One client (one request budget) serves every
//! stream of its token, whatever the version.
//!
//! It classifies every answer and leaves retry decisions to the Poller. It
//! never needs `result_info`, accepts `errors: null`, absent `messages` and `result: null`,
//! and reads `Ratelimit` headers when present. It never follows a redirect (the credential
//! would go with it), reads at most `CLOUDFLARE_MAX_RESPONSE_BYTES` of a body, and a page one
//! of whose events is not valid JSON still yields the others (the bad one is dead-lettered).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cfaudit_actors::{
    ApiVersion, AuditSource, Metrics, Page, PageRequest, RawEvent, SourceError, UnreadableEvent,
};
use chrono::{DateTime, SecondsFormat, Utc};
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tracing::{info, warn};

use crate::settings::{CloudflareSettings, Credential, TokenAccounts};

/// Error codes that mean "this credential cannot read this account", or that there is no such
/// account (7000/7003: no route, e.g. a wrong account id): retrying soon cannot help.
const AUTH_CODES: &[i64] = &[
    6003, 6100, 6101, 6102, 6103, 6111, 7000, 7003, 9106, 9107, 9109, 9300, 10000,
];

pub struct CloudflareClient {
    http: reqwest::Client,
    base_url: String,
    credential: Credential,
    /// The token's label in metrics and logs (never the token).
    token: String,
    metrics: Arc<Metrics>,
    /// The client-side budget (GCRA): below Cloudflare's 1,200 requests per 5 minutes. This
    /// process's share of it: replaced when the number of replicas on the token changes.
    budget: Mutex<Arc<Budget>>,
    /// The token's budget (requests per 5 minutes, burst) and how many replicas share it.
    token_budget: (u32, u32),
    sharing: std::sync::atomic::AtomicU32,
    /// Set when a `Ratelimit` header said nothing is left: no request before this instant.
    paused_until: Mutex<Option<Instant>>,
    /// Requests wait for the budget in the order they ask (tokio's mutex is first come, first
    /// served): a stream working through a backlog, always asking again, cannot win every
    /// free slot against the live sweeps of the token's other accounts.
    queue: tokio::sync::Mutex<()>,
    /// The longest wait a server may impose through its headers.
    max_server_wait: Duration,
    /// Bodies longer than this are not read.
    max_response_bytes: u64,
    /// v2 filters, each a name (`action_type`, `actor_email.not`, …) and its values.
    v2_filters: Vec<(String, Vec<String>)>,
}

impl CloudflareClient {
    /// A client of the API with one credential (`token`, of [`CloudflareSettings::tokens`]),
    /// with that token's request budget.
    pub fn new(
        settings: &CloudflareSettings,
        token: &TokenAccounts,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        metrics
            .api_ratelimit_remaining
            .with_label_values(&[token.label.as_str()])
            .set(-1);
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("cfaudit/", env!("CARGO_PKG_VERSION")))
            // The API never redirects; following one would send the credential elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let token_budget = (settings.requests_per_5_minutes, settings.request_burst);
        Ok(CloudflareClient {
            http,
            base_url: settings.api_base_url.trim_end_matches('/').to_owned(),
            credential: token.credential.clone(),
            token: token.label.clone(),
            metrics,
            budget: Mutex::new(Arc::new(share_of(token_budget, 1))),
            token_budget,
            sharing: std::sync::atomic::AtomicU32::new(1),
            paused_until: Mutex::new(None),
            queue: tokio::sync::Mutex::new(()),
            max_server_wait: settings.max_retry_after,
            max_response_bytes: settings.max_response_bytes,
            v2_filters: settings.v2_filters.0.clone(),
        })
    }

    /// Waits for the budget, and for the reset announced by a `Ratelimit: …;r=0;t=N` header.
    async fn wait_for_budget(&self) {
        let paused_until = *self.paused_until.lock().unwrap();
        if let Some(until) = paused_until {
            let now = Instant::now();
            if until > now {
                tokio::time::sleep(until - now).await;
            }
        }
        let _turn = self.queue.lock().await;
        let budget = self.budget.lock().unwrap().clone();
        budget.until_ready().await;
    }

    /// Divides the token's request budget among `replicas` processes (at least one): each
    /// paces its requests at its share, so together they stay within the budget.
    pub fn share_budget(&self, replicas: u32) {
        use std::sync::atomic::Ordering;
        let replicas = replicas.max(1);
        if self.sharing.swap(replicas, Ordering::Relaxed) == replicas {
            return;
        }
        *self.budget.lock().unwrap() = Arc::new(share_of(self.token_budget, replicas));
        let (per_5_minutes, burst) = self.token_budget;
        info!(
            token = %self.token,
            replicas,
            requests_per_5_minutes = per_5_minutes / replicas,
            burst = (burst / replicas).max(1),
            "the token's request budget is shared by the replicas running"
        );
    }

    async fn request(
        &self,
        request: &PageRequest,
    ) -> Result<(StatusCode, HeaderMap, bytes::Bytes), SourceError> {
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut query: Vec<(&str, String)> = vec![
            ("since", time(request.since)),
            ("before", time(request.before)),
            ("direction", request.direction.as_str().to_owned()),
        ];
        let url = match request.api_version {
            ApiVersion::V1 => {
                query.push(("per_page", request.per_page.to_string()));
                query.push(("page", request.page.to_string()));
                if request.hide_user_logs {
                    query.push(("hide_user_logs", "true".to_owned()));
                }
                format!(
                    "{}/accounts/{}/audit_logs",
                    self.base_url, request.account_id
                )
            }
            ApiVersion::V2 => {
                query.push(("limit", request.per_page.to_string()));
                if let Some(cursor) = &request.cursor {
                    query.push(("cursor", cursor.clone()));
                }
                // Each value of a filter is a repeated key, as the API reads arrays.
                for (name, values) in &self.v2_filters {
                    query.extend(values.iter().map(|v| (name.as_str(), v.clone())));
                }
                format!(
                    "{}/accounts/{}/logs/audit",
                    self.base_url, request.account_id
                )
            }
        };
        self.send(&url, &query).await
    }

    /// One GET with the credential; the body read up to the size limit.
    async fn send(
        &self,
        url: &str,
        query: &[(&str, String)],
    ) -> Result<(StatusCode, HeaderMap, bytes::Bytes), SourceError> {
        let builder = self.http.get(url).query(query);
        let builder = match &self.credential {
            Credential::Token(token) => {
                builder.header(AUTHORIZATION, format!("Bearer {}", token.expose()))
            }
            Credential::Key { email, key } => builder
                .header("X-Auth-Email", email)
                .header("X-Auth-Key", key.expose()),
        };
        let response = builder
            .send()
            .await
            .map_err(|e| transport_error("request", e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let limit = self.max_response_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > limit)
        {
            return Err(SourceError::TooLarge { limit });
        }
        let mut body = bytes::BytesMut::new();
        let mut response = response;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error("response body", e))?
        {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(SourceError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, headers, body.freeze()))
    }

    fn observe(&self, started: Instant, class: &str, headers: Option<&HeaderMap>) {
        self.metrics
            .api_request_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.api_requests.with_label_values(&[class]).inc();
        if let Some((remaining, reset)) = headers.and_then(ratelimit) {
            self.metrics
                .api_ratelimit_remaining
                .with_label_values(&[self.token.as_str()])
                .set(remaining);
            if remaining <= 0 {
                // The window is used up: wait for its reset rather than earn a 5-minute block
                // (never longer than a server may impose).
                let wait = Duration::from_secs(reset.max(1)).min(self.max_server_wait);
                *self.paused_until.lock().unwrap() = Some(Instant::now() + wait);
            }
        }
    }
}

fn transport_error(stage: &str, error: reqwest::Error) -> SourceError {
    // without_url: the URL carries no secret, but keeps the message short.
    let kind = if error.is_timeout() {
        "timed out"
    } else {
        "failed"
    };
    SourceError::Transient(format!("{stage} {kind}: {}", error.without_url()))
}

#[async_trait]
impl AuditSource for CloudflareClient {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Page, SourceError> {
        self.wait_for_budget().await;
        let started = Instant::now();
        let (status, headers, body) = match self.request(request).await {
            Ok(answer) => answer,
            Err(error) => {
                self.observe(started, "error", None);
                return Err(error);
            }
        };
        self.observe(started, status_class(status), Some(&headers));
        classify(status, &headers, body.as_ref())
    }
}

/// A request budget on the standard monotonic clock. governor's default clock (quanta)
/// calibrates itself at its first use by reading the clock in a loop: about 0.2 s of CPU at
/// every start, on the way to the first request.
type Budget =
    RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>;

/// One of `replicas` equal shares of a budget of `per_5_minutes` requests and `burst`.
fn share_of((per_5_minutes, burst): (u32, u32), replicas: u32) -> Budget {
    let per_request = Duration::from_secs(300).div_f64(f64::from(per_5_minutes)) * replicas.max(1);
    let burst = NonZeroU32::new((burst / replicas.max(1)).max(1)).expect("at least one");
    RateLimiter::direct_with_clock(
        Quota::with_period(per_request)
            .expect("a positive period")
            .allow_burst(burst),
        MonotonicClock,
    )
}

/// `GET /accounts` is paged by number; past its last page some API versions repeat the last
/// one (or the first) for ever. At most this many pages of [`ACCOUNTS_PER_PAGE`] are read.
const MAX_ACCOUNT_PAGES: u32 = 200;
const ACCOUNTS_PER_PAGE: u32 = 50;

impl CloudflareClient {
    /// Every account the credential is a member of (`GET /accounts`), through the request
    /// budget. The listing ends on a short page; a page that repeats the one before it (the
    /// API's known pagination loop) ends it too, and more than [`MAX_ACCOUNT_PAGES`] pages is
    /// an error, never a loop.
    pub async fn list_accounts(&self) -> Result<Vec<String>, SourceError> {
        #[derive(Deserialize)]
        struct Account {
            id: String,
        }
        let url = format!("{}/accounts", self.base_url);
        let mut accounts: Vec<String> = Vec::new();
        let mut previous: Option<Vec<String>> = None;
        for page in 1..=MAX_ACCOUNT_PAGES {
            self.wait_for_budget().await;
            let started = Instant::now();
            let query = [
                ("page", page.to_string()),
                ("per_page", ACCOUNTS_PER_PAGE.to_string()),
            ];
            let (status, headers, body) = self.send(&url, &query).await?;
            self.observe(started, status_class(status), Some(&headers));
            let listed = classify(status, &headers, body.as_ref())?;
            let ids = listed
                .events
                .iter()
                .map(|raw| {
                    serde_json::from_str::<Account>(raw.get())
                        .map(|account| account.id)
                        .map_err(|e| {
                            SourceError::Transient(format!(
                                "GET /accounts: an account without an id: {e}"
                            ))
                        })
                })
                .collect::<Result<Vec<String>, SourceError>>()?;
            if previous.as_ref() == Some(&ids) && !ids.is_empty() {
                warn!(
                    page,
                    "GET /accounts repeated its previous page: the listing ends here"
                );
                return Ok(accounts);
            }
            let short = (ids.len() as u32) < ACCOUNTS_PER_PAGE;
            for id in &ids {
                if !accounts.contains(id) {
                    accounts.push(id.clone());
                }
            }
            if short {
                return Ok(accounts);
            }
            previous = Some(ids);
        }
        Err(SourceError::Transient(format!(
            "GET /accounts did not end within {MAX_ACCOUNT_PAGES} pages of {ACCOUNTS_PER_PAGE}: \
             the listing is not trusted; name the accounts in CLOUDFLARE_ACCOUNT_IDS"
        )))
    }
}

/// The `class` label of `cfaudit_api_requests_total`.
fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "429",
        s if s >= 500 => "5xx",
        s if s >= 400 => "4xx",
        s if s >= 300 => "3xx",
        _ => "2xx",
    }
}

#[derive(Deserialize)]
struct Envelope {
    success: Option<bool>,
    errors: Option<Value>,
    result: Option<Vec<RawEvent>>,
    /// v2: `{count, cursor}`; v1 has none, or a partial one. Read loosely: only the cursor
    /// matters.
    result_info: Option<Value>,
}

/// v2's next cursor: `result_info.cursor`, or `result_info.cursors.after` as one SDK reads
/// it; `None` when absent or empty (the last page).
fn next_cursor(result_info: Option<&Value>) -> Option<String> {
    let info = result_info?;
    [
        info.get("cursor"),
        info.get("cursors").and_then(|c| c.get("after")),
    ]
    .into_iter()
    .flatten()
    .find_map(|cursor| cursor.as_str().filter(|c| !c.is_empty()))
    .map(str::to_owned)
}

/// Turns one HTTP answer into a page or a classified error.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Result<Page, SourceError> {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(SourceError::RateLimited {
            retry_after: retry_after(headers),
        });
    }
    let errors = || errors_of(body);
    if status.is_server_error() {
        return Err(SourceError::Transient(format!(
            "HTTP {status}: {}",
            errors().0
        )));
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(SourceError::Auth(format!("HTTP {status}: {}", errors().0)));
    }
    if status.is_client_error() {
        let (summary, codes) = errors();
        if codes.iter().any(|c| AUTH_CODES.contains(c)) {
            return Err(SourceError::Auth(format!("HTTP {status}: {summary}")));
        }
        return Err(SourceError::BadRequest(format!("HTTP {status}: {summary}")));
    }
    if status.is_redirection() {
        let target = headers
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("(no location)");
        return Err(SourceError::Auth(format!(
            "HTTP {status}: the API redirects to {target}; cfaudit follows no redirect (the \
             credential would go along). Set CLOUDFLARE_API_BASE_URL to the API's own address"
        )));
    }
    if !status.is_success() {
        return Err(SourceError::Transient(format!("unexpected HTTP {status}")));
    }
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(envelope) => envelope,
        // One bad event must not block the page: a complete envelope whose `result` holds
        // an element that is not JSON yields the others, and that one as a dead letter.
        Err(error) => {
            return salvage(body).ok_or_else(|| {
                SourceError::Transient(format!(
                "HTTP {status} with a body that is not the audit-log envelope ({} bytes): {error}",
                body.len()
            ))
            })
        }
    };
    if envelope.success == Some(false) {
        let (summary, codes) = errors_of(body);
        if codes.iter().any(|c| AUTH_CODES.contains(c)) {
            return Err(SourceError::Auth(summary));
        }
        return Err(SourceError::Transient(format!(
            "success:false with HTTP {status}: {summary}"
        )));
    }
    let _ = envelope.errors; // tolerated in any shape, including null
    Ok(Page {
        next_cursor: next_cursor(envelope.result_info.as_ref()),
        ..Page::from(envelope.result.unwrap_or_default())
    })
}

/// The page of a body that does not parse as a whole: `None` unless it is a complete JSON
/// object (not a truncated one) with `"success"` not false and a `result` array, whose
/// elements are then read one by one.
fn salvage(body: &[u8]) -> Option<Page> {
    let shape = EnvelopeShape::scan(body)?;
    if shape.success == Some(false) {
        return None;
    }
    let mut page = Page {
        next_cursor: shape
            .result_info
            .and_then(|info| serde_json::from_slice::<Value>(info).ok())
            .and_then(|info| next_cursor(Some(&info))),
        ..Page::default()
    };
    for element in shape.result? {
        let bytes = element.trim_ascii();
        match serde_json::from_slice::<Box<RawValue>>(bytes) {
            Ok(event) => page.events.push(event),
            Err(error) => page.unreadable.push(UnreadableEvent {
                bytes: bytes.to_vec(),
                reason: error.to_string(),
            }),
        }
    }
    Some(page)
}

/// The top level of a JSON object read byte by byte, without decoding strings (so invalid
/// UTF-8 or a raw control character inside one does not stop it): the `success` literal and
/// the elements of the `result` array.
struct EnvelopeShape<'a> {
    success: Option<bool>,
    result: Option<Vec<&'a [u8]>>,
    result_info: Option<&'a [u8]>,
}

impl<'a> EnvelopeShape<'a> {
    fn scan(body: &'a [u8]) -> Option<EnvelopeShape<'a>> {
        let mut shape = EnvelopeShape {
            success: None,
            result: None,
            result_info: None,
        };
        let mut at = skip_space(body, 0);
        if body.get(at) != Some(&b'{') {
            return None;
        }
        at = skip_space(body, at + 1);
        if body.get(at) == Some(&b'}') {
            return (skip_space(body, at + 1) == body.len()).then_some(shape);
        }
        loop {
            let key_end = string_end(body, at)?;
            let key = &body[at + 1..key_end - 1];
            at = skip_space(body, key_end);
            if body.get(at) != Some(&b':') {
                return None;
            }
            at = skip_space(body, at + 1);
            let value_end = value_end(body, at)?;
            match key {
                b"success" => shape.success = Some(&body[at..value_end] == b"true"),
                b"result" if body[at] == b'[' => {
                    shape.result = Some(elements(&body[at..value_end])?)
                }
                b"result_info" => shape.result_info = Some(&body[at..value_end]),
                _ => {}
            }
            at = skip_space(body, value_end);
            match body.get(at)? {
                b',' => at = skip_space(body, at + 1),
                b'}' => break,
                _ => return None,
            }
        }
        (skip_space(body, at + 1) == body.len()).then_some(shape)
    }
}

fn skip_space(body: &[u8], mut at: usize) -> usize {
    while body.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// The end (exclusive) of the string starting at `at`.
fn string_end(body: &[u8], at: usize) -> Option<usize> {
    if body.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end (exclusive) of the value starting at `at`: a string, an object or array with
/// balanced brackets (strings skipped), or a literal up to the next delimiter.
fn value_end(body: &[u8], at: usize) -> Option<usize> {
    match body.get(at)? {
        b'"' => string_end(body, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while i < body.len() {
                match body[i] {
                    b'"' => {
                        i = string_end(body, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = body[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(body.len() - at);
            (len > 0).then_some(at + len)
        }
    }
}

/// The elements of an array (`[` … `]`) as byte slices.
fn elements(array: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut at = skip_space(array, 1);
    if array.get(at) == Some(&b']') {
        return Some(out);
    }
    loop {
        let end = value_end(array, at)?;
        out.push(&array[at..end]);
        at = skip_space(array, end);
        match array.get(at)? {
            b',' => at = skip_space(array, at + 1),
            b']' => return (at + 1 == array.len()).then_some(out),
            _ => return None,
        }
    }
}

/// "code message; code message" of an error envelope, and the codes (chains included).
fn errors_of(body: &[u8]) -> (String, Vec<i64>) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (format!("non-JSON body of {} bytes", body.len()), Vec::new());
    };
    let mut parts = Vec::new();
    let mut codes = Vec::new();
    let mut visit = |item: &Value| {
        let code = item.get("code").and_then(Value::as_i64);
        let message = item.get("message").and_then(Value::as_str).unwrap_or("");
        codes.extend(code);
        parts.push(match code {
            Some(code) => format!("{code} {message}"),
            None => message.to_owned(),
        });
    };
    if let Some(errors) = value.get("errors").and_then(Value::as_array) {
        for error in errors {
            visit(error);
            for link in error
                .get("error_chain")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                visit(link);
            }
        }
    }
    if parts.is_empty() {
        parts.push("no error details".into());
    }
    (parts.join("; "), codes)
}

/// `retry-after` in seconds (or an HTTP date, read as "now").
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// `Ratelimit: "default";r=<remaining>;t=<secs to reset>` → (remaining, secs to reset).
fn ratelimit(headers: &HeaderMap) -> Option<(i64, u64)> {
    let value = headers.get("ratelimit")?.to_str().ok()?;
    let field = |name: &str| {
        value
            .split(';')
            .find_map(|part| part.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    Some((field("r=")?, field("t=").unwrap_or(0).max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn ok(body: &str) -> Result<Page, SourceError> {
        classify(StatusCode::OK, &HeaderMap::new(), body.as_bytes())
    }

    #[test]
    fn envelope_variants_are_tolerated() {
        assert_eq!(
            ok(r#"{"success":true,"errors":null,"messages":[],"result":[{"id":"a"}]}"#)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            ok(r#"{"success":true,"errors":[],"result":[],"result_info":{"page":1,"per_page":5}}"#)
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            ok(r#"{"success":true,"errors":[],"messages":[],"result":null}"#)
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            ok(r#"{"result":[{"id":"a"},{"id":"b"}]}"#).unwrap().len(),
            2
        );
        let raw = ok(r#"{"success":true,"result":[{"id":"a", "when" : "x"}]}"#).unwrap();
        assert_eq!(
            raw.events[0].get(),
            r#"{"id":"a", "when" : "x"}"#,
            "raw bytes are kept"
        );
    }

    #[test]
    fn success_false_with_200_is_transient() {
        // Case 18.
        let error = ok(r#"{"success":false,"errors":[{"code":1000,"message":"boom"}],"messages":[],"result":null}"#).unwrap_err();
        assert!(
            matches!(error, SourceError::Transient(ref m) if m.contains("1000 boom")),
            "{error:?}"
        );
    }

    #[test]
    fn broken_bodies_are_transient() {
        assert!(matches!(
            ok(r#"{"success":true,"result":[{"id":"#),
            Err(SourceError::Transient(_))
        ));
        assert!(matches!(ok("<html>"), Err(SourceError::Transient(_))));
    }

    #[test]
    fn statuses_are_classified() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("300"));
        let body = br#"{"success":false,"errors":[{"code":971,"message":"Please wait"}],"messages":[],"result":null}"#;
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, &headers, body),
            Err(SourceError::RateLimited { retry_after: Some(d) }) if d == Duration::from_secs(300)
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, &HeaderMap::new(), b""),
            Err(SourceError::Transient(_))
        ));
        let bad_auth = br#"{"success":false,"errors":[{"code":6003,"message":"Invalid request headers","error_chain":[{"code":6111,"message":"Invalid format for Authorization header"}]}],"messages":[],"result":null}"#;
        match classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), bad_auth) {
            Err(SourceError::Auth(m)) => assert!(m.contains("6111"), "{m}"),
            other => panic!("{other:?}"),
        }
        let invalid_token =
            br#"{"success":false,"errors":[{"code":9109,"message":"Invalid access token"}]}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), invalid_token),
            Err(SourceError::Auth(_))
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, &HeaderMap::new(), b"{}"),
            Err(SourceError::Auth(_))
        ));
        let past_end = br#"{"success":false,"errors":[{"code":1001,"message":"bad page"}]}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), past_end),
            Err(SourceError::BadRequest(_))
        ));
    }

    #[test]
    fn one_unreadable_event_leaves_the_rest_of_the_page() {
        // Invalid UTF-8 and a raw control character inside a string.
        let bad: [&[u8]; 2] = [
            b"{\"id\":\"b\",\"actor\":{\"email\":\"\xff\xfe@x\"}}",
            b"{\"id\":\"c\",\"name\":\"tab\there\"}",
        ];
        for bad in bad {
            let mut body = b"{\"success\":true,\"errors\":[],\"result\":[{\"id\":\"a\"}, ".to_vec();
            body.extend_from_slice(bad);
            body.extend_from_slice(b" ,{\"id\":\"d\",\"s\":\"]}\\\"\"}],\"messages\":[]}");
            let page = classify(StatusCode::OK, &HeaderMap::new(), &body).unwrap();
            let ids: Vec<&str> = page.events.iter().map(|e| e.get()).collect();
            assert_eq!(ids, [r#"{"id":"a"}"#, r#"{"id":"d","s":"]}\""}"#]);
            assert_eq!(page.unreadable.len(), 1);
            assert_eq!(page.unreadable[0].bytes, bad, "the exact bytes are kept");
            assert_eq!(page.len(), 3, "a full page stays a full page");
        }
        // Truncated bodies are not salvaged: they are retried.
        let truncated = br#"{"success":true,"result":[{"id":"a"},{"id":"b""#;
        assert!(matches!(
            classify(StatusCode::OK, &HeaderMap::new(), truncated),
            Err(SourceError::Transient(_))
        ));
        let cut_after_result = br#"{"success":true,"result":[{"id":"a"}],"messa"#;
        assert!(matches!(
            classify(StatusCode::OK, &HeaderMap::new(), cut_after_result),
            Err(SourceError::Transient(_))
        ));
    }

    #[test]
    fn no_route_and_redirects_stop_instead_of_retrying() {
        let no_route = br#"{"success":false,"errors":[{"code":7003,"message":"Could not route to /accounts/x/audit_logs, perhaps your object identifier is invalid?"}]}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), no_route),
            Err(SourceError::Auth(m)) if m.contains("7003")
        ));
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::LOCATION,
            HeaderValue::from_static("https://elsewhere.example/x"),
        );
        assert!(matches!(
            classify(StatusCode::MOVED_PERMANENTLY, &headers, b""),
            Err(SourceError::Auth(m)) if m.contains("elsewhere.example") && m.contains("CLOUDFLARE_API_BASE_URL")
        ));
    }

    #[test]
    fn ratelimit_header_is_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "ratelimit",
            HeaderValue::from_static("\"default\";r=1187;t=42"),
        );
        assert_eq!(ratelimit(&headers), Some((1187, 42)));
    }

    /// Replicas divide the token's budget: each lets out its share of the burst at once and
    /// paces the rest at its share of the rate.
    #[test]
    fn a_replica_takes_its_share_of_the_tokens_budget() {
        for (replicas, burst) in [(1, 100), (4, 25), (300, 1)] {
            let share = share_of((1200, 100), replicas);
            let allowed = (0..200).take_while(|_| share.check().is_ok()).count();
            assert_eq!(allowed, burst, "{replicas} replicas");
        }
    }
}
