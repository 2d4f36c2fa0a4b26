//! The Rust client (`credbroker-client`): a [`CredentialHandle`] that
//! always holds the latest credential sets of a tenant, read lock-free;
//! [`token`] (bearer token file, re-read on change) and [`agent`] (the
//! sidecar writing `{exchange}.json` files). It depends on the contract
//! (`credbroker-proto`) and the core's types, never on the server.
//!
//! A supervisor task keeps one WatchRotations stream open, rotating through
//! the configured endpoints; it reconnects with jittered exponential backoff
//! and resumes from the last sequence it saw, fetches a set only when its
//! version changed (so reconnects cause no needless reloads), acknowledges
//! the version it now holds, and keeps the last good value while the broker
//! is unreachable. Every full-state snapshot on (re)connect is authoritative:
//! an exchange it leaves out was deleted.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use credbroker_core::backoff::Backoff;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use secrecy::SecretString;
use time::OffsetDateTime;
use token::BrokerClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

pub mod agent;
pub mod token;

use credbroker_proto::pb::{self, EventKind};

use credbroker_proto::pb::watch_rotations_response::Message;

use credbroker_core::broker::types::{CredentialSet, ExchangeId, TenantId};

/// How to reach the broker and what to watch.
#[derive(Clone)]
pub struct ClientConfig {
    /// Broker endpoints (`https://host:port`), tried in turn.
    pub endpoints: Vec<String>,
    /// CA bundle the broker's certificate chains to (PEM).
    pub ca_pem: Vec<u8>,
    /// Our client certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// Our private key (PEM).
    pub key_pem: SecretString,
    /// Name to verify in the broker's certificate (default: the endpoint host).
    pub domain: Option<String>,
    /// Tenant watched.
    pub tenant: TenantId,
    /// Exchanges watched; empty means all of the tenant's.
    pub exchanges: Vec<ExchangeId>,
    /// Instance name sent with acknowledgements (pod name).
    pub instance: Option<String>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Reconnect when no message (not even a heartbeat) arrives this long.
    pub silence_limit: Duration,
    /// Time one connection attempt (TCP and TLS) may take. gRPC's
    /// connection backoff gives every attempt at least 20 s
    /// (`MIN_CONNECT_TIMEOUT`): when a replica dies, its pods reconnect to
    /// the others at once, and a shorter deadline abandons handshakes the
    /// busy survivors were about to finish, so the whole fleet retries.
    pub connect_timeout: Duration,
    /// Bearer token sent on every call, re-read when the file changes.
    pub token: Option<token::TokenFile>,
    /// Ask for the sets on the stream itself (`include_credentials`, as
    /// Envoy SDS and SPIRE's Workload API push theirs): a rotation then
    /// costs no GetCredentials round trip. A set the stream does not carry
    /// (a broker that could not read or record it, or one older than the
    /// field) is fetched as without it. Default: true.
    pub include_credentials: bool,
    /// Each acknowledgement waits a random delay up to this long after the
    /// version was taken, so a fleet's acknowledgements spread out instead
    /// of landing together with its swap: they are bookkeeping (who holds
    /// which version), and 10,000 of them in the swap's second slowed the
    /// swap itself (docs/performance.md). Default: 5 s.
    pub ack_jitter: Duration,
}

impl ClientConfig {
    /// Defaults: backoff 100 ms … 30 s, silence limit 15 s (three missed
    /// heartbeats at the server default of 5 s), 20 s per connection
    /// attempt.
    pub fn new(
        endpoints: Vec<String>,
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: SecretString,
        tenant: TenantId,
    ) -> Self {
        Self {
            endpoints,
            ca_pem,
            cert_pem,
            key_pem,
            domain: None,
            tenant,
            exchanges: Vec::new(),
            instance: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            silence_limit: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(20),
            token: None,
            include_credentials: true,
            ack_jitter: Duration::from_secs(5),
        }
    }
}

/// The sets of one exchange as last fetched.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Exchange.
    pub exchange: ExchangeId,
    /// Version of `current`.
    pub version: u64,
    /// The set to sign with.
    pub current: CredentialSet,
    /// The previous set, version and deadline while an overlap is open.
    pub previous: Option<(CredentialSet, u64, OffsetDateTime)>,
}

/// Everything the handle holds.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Per exchange.
    pub credentials: BTreeMap<ExchangeId, Arc<Credentials>>,
    /// Last event sequence seen.
    pub last_seq: u64,
}

/// Always the latest credentials; cheap to clone, lock-free to read.
#[derive(Clone)]
pub struct CredentialHandle {
    state: Arc<ArcSwap<Snapshot>>,
    changes: watch::Receiver<u64>,
    connection: watch::Receiver<Option<Arc<str>>>,
    cancel: CancellationToken,
}

impl CredentialHandle {
    /// Starts watching in the background.
    pub fn start(cfg: ClientConfig) -> Self {
        let state = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let (tx, changes) = watch::channel(0u64);
        let (connected, connection) = watch::channel(None);
        let cancel = CancellationToken::new();
        let (acks, queued) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(acknowledge(
            cfg.tenant,
            cfg.instance.clone().unwrap_or_default(),
            cfg.ack_jitter,
            queued,
            cancel.clone(),
        ));
        let sup = Supervisor {
            cfg,
            state: state.clone(),
            changes: tx,
            connected,
            generation: 0,
            pending: BTreeMap::new(),
            acks,
        };
        tokio::spawn(sup.run(cancel.clone()));
        Self {
            state,
            changes,
            connection,
            cancel,
        }
    }

    /// The current credentials of `exchange`, if any.
    pub fn get(&self, exchange: ExchangeId) -> Option<Arc<Credentials>> {
        self.state.load().credentials.get(&exchange).cloned()
    }

    /// Everything held.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.load_full()
    }

    /// A receiver that changes whenever a set is swapped in or removed; its
    /// value counts the changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The endpoint whose WatchRotations stream the broker admitted (None
    /// while connecting or between reconnects); the receiver sees every
    /// change.
    pub fn connection(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.connection.clone()
    }

    /// Waits until `exchange` is held at `version` or later.
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub async fn wait_for(
        &self,
        exchange: ExchangeId,
        version: u64,
        timeout: Duration,
    ) -> Result<Arc<Credentials>, &'static str> {
        let mut rx = self.changes();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(c) = self.get(exchange).filter(|c| c.version >= version) {
                    return c;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .map_err(|_| "timed out waiting for the credential version")
    }

    /// Stops the background task.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

struct Supervisor {
    cfg: ClientConfig,
    state: Arc<ArcSwap<Snapshot>>,
    changes: watch::Sender<u64>,
    /// The endpoint of the live stream, once the broker admitted it.
    connected: watch::Sender<Option<Arc<str>>>,
    generation: u64,
    /// Fetches to retry: the broker answered with a set older than an event
    /// announced (a replica that has not seen the event yet), or failed.
    pending: BTreeMap<ExchangeId, Pending>,
    /// Versions taken, for [`acknowledge`] to report.
    acks: tokio::sync::mpsc::UnboundedSender<(ExchangeId, u64, BrokerClient)>,
}

/// Reports each version the handle takes (AcknowledgeVersion), in order,
/// from this one task: it waits a random delay up to `jitter` after a
/// version is taken, so a fleet's acknowledgements spread out instead of
/// landing with its swap and the stream is read on at once; then it sends the
/// latest version of each exchange taken meanwhile, on the connection that
/// took it. An acknowledgement that fails is not retried: the next one
/// supersedes it.
async fn acknowledge(
    tenant: TenantId,
    instance: String,
    jitter: Duration,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<(ExchangeId, u64, BrokerClient)>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            q = queued.recv() => match q {
                Some(q) => q,
                None => return,
            },
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(jitter.mul_f64(rand::random::<f64>())) => {}
        }
        let mut latest = BTreeMap::new();
        let (ex, version, client) = first;
        latest.insert(ex, (version, client));
        while let Ok((ex, version, client)) = queued.try_recv() {
            latest.insert(ex, (version, client));
        }
        for (ex, (version, mut client)) in latest {
            let ack = pb::AcknowledgeVersionRequest {
                tenant_id: tenant.to_string(),
                exchange: ex.as_str().to_owned(),
                version,
                instance: instance.clone(),
            };
            if let Err(s) = client.acknowledge_version(ack).await {
                tracing::debug!(exchange = %ex, "acknowledgement not recorded: {}", s.message());
            }
        }
    }
}

/// A fetch that has not yet produced the announced version.
struct Pending {
    /// The version an event or the state announced.
    min_version: u64,
    backoff: Backoff,
    since: Instant,
    next_at: Instant,
    warned: bool,
}

/// An error with its causes ("transport error: ... : Connection refused"):
/// tonic's transport error alone does not say what failed.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// First retry delay of a fetch that got an older set than announced.
const REFETCH_MIN: Duration = Duration::from_millis(50);
/// Longest retry delay of such a fetch.
const REFETCH_MAX: Duration = Duration::from_secs(5);
/// Waiting this long for the announced version is worth a warning.
const REFETCH_WARN_AFTER: Duration = Duration::from_secs(5);

/// Why a session ended.
enum SessionEnd {
    Cancelled,
    /// Worth retrying; `progressed` when it delivered anything.
    Retry {
        why: String,
        progressed: bool,
    },
}

impl Supervisor {
    async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        // A fleet's pods start at different endpoints (and move on in
        // turn), so replicas share them and a lost replica's pods spread
        // over the others.
        let mut attempt = rand::random_range(0..self.cfg.endpoints.len().max(1));
        loop {
            let Some(endpoint) = self
                .cfg
                .endpoints
                .get(attempt % self.cfg.endpoints.len().max(1))
                .cloned()
            else {
                tracing::error!("credbroker client has no endpoints");
                return;
            };
            attempt += 1;
            let end = self.session(&endpoint, &cancel).await;
            self.connected.send_replace(None);
            match end {
                SessionEnd::Cancelled => return,
                SessionEnd::Retry { why, progressed } => {
                    if progressed {
                        backoff.reset();
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(%endpoint, retry_in_ms = wait.as_millis() as u64, "credbroker stream ended: {why}");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn connect(&self, endpoint: &str) -> Result<BrokerClient, String> {
        use secrecy::ExposeSecret as _;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.cfg.ca_pem))
            .identity(Identity::from_pem(
                &self.cfg.cert_pem,
                self.cfg.key_pem.expose_secret(),
            ));
        if let Some(d) = &self.cfg.domain {
            tls = tls.domain_name(d.clone());
        }
        let ch = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| format!("bad endpoint: {e}"))?
            .tls_config(tls)
            .map_err(|e| format!("tls: {e}"))?
            .connect_timeout(self.cfg.connect_timeout)
            .connect()
            .await
            .map_err(|e| format!("connect: {}", chain(&e)))?;
        Ok(token::broker_client(
            ch,
            token::Bearer(self.cfg.token.clone()),
        ))
    }

    async fn session(&mut self, endpoint: &str, cancel: &CancellationToken) -> SessionEnd {
        let mut client = match self.connect(endpoint).await {
            Ok(c) => c,
            Err(why) => {
                return SessionEnd::Retry {
                    why,
                    progressed: false,
                };
            }
        };
        let after_seq = self.state.load().last_seq;
        let req = pb::WatchRotationsRequest {
            tenant_id: self.cfg.tenant.to_string(),
            exchanges: self
                .cfg
                .exchanges
                .iter()
                .map(|e| e.as_str().to_owned())
                .collect(),
            after_seq,
            include_credentials: self.cfg.include_credentials,
        };
        let mut stream = match client.watch_rotations(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => return self.on_status(s, false),
        };
        // Admitted: the broker holds the subscription from here on.
        self.connected.send_replace(Some(Arc::from(endpoint)));
        let mut progressed = false;
        // Exchanges named by this connection's initial state; None once the
        // state phase is over.
        let mut in_state: Option<Vec<ExchangeId>> = Some(Vec::new());
        loop {
            let retry_at = self.pending.values().map(|p| p.next_at).min();
            let msg = tokio::select! {
                () = cancel.cancelled() => return SessionEnd::Cancelled,
                () = sleep_until_opt(retry_at) => {
                    self.retry_due(&mut client).await;
                    continue;
                }
                m = tokio::time::timeout(self.cfg.silence_limit, stream.message()) => m,
            };
            let msg = match msg {
                Err(_) => {
                    return SessionEnd::Retry {
                        why: format!("no message within {:?}", self.cfg.silence_limit),
                        progressed,
                    };
                }
                Ok(Err(s)) => return self.on_status(s, progressed),
                Ok(Ok(None)) => {
                    return SessionEnd::Retry {
                        why: "stream closed".into(),
                        progressed,
                    };
                }
                Ok(Ok(Some(m))) => m,
            };
            progressed = true;
            let pb::WatchRotationsResponse {
                message: Some(message),
                credentials: pushed,
            } = msg
            else {
                continue;
            };
            if !matches!(message, Message::State(_))
                && let Some(named) = in_state.take()
            {
                self.forget_absent(&named);
            }
            match message {
                Message::State(meta) => {
                    let Ok(ex) = meta.exchange.parse::<ExchangeId>() else {
                        continue;
                    };
                    if let Some(named) = in_state.as_mut() {
                        named.push(ex);
                    }
                    self.refresh(&mut client, ex, meta.version, pushed).await;
                }
                Message::Event(e) => {
                    let Ok(ex) = e.exchange.parse::<ExchangeId>() else {
                        continue;
                    };
                    let kind = EventKind::try_from(e.kind).unwrap_or(EventKind::Unspecified);
                    if kind == EventKind::Deleted {
                        self.pending.remove(&ex);
                        self.remove(ex);
                    } else if kind == EventKind::PreviousExpired
                        && self.drop_previous(ex, e.version)
                    {
                        // The overlap ended and the version is held: the
                        // previous set is dropped here, with nothing to
                        // fetch (a whole fleet refetching at the overlap's
                        // end would be a load spike that changes nothing).
                    } else {
                        self.refresh(&mut client, ex, e.version, pushed).await;
                    }
                    self.set_seq(e.seq);
                }
                Message::Heartbeat(h) => self.set_seq(h.seq),
            }
        }
    }

    fn on_status(&mut self, s: Status, progressed: bool) -> SessionEnd {
        if s.code() == Code::OutOfRange {
            // Our resume point fell out of retention: start over from full
            // state (which the next connection sends anyway).
            self.state.rcu(|st| Snapshot {
                credentials: st.credentials.clone(),
                last_seq: 0,
            });
        }
        SessionEnd::Retry {
            why: format!("{:?}: {}", s.code(), s.message()),
            progressed,
        }
    }

    fn set_seq(&self, seq: u64) {
        let cur = self.state.load();
        if seq > cur.last_seq {
            self.state.rcu(|st| Snapshot {
                credentials: st.credentials.clone(),
                last_seq: st.last_seq.max(seq),
            });
        }
    }

    fn bump(&mut self) {
        self.generation += 1;
        let _ = self.changes.send(self.generation);
    }

    /// Publishes `creds` as what `ex` holds now (None: nothing), and tells
    /// the watchers of [`CredentialHandle::changes`].
    fn publish(&mut self, ex: ExchangeId, creds: Option<Arc<Credentials>>) {
        self.state.rcu(|st| {
            let mut c = st.credentials.clone();
            match &creds {
                Some(set) => c.insert(ex, Arc::clone(set)),
                None => c.remove(&ex),
            };
            Snapshot {
                credentials: c,
                last_seq: st.last_seq,
            }
        });
        self.bump();
    }

    fn remove(&mut self, ex: ExchangeId) {
        if self.state.load().credentials.contains_key(&ex) {
            self.publish(ex, None);
        }
    }

    /// Drops the previous set of `ex` when the held version is at least
    /// `version`; false when it is older (then a fetch is needed).
    fn drop_previous(&mut self, ex: ExchangeId, version: u64) -> bool {
        let Some(held) = self.state.load().credentials.get(&ex).cloned() else {
            return false;
        };
        if held.version < version {
            return false;
        }
        if held.previous.is_some() {
            let dropped = Credentials {
                previous: None,
                ..(*held).clone()
            };
            self.publish(ex, Some(Arc::new(dropped)));
        }
        true
    }

    fn forget_absent(&mut self, named: &[ExchangeId]) {
        let held: Vec<ExchangeId> = self.state.load().credentials.keys().copied().collect();
        for ex in held {
            let watched = self.cfg.exchanges.is_empty() || self.cfg.exchanges.contains(&ex);
            if watched && !named.contains(&ex) {
                self.remove(ex);
            }
        }
    }

    /// Fetches `ex` unless version `version` is already held, and never
    /// accepts a set older than `version`: the fetch is retried with backoff
    /// (while the stream keeps being read) until the broker serves it. A
    /// failed fetch keeps the last good value and is retried the same way.
    /// A set the stream carried (`pushed`) is taken instead of a fetch when
    /// it is at least `version`.
    async fn refresh(
        &mut self,
        client: &mut BrokerClient,
        ex: ExchangeId,
        version: u64,
        pushed: Option<pb::GetCredentialsResponse>,
    ) {
        // Deduplicate by version: reconnects and replays cause no reload.
        // (Not `>=`: a credential deleted and stored again restarts at 1.)
        let held = self.state.load().credentials.get(&ex).map(|c| c.version);
        if held == Some(version) {
            self.pending.remove(&ex);
            return;
        }
        let now = Instant::now();
        let p = self.pending.entry(ex).or_insert(Pending {
            min_version: version,
            backoff: Backoff::new(REFETCH_MIN, REFETCH_MAX),
            since: now,
            next_at: now,
            warned: false,
        });
        // A newer announcement replaces the older one (a delete and a new
        // store may announce a lower version: the latest announcement wins).
        p.min_version = version;
        p.next_at = now;
        if let Some(resp) = pushed
            && self.take(client, ex, resp)
        {
            return;
        }
        self.fetch(client, ex).await;
    }

    /// Retries every pending fetch that is due.
    async fn retry_due(&mut self, client: &mut BrokerClient) {
        let now = Instant::now();
        let due: Vec<ExchangeId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next_at <= now)
            .map(|(ex, _)| *ex)
            .collect();
        for ex in due {
            self.fetch(client, ex).await;
        }
    }

    /// One attempt of the pending fetch of `ex`.
    async fn fetch(&mut self, client: &mut BrokerClient, ex: ExchangeId) {
        let Some(min_version) = self.pending.get(&ex).map(|p| p.min_version) else {
            return;
        };
        let resp = client
            .get_credentials(pb::GetCredentialsRequest {
                tenant_id: self.cfg.tenant.to_string(),
                exchange: ex.as_str().to_owned(),
                min_version,
            })
            .await;
        let resp = match resp {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                self.pending.remove(&ex);
                self.remove(ex);
                return;
            }
            Err(s) => {
                tracing::warn!(exchange = %ex, "keeping the last good credentials: fetch failed: {}", s.message());
                self.backoff(ex);
                return;
            }
        };
        if !self.take(client, ex, resp) {
            self.backoff(ex);
        }
    }

    /// Adopts `resp` (a fetch's answer or a set the stream carried) for the
    /// pending announcement of `ex`, then acknowledges it; false when it is
    /// incomplete or older than announced (the announcement stays pending).
    fn take(
        &mut self,
        client: &BrokerClient,
        ex: ExchangeId,
        resp: pb::GetCredentialsResponse,
    ) -> bool {
        let Some(min_version) = self.pending.get(&ex).map(|p| p.min_version) else {
            return true;
        };
        let Some(creds) = to_credentials(ex, resp) else {
            tracing::warn!(exchange = %ex, "keeping the last good credentials: the broker sent an incomplete set");
            return false;
        };
        let version = creds.version;
        if version < min_version {
            // A replica (or its cache) that has not seen the event yet.
            return false;
        }
        if let Some(p) = self.pending.remove(&ex)
            && p.warned
        {
            tracing::info!(exchange = %ex, version, waited_ms = p.since.elapsed().as_millis() as u64,
                "the broker now serves the announced version");
        }
        let held = self.state.load().credentials.get(&ex).map(|c| c.version);
        if held == Some(version) {
            return true;
        }
        self.publish(ex, Some(Arc::new(creds)));
        let _ = self.acks.send((ex, version, client.clone()));
        true
    }

    /// Schedules the next attempt of `ex`'s fetch (jittered exponential
    /// backoff), and says so once the announced version is long in coming.
    fn backoff(&mut self, ex: ExchangeId) {
        let Some(p) = self.pending.get_mut(&ex) else {
            return;
        };
        p.next_at = Instant::now() + p.backoff.next_delay();
        if !p.warned && p.since.elapsed() >= REFETCH_WARN_AFTER {
            p.warned = true;
            tracing::warn!(exchange = %ex, announced = p.min_version, waited_ms = p.since.elapsed().as_millis() as u64,
                "the broker still serves an older set than the announced version; keeping the last good set and retrying");
        }
    }
}

/// Sleeps until `at`, or for ever when there is nothing to wait for.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn to_set(s: pb::CredentialSet) -> CredentialSet {
    let pb::CredentialSet {
        api_key,
        api_secret,
        passphrase,
    } = s;
    CredentialSet {
        api_key,
        api_secret: SecretString::from(api_secret),
        passphrase: passphrase.map(SecretString::from),
    }
}

fn to_credentials(exchange: ExchangeId, r: pb::GetCredentialsResponse) -> Option<Credentials> {
    let pb::GetCredentialsResponse {
        current,
        version,
        status: _,
        previous,
        previous_version,
        previous_valid_until,
        stale: _,
    } = r;
    let current = to_set(current?);
    if current.api_key.is_empty() || version == 0 {
        return None;
    }
    let previous = match (previous, previous_version, previous_valid_until) {
        (Some(p), Some(v), Some(t)) => {
            let until = OffsetDateTime::from_unix_timestamp(t.seconds).ok()?;
            Some((to_set(p), v, until))
        }
        _ => None,
    };
    Some(Credentials {
        exchange,
        version,
        current,
        previous,
    })
}
