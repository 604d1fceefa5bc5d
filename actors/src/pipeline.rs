//! Wiring: one supervised actor of each kind per account, each writer on its own arbiter
//! (thread) so Parquet encoding, SQL and API parsing use both cores.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::checkpointer::{Checkpointer, CheckpointerConfig, Connect};
use crate::mailbox::Mailbox;
use crate::mapper::Mapper;
use crate::messages::{Drain, Epoch, PipelineEvent};
use crate::metrics::Metrics;
use crate::poller::{Poller, PollerConfig};
use crate::ports::{AuditSource, CheckpointStore, FileSink, RowSink};
use crate::writer::{ParquetTarget, ParquetWriter, PgTarget, PgWriter};

/// Everything one account's pipeline is given.
pub struct PipelineParts {
    pub poller: PollerConfig,
    pub checkpointer: CheckpointerConfig,
    pub source: Arc<dyn AuditSource>,
    pub rows: Arc<dyn RowSink>,
    pub files: Arc<dyn FileSink>,
    pub store: Arc<dyn CheckpointStore>,
    pub metrics: Arc<Metrics>,
}

/// A running pipeline. Dropping it does not stop the actors; call [`Pipeline::stop`].
pub struct Pipeline {
    poller: Addr<Poller>,
    arbiters: Vec<Arbiter>,
    pub events: mpsc::UnboundedReceiver<PipelineEvent>,
}

impl Pipeline {
    /// Starts the actors; must be called inside an actix system.
    pub fn start(parts: PipelineParts) -> Pipeline {
        let PipelineParts {
            poller,
            checkpointer,
            source,
            rows,
            files,
            store,
            metrics,
        } = parts;
        let account: Arc<str> = Arc::from(poller.account_id.as_str());
        // Credits (in-flight batches) never exceed the mailbox capacity, so hot-path sends
        // never wait on a full mailbox and batches stay in order.
        let capacity = poller.max_inflight_batches + 16;
        let epoch = Epoch::default();
        let (events_tx, events) = mpsc::unbounded_channel();
        let arbiters: Vec<Arbiter> = (0..3).map(|_| Arbiter::new()).collect();

        let checkpointer_config = Arc::new(checkpointer);
        let checkpointer_addr = {
            let (epoch, metrics, files) = (epoch.clone(), metrics.clone(), files.clone());
            Supervisor::start_in_arbiter(&arbiters[0].handle(), move |ctx| {
                ctx.set_mailbox_capacity(capacity);
                Checkpointer::new(checkpointer_config, store, files, epoch, metrics)
            })
        };
        let checkpointer = Mailbox::new(checkpointer_addr.clone(), metrics.actor("checkpointer"));

        let pg = {
            let (account, checkpointer, epoch, m) =
                (account.clone(), checkpointer.clone(), epoch.clone(), metrics.clone());
            let addr = Supervisor::start_in_arbiter(&arbiters[1].handle(), move |ctx| {
                ctx.set_mailbox_capacity(capacity);
                PgWriter::new(PgTarget(rows), account, checkpointer, epoch, m)
            });
            Mailbox::new(addr, metrics.actor("pg_writer"))
        };
        let parquet = {
            let (account, checkpointer, epoch, m) =
                (account.clone(), checkpointer.clone(), epoch.clone(), metrics.clone());
            let addr = Supervisor::start_in_arbiter(&arbiters[2].handle(), move |ctx| {
                ctx.set_mailbox_capacity(capacity);
                ParquetWriter::new(ParquetTarget(files), account, checkpointer, epoch, m)
            });
            Mailbox::new(addr, metrics.actor("parquet_writer"))
        };
        let mapper = {
            let (account, checkpointer, epoch, m) =
                (account.clone(), checkpointer.clone(), epoch.clone(), metrics.clone());
            let addr = Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Mapper::new(account, checkpointer, pg, parquet, epoch, m)
            });
            Mailbox::new(addr, metrics.actor("mapper"))
        };
        let poller_addr = {
            let (checkpointer, metrics) = (checkpointer.clone(), metrics.clone());
            let config = Arc::new(poller);
            Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Poller::new(config, source, mapper, checkpointer, metrics, events_tx)
            })
        };
        checkpointer_addr.do_send(Connect(Mailbox::new(
            poller_addr.clone(),
            metrics.actor("poller"),
        )));
        Pipeline {
            poller: poller_addr,
            arbiters,
            events,
        }
    }

    /// Stops fetching; [`PipelineEvent::Drained`] follows once in-flight batches are done.
    pub fn drain(&self) {
        self.poller.do_send(Drain);
    }

    /// Stops the writer/checkpointer threads. Uncommitted work is abandoned, never half-done.
    pub fn stop(self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }

    /// Waits for the next event of interest.
    pub async fn next_event(&mut self) -> Option<PipelineEvent> {
        self.events.recv().await
    }
}

