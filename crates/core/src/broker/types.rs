//! Domain types: identifiers that are valid by construction, the secret
//! credential set, and the metadata records and events the broker keeps.

use std::{fmt, str::FromStr};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

/// Longest accepted value of any credential field, in bytes.
///
/// Coinbase CDP PEM keys are the longest real values (about 230 bytes); 4 KiB
/// leaves room for any exchange while refusing garbage early.
pub const MAX_FIELD_LEN: usize = 4096;

/// A tenant, identified by UUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TenantId(Uuid);

impl TenantId {
    /// Wraps a UUID.
    pub const fn new(id: Uuid) -> Self {
        Self(id)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for TenantId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s.trim())
            .map(Self)
            .map_err(|_| "must be a UUID such as 00000000-0000-0000-0000-000000000001".to_owned())
    }
}

/// A supported exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeId {
    /// Binance spot.
    Binance,
    /// Bybit v5.
    Bybit,
    /// OKX v5 (needs a passphrase).
    Okx,
    /// Coinbase Advanced Trade with CDP keys.
    Coinbase,
    /// Kraken spot.
    Kraken,
    /// KuCoin (needs a passphrase).
    Kucoin,
}

impl ExchangeId {
    /// Every supported exchange, in a stable order.
    pub const ALL: [ExchangeId; 6] = [
        ExchangeId::Binance,
        ExchangeId::Bybit,
        ExchangeId::Okx,
        ExchangeId::Coinbase,
        ExchangeId::Kraken,
        ExchangeId::Kucoin,
    ];

    /// The lowercase name used in paths, the database and the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExchangeId::Binance => "binance",
            ExchangeId::Bybit => "bybit",
            ExchangeId::Okx => "okx",
            ExchangeId::Coinbase => "coinbase",
            ExchangeId::Kraken => "kraken",
            ExchangeId::Kucoin => "kucoin",
        }
    }

    /// The audit trail's name of its key set, e.g. `binance_api_key`.
    pub fn audit_resource(&self) -> &'static str {
        match self {
            ExchangeId::Binance => "binance_api_key",
            ExchangeId::Bybit => "bybit_api_key",
            ExchangeId::Okx => "okx_api_key",
            ExchangeId::Coinbase => "coinbase_api_key",
            ExchangeId::Kraken => "kraken_api_key",
            ExchangeId::Kucoin => "kucoin_api_key",
        }
    }

    /// Whether the exchange's keys come with a passphrase.
    pub fn requires_passphrase(&self) -> bool {
        matches!(self, ExchangeId::Okx | ExchangeId::Kucoin)
    }
}

impl fmt::Display for ExchangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExchangeId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == lower)
            .ok_or_else(|| {
                format!(
                    "unknown exchange {:?}; supported: binance, bybit, okx, coinbase, kraken, kucoin",
                    truncate_for_message(s)
                )
            })
    }
}

/// Cuts user input echoed back in an error message to a safe length.
pub fn truncate_for_message(s: &str) -> String {
    s.chars().take(32).collect()
}

/// One exchange credential set. Secret fields are `SecretString`s: redacted
/// in Debug and zeroized on drop.
#[derive(Clone)]
pub struct CredentialSet {
    /// The API key. Not a secret on its own, but only its hint is ever shown.
    pub api_key: String,
    /// The API secret.
    pub api_secret: SecretString,
    /// The passphrase (OKX, KuCoin).
    pub passphrase: Option<SecretString>,
}

impl CredentialSet {
    /// The api_key with everything but the last four characters masked.
    pub fn key_hint(&self) -> String {
        key_hint(&self.api_key)
    }

    /// Constant-time comparison of every field, used to recognise a repeated
    /// rotation request.
    pub fn same_as(&self, other: &CredentialSet) -> bool {
        let eq = |a: &str, b: &str| bool::from(a.as_bytes().ct_eq(b.as_bytes()));
        let pass = match (&self.passphrase, &other.passphrase) {
            (None, None) => true,
            (Some(a), Some(b)) => eq(a.expose_secret(), b.expose_secret()),
            _ => false,
        };
        eq(&self.api_key, &other.api_key)
            & eq(
                self.api_secret.expose_secret(),
                other.api_secret.expose_secret(),
            )
            & pass
    }
}

impl fmt::Debug for CredentialSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialSet")
            .field("api_key", &self.key_hint())
            .field("api_secret", &"[REDACTED]")
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "[REDACTED]"),
            )
            .finish()
    }
}

/// Masks all but the last four characters of an API key (all of it when the
/// key is shorter than twelve characters).
pub fn key_hint(key: &str) -> String {
    let n = key.chars().count();
    if n < 12 {
        return "****".to_owned();
    }
    let tail: String = key.chars().skip(n - 4).collect();
    format!("****{tail}")
}

/// What a key may do on its exchange, as detected at validation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// May read balances and orders.
    pub read: bool,
    /// May place and cancel orders.
    pub trade: bool,
    /// May withdraw funds off the exchange.
    pub withdraw: bool,
    /// May move funds between accounts.
    pub transfer: bool,
    /// Bound to an IP allow-list.
    pub ip_restricted: bool,
    /// Expiry the exchange reports, if any.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub expires_at: Option<OffsetDateTime>,
}

/// Lifecycle state of a stored credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialStatus {
    /// Validated and served.
    Active,
    /// Past the exchange's expiry date.
    Expired,
    /// Rejected by the exchange on a later check.
    Invalid,
    /// Revoked by an operator.
    Revoked,
}

impl CredentialStatus {
    /// Name stored in the database.
    pub fn as_str(&self) -> &'static str {
        match self {
            CredentialStatus::Active => "active",
            CredentialStatus::Expired => "expired",
            CredentialStatus::Invalid => "invalid",
            CredentialStatus::Revoked => "revoked",
        }
    }

    /// Invalid or expired: a health check took it out of use (INVALIDATED).
    pub fn is_invalidated(&self) -> bool {
        matches!(self, CredentialStatus::Invalid | CredentialStatus::Expired)
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Expired, Self::Invalid, Self::Revoked]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// Outcome of the latest health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthStatus {
    /// No check yet (a fresh store counts as validated, not checked).
    Unknown,
    /// The last check succeeded.
    Healthy,
    /// The exchange rejected the key at the last check.
    Unhealthy,
}

impl HealthStatus {
    /// Name stored in the database and shown by the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthStatus::Unknown => "unknown",
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }

    /// Parses the stored name; anything else reads as unknown.
    pub fn parse(s: &str) -> Self {
        match s {
            "healthy" => HealthStatus::Healthy,
            "unhealthy" => HealthStatus::Unhealthy,
            _ => HealthStatus::Unknown,
        }
    }
}

/// Metadata of one (tenant, exchange) credential. Never holds secret bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialRecord {
    /// Owner.
    pub tenant: TenantId,
    /// Exchange.
    pub exchange: ExchangeId,
    /// Vault KV v2 path (relative to the mount).
    pub vault_path: String,
    /// Vault version of the set served as current.
    pub current_version: u64,
    /// Vault version still served during a rotation overlap.
    pub previous_version: Option<u64>,
    /// When the previous version stops being served.
    pub previous_valid_until: Option<OffsetDateTime>,
    /// Lifecycle state.
    pub status: CredentialStatus,
    /// Permissions detected at the last validation.
    pub permissions: Option<Permissions>,
    /// Masked api_key of the current set.
    pub api_key_hint: String,
    /// Last successful validation against the exchange.
    pub last_validated_at: Option<OffsetDateTime>,
    /// Outcome of the latest health check.
    pub health: HealthStatus,
    /// Safe-to-show reason of the latest failed check.
    pub health_detail: Option<String>,
    /// When the latest health check ran.
    pub health_checked_at: Option<OffsetDateTime>,
    /// When the credential was first stored.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
    /// Seq of the newest event describing this state (0: none yet). Loads
    /// older than an event the cache has applied are never cached.
    pub event_seq: u64,
}

impl CredentialRecord {
    /// The previous version if it is still inside its overlap at `now`.
    pub fn open_previous(&self, now: OffsetDateTime) -> Option<(u64, OffsetDateTime)> {
        match (self.previous_version, self.previous_valid_until) {
            (Some(v), Some(until)) if now < until => Some((v, until)),
            _ => None,
        }
    }
}

/// One subscriber's acknowledged version of a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adoption {
    /// SPIFFE ID, plus `#instance` when the pod named one.
    pub subscriber: String,
    /// Version it signs with.
    pub version: u64,
    /// When it said so.
    pub acked_at: OffsetDateTime,
}

/// Kind of a credential change event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// First version stored.
    Stored,
    /// A new version replaced the current one.
    Rotated,
    /// The previous version's overlap ended; it is no longer served.
    PreviousExpired,
    /// A check found the credential invalid.
    Invalidated,
    /// The credential was deleted.
    Deleted,
}

impl EventKind {
    /// Name stored in the database.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Stored => "stored",
            EventKind::Rotated => "rotated",
            EventKind::PreviousExpired => "previous_expired",
            EventKind::Invalidated => "invalidated",
            EventKind::Deleted => "deleted",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Stored,
            Self::Rotated,
            Self::PreviousExpired,
            Self::Invalidated,
            Self::Deleted,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// A committed change, ordered by `seq`.
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialEvent {
    /// Global, strictly growing sequence number.
    pub seq: u64,
    /// Owner.
    pub tenant: TenantId,
    /// Exchange.
    pub exchange: ExchangeId,
    /// What happened.
    pub kind: EventKind,
    /// Current version after the change (0 after a delete).
    pub version: u64,
    /// Previous version still served, if any.
    pub previous_version: Option<u64>,
    /// End of the previous version's overlap, if any.
    pub previous_valid_until: Option<OffsetDateTime>,
    /// Commit time.
    pub occurred_at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_resources_name_the_exchange() {
        for e in ExchangeId::ALL {
            assert_eq!(e.audit_resource(), format!("{e}_api_key"));
        }
    }

    #[test]
    fn exchange_parse_is_case_insensitive_and_rejects_unknown() {
        assert_eq!("Binance".parse::<ExchangeId>(), Ok(ExchangeId::Binance));
        assert_eq!(" okx ".parse::<ExchangeId>(), Ok(ExchangeId::Okx));
        let err = "ftx".parse::<ExchangeId>().unwrap_err();
        assert!(err.contains("unknown exchange"), "{err}");
    }

    #[test]
    fn debug_never_shows_secret_values() {
        let set = CredentialSet {
            api_key: "AKIAVERYLONGPUBLICKEY1234".into(),
            api_secret: SecretString::from("super-secret-value"),
            passphrase: Some(SecretString::from("pass-phrase-value")),
        };
        let dbg = format!("{set:?}");
        assert!(!dbg.contains("super-secret-value"), "{dbg}");
        assert!(!dbg.contains("pass-phrase-value"), "{dbg}");
        assert!(!dbg.contains("AKIAVERYLONGPUBLICKEY"), "{dbg}");
        assert!(dbg.contains("****1234"), "{dbg}");
    }

    #[test]
    fn same_as_compares_every_field() {
        let a = CredentialSet {
            api_key: "k".into(),
            api_secret: SecretString::from("s"),
            passphrase: None,
        };
        let mut b = a.clone();
        assert!(a.same_as(&b));
        b.passphrase = Some(SecretString::from("p"));
        assert!(!a.same_as(&b));
        b.passphrase = None;
        b.api_secret = SecretString::from("t");
        assert!(!a.same_as(&b));
    }

    #[test]
    fn previous_is_open_only_before_deadline() {
        let now = OffsetDateTime::now_utc();
        let rec = CredentialRecord {
            tenant: TenantId::new(Uuid::nil()),
            exchange: ExchangeId::Binance,
            vault_path: String::new(),
            current_version: 2,
            previous_version: Some(1),
            previous_valid_until: Some(now + time::Duration::seconds(10)),
            status: CredentialStatus::Active,
            permissions: None,
            api_key_hint: String::new(),
            last_validated_at: None,
            health: HealthStatus::Unknown,
            health_detail: None,
            health_checked_at: None,
            created_at: now,
            updated_at: now,
            event_seq: 0,
        };
        assert!(rec.open_previous(now).is_some());
        assert!(
            rec.open_previous(now + time::Duration::seconds(10))
                .is_none()
        );
    }
}
