//! Exchange validation: prove a key works, and learn what it may do, before
//! it is stored.
//!
//! For each exchange: format checks first (no network), then one signed,
//! read-only account request and the exchange's key-permission request, each
//! signed exactly as the exchange documents it ([`signing`]), their answers
//! mapped to one [`Permissions`] value and one error taxonomy:
//! a key the exchange refuses (bad key, signature, passphrase, IP, clock,
//! permission) is `Rejected`; an exchange that gives no answer (down, 5xx,
//! timeout, rate limit) is `Unavailable` and the key is neither stored nor
//! marked invalid. A per-tenant policy then refuses withdrawal-enabled keys
//! unless allowed. A client-side budget per exchange keeps health checks from
//! getting the broker's IP banned.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod adapters;
mod config;
pub mod signing;

pub use config::{ValidationConfig, ValidationMode};

use std::{
    collections::{BTreeMap, BTreeSet},
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use credbroker_core::broker::error::ValidationError;

use credbroker_core::broker::ports::CredentialValidator;

use credbroker_core::broker::types::{CredentialSet, ExchangeId, Permissions, TenantId};

use credbroker_core::broker::validate::check_format;

use credbroker_core::clock::Clock;

/// Where and how to reach one exchange.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeEndpoint {
    /// Base URL, e.g. `https://api.binance.com` (or a testnet, or a simulator).
    pub base_url: String,
    /// Per-request timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Client-side budget of signed requests per minute.
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// OKX demo trading (`x-simulated-trading: 1`).
    #[serde(default)]
    pub demo: bool,
}

fn default_timeout_ms() -> u64 {
    5000
}
fn default_rpm() -> u32 {
    60
}

impl ExchangeEndpoint {
    /// The exchange's production API.
    pub fn mainnet(exchange: ExchangeId) -> Self {
        let base = match exchange {
            ExchangeId::Binance => "https://api.binance.com",
            ExchangeId::Bybit => "https://api.bybit.com",
            ExchangeId::Okx => "https://www.okx.com",
            ExchangeId::Coinbase => "https://api.coinbase.com",
            ExchangeId::Kraken => "https://api.kraken.com",
            ExchangeId::Kucoin => "https://api.kucoin.com",
        };
        Self {
            base_url: base.into(),
            timeout_ms: default_timeout_ms(),
            requests_per_minute: default_rpm(),
            demo: false,
        }
    }
}

/// A permission a tenant can require of its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequiredPermission {
    /// Read balances and orders.
    Read,
    /// Place and cancel orders.
    Trade,
    /// Move funds between accounts.
    Transfer,
}

impl RequiredPermission {
    fn held_by(self, p: &Permissions) -> bool {
        match self {
            Self::Read => p.read,
            Self::Trade => p.trade,
            Self::Transfer => p.transfer,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Trade => "trade",
            Self::Transfer => "transfer",
        }
    }
}

/// What a key must (not) be allowed to do.
#[derive(Clone, Debug, Default)]
pub struct WithdrawPolicy {
    /// Tenants explicitly allowed to store withdrawal-enabled keys.
    pub allowed_tenants: BTreeSet<TenantId>,
    /// Permissions every key must have.
    pub required: Vec<RequiredPermission>,
    /// Per-tenant requirements, instead of `required`.
    pub required_by_tenant: BTreeMap<TenantId, Vec<RequiredPermission>>,
}

impl WithdrawPolicy {
    /// Whether `tenant` may store a key that can withdraw.
    pub fn may_withdraw(&self, tenant: TenantId) -> bool {
        self.allowed_tenants.contains(&tenant)
    }
}

/// The refusal of a withdrawal-enabled key.
fn withdraw_refused(ex: ExchangeId) -> ValidationError {
    ValidationError::Rejected {
        exchange: ex.as_str(),
        code: Some("withdraw_enabled".into()),
        reason: "this key can withdraw funds; create a key without withdrawal permission \
                 (or have an operator allow withdrawal keys for this tenant)"
            .into(),
    }
}

struct Endpoint {
    base: url::Url,
    timeout: Duration,
    budget: DefaultDirectRateLimiter,
    demo: bool,
}

/// The validator that asks the exchanges.
pub struct ExchangeValidator {
    http: reqwest::Client,
    endpoints: BTreeMap<ExchangeId, Endpoint>,
    policy: WithdrawPolicy,
    clock: Arc<dyn Clock>,
    /// Last Kraken nonce handed out: nonces must always grow per key.
    last_nonce: AtomicU64,
}

impl ExchangeValidator {
    /// A validator for the given endpoints (exchanges without one use their
    /// mainnet).
    ///
    /// # Errors
    /// A message naming the exchange whose base URL is malformed.
    pub fn new(
        endpoints: &BTreeMap<ExchangeId, ExchangeEndpoint>,
        policy: WithdrawPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("credbroker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("exchange HTTP client: {e}"))?;
        let mut out = BTreeMap::new();
        for ex in ExchangeId::ALL {
            let ep = endpoints
                .get(&ex)
                .cloned()
                .unwrap_or_else(|| ExchangeEndpoint::mainnet(ex));
            let base = url::Url::parse(&ep.base_url)
                .map_err(|e| format!("exchanges.{ex}.base_url: not a URL ({e})"))?;
            // A base URL that cannot work stops start-up; a path (a gateway
            // prefix) is kept in front of every request path.
            if !matches!(base.scheme(), "http" | "https")
                || base.host_str().is_none()
                || base.query().is_some()
                || base.fragment().is_some()
                || !base.username().is_empty()
                || base.password().is_some()
            {
                return Err(format!(
                    "exchanges.{ex}.base_url: must be http(s)://host[:port][/path] without credentials, query or fragment"
                ));
            }
            let rpm = NonZeroU32::new(ep.requests_per_minute)
                .ok_or_else(|| format!("exchanges.{ex}.requests_per_minute: must be at least 1"))?;
            out.insert(
                ex,
                Endpoint {
                    base,
                    timeout: Duration::from_millis(ep.timeout_ms),
                    budget: RateLimiter::direct(Quota::per_minute(rpm)),
                    demo: ep.demo,
                },
            );
        }
        Ok(Self {
            http,
            endpoints: out,
            policy,
            clock,
            last_nonce: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
    }

    /// A strictly growing millisecond nonce (Kraken).
    fn nonce(&self) -> u64 {
        let now = self.now_ms();
        let mut prev = self.last_nonce.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .last_nonce
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    fn endpoint(&self, ex: ExchangeId) -> Result<&Endpoint, ValidationError> {
        self.endpoints
            .get(&ex)
            .ok_or_else(|| ValidationError::Unavailable {
                exchange: ex.as_str(),
                reason: "no endpoint configured".into(),
            })
    }

    /// Sends one signed request; transport failures, timeouts, 5xx and rate
    /// limits become `Unavailable`. Returns the status and the body.
    async fn send(
        &self,
        ex: ExchangeId,
        req: adapters::Request,
    ) -> Result<(u16, String), ValidationError> {
        let ep = self.endpoint(ex)?;
        if ep.budget.check().is_err() {
            return Err(ValidationError::Unavailable {
                exchange: ex.as_str(),
                reason: "the broker's own request budget for this exchange is spent (it protects the broker's IP from bans); retry in a minute".into(),
            });
        }
        // The base URL's path is a prefix (`https://gateway/binance` +
        // `/api/v3/account`), never cut off.
        let url = url::Url::parse(&format!(
            "{}{}",
            ep.base.as_str().trim_end_matches('/'),
            req.path_and_query
        ))
        .map_err(|e| ValidationError::Unavailable {
            exchange: ex.as_str(),
            reason: format!("bad request URL: {e}"),
        })?;
        let mut rb = self
            .http
            .request(req.method.clone(), url)
            .timeout(ep.timeout);
        for (k, v) in &req.headers {
            rb = rb.header(*k, v);
        }
        if ep.demo && ex == ExchangeId::Okx {
            rb = rb.header("x-simulated-trading", "1");
        }
        if let Some((ct, body)) = req.body {
            rb = rb.header("content-type", ct).body(body);
        }
        let resp = rb.send().await.map_err(|e| ValidationError::Unavailable {
            exchange: ex.as_str(),
            reason: if e.is_timeout() {
                format!(
                    "no answer within {} ms; retry later",
                    ep.timeout.as_millis()
                )
            } else {
                "cannot reach the exchange; retry later".into()
            },
        })?;
        let status = resp.status().as_u16();
        // Our own number, never the header's text: delta-seconds, bounded
        // (an HTTP date or anything else reads as a minute).
        let retry_after_secs = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(60, |s| s.clamp(1, 3600));
        let body = resp
            .text()
            .await
            .map_err(|_| ValidationError::Unavailable {
                exchange: ex.as_str(),
                reason: "the exchange's answer was cut off; retry later".into(),
            })?;
        if status == 429 || status == 418 {
            return Err(ValidationError::Unavailable {
                exchange: ex.as_str(),
                reason: format!(
                    "rate limited by the exchange (HTTP {status}); retry in {retry_after_secs} s"
                ),
            });
        }
        if status >= 500 {
            return Err(ValidationError::Unavailable {
                exchange: ex.as_str(),
                reason: format!("the exchange answered HTTP {status}; retry later"),
            });
        }
        Ok((status, body))
    }

    fn apply_policy(
        &self,
        tenant: TenantId,
        ex: ExchangeId,
        p: &Permissions,
    ) -> Result<(), ValidationError> {
        if p.withdraw && !self.policy.may_withdraw(tenant) {
            return Err(withdraw_refused(ex));
        }
        let required = self
            .policy
            .required_by_tenant
            .get(&tenant)
            .unwrap_or(&self.policy.required);
        if let Some(missing) = required.iter().find(|r| !r.held_by(p)) {
            return Err(ValidationError::Rejected {
                exchange: ex.as_str(),
                code: Some("missing_permission".into()),
                reason: format!(
                    "this key lacks the `{}` permission this tenant requires; create a key with it",
                    missing.name()
                ),
            });
        }
        if !p.ip_restricted {
            tracing::warn!(%tenant, exchange = %ex, "key is not bound to an IP allow-list");
        }
        Ok(())
    }
}

#[async_trait]
impl CredentialValidator for ExchangeValidator {
    async fn validate(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        set: &CredentialSet,
    ) -> Result<Permissions, ValidationError> {
        check_format(exchange, set)?;
        adapters::check_exchange_format(exchange, set)?;
        let started = std::time::Instant::now();
        let permissions = adapters::probe(self, exchange, set).await?;
        tracing::debug!(exchange = %exchange, elapsed_ms = started.elapsed().as_millis() as u64, "key validated against the exchange");
        self.apply_policy(tenant, exchange, &permissions)?;
        Ok(permissions)
    }
}
