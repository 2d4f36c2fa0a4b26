//! The in-process subscription hub: committed events fan out to every
//! WatchRotations stream of this replica through one broadcast channel.
//! A subscriber that lags is told how far it fell behind and catches up from
//! the events table, so the channel's bound never loses an event.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::broker::types::CredentialEvent;

/// Fan-out of committed events.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<CredentialEvent>>,
}

impl Hub {
    /// A hub whose slowest subscriber may fall `capacity` events behind
    /// before it must catch up from the table.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Self { tx }
    }

    /// Publishes a committed event (after the cache was invalidated).
    pub fn publish(&self, event: CredentialEvent) {
        // No receiver is not an error: nobody watches right now.
        let _ = self.tx.send(Arc::new(event));
    }

    /// A new subscription that sees every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CredentialEvent>> {
        self.tx.subscribe()
    }
}
