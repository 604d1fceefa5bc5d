//! Leases and replicas: which process collects which stream, coordinated through PostgreSQL.
//!
//! A process holds every lease it has (and, as a service replica, its own presence) as an
//! advisory lock on one session connection. A lock lives exactly as long as that connection:
//! the server frees the locks of a killed process the moment its connection closes, and those
//! of a host cut off by the network once the keepalive probes fail (about 25 s). Who is alive
//! and who holds what is therefore read from `pg_locks` (`cfaudit_lock_held`), never from a
//! heartbeat that could lie. The lease token in `cfaudit_checkpoints` is what every write and
//! commit is fenced on: a process that lost its session cannot commit after another process
//! took the stream, even before it notices.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use super::Postgres;

/// How often the session connection is checked.
const SESSION_CHECK: Duration = Duration::from_secs(2);

/// The advisory lock of a stream's lease, by stream key.
fn stream_lock(stream: &str) -> String {
    format!("cfaudit.stream.{stream}")
}

/// The advisory lock a live service replica holds, by replica name.
fn replica_lock(name: &str) -> String {
    format!("cfaudit.replica.{name}")
}

/// Who holds a stream's lease, as far as the database knows.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseHolder {
    pub holder: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.holder, self.since) {
            (Some(holder), Some(since)) => write!(f, "{holder} (since {})", since.to_rfc3339()),
            (Some(holder), None) => write!(f, "{holder}"),
            _ => write!(f, "another process"),
        }
    }
}

/// A live service replica.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Replica {
    pub name: String,
    pub config_digest: String,
    pub started_at: DateTime<Utc>,
}

/// A stream, who last took its lease, and whether that lease is held now.
#[derive(Clone, Debug, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct StreamOwner {
    pub stream: String,
    pub holder: Option<String>,
    pub leased_at: Option<DateTime<Utc>>,
    /// Whether a live session holds the stream's lock.
    pub held: bool,
}

/// The leases of one process, on one session connection.
#[derive(Clone)]
pub struct LeaseSession {
    inner: Arc<Inner>,
}

struct Inner {
    postgres: Postgres,
    holder: String,
    state: Mutex<SessionState>,
}

#[derive(Default)]
struct SessionState {
    /// `None` while the connection is down.
    conn: Option<PgConnection>,
    held: HashMap<String, Held>,
    /// The replica name this session holds the lock of.
    replica: Option<String>,
}

struct Held {
    token: u64,
    lost: watch::Sender<Option<String>>,
}

/// A stream's lease held by this process: the token every write and commit is fenced on.
/// [`Lease::lost`] fires if another process took the stream while this one's session was
/// down.
pub struct Lease {
    pub stream: String,
    pub token: u64,
    lost: watch::Receiver<Option<String>>,
    session: LeaseSession,
}

impl Lease {
    /// Resolves when the lease is gone to another process, with why.
    pub async fn lost(&mut self) -> String {
        loop {
            if let Some(reason) = self.lost.borrow().clone() {
                return reason;
            }
            if self.lost.changed().await.is_err() {
                return "the lease session closed".into();
            }
        }
    }

    /// Gives the stream up: another process may take it at once.
    pub async fn release(self) {
        self.session.release(&self.stream).await;
    }
}

impl SessionState {
    async fn connection(&mut self, postgres: &Postgres) -> Result<&mut PgConnection, sqlx::Error> {
        if self.conn.is_none() {
            self.conn = Some(postgres.session_connection().await?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

async fn try_lock(conn: &mut PgConnection, lock: &str) -> Result<bool, sqlx::Error> {
    let (locked,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(lock)
        .fetch_one(conn)
        .await?;
    Ok(locked)
}

impl Postgres {
    /// The connection a session's locks live on: the server probes it every few seconds, so
    /// the locks of a process cut off by the network are freed within half a minute.
    async fn session_connection(&self) -> Result<PgConnection, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        sqlx::raw_sql(
            "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; \
             SET application_name = 'cfaudit leases'",
        )
        .execute(&mut conn)
        .await?;
        Ok(conn)
    }

    /// The live service replicas, by name.
    pub async fn live_replicas(&self) -> anyhow::Result<Vec<Replica>> {
        Ok(sqlx::query_as(
            "SELECT name, config_digest, started_at FROM cfaudit_replicas \
             WHERE cfaudit_lock_held('cfaudit.replica.' || name) ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every stream, who took its lease last and whether it is held now.
    pub async fn stream_owners(&self) -> anyhow::Result<Vec<StreamOwner>> {
        Ok(sqlx::query_as(
            "SELECT account_id AS stream, lease_holder AS holder, leased_at, \
                    cfaudit_lock_held('cfaudit.stream.' || account_id) AS held \
             FROM cfaudit_checkpoints ORDER BY account_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}

impl LeaseSession {
    /// Opens the session of the process called `holder` (host and process id, or the
    /// replica's name); a task keeps its connection alive.
    pub async fn open(postgres: &Postgres, holder: &str) -> anyhow::Result<LeaseSession> {
        let conn = postgres.session_connection().await?;
        let session = LeaseSession {
            inner: Arc::new(Inner {
                postgres: postgres.clone(),
                holder: holder.to_owned(),
                state: Mutex::new(SessionState {
                    conn: Some(conn),
                    ..SessionState::default()
                }),
            }),
        };
        let weak = Arc::downgrade(&session.inner);
        actix_rt::spawn(keep(weak));
        Ok(session)
    }

    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// Announces this process as a service replica named by the session's holder, collecting
    /// `streams` (their digest tells replicas of the same configuration). Fails if a live
    /// replica has that name.
    pub async fn join_replicas(&self, streams: &[String]) -> anyhow::Result<()> {
        let name = self.inner.holder.clone();
        {
            let mut state = self.inner.state.lock().await;
            let conn = state.connection(&self.inner.postgres).await?;
            if !try_lock(conn, &replica_lock(&name)).await? {
                anyhow::bail!(
                    "another running cfaudit replica is named {name:?}: give each replica its \
                     own name (CFAUDIT_REPLICA_NAME; default: host name and process id)"
                );
            }
            state.replica = Some(name);
        }
        self.announce_streams(streams).await
    }

    /// Records the streams this replica is configured for: at joining, and when discovered
    /// accounts come or go.
    pub async fn announce_streams(&self, streams: &[String]) -> anyhow::Result<()> {
        let mut streams = streams.to_vec();
        streams.sort_unstable();
        let mut state = self.inner.state.lock().await;
        let conn = state.connection(&self.inner.postgres).await?;
        sqlx::query(
            "INSERT INTO cfaudit_replicas (name, config_digest) VALUES ($1, md5($2)) \
             ON CONFLICT (name) DO UPDATE SET config_digest = EXCLUDED.config_digest",
        )
        .bind(&self.inner.holder)
        .bind(streams.join(","))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Takes the stream's lease if no process (this one included) holds it; otherwise says
    /// who does.
    pub async fn try_lease(&self, stream: &str) -> anyhow::Result<Result<Lease, LeaseHolder>> {
        let holder = &self.inner.holder;
        let mut state = self.inner.state.lock().await;
        if state.held.contains_key(stream) {
            // Advisory locks are re-entrant within a session: refuse here instead.
            return Ok(Err(LeaseHolder {
                holder: Some(holder.clone()),
                since: None,
            }));
        }
        let conn = state.connection(&self.inner.postgres).await?;
        if !try_lock(conn, &stream_lock(stream)).await? {
            let held: Option<(Option<String>, Option<DateTime<Utc>>)> = sqlx::query_as(
                "SELECT lease_holder, leased_at FROM cfaudit_checkpoints WHERE account_id = $1",
            )
            .bind(stream)
            .fetch_optional(&mut *conn)
            .await?;
            let (holder, since) = held.unwrap_or_default();
            return Ok(Err(LeaseHolder { holder, since }));
        }
        let taken = async {
            let mut tx = conn.begin().await?;
            sqlx::query(
                "INSERT INTO cfaudit_checkpoints (account_id) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(stream)
            .execute(&mut *tx)
            .await?;
            let (token,): (i64,) = sqlx::query_as(
                "UPDATE cfaudit_checkpoints SET lease_token = lease_token + 1, lease_holder = $2, leased_at = NOW() \
                 WHERE account_id = $1 RETURNING lease_token",
            )
            .bind(stream)
            .bind(holder)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO cfaudit_lease_log (stream, lease_token, holder) VALUES ($1, $2, $3)",
            )
            .bind(stream)
            .bind(token)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<u64, sqlx::Error>(token as u64)
        }
        .await;
        let token = match taken {
            Ok(token) => token,
            Err(error) => {
                let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                    .bind(stream_lock(stream))
                    .execute(&mut *conn)
                    .await;
                return Err(error.into());
            }
        };
        let (lost_tx, lost) = watch::channel(None);
        state.held.insert(
            stream.to_owned(),
            Held {
                token,
                lost: lost_tx,
            },
        );
        Ok(Ok(Lease {
            stream: stream.to_owned(),
            token,
            lost,
            session: self.clone(),
        }))
    }

    /// Unlocks the stream (a broken connection freed it already).
    async fn release(&self, stream: &str) {
        let mut state = self.inner.state.lock().await;
        if state.held.remove(stream).is_none() {
            return;
        }
        if let Some(conn) = state.conn.as_mut() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                .bind(stream_lock(stream))
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // The lock is gone with the connection; the keeper opens a new one.
                state.conn = None;
            }
        }
    }

    /// Closes the session: every lock it holds is freed.
    pub async fn close(&self) {
        let mut state = self.inner.state.lock().await;
        state.held.clear();
        state.replica = None;
        if let Some(conn) = state.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// Keeps the session's connection alive while the session exists. A broken connection took
/// every lock with it: a new one takes them again, each stream only if its token is unchanged
/// (no other process took it meanwhile); the others are reported lost to their holders.
async fn keep(session: Weak<Inner>) {
    loop {
        tokio::time::sleep(SESSION_CHECK).await;
        let Some(inner) = session.upgrade() else {
            return;
        };
        let mut state = inner.state.lock().await;
        if let Some(conn) = state.conn.as_mut() {
            if conn.ping().await.is_ok() {
                continue;
            }
            warn!(holder = %inner.holder, "the lease session's database connection broke; taking its leases again");
            state.conn = None;
        }
        let Ok(mut conn) = inner.postgres.session_connection().await else {
            continue;
        };
        if let Some(name) = &state.replica {
            match try_lock(&mut conn, &replica_lock(name)).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(replica = %name, "another process took this replica's name while its connection was down")
                }
                Err(_) => continue,
            }
        }
        let mut lost = Vec::new();
        let mut failed = false;
        for (stream, held) in &state.held {
            match retake(&mut conn, stream, &inner.holder, held.token).await {
                Ok(true) => info!(%stream, "lease taken again"),
                Ok(false) => lost.push(stream.clone()),
                Err(_) => {
                    // The new connection is in doubt too: drop it (and what it took), retry.
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            continue;
        }
        for stream in lost {
            if let Some(held) = state.held.remove(&stream) {
                let _ = held.lost.send(Some(format!(
                    "stream {stream} was taken over by another process while this one's database connection was down"
                )));
            }
        }
        state.conn = Some(conn);
    }
}

/// Takes the stream's lock again if its token is still `token`.
async fn retake(
    conn: &mut PgConnection,
    stream: &str,
    holder: &str,
    token: u64,
) -> Result<bool, sqlx::Error> {
    if !try_lock(conn, &stream_lock(stream)).await? {
        return Ok(false);
    }
    let kept = sqlx::query(
        "UPDATE cfaudit_checkpoints SET lease_holder = $2, leased_at = NOW() \
         WHERE account_id = $1 AND lease_token = $3",
    )
    .bind(stream)
    .bind(holder)
    .bind(token as i64)
    .execute(&mut *conn)
    .await?;
    if kept.rows_affected() == 1 {
        return Ok(true);
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(stream_lock(stream))
        .execute(&mut *conn)
        .await;
    Ok(false)
}
