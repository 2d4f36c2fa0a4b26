//! Per-tenant rate limits (GCRA, through governor): one budget per tenant
//! and method class (writes, reads, watch opens), overridable per tenant,
//! plus each operator's own budget. Checked after authorization, so a
//! caller that may not touch a tenant never spends that tenant's budget.
//!
//! The limits hold for the whole deployment: each replica counts the live
//! replicas in PostgreSQL (`broker_replicas`, refreshed every few seconds)
//! and enforces its share, `ceil(limit / replicas)`. A balancer that spreads
//! a tenant's calls evenly gives it the configured limit; one that sends
//! them all to one replica gives it that replica's share (stricter, never
//! looser). When the count changes the budgets start afresh.

pub mod admission;

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use arc_swap::ArcSwap;
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock as _, DefaultClock},
};

use crate::auth::model::{Action, Caller, Role};

use crate::broker::types::TenantId;

/// Which budget a call spends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Store, rotate, delete, validate.
    Write,
    /// GetCredentials, metadata, acknowledgements.
    Read,
    /// Opening a WatchRotations stream.
    Watch,
}

impl Class {
    /// The class of an action.
    pub fn of(action: Action) -> Self {
        match action {
            Action::ValidateAndStore
            | Action::Rotate
            | Action::DeleteCredentials
            | Action::ValidateCredentials
            | Action::SetWebhook
            | Action::SetManagementKey => Class::Write,
            Action::WatchRotations => Class::Watch,
            Action::GetCredentials
            | Action::AcknowledgeVersion
            | Action::ListCredentials
            | Action::DescribeCredential
            | Action::GetCredentialHealth
            | Action::ListAuditEvents => Class::Read,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Write => "write",
            Class::Read => "read",
            Class::Watch => "watch",
        }
    }
}

/// A refused call: whose budget, and when to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// What ran out, safe to show.
    pub what: String,
    /// When the next call would be admitted.
    pub retry_after: Duration,
}

type Keyed<K> = DefaultKeyedRateLimiter<K>;
/// A budget: calls per minute and its limiter.
type Budget<K> = (u32, Keyed<K>);

/// The limiters of one replica.
pub struct Limits {
    cfg: LimitsConfig,
    replicas: AtomicU32,
    set: ArcSwap<LimiterSet>,
    clock: DefaultClock,
}

/// The budgets for one replica count.
struct LimiterSet {
    per_class: HashMap<Class, Budget<TenantId>>,
    /// Per-tenant budgets; `None`: that tenant's class is not limited.
    overrides: HashMap<(TenantId, Class), Option<Budget<TenantId>>>,
    operators: Option<Budget<std::sync::Arc<str>>>,
}

/// A budget of `per_minute` for the deployment, this replica's share of it.
fn limiter<K: std::hash::Hash + Eq + Clone>(per_minute: u32, replicas: u32) -> Option<Budget<K>> {
    let share = per_minute.div_ceil(replicas.max(1));
    NonZeroU32::new(share).map(|n| (per_minute, RateLimiter::keyed(Quota::per_minute(n))))
}

impl Limits {
    /// Limiters for `cfg` (0: no limit for that class), for one replica
    /// until [`Limits::set_replicas`] says otherwise.
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            replicas: AtomicU32::new(1),
            set: ArcSwap::from_pointee(LimiterSet::new(cfg, 1)),
            clock: DefaultClock::default(),
        }
    }

    /// Live replicas this replica shares the limits with.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Takes this replica's share for `n` live replicas (budgets restart
    /// when the count changes).
    pub fn set_replicas(&self, n: u32) {
        let n = n.max(1);
        if self.replicas.swap(n, Ordering::Relaxed) != n {
            self.set
                .store(std::sync::Arc::new(LimiterSet::new(&self.cfg, n)));
            tracing::info!(replicas = n, "rate limits shared with the live replicas");
        }
    }

    /// Spends one call of `caller` on `tenant` for `action`.
    ///
    /// # Errors
    /// `Limited` with the time to wait.
    pub fn check(&self, caller: &Caller, tenant: TenantId, action: Action) -> Result<(), Limited> {
        self.set.load().check(caller, tenant, action, &self.clock)
    }
}

impl LimiterSet {
    fn new(cfg: &LimitsConfig, replicas: u32) -> Self {
        let mut per_class = HashMap::new();
        for (class, n) in [
            (Class::Write, cfg.writes_per_minute),
            (Class::Read, cfg.reads_per_minute),
            (Class::Watch, cfg.watches_per_minute),
        ] {
            if let Some(l) = limiter(n, replicas) {
                per_class.insert(class, l);
            }
        }
        let mut overrides = HashMap::new();
        for (tenant, o) in &cfg.tenants {
            for (class, n) in [
                (Class::Write, o.writes_per_minute),
                (Class::Read, o.reads_per_minute),
                (Class::Watch, o.watches_per_minute),
            ] {
                if let Some(n) = n {
                    overrides.insert((TenantId::new(*tenant), class), limiter(n, replicas));
                }
            }
        }
        Self {
            per_class,
            overrides,
            operators: limiter(cfg.operator_per_minute, replicas),
        }
    }

    fn check(
        &self,
        caller: &Caller,
        tenant: TenantId,
        action: Action,
        clock: &DefaultClock,
    ) -> Result<(), Limited> {
        let class = Class::of(action);
        if caller.role == Role::Operator
            && let Some((n, l)) = &self.operators
            && let Err(not_until) = l.check_key(&caller.subject)
        {
            return Err(Limited {
                what: format!(
                    "operator {} made more than {n} calls per minute",
                    caller.subject
                ),
                retry_after: not_until.wait_time_from(clock.now()),
            });
        }
        let budget = match self.overrides.get(&(tenant, class)) {
            Some(o) => o.as_ref(),
            None => self.per_class.get(&class),
        };
        if let Some((n, l)) = budget
            && let Err(not_until) = l.check_key(&tenant)
        {
            return Err(Limited {
                what: format!(
                    "tenant {tenant} made more than {n} {} calls per minute",
                    class.as_str()
                ),
                retry_after: not_until.wait_time_from(clock.now()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::TenantLimits;
    use super::*;

    fn caller(tenant: TenantId, role: Role) -> Caller {
        Caller {
            spiffe_id: "spiffe://td/x".into(),
            subject: format!("pod-of-{tenant}").into(),
            tenant: Some(tenant),
            role,
        }
    }

    #[test]
    fn each_tenant_and_class_has_its_own_budget() {
        let a = TenantId::new(uuid::Uuid::new_v4());
        let b = TenantId::new(uuid::Uuid::new_v4());
        let mut tenants = BTreeMap::new();
        tenants.insert(
            b.as_uuid(),
            TenantLimits {
                writes_per_minute: Some(3),
                reads_per_minute: Some(0),
                watches_per_minute: None,
            },
        );
        let limits = Limits::new(&LimitsConfig {
            writes_per_minute: 5,
            reads_per_minute: 10,
            watches_per_minute: 2,
            operator_per_minute: 4,
            tenants,
        });
        let ca = caller(a, Role::Admin);
        for _ in 0..5 {
            limits.check(&ca, a, Action::Rotate).unwrap();
        }
        let e = limits.check(&ca, a, Action::Rotate).unwrap_err();
        assert!(e.what.contains("5 write calls per minute"), "{e:?}");
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_secs(12));
        // Reads are another budget; tenant B is untouched by A's flood.
        limits.check(&ca, a, Action::GetCredentials).unwrap();
        let cb = caller(b, Role::Admin);
        for _ in 0..3 {
            limits.check(&cb, b, Action::DeleteCredentials).unwrap();
        }
        assert!(
            limits.check(&cb, b, Action::DeleteCredentials).is_err(),
            "B's override is 3"
        );
        for _ in 0..100 {
            limits.check(&cb, b, Action::GetCredentials).unwrap();
        }
        // Operators spend the tenant's budget and their own.
        let op = Caller {
            spiffe_id: "spiffe://td/operator/o".into(),
            subject: "spiffe://td/operator/o".into(),
            tenant: None,
            role: Role::Operator,
        };
        let c = TenantId::new(uuid::Uuid::new_v4());
        for _ in 0..2 {
            limits.check(&op, c, Action::WatchRotations).unwrap();
        }
        let e = limits.check(&op, c, Action::WatchRotations).unwrap_err();
        assert!(e.what.contains("tenant"), "{e:?}");
        limits.check(&op, c, Action::GetCredentials).unwrap();
        let e = limits.check(&op, c, Action::GetCredentials).unwrap_err();
        assert!(e.what.contains("operator"), "{e:?}");
        // Three live replicas: this one takes ceil(5 / 3) = 2 writes.
        limits.set_replicas(3);
        let d = TenantId::new(uuid::Uuid::new_v4());
        for _ in 0..2 {
            limits
                .check(&caller(d, Role::Admin), d, Action::Rotate)
                .unwrap();
        }
        let e = limits
            .check(&caller(d, Role::Admin), d, Action::Rotate)
            .unwrap_err();
        assert!(
            e.what.contains("5 write calls per minute"),
            "the message names the deployment's limit: {e:?}"
        );
    }
}

// ---- configuration: the [limits] section, owned here (`config` re-exports it).

/// One tenant's overrides (unset: the default; 0: unlimited).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Writes per minute.
    pub writes_per_minute: Option<u32>,
    /// Reads per minute.
    pub reads_per_minute: Option<u32>,
    /// Watch opens per minute.
    pub watches_per_minute: Option<u32>,
}

/// Per-tenant rate limits (calls per minute; 0: unlimited).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// ValidateAndStore, Rotate, DeleteCredentials, ValidateCredentials.
    pub writes_per_minute: u32,
    /// GetCredentials, metadata, AcknowledgeVersion.
    pub reads_per_minute: u32,
    /// WatchRotations opens.
    pub watches_per_minute: u32,
    /// Each operator's own budget, on top of the tenant's.
    pub operator_per_minute: u32,
    /// Overrides by tenant UUID.
    pub tenants: std::collections::BTreeMap<uuid::Uuid, TenantLimits>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            writes_per_minute: 100,
            reads_per_minute: 60_000,
            // A 10,000-pod tenant resubscribes at once after a replica
            // restart (the GCRA burst is the minute's budget): see
            // docs/streams.md.
            watches_per_minute: 20_000,
            operator_per_minute: 6_000,
            tenants: std::collections::BTreeMap::new(),
        }
    }
}

impl LimitsConfig {
    /// No limit at all (tests, benchmarks).
    pub fn unlimited() -> Self {
        Self {
            writes_per_minute: 0,
            reads_per_minute: 0,
            watches_per_minute: 0,
            operator_per_minute: 0,
            tenants: std::collections::BTreeMap::new(),
        }
    }
}
