//! Tenant webhooks: Standard Webhooks signing and delivery from the durable
//! outbox in PostgreSQL.
//!
//! A message is queued in the same transaction as the change it reports
//! (see `HealthUpdate::notice`), so a committed change always has its
//! message. The deliverer claims due messages (each claim is a lease, so a
//! crash mid-attempt only delays a message), POSTs them with the
//! `webhook-id`, `webhook-timestamp` and `webhook-signature` headers, and on
//! anything but a 2xx retries with jittered exponential backoff (5 s …
//! 1 h) for up to [`MAX_ATTEMPTS`] attempts (about a day): at least once,
//! with a stable id receivers deduplicate on.
//!
//! The signing secret (`whsec_` + base64 of 32 random bytes) and the URL
//! (which may carry the receiver's own secret) are kept together in the
//! secret store at `{prefix}/{tenant}/webhook`; PostgreSQL holds only the
//! URL's host and the secret's version, and logs name the host only.
//! Where a webhook may go is [`target`]'s business.

pub mod target;

pub use crate::broker::webhook::{
    BadSecret, generate_secret, secret_key, secret_path, stored_endpoint,
};

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::Sha256;
use target::Sender;
pub use target::{
    Connect, DirectConnect, Resolve, SystemResolver, TargetPolicy, Targets, WebhookNet,
};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditRecord, AuditSink};

use crate::backoff::Backoff;

use crate::broker::error::MetadataStoreError;

use crate::broker::ports::{OutboxMessage, SecretStore, WebhookStore};

use crate::broker::types::TenantId;

use crate::telemetry::metrics::{Metrics, ResultLabel, TenantLabel};

/// Attempts before a message is given up (kept in the outbox, marked).
pub const MAX_ATTEMPTS: u32 = 30;
/// First retry delay.
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// How long a claimed message is withheld from other deliverers.
const CLAIM: time::Duration = time::Duration::minutes(2);
/// Messages claimed per pass.
const BATCH: u32 = 50;

/// The `webhook-signature` value: `v1,` and base64 of
/// HMAC-SHA256(`{id}.{timestamp}.{payload}`).
pub fn sign(key: &[u8], id: &str, timestamp: i64, payload: &str) -> String {
    #[allow(clippy::expect_used)] // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The `webhook-id` of an outbox message.
pub fn message_id(id: uuid::Uuid) -> String {
    format!("msg_{}", id.simple())
}

/// What delivery needs of an endpoint, read from the secret store once per
/// secret version: the signing key (zeroized on drop) and the URL.
struct Endpoint {
    key: zeroize::Zeroizing<Vec<u8>>,
    url: SecretString,
}

/// Endpoints read from the secret store, by (tenant, secret version).
type EndpointCache = HashMap<(TenantId, u64), Arc<Endpoint>>;

/// How many deliveries run at once.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryLimits {
    /// Tenants delivered to at once (each tenant's messages go one at a
    /// time, in order, so a receiver that hangs holds up only its tenant).
    pub tenants: usize,
    /// Requests in flight to one host, across tenants.
    pub per_host: usize,
}

impl Default for DeliveryLimits {
    fn default() -> Self {
        Self {
            tenants: 32,
            per_host: 4,
        }
    }
}

/// Delivers the outbox.
pub struct Deliverer {
    audit: Arc<dyn AuditSink>,
    store: Arc<dyn WebhookStore>,
    secrets: Arc<dyn SecretStore>,
    prefix: String,
    targets: Arc<Targets>,
    sender: Sender,
    metrics: Metrics,
    limits: DeliveryLimits,
    endpoints: Mutex<EndpointCache>,
    hosts: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Tenants whose backlog gauge was set, so a drained one is set to 0.
    reported: Mutex<BTreeSet<TenantId>>,
}

/// What one tenant's turn did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Delivered (2xx).
    pub delivered: usize,
    /// To be retried.
    pub retried: usize,
    /// Given up (too many attempts, or no endpoint any more).
    pub dropped: usize,
}

impl Deliverer {
    /// A deliverer: 10 s per attempt, targets checked by `targets`,
    /// connections opened by `connect`.
    ///
    /// # Errors
    /// When the TLS trust roots cannot be loaded.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        audit: Arc<dyn AuditSink>,
        store: Arc<dyn WebhookStore>,
        secrets: Arc<dyn SecretStore>,
        prefix: &str,
        metrics: Metrics,
        targets: Arc<Targets>,
        connect: Arc<dyn Connect>,
        limits: DeliveryLimits,
    ) -> Result<Self, String> {
        Ok(Self {
            audit,
            store,
            secrets,
            prefix: prefix.to_owned(),
            targets,
            sender: Sender::new(connect, Duration::from_secs(10))?,
            metrics,
            limits,
            endpoints: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
            reported: Mutex::new(BTreeSet::new()),
        })
    }

    async fn endpoint(&self, tenant: TenantId, version: u64) -> Result<Arc<Endpoint>, String> {
        if let Some(e) = lock(&self.endpoints).get(&(tenant, version)) {
            return Ok(e.clone());
        }
        let set = self
            .secrets
            .read(&secret_path(&self.prefix, tenant), version)
            .await
            .map_err(|e| format!("signing secret unreadable: {e}"))?;
        let key = secret_key(set.api_secret.expose_secret()).map_err(|e| e.to_string())?;
        let url = set.passphrase.ok_or(
            "the endpoint's URL is not in Vault (set before URLs moved there): set the webhook again",
        )?;
        let e = Arc::new(Endpoint {
            key: zeroize::Zeroizing::new(key),
            url,
        });
        lock(&self.endpoints).insert((tenant, version), e.clone());
        Ok(e)
    }

    fn host_slot(&self, host: &str) -> Arc<tokio::sync::Semaphore> {
        lock(&self.hosts)
            .entry(host.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.limits.per_host.max(1))))
            .clone()
    }

    /// One attempt at `msg`: Ok on a 2xx, else what went wrong (safe to
    /// store: a status, an error kind or a refusal naming the host, never a
    /// body or the URL's path).
    async fn attempt(&self, msg: &OutboxMessage, now: OffsetDateTime) -> Result<(), String> {
        let endpoint = msg.endpoint.as_ref().ok_or("no endpoint")?;
        let ep = self.endpoint(msg.tenant, endpoint.secret_version).await?;
        // Checked again at every delivery, after resolving the name now:
        // the policy or the DNS answer may have changed since SetWebhook.
        let target = self
            .targets
            .check(ep.url.expose_secret())
            .await
            .map_err(|r| format!("refused: {r}"))?;
        let id = message_id(msg.id);
        let ts = now.unix_timestamp();
        let headers = [
            ("content-type", "application/json".to_owned()),
            (
                "user-agent",
                concat!("credbroker-webhooks/", env!("CARGO_PKG_VERSION")).to_owned(),
            ),
            ("webhook-id", id.clone()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sign(&ep.key, &id, ts, &msg.payload)),
        ];
        let slot = self.host_slot(target.url.host_str().unwrap_or(""));
        let _permit = slot.acquire().await.map_err(|_| "shutting down")?;
        let status = self
            .sender
            .post(&target, &headers, msg.payload.clone())
            .await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }

    /// Attempts one message and records the outcome.
    async fn deliver(
        &self,
        msg: OutboxMessage,
        now: OffsetDateTime,
        pass: &mut Pass,
    ) -> Result<(), MetadataStoreError> {
        let outcome = self.attempt(&msg, now).await;
        let attempts = msg.attempts + 1;
        let delivered = outcome.is_ok();
        let (label, retry_at, result) = match &outcome {
            Ok(()) => {
                pass.delivered += 1;
                ("delivered", None, "delivered".to_owned())
            }
            Err(e) if msg.endpoint.is_none() || attempts >= MAX_ATTEMPTS => {
                pass.dropped += 1;
                ("dropped", None, format!("given up: {e}"))
            }
            Err(e) => {
                pass.retried += 1;
                let wait = Backoff::nth(RETRY_MIN, RETRY_MAX, msg.attempts);
                let at = now + time::Duration::try_from(wait).unwrap_or(CLAIM);
                ("retry", Some(at), e.clone())
            }
        };
        if let Err(e) = &outcome {
            let host = msg.endpoint.as_ref().map_or("", |e| e.host.as_str());
            tracing::warn!(tenant = %msg.tenant, host, id = %message_id(msg.id), attempts, "webhook not delivered: {e}");
        }
        // Each attempt is a background action of the system actor.
        let mut record =
            AuditRecord::system("webhook", "WebhookDelivery", msg.tenant, None, vec![]);
        record.resource = Cow::Borrowed("webhook");
        record.result = Cow::Borrowed(if delivered { "success" } else { "failure" });
        record.request_id = msg.id;
        if let Err(e) = self.audit.append(&record) {
            tracing::error!("a webhook delivery could not be audited: {e}");
        }
        self.metrics
            .families()
            .webhook_deliveries
            .get_or_create(&ResultLabel { result: label })
            .inc();
        self.store
            .finish_attempt(msg.id, delivered, &result, now, retry_at)
            .await
    }

    /// One tenant's claimed messages, one at a time, in order.
    async fn deliver_tenant(&self, msgs: Vec<OutboxMessage>) -> Result<Pass, MetadataStoreError> {
        let mut pass = Pass::default();
        for msg in msgs {
            self.deliver(msg, OffsetDateTime::now_utc(), &mut pass)
                .await?;
        }
        Ok(pass)
    }

    /// Sets the outbox gauges: the total and each tenant's backlog.
    async fn report_backlog(&self) {
        let Ok(backlog) = self.store.outbox_backlog().await else {
            return;
        };
        let f = self.metrics.families();
        let total: u64 = backlog.iter().map(|(_, n)| n).sum();
        f.webhook_outbox
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        let mut reported = lock(&self.reported);
        let now: BTreeSet<TenantId> = backlog.iter().map(|(t, _)| *t).collect();
        for gone in reported.difference(&now) {
            f.webhook_backlog
                .get_or_create(&TenantLabel {
                    tenant_id: gone.to_string(),
                })
                .set(0);
        }
        for (t, n) in &backlog {
            f.webhook_backlog
                .get_or_create(&TenantLabel {
                    tenant_id: t.to_string(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        *reported = now;
    }

    /// Delivers until cancelled: every `every` it claims what is due and
    /// hands each tenant's messages to a task of their own (at most
    /// `limits.tenants` at once, one per tenant), so a receiver that hangs
    /// delays only its own tenant. Messages of a tenant still busy wait for
    /// their claim to lapse. An unreachable PostgreSQL is logged and
    /// retried on the next pass.
    pub async fn task_main(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let mut running: tokio::task::JoinSet<(TenantId, Result<Pass, MetadataStoreError>)> =
            tokio::task::JoinSet::new();
        let mut busy = BTreeSet::<TenantId>::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    running.abort_all();
                    return;
                }
                () = tokio::time::sleep(every) => {}
            }
            while let Some(done) = running.try_join_next() {
                match done {
                    Ok((tenant, result)) => {
                        busy.remove(&tenant);
                        if let Err(e) = result {
                            tracing::warn!(%tenant, "webhook delivery failed to record an attempt (retried next pass): {e}");
                        }
                    }
                    Err(e) => tracing::error!("a webhook delivery task failed: {e}"),
                }
            }
            if running.len() < self.limits.tenants.max(1) {
                match self
                    .store
                    .claim_due(OffsetDateTime::now_utc(), CLAIM, BATCH)
                    .await
                {
                    Ok(due) => {
                        let mut by_tenant = BTreeMap::<TenantId, Vec<OutboxMessage>>::new();
                        for msg in due {
                            by_tenant.entry(msg.tenant).or_default().push(msg);
                        }
                        for (tenant, msgs) in by_tenant {
                            if !busy.insert(tenant) {
                                continue;
                            }
                            let me = self.clone();
                            running.spawn(async move { (tenant, me.deliver_tenant(msgs).await) });
                        }
                    }
                    Err(e) => {
                        tracing::warn!("webhook delivery pass failed (retried next pass): {e}");
                    }
                }
            }
            self.report_backlog().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's published example.
    #[test]
    fn signs_the_specifications_example() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(secret_key("nope").is_err());
        assert!(secret_key(generate_secret().expose_secret()).is_ok());
    }
}

// ---- configuration: the [webhooks] section, owned here (`config` re-exports it).

/// Webhook delivery from the outbox.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// How often the outbox is polled for due messages.
    pub poll_ms: u64,
    /// Allow plain `http://` receivers (default: https only).
    pub allow_http: bool,
    /// Internal networks receivers may be in (CIDRs; default none: loopback,
    /// link-local, private, CGNAT, multicast and unspecified addresses are
    /// refused).
    pub allow_networks: Vec<ipnet::IpNet>,
    /// Host names allowed whatever they resolve to (exact match).
    pub allow_hosts: Vec<String>,
    /// Tenants delivered to at once.
    pub concurrent_tenants: usize,
    /// Requests in flight to one receiver host.
    pub per_host: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            poll_ms: 1000,
            allow_http: false,
            allow_networks: Vec::new(),
            allow_hosts: Vec::new(),
            concurrent_tenants: 32,
            per_host: 4,
        }
    }
}
