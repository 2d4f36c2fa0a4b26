//! The L1 cache of decrypted credential sets, per (tenant, exchange).
//!
//! quick_cache has no TTL of its own, so each entry carries the time it was
//! fetched: fresh for `ttl` (5 minutes), then still usable for `grace`
//! (1 hour) when Vault or PostgreSQL cannot be reached, marked stale.

use std::sync::Arc;

use quick_cache::sync::Cache;
use time::{Duration, OffsetDateTime};

use crate::broker::types::{CredentialRecord, CredentialSet, ExchangeId, TenantId};

/// A fetched credential: its metadata and the secret sets it references.
#[derive(Debug)]
pub struct CachedCredential {
    /// Metadata as read with the secrets.
    pub record: CredentialRecord,
    /// The current set.
    pub current: CredentialSet,
    /// The previous set, when the record had an open overlap at fetch time.
    pub previous: Option<CredentialSet>,
    /// When this entry was read from the stores.
    pub fetched_at: OffsetDateTime,
}

/// Cache key.
pub type CacheKey = (TenantId, ExchangeId);

/// The cache with its freshness rules.
pub struct CredentialCache {
    entries: Cache<CacheKey, Arc<CachedCredential>>,
    ttl: Duration,
    grace: Duration,
}

impl CredentialCache {
    /// A cache holding at most `capacity` credentials.
    pub fn new(capacity: usize, ttl: Duration, grace: Duration) -> Self {
        Self {
            entries: Cache::new(capacity.max(1)),
            ttl,
            grace,
        }
    }

    /// The entry if it was fetched less than `ttl` ago.
    pub fn fresh(&self, key: &CacheKey, now: OffsetDateTime) -> Option<Arc<CachedCredential>> {
        self.entries
            .get(key)
            .filter(|e| now < e.fetched_at + self.ttl)
    }

    /// The entry if it is within `ttl + grace`: what may be served while a
    /// backend is down.
    pub fn within_grace(
        &self,
        key: &CacheKey,
        now: OffsetDateTime,
    ) -> Option<Arc<CachedCredential>> {
        self.entries
            .get(key)
            .filter(|e| now < e.fetched_at + self.ttl + self.grace)
    }

    /// Stores a freshly fetched entry.
    pub fn insert(&self, key: CacheKey, entry: CachedCredential) -> Arc<CachedCredential> {
        let entry = Arc::new(entry);
        self.entries.insert(key, entry.clone());
        entry
    }

    /// Drops an entry after a write, rotation, delete or remote event.
    pub fn invalidate(&self, key: &CacheKey) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use uuid::Uuid;

    use super::*;
    use crate::broker::types::{CredentialStatus, HealthStatus};

    fn entry(at: OffsetDateTime) -> CachedCredential {
        CachedCredential {
            record: CredentialRecord {
                tenant: TenantId::new(Uuid::nil()),
                exchange: ExchangeId::Kraken,
                vault_path: "p".into(),
                current_version: 1,
                previous_version: None,
                previous_valid_until: None,
                status: CredentialStatus::Active,
                permissions: None,
                api_key_hint: "****".into(),
                last_validated_at: None,
                health: HealthStatus::Unknown,
                health_detail: None,
                health_checked_at: None,
                created_at: at,
                updated_at: at,
            },
            current: CredentialSet {
                api_key: "k".into(),
                api_secret: SecretString::from("s"),
                passphrase: None,
            },
            previous: None,
            fetched_at: at,
        }
    }

    #[test]
    fn fresh_for_ttl_then_grace_then_gone() {
        let t0 = OffsetDateTime::now_utc();
        let c = CredentialCache::new(16, Duration::minutes(5), Duration::hours(1));
        let key = (TenantId::new(Uuid::nil()), ExchangeId::Kraken);
        c.insert(key, entry(t0));
        assert!(c.fresh(&key, t0 + Duration::minutes(4)).is_some());
        assert!(c.fresh(&key, t0 + Duration::minutes(5)).is_none());
        assert!(c.within_grace(&key, t0 + Duration::minutes(64)).is_some());
        assert!(c.within_grace(&key, t0 + Duration::minutes(65)).is_none());
        c.invalidate(&key);
        assert!(c.within_grace(&key, t0).is_none());
    }
}
