//! The event listener: one per replica, on its own PostgreSQL connection
//! (NOTIFY only arrives through a `Connection`, never through the pool).
//!
//! A notification is only a wake-up: the listener reads every event after the
//! last seq it delivered from the table, in order, and delivers each (cache
//! invalidation, then the hub). Notifications sent while it is disconnected
//! are lost, so after every reconnect it reads the table, and it also polls
//! on a timer as a backstop. Events become visible in seq order (writers hold
//! an advisory lock while they append), so "after the last seq" misses none.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;

use crate::store::row_to_event;

/// Events read per query.
const PAGE: i64 = 1000;

/// Listens for committed events from every replica.
pub struct EventListener {
    pg: tokio_postgres::Config,
    broker: Arc<Broker>,
    poll_every: Duration,
    lag: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl EventListener {
    /// A listener on `pg` delivering into `broker`; the table is re-read
    /// every `poll_every` even without notifications.
    pub fn new(mut pg: tokio_postgres::Config, broker: Arc<Broker>, poll_every: Duration) -> Self {
        pg.application_name("credbroker-listener");
        Self {
            pg,
            broker,
            poll_every,
            lag: None,
        }
    }

    /// Observes each event's commit-to-delivery time into `lag`.
    #[must_use]
    pub fn with_lag(mut self, lag: prometheus_client::metrics::histogram::Histogram) -> Self {
        self.lag = Some(lag);
        self
    }

    /// Runs until cancelled, reconnecting with jittered exponential backoff.
    /// `ready` turns true once the first session listens (events up to the
    /// seq it starts after are history, served from the table); until then
    /// the replica serves nothing.
    ///
    /// # Errors
    /// Never returns an error: connection failures are retried forever and
    /// logged.
    pub async fn task_main(
        self,
        ready: watch::Sender<bool>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut last: Option<u64> = None;
        let mut ready = Some(ready);
        let mut backoff =
            // Capped at 1 s: events flow again within about a second of
            // PostgreSQL accepting connections.
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            match self.session(&mut last, &mut ready, &cancel).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if cancel.is_cancelled() {
                        return Ok(());
                    }
                    tracing::warn!(
                        after_seq = last.unwrap_or(0),
                        "event listener lost PostgreSQL ({e:#}); reconnecting"
                    );
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    async fn session(
        &self,
        last: &mut Option<u64>,
        ready: &mut Option<watch::Sender<bool>>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (client, mut conn) = self.pg.connect(NoTls).await?;
        let (wake_tx, mut wake) = mpsc::unbounded_channel::<()>();
        // The connection task ends when the server goes away; dropping its
        // sender then ends this session.
        let conn_task = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(msg) = messages.next().await {
                match msg {
                    Ok(AsyncMessage::Notification(_)) => {
                        let _ = wake_tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("listener connection error: {e}");
                        break;
                    }
                }
            }
        });
        let _abort = AbortOnDrop(conn_task);
        client
            .batch_execute("SET ROLE credbroker_system; LISTEN credbroker_events")
            .await?;
        if last.is_none() {
            let row = client
                .query_one("SELECT coalesce(max(seq), 0) FROM credential_events", &[])
                .await?;
            *last = Some(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0));
        }
        if let Some(r) = ready.take() {
            r.send_replace(true);
        }
        tracing::info!(after_seq = last.unwrap_or(0), "event listener connected");
        loop {
            self.drain(&client, last).await?;
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                woke = wake.recv() => {
                    if woke.is_none() {
                        anyhow::bail!("connection closed");
                    }
                    // One read covers every notification queued so far.
                    while wake.try_recv().is_ok() {}
                }
                () = tokio::time::sleep(self.poll_every) => {}
            }
        }
    }

    /// Delivers every event after `last`, in order.
    async fn drain(
        &self,
        client: &tokio_postgres::Client,
        last: &mut Option<u64>,
    ) -> anyhow::Result<()> {
        loop {
            let after = i64::try_from(last.unwrap_or(0)).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    "SELECT seq, tenant_id, exchange, kind, version, previous_version, previous_valid_until, occurred_at \
                     FROM credential_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &PAGE],
                )
                .await?;
            let n = rows.len();
            for row in &rows {
                let event = row_to_event(row)?;
                *last = Some(event.seq);
                if let Some(lag) = &self.lag {
                    let age = time::OffsetDateTime::now_utc() - event.occurred_at;
                    lag.observe(age.as_seconds_f64().max(0.0));
                }
                self.broker.deliver(event);
            }
            if n < PAGE as usize {
                return Ok(());
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
