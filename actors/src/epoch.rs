//! The pipeline's epoch: the one rule that makes whatever was in flight before a rewind
//! harmless.
//!
//! On any failure the Checkpointer abandons everything after the last commit and advances the
//! epoch; every message carries the epoch it was made in ([`Stamped`]), and a message of
//! another epoch than the current one is ignored wherever it arrives. [`EpochView::is_stale`]
//! is the only place that rule is written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The pipeline epoch, shared by all actors. Only the Checkpointer advances it. A halted
/// pipeline (its lease is gone, or its runner stopped it) does nothing any more.
#[derive(Clone, Default, Debug)]
pub struct Epoch {
    current: Arc<AtomicU64>,
    halted: Arc<AtomicBool>,
}

impl Epoch {
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    pub(crate) fn advance(&self) -> u64 {
        self.current.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stops the pipeline for good: every message in flight becomes stale.
    pub(crate) fn halt(&self) {
        self.halted.store(true, Ordering::SeqCst);
        self.advance();
    }

    pub fn halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }
}

/// Anything made in one epoch of the pipeline: a message, a batch, a timer's epoch.
pub trait Stamped {
    fn epoch(&self) -> u64;
}

impl Stamped for u64 {
    fn epoch(&self) -> u64 {
        *self
    }
}

/// Whether an actor's own state belongs to one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Joined {
    /// It keeps no state of an epoch (the writers, the Checkpointer that owns the epoch).
    Any,
    /// Its state was reset for this epoch (by a message of the epoch); `None` until then.
    At(Option<u64>),
}

/// One actor's view of the epoch.
#[derive(Clone, Debug)]
pub struct EpochView {
    shared: Epoch,
    joined: Joined,
}

impl EpochView {
    /// For an actor that keeps no state of an epoch: a message of the current epoch is current.
    pub fn following(shared: Epoch) -> Self {
        EpochView {
            shared,
            joined: Joined::Any,
        }
    }

    /// For an actor whose state belongs to one epoch: until it [joins](Self::join) one,
    /// everything is stale to it.
    pub fn joining(shared: Epoch) -> Self {
        EpochView {
            shared,
            joined: Joined::At(None),
        }
    }

    /// The actor's state is now that of `epoch`.
    pub fn join(&mut self, epoch: u64) {
        self.joined = Joined::At(Some(epoch));
    }

    /// The actor's state was lost (a restart): stale to everything until it joins again.
    pub fn leave(&mut self) {
        if let Joined::At(_) = self.joined {
            self.joined = Joined::At(None);
        }
    }

    /// The epoch the actor joined; `None` before it did.
    pub fn joined(&self) -> Option<u64> {
        match self.joined {
            Joined::Any => Some(self.shared.current()),
            Joined::At(at) => at,
        }
    }

    /// The rule: a message is stale once the pipeline has halted, when it was made in another
    /// epoch than the current one, or in another epoch than the one this actor's state is of.
    pub fn is_stale(&self, msg: &impl Stamped) -> bool {
        let epoch = msg.epoch();
        self.shared.halted()
            || epoch != self.shared.current()
            || matches!(self.joined, Joined::At(at) if at != Some(epoch))
    }

    pub fn current(&self) -> u64 {
        self.shared.current()
    }

    pub fn halted(&self) -> bool {
        self.shared.halted()
    }

    pub(crate) fn shared(&self) -> &Epoch {
        &self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_of_another_epoch_or_after_a_halt_is_stale() {
        let shared = Epoch::default();
        let writer = EpochView::following(shared.clone());
        let mut mapper = EpochView::joining(shared.clone());
        assert!(!writer.is_stale(&0));
        assert!(mapper.is_stale(&0), "not joined yet");
        mapper.join(0);
        assert!(!mapper.is_stale(&0));
        shared.advance();
        for view in [&writer, &mapper] {
            assert!(view.is_stale(&0), "an older epoch");
        }
        assert!(!writer.is_stale(&1));
        assert!(mapper.is_stale(&1), "joined the older epoch only");
        mapper.join(1);
        assert!(!mapper.is_stale(&1));
        mapper.leave();
        assert!(mapper.is_stale(&1), "left after a restart");
        mapper.join(1);
        shared.halt();
        for view in [&writer, &mapper] {
            assert!(view.is_stale(&1) && view.is_stale(&2), "halted");
        }
    }
}
