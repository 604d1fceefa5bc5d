//! The service: every live stream of the configuration, each in a pipeline of its own, on
//! whichever replica the database assigns it to.
//!
//! Replicas (processes of one configuration on one database) divide the streams among
//! themselves. Every `rebalance_interval` each replica reads which replicas are alive (their
//! locks, see `sinks::postgres::leases`) and which streams are free, takes the free streams
//! [`assignment`] gives it, and hands over a stream it holds that is now another live
//! replica's (its in-flight batches commit, then the lease is released). A replica that dies
//! frees its streams at once, and the others take them at their next look. The lease token
//! fences every write and commit, so a replica that lost a stream without noticing cannot
//! commit.
//!
//! One stream failing never stops another: a pipeline that stops unexpectedly restarts from
//! its checkpoint after a pause; an account the token may not read (or a deleted one) stays
//! polled at the authentication recheck interval and shows in `/readyz` and the metrics.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use cfaudit_actors::SourceKey;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::app::{
    discover_accounts, drive, holder_name, register_live_stream, Adapters, RunEnd, Signals,
};
use crate::settings::Settings;
use crate::sinks::postgres::{Lease, LeaseSession, Postgres};
use crate::streams::{account_of, Stream};

/// The streams (by key) that replica `me` collects: streams sorted by key are dealt to the
/// live replicas sorted by name in turn, so each has the same number, give or take one, and
/// every replica that reads the same replicas and streams computes the same assignment.
pub fn assignment(me: &str, replicas: &[&str], streams: &[String]) -> BTreeSet<String> {
    let mut replicas: Vec<&str> = replicas.to_vec();
    replicas.sort_unstable();
    replicas.dedup();
    let Some(position) = replicas.iter().position(|r| *r == me) else {
        return BTreeSet::new();
    };
    let mut streams: Vec<&String> = streams.iter().collect();
    streams.sort_unstable();
    streams.dedup();
    streams
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % replicas.len() == position)
        .map(|(_, key)| key.clone())
        .collect()
}

/// A stream this replica collects.
struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    handing_over: bool,
}

/// A free stream that is another replica's is taken anyway after this many looks: its
/// replica does not take it (it may run another configuration).
const ORPHAN_LOOKS: u32 = 3;

/// Runs the service on `streams` until a signal.
pub async fn serve(
    adapters: Adapters,
    config: Settings,
    streams: Vec<Stream>,
) -> anyhow::Result<()> {
    let name = config
        .service
        .replica_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(holder_name);
    let session = LeaseSession::open(&adapters.postgres, &name).await?;
    let keys: Vec<String> = streams.iter().map(|s| s.key.clone()).collect();
    session.join_replicas(&keys).await?;
    info!(replica = %name, streams = keys.len(), accounts = adapters.accounts.len(),
        "joined the replicas; taking this replica's share of the streams");

    let state = crate::http::HealthState {
        metrics: adapters.metrics.clone(),
        database: Postgres::lazy_pool(&config.database.url)?,
        max_sweep_age: config.sweep.poll_interval * 3
            + config.cloudflare.request_timeout * 4
            + Duration::from_secs(60),
        started: chrono::Utc::now(),
    };
    let (addr, server) = crate::http::serve(config.service.metrics_addr, state)?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    let http = server.handle();
    actix_rt::spawn(server);

    let mut signals = Signals::new()?;
    let mut coordinator = Coordinator {
        name,
        adapters,
        config,
        session,
        streams,
        running: HashMap::new(),
        free_looks: HashMap::new(),
        told_mismatch: false,
        next_discovery: None,
    };
    if coordinator
        .adapters
        .tokens
        .iter()
        .any(|t| t.accounts.discover)
    {
        coordinator.next_discovery =
            Some(Instant::now() + coordinator.config.cloudflare.discovery_interval);
    }
    let mut tick = tokio::time::interval(coordinator.config.service.rebalance_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = signals.recv() => break,
        }
        // A signal cuts a look short (the database may be down, each statement then waits
        // for its timeout): what it took is released with the session.
        tokio::select! {
            _ = coordinator.look() => {}
            _ = signals.recv() => break,
        }
    }
    info!(
        timeout = ?coordinator.config.service.shutdown_timeout,
        "signal received: no new pages; committing what is in flight"
    );
    coordinator.stop_all().await;
    http.stop(true).await;
    Ok(())
}

struct Coordinator {
    name: String,
    adapters: Adapters,
    config: Settings,
    session: LeaseSession,
    streams: Vec<Stream>,
    running: HashMap<String, Running>,
    /// Free streams that are not this replica's: how many looks they have been free.
    free_looks: HashMap<String, u32>,
    told_mismatch: bool,
    /// When the tokens' accounts are listed next (discovery on for one at least).
    next_discovery: Option<Instant>,
}

impl Coordinator {
    /// One look: the accounts listed again when due, then the streams rebalanced.
    async fn look(&mut self) {
        if self.next_discovery.is_some_and(|at| at <= Instant::now()) {
            if let Err(error) = self.refresh_accounts().await {
                warn!(error = format!("{error:#}"), "could not list the token's accounts; the streams go on, listing again at the next interval");
            }
            self.next_discovery = Some(Instant::now() + self.config.cloudflare.discovery_interval);
        }
        if let Err(error) = self.rebalance().await {
            warn!(error = format!("{error:#}"), "could not read the replicas and streams; the streams held go on, looking again shortly");
        }
    }

    /// Lists the token's accounts again: streams of new accounts are registered (and taken
    /// at the next look by whoever they are dealt to), those of accounts no longer listed stop.
    async fn refresh_accounts(&mut self) -> anyhow::Result<()> {
        let found = discover_accounts(&self.adapters.tokens, self.adapters.token_of()).await?;
        let accounts: Vec<String> = found.iter().map(|(a, _)| a.clone()).collect();
        let added: Vec<String> = accounts
            .iter()
            .filter(|a| !self.adapters.accounts.contains(a))
            .cloned()
            .collect();
        let removed: Vec<String> = self
            .adapters
            .accounts
            .iter()
            .filter(|a| !accounts.contains(a))
            .cloned()
            .collect();
        if added.is_empty() && removed.is_empty() {
            self.adapters.set_accounts(found);
            return Ok(());
        }
        for account in &added {
            for &api_version in &self.config.cloudflare.api_versions.0 {
                let stream = register_live_stream(
                    &self.adapters.postgres,
                    &self.config,
                    account,
                    api_version,
                )
                .await?;
                self.streams.push(stream);
            }
        }
        self.streams
            .retain(|s| !removed.iter().any(|a| a == s.account()));
        for (key, running) in &mut self.running {
            if removed.iter().any(|a| a == account_of(key)) && !running.handing_over {
                let _ = running.stop.send(true);
                running.handing_over = true;
            }
        }
        self.adapters.set_accounts(found);
        let keys: Vec<String> = self.streams.iter().map(|s| s.key.clone()).collect();
        self.session.announce_streams(&keys).await?;
        info!(added = ?added, removed = ?removed, "the token's accounts changed");
        Ok(())
    }

    /// One look: which replicas live, which streams are free; take this replica's share,
    /// hand over what is another's.
    async fn rebalance(&mut self) -> anyhow::Result<()> {
        self.running.retain(|_, r| !r.task.is_finished());
        let replicas = self.adapters.postgres.live_replicas().await?;
        let Some(me) = replicas.iter().find(|r| r.name == self.name) else {
            // This replica's session is reconnecting: not counted among the live ones now.
            return Ok(());
        };
        // Every live replica is taken to share the tokens (one configuration).
        self.adapters.share_budget(replicas.len() as u32);
        let peers: Vec<&str> = replicas
            .iter()
            .filter(|r| r.config_digest == me.config_digest)
            .map(|r| r.name.as_str())
            .collect();
        if peers.len() < replicas.len() && !self.told_mismatch {
            let others: Vec<&str> = replicas
                .iter()
                .filter(|r| r.config_digest != me.config_digest)
                .map(|r| r.name.as_str())
                .collect();
            warn!(replicas = ?others, "these replicas collect other accounts or API versions: streams are balanced only among replicas of the same configuration");
            self.told_mismatch = true;
        }
        let keys: Vec<String> = self.streams.iter().map(|s| s.key.clone()).collect();
        let mine = assignment(&self.name, &peers, &keys);
        let held: HashMap<String, bool> = self
            .adapters
            .postgres
            .stream_owners()
            .await?
            .into_iter()
            .map(|owner| (owner.stream, owner.held))
            .collect();
        for stream in &self.streams {
            let key = &stream.key;
            if let Some(running) = self.running.get_mut(key) {
                if !mine.contains(key) && !running.handing_over {
                    info!(stream = %key, "the stream is another replica's now: handing it over");
                    let _ = running.stop.send(true);
                    running.handing_over = true;
                }
                continue;
            }
            if held.get(key).copied().unwrap_or(false) {
                self.free_looks.remove(key);
                continue;
            }
            if !mine.contains(key) {
                let looks = self.free_looks.entry(key.clone()).or_default();
                *looks += 1;
                if *looks < ORPHAN_LOOKS {
                    continue;
                }
            }
            // A stream taken by another replica since the look is `Err` here: left alone.
            if let Ok(lease) = self.session.try_lease(key).await? {
                self.free_looks.remove(key);
                info!(stream = %key, lease = lease.token, replica = %self.name, "stream leased");
                let (stop, stopped) = watch::channel(false);
                let task = actix_rt::spawn(collect(
                    self.adapters.clone(),
                    self.config.clone(),
                    stream.clone(),
                    lease,
                    stopped,
                ));
                self.running.insert(
                    key.clone(),
                    Running {
                        stop,
                        task,
                        handing_over: false,
                    },
                );
            }
        }
        Ok(())
    }

    /// Stops every stream (in-flight batches commit within the shutdown timeout) and closes
    /// the session.
    async fn stop_all(&mut self) {
        for running in self.running.values() {
            let _ = running.stop.send(true);
        }
        let tasks = self.running.drain().map(|(_, r)| r.task);
        futures::future::join_all(tasks).await;
        self.session.close().await;
    }
}

/// Resolves when the coordinator asks the stream to stop (or is gone).
async fn stop_asked(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The longest pause before a failed pipeline restarts.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(300);

/// Collects one stream under `lease` until asked to stop or the lease is lost; a pipeline
/// that fails restarts from the checkpoint after a pause that doubles each time.
async fn collect(
    adapters: Adapters,
    config: Settings,
    stream: Stream,
    mut lease: Lease,
    mut stop: watch::Receiver<bool>,
) {
    let timeout = config.service.shutdown_timeout;
    let source = SourceKey::new(stream.account(), stream.api_version());
    info!(account = %stream.account(), api_version = %stream.api_version(),
        start = ?stream.covers_since, "collecting");
    let mut pause = Duration::from_secs(1);
    loop {
        let mut pipeline = adapters.start_pipeline(&config, &stream, false, lease.token);
        let end = drive(
            &mut pipeline,
            false,
            &adapters,
            &stream.key,
            &mut lease,
            stop_asked(&mut stop),
        )
        .await;
        match end {
            Ok(RunEnd::Lost(reason)) => {
                pipeline.halt();
                warn!(stream = %stream.key, %reason, "the stream was taken over by another process");
                lease.release().await;
                return;
            }
            Ok(RunEnd::Stopped | RunEnd::Done) => {
                if !pipeline.shutdown(timeout).await {
                    warn!(stream = %stream.key, ?timeout, "in-flight batches did not commit in time; they are abandoned and fetched again by the stream's next holder");
                }
                lease.release().await;
                return;
            }
            Err(failure) => {
                pipeline.halt();
                drop(pipeline);
                let reason = format!("{failure:#}");
                error!(stream = %stream.key, %reason, ?pause,
                    "the stream's pipeline failed; it restarts from its checkpoint after a pause (the other streams go on)");
                // Shown by /readyz until the restarted pipeline commits.
                adapters
                    .metrics
                    .health
                    .sink_failures
                    .lock()
                    .unwrap()
                    .insert(source.clone(), reason);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop_asked(&mut stop) => {
                        lease.release().await;
                        return;
                    }
                }
                pause = (pause * 2).min(MAX_RESTART_PAUSE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("account{i:02}")).collect()
    }

    #[test]
    fn every_stream_has_one_replica_and_shares_differ_by_one_at_most() {
        let streams = keys(20);
        let replicas = ["c", "a", "b"];
        let shares: Vec<BTreeSet<String>> = replicas
            .iter()
            .map(|me| assignment(me, &replicas, &streams))
            .collect();
        let all: BTreeSet<&String> = shares.iter().flatten().collect();
        assert_eq!(all.len(), 20, "every stream assigned");
        assert_eq!(
            shares.iter().map(BTreeSet::len).sum::<usize>(),
            20,
            "no stream assigned twice"
        );
        let sizes: Vec<usize> = shares.iter().map(BTreeSet::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    #[test]
    fn the_order_replicas_and_streams_are_read_in_does_not_matter() {
        let mut streams = keys(7);
        let a = assignment("b", &["a", "b"], &streams);
        streams.reverse();
        assert_eq!(a, assignment("b", &["b", "a"], &streams));
    }

    #[test]
    fn a_replica_not_alive_gets_nothing_and_one_alone_gets_everything() {
        let streams = keys(5);
        assert!(assignment("z", &["a", "b"], &streams).is_empty());
        assert_eq!(assignment("a", &["a"], &streams).len(), 5);
    }
}
