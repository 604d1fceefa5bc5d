//! Where an actor sends one kind of message.

use actix::dev::{RecipientRequest, ToEnvelope};
use actix::prelude::*;
use actix::WeakRecipient;

use crate::metrics::ActorMetrics;

/// The receiver of one kind of message, whoever it is, plus the receiver's metrics (its
/// mailbox depth). An actor holds an outbox per message it sends and never names the actor
/// behind it: only the pipeline's wiring does. Hot-path sends use [`Outbox::send`], which
/// respects the bounded mailbox; `do_send` is for rare control messages only.
pub struct Outbox<M>
where
    M: Message + Send,
    M::Result: Send,
{
    recipient: Recipient<M>,
    metrics: ActorMetrics,
}

impl<M> Clone for Outbox<M>
where
    M: Message + Send,
    M::Result: Send,
{
    fn clone(&self) -> Self {
        Outbox {
            recipient: self.recipient.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<M> Outbox<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    /// The outbox to `addr`, whose mailbox `metrics` counts.
    pub fn to<A>(addr: &Addr<A>, metrics: &ActorMetrics) -> Self
    where
        A: Actor + Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        Outbox {
            recipient: addr.clone().recipient(),
            metrics: metrics.clone(),
        }
    }

    pub fn send(&self, msg: M) -> RecipientRequest<M> {
        self.metrics.enqueued();
        self.recipient.send(msg)
    }

    pub fn do_send(&self, msg: M) {
        self.metrics.enqueued();
        self.recipient.do_send(msg)
    }
}

/// An [`Outbox`] whose receiver may be gone; a message to a stopped receiver is dropped.
pub struct WeakOutbox<M>
where
    M: Message + Send,
    M::Result: Send,
{
    recipient: WeakRecipient<M>,
    metrics: ActorMetrics,
}

impl<M> WeakOutbox<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    /// The outbox to `addr` that does not keep it alive: for the pipeline's back-edge, so that
    /// the actors form no cycle of strong references and all stop once the pipeline is dropped.
    pub fn to<A>(addr: &Addr<A>, metrics: &ActorMetrics) -> Self
    where
        A: Actor + Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        WeakOutbox {
            recipient: addr.clone().recipient().downgrade(),
            metrics: metrics.clone(),
        }
    }

    pub fn do_send(&self, msg: M) {
        if let Some(recipient) = self.recipient.upgrade() {
            self.metrics.enqueued();
            recipient.do_send(msg)
        }
    }
}
