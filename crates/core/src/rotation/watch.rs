//! One WatchRotations subscription: full state first, then missed events
//! replayed from the table, then live events from the hub, with heartbeats
//! while idle. The gRPC response stream polls it directly, so it only runs
//! when the client can take a message; a client that stops reading falls
//! behind the hub and is caught up from the table when it reads again.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::broadcast::{self, error::RecvError},
    time::{Instant, Sleep, sleep_until},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::broker::Broker;

use crate::broker::error::BrokerError;

use crate::broker::types::{CredentialEvent, CredentialRecord, ExchangeId, TenantId};

/// Events read from the table per catch-up query.
const CATCH_UP_PAGE: u32 = 500;

/// How many WatchRotations streams one replica holds at most, in all and
/// per tenant. Streams are admitted by this budget of their own, not by
/// the unary calls in flight: a listening stream costs memory (a few KiB),
/// not a call slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streams on this replica, every tenant's and the operators'.
    pub max: usize,
    /// Streams one tenant's workloads may hold on this replica.
    pub per_tenant: usize,
}

/// Why a stream was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamsFull {
    /// The replica holds its limit.
    #[error(
        "this replica already holds {max} WatchRotations streams (its limit); retry with backoff, another replica may take the stream"
    )]
    Replica {
        /// The replica's limit.
        max: usize,
    },
    /// The tenant holds its limit on this replica.
    #[error(
        "tenant {tenant} already holds {max} WatchRotations streams on this replica (its limit); close one, or retry with backoff (another replica may take it)"
    )]
    Tenant {
        /// The tenant.
        tenant: TenantId,
        /// Its limit.
        max: usize,
    },
}

/// Admission for streams by their own budget ([`StreamLimits`]): a
/// reconnect herd or one noisy tenant cannot hold every slot of a replica,
/// and the replica holds no more streams than its memory was sized for.
pub struct StreamSlots {
    limits: StreamLimits,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_tenant: HashMap<TenantId, usize>,
}

/// One admitted stream; frees its slot when dropped.
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    /// `None`: an operator's stream, counted in the replica's total only.
    tenant: Option<TenantId>,
}

impl StreamSlots {
    /// Slots for `limits`.
    pub fn new(limits: StreamLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::default(),
        })
    }

    /// Streams open on this replica, all tenants and operators.
    pub fn open_total(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .total
    }

    /// Admits a stream of `tenant`'s workloads (`None`: an operator's,
    /// which takes no tenant slot), or says why not.
    ///
    /// # Errors
    /// [`StreamsFull`] when the replica or the tenant holds its limit.
    pub fn acquire(self: &Arc<Self>, tenant: Option<TenantId>) -> Result<StreamSlot, StreamsFull> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.total >= self.limits.max {
            return Err(StreamsFull::Replica {
                max: self.limits.max,
            });
        }
        if let Some(t) = tenant {
            let n = open.per_tenant.entry(t).or_insert(0);
            if *n >= self.limits.per_tenant {
                return Err(StreamsFull::Tenant {
                    tenant: t,
                    max: self.limits.per_tenant,
                });
            }
            *n += 1;
        }
        open.total += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            tenant,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.total -= 1;
        if let Some(t) = self.tenant
            && let Some(n) = open.per_tenant.get_mut(&t)
        {
            *n -= 1;
            if *n == 0 {
                open.per_tenant.remove(&t);
            }
        }
    }
}

/// Timing rules of every stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamTiming {
    /// Heartbeat period when idle.
    pub heartbeat: Duration,
    /// Streams end (resumably) after a jittered 75–100 % of this, so a fleet
    /// that connected in one burst (after a partition, a deploy) spreads over
    /// the replicas again instead of staying where the herd landed.
    pub max_age: Option<Duration>,
}

/// What a subscription asked for.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Tenant watched.
    pub tenant: TenantId,
    /// Exchanges watched; empty means all.
    pub exchanges: BTreeSet<ExchangeId>,
    /// Resume point (0: none).
    pub after_seq: u64,
}

impl Subscription {
    fn wants(&self, tenant: TenantId, exchange: ExchangeId) -> bool {
        tenant == self.tenant && (self.exchanges.is_empty() || self.exchanges.contains(&exchange))
    }
}

/// One message of the stream, before it is put on the wire.
#[derive(Debug)]
///
/// Kept pointer-sized: each stream's channel allocates its slots up front, so
/// the item size is paid by every idle subscriber.
pub enum WatchItem {
    /// Current state of one credential.
    State(Box<CredentialRecord>),
    /// A change, shared with every other subscriber.
    Event(Arc<CredentialEvent>),
    /// Idle tick carrying the last sequence delivered and the newest event
    /// seq of the tenant that this replica knows.
    Heartbeat {
        /// Resume point.
        seq: u64,
        /// Head of the tenant's log.
        head: u64,
    },
    /// The stream ends with this error (resumable where it says so).
    End(Box<BrokerError>),
}

/// One subscription, polled directly by its gRPC response stream: no task
/// or channel of its own, so an idle subscriber costs a broadcast receiver
/// and this struct, and a delivery costs one wake-up.
///
/// Its timers and cancellation wait live as long as the subscription: a
/// delivery touches neither the timer wheel nor the token's waiter list.
pub struct Watch {
    broker: Arc<Broker>,
    sub: Subscription,
    timing: StreamTiming,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    _slot: Option<StreamSlot>,
    live: broadcast::Receiver<Arc<CredentialEvent>>,
    cursor: u64,
    /// Newest event seq of the tenant seen (snapshot, table, hub).
    head: u64,
    started: bool,
    done: bool,
    /// Fires at the heartbeat deadline; re-armed lazily from `last_sent`.
    heartbeat: Pin<Box<Sleep>>,
    last_sent: Instant,
    aged: Option<Pin<Box<Sleep>>>,
    pending: VecDeque<WatchItem>,
}

impl Watch {
    /// Subscribes now (before any state is read, so nothing committed in
    /// between is lost); the state is read on the first poll.
    pub fn new(
        broker: Arc<Broker>,
        sub: Subscription,
        timing: StreamTiming,
        cancel: CancellationToken,
        slot: Option<StreamSlot>,
    ) -> Self {
        let live = broker.hub().subscribe();
        let now = Instant::now();
        let aged = timing.max_age.map(|age| {
            use rand::Rng as _;
            Box::pin(sleep_until(
                now + age.mul_f64(rand::rng().random_range(0.75..=1.0)),
            ))
        });
        Self {
            broker,
            cursor: sub.after_seq,
            head: 0,
            sub,
            timing,
            cancelled: Box::pin(cancel.cancelled_owned()),
            _slot: slot,
            live,
            started: false,
            done: false,
            heartbeat: Box::pin(sleep_until(now + timing.heartbeat)),
            last_sent: now,
            aged,
            pending: VecDeque::new(),
        }
    }

    /// The stream of items; it ends after an `End` item.
    pub fn into_stream(self) -> impl futures::Stream<Item = WatchItem> + Send {
        futures::stream::unfold(
            self,
            |mut w| async move { w.next().await.map(|item| (item, w)) },
        )
    }

    fn end(&mut self, e: BrokerError) {
        self.pending.push_back(WatchItem::End(Box::new(e)));
        self.done = true;
    }

    /// The next item, or `None` once the stream is over.
    pub async fn next(&mut self) -> Option<WatchItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            if !self.started {
                self.started = true;
                self.start().await;
                continue;
            }
            let aged = async {
                match self.aged.as_mut() {
                    Some(t) => t.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.cancelled.as_mut() => self.end(BrokerError::ShuttingDown { resume_after: self.cursor }),
                () = aged => self.end(BrokerError::StreamAged { resume_after: self.cursor }),
                () = self.heartbeat.as_mut() => {
                    let now = Instant::now();
                    let due = self.last_sent + self.timing.heartbeat;
                    if now >= due {
                        self.last_sent = now;
                        self.heartbeat.as_mut().reset(now + self.timing.heartbeat);
                        return Some(WatchItem::Heartbeat { seq: self.cursor, head: self.head.max(self.cursor) });
                    }
                    // Something was sent since the timer was armed.
                    self.heartbeat.as_mut().reset(due);
                }
                got = self.live.recv() => match got {
                    Ok(event) => {
                        if event.tenant == self.sub.tenant {
                            self.head = self.head.max(event.seq);
                        }
                        if event.seq > self.cursor && self.sub.wants(event.tenant, event.exchange) {
                            self.cursor = event.seq;
                            self.last_sent = Instant::now();
                            return Some(WatchItem::Event(event));
                        }
                    }
                    // Fell behind the hub: the table has everything, re-read it.
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(tenant = %self.sub.tenant, missed, "watch subscriber lagged; catching up from the table");
                        self.catch_up().await;
                    }
                    Err(RecvError::Closed) => self.done = true,
                }
            }
        }
    }

    /// Full state, then (when resuming) the events after `after_seq`. A
    /// resume point below retention, or above the newest event (nothing
    /// would ever arrive after it), ends the stream with a resync status.
    async fn start(&mut self) {
        let pruned = if self.sub.after_seq > 0 {
            match self
                .broker
                .opens()
                .pruned_through(self.broker.metadata())
                .await
            {
                Ok(pruned) if self.sub.after_seq < pruned => {
                    return self.end(BrokerError::ResumeTooOld {
                        after_seq: self.sub.after_seq,
                    });
                }
                Ok(pruned) => pruned,
                Err(e) => return self.end(e.into()),
            }
        } else {
            0
        };
        match self
            .broker
            .opens()
            .snapshot(self.broker.metadata(), self.sub.tenant)
            .await
        {
            Ok(state) => {
                let (records, seq) = (&state.0, state.1);
                let head = seq.max(pruned);
                if self.sub.after_seq > head {
                    return self.end(BrokerError::ResumeAhead {
                        after_seq: self.sub.after_seq,
                        head,
                    });
                }
                self.head = self.head.max(seq);
                // A fresh subscription starts at the state: older events are
                // already reflected in it. A resuming one asked for its replay.
                if self.sub.after_seq == 0 {
                    self.cursor = seq;
                }
                for r in records
                    .iter()
                    .filter(|r| self.sub.wants(r.tenant, r.exchange))
                {
                    self.pending
                        .push_back(WatchItem::State(Box::new(r.clone())));
                }
            }
            Err(e) => return self.end(e.into()),
        }
        if self.sub.after_seq > 0 {
            self.catch_up().await;
        }
    }

    /// Queues every stored event after the cursor.
    async fn catch_up(&mut self) {
        loop {
            let page = match self
                .broker
                .opens()
                .events_after(
                    self.broker.metadata(),
                    self.sub.tenant,
                    self.cursor,
                    CATCH_UP_PAGE,
                )
                .await
            {
                Ok(p) => p,
                Err(e) => return self.end(e.into()),
            };
            let full = page.len() == CATCH_UP_PAGE as usize;
            for e in page.iter() {
                self.cursor = e.seq;
                self.head = self.head.max(e.seq);
                if self.sub.wants(e.tenant, e.exchange) {
                    self.pending.push_back(WatchItem::Event(Arc::clone(e)));
                }
            }
            if !full {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use secrecy::SecretString;

    use super::*;

    #[test]
    fn streams_are_admitted_by_their_own_budget() {
        let slots = StreamSlots::new(StreamLimits {
            max: 3,
            per_tenant: 2,
        });
        let (a, b) = (
            TenantId::new(uuid::Uuid::new_v4()),
            TenantId::new(uuid::Uuid::new_v4()),
        );
        let a1 = slots.acquire(Some(a)).unwrap();
        let _a2 = slots.acquire(Some(a)).unwrap();
        assert_eq!(
            slots.acquire(Some(a)).err(),
            Some(StreamsFull::Tenant { tenant: a, max: 2 })
        );
        // An operator's stream takes no tenant slot, but counts for the replica.
        let op = slots.acquire(None).unwrap();
        assert_eq!(slots.open_total(), 3);
        assert_eq!(
            slots.acquire(Some(b)).err(),
            Some(StreamsFull::Replica { max: 3 })
        );
        drop(op);
        let _b1 = slots.acquire(Some(b)).unwrap();
        drop(a1);
        assert_eq!(slots.open_total(), 2);
        let _a3 = slots.acquire(Some(a)).unwrap();
    }
    use crate::broker::BrokerSettings;
    use crate::broker::context::RequestContext;
    use crate::broker::types::CredentialSet;
    use crate::broker::validate::FormatCheckValidator;
    use crate::cache::CredentialCache;
    use crate::clock::SystemClock;
    use crate::memstore::{MemoryMetadataStore, MemorySecretStore};
    use crate::rotation::hub::Hub;

    fn set(n: u32) -> CredentialSet {
        CredentialSet {
            api_key: format!("key{n:010}"),
            api_secret: SecretString::from(format!("secret{n:010}")),
            passphrase: None,
        }
    }

    /// A subscriber that stops reading while many events pass falls behind
    /// the hub's bound (16 here); it is caught up from the table, never
    /// skipped.
    #[tokio::test]
    async fn a_lagging_subscriber_is_caught_up_from_the_table() {
        let broker = Arc::new(Broker::new(
            Arc::new(MemorySecretStore::default()),
            Arc::new(MemoryMetadataStore::default()),
            Arc::new(FormatCheckValidator),
            CredentialCache::new(16, time::Duration::minutes(5), time::Duration::hours(1)),
            Hub::new(16),
            Arc::new(SystemClock),
            BrokerSettings::default(),
        ));
        let tenant = TenantId::new(uuid::Uuid::new_v4());
        broker
            .validate_and_store(
                &RequestContext::system("test"),
                tenant,
                ExchangeId::Binance,
                set(0),
            )
            .await
            .unwrap();
        let slot = StreamSlots::new(StreamLimits {
            max: 1,
            per_tenant: 1,
        })
        .acquire(Some(tenant))
        .unwrap();
        let sub = Subscription {
            tenant,
            exchanges: BTreeSet::new(),
            after_seq: 0,
        };
        let cancel = CancellationToken::new();
        let timing = StreamTiming {
            heartbeat: Duration::from_secs(60),
            max_age: None,
        };
        let mut w = Watch::new(broker.clone(), sub, timing, cancel.clone(), Some(slot));
        assert!(matches!(w.next().await, Some(WatchItem::State(_))));
        // 100 rotations while nobody reads: far more than the hub holds.
        for n in 1..=100 {
            broker
                .rotate(
                    &RequestContext::system("test"),
                    tenant,
                    ExchangeId::Binance,
                    set(n),
                    None,
                )
                .await
                .unwrap();
        }
        let mut seqs = Vec::new();
        while seqs.len() < 100 {
            match tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .unwrap()
            {
                Some(WatchItem::Event(e)) => seqs.push(e.seq),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Seq 1 was the STORED event reflected in the state; 2..=101 follow.
        assert_eq!(seqs, (2..=101).collect::<Vec<u64>>());
        cancel.cancel();
    }
}
