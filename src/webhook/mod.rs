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
//! The signing secret (`whsec_` + base64 of 32 random bytes) is kept in the
//! secret store at `{prefix}/{tenant}/webhook`; PostgreSQL holds only its
//! version, and it is never logged.

use std::{borrow::Cow, collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::Sha256;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::{
    audit::{AuditRecord, AuditSink},
    backoff::Backoff,
    broker::{
        ports::{OutboxMessage, SecretStore, WebhookStore},
        types::TenantId,
    },
    telemetry::metrics::{Metrics, ResultLabel},
};

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

/// The secret-store path of a tenant's signing secret.
pub fn secret_path(prefix: &str, tenant: TenantId) -> String {
    format!("{prefix}/{tenant}/webhook")
}

/// A new signing secret: `whsec_` and base64 of 32 random bytes.
pub fn generate_secret() -> SecretString {
    let bytes: [u8; 32] = rand::random();
    SecretString::from(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Why a secret cannot sign.
#[derive(Debug, thiserror::Error)]
#[error("a webhook secret is `whsec_` followed by base64 of 24 to 64 bytes")]
pub struct BadSecret;

/// The key bytes of a `whsec_…` secret.
///
/// # Errors
/// When it is not one.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, BadSecret> {
    let b64 = secret.strip_prefix("whsec_").ok_or(BadSecret)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| BadSecret)?;
    if (24..=64).contains(&key.len()) {
        Ok(key)
    } else {
        Err(BadSecret)
    }
}

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

/// Signing keys read from the secret store, by (tenant, secret version).
type KeyCache = HashMap<(TenantId, u64), Arc<Vec<u8>>>;

/// Delivers the outbox.
pub struct Deliverer {
    audit: Arc<dyn AuditSink>,
    store: Arc<dyn WebhookStore>,
    secrets: Arc<dyn SecretStore>,
    prefix: String,
    http: reqwest::Client,
    metrics: Metrics,
    keys: Mutex<KeyCache>,
}

/// What one pass did.
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
    /// A deliverer with a 10 s per-request timeout.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        audit: Arc<dyn AuditSink>,
        store: Arc<dyn WebhookStore>,
        secrets: Arc<dyn SecretStore>,
        prefix: &str,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credbroker-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            audit,
            store,
            secrets,
            prefix: prefix.to_owned(),
            http,
            metrics,
            keys: Mutex::new(HashMap::new()),
        })
    }

    async fn key(&self, tenant: TenantId, version: u64) -> Result<Arc<Vec<u8>>, String> {
        if let Some(k) = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(tenant, version))
        {
            return Ok(k.clone());
        }
        let set = self
            .secrets
            .read(&secret_path(&self.prefix, tenant), version)
            .await
            .map_err(|e| format!("signing secret unreadable: {e}"))?;
        let key = Arc::new(secret_key(set.api_secret.expose_secret()).map_err(|e| e.to_string())?);
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((tenant, version), key.clone());
        Ok(key)
    }

    /// One attempt at `msg`: Ok on a 2xx, else what went wrong (safe to
    /// store: a status or an error kind, never a body).
    async fn attempt(&self, msg: &OutboxMessage, now: OffsetDateTime) -> Result<(), String> {
        let endpoint = msg.endpoint.as_ref().ok_or("no endpoint")?;
        let key = self.key(msg.tenant, endpoint.secret_version).await?;
        let id = message_id(msg.id);
        let ts = now.unix_timestamp();
        let resp = self
            .http
            .post(&endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sign(&key, &id, ts, &msg.payload))
            .body(msg.payload.clone())
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "timeout".to_owned()
                } else if e.is_connect() {
                    "connection refused or unreachable".to_owned()
                } else {
                    "request failed".to_owned()
                }
            })?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }

    /// Delivers what is due now.
    ///
    /// # Errors
    /// When the outbox cannot be read or updated.
    pub async fn deliver_due(&self) -> anyhow::Result<Pass> {
        let now = OffsetDateTime::now_utc();
        let due = self.store.claim_due(now, CLAIM, BATCH).await?;
        let mut pass = Pass::default();
        for msg in due {
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
                tracing::warn!(tenant = %msg.tenant, id = %message_id(msg.id), attempts, "webhook not delivered: {e}");
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
                .await?;
        }
        if let Ok(depth) = self.store.outbox_depth().await {
            self.metrics
                .families()
                .webhook_outbox
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
        Ok(pass)
    }

    /// Delivers every `every` until cancelled; an unreachable PostgreSQL is
    /// logged and retried on the next pass.
    pub async fn task_main(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            loop {
                match self.deliver_due().await {
                    // A full batch: more may be due at once.
                    Ok(p) if p.delivered + p.retried + p.dropped >= BATCH as usize => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("webhook delivery pass failed (retried next pass): {e:#}");
                        break;
                    }
                }
            }
        }
    }
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
