//! An actor address that counts what it sends, for the mailbox-depth metric.

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::metrics::ActorMetrics;

/// `Addr<A>` plus the receiving actor's metrics. Hot-path sends use [`Mailbox::send`], which
/// respects the bounded mailbox; `do_send` is for rare control messages only.
pub struct Mailbox<A: Actor> {
    addr: Addr<A>,
    metrics: ActorMetrics,
}

impl<A: Actor> Clone for Mailbox<A> {
    fn clone(&self) -> Self {
        Mailbox {
            addr: self.addr.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<A: Actor> Mailbox<A> {
    pub fn new(addr: Addr<A>, metrics: ActorMetrics) -> Self {
        Mailbox { addr, metrics }
    }

    pub fn addr(&self) -> &Addr<A> {
        &self.addr
    }

    pub fn send<M>(&self, msg: M) -> actix::dev::Request<A, M>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.metrics.enqueued();
        self.addr.send(msg)
    }

    pub fn do_send<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.metrics.enqueued();
        self.addr.do_send(msg)
    }
}
