//! The `[validation]` section, owned here (the binary's `config`
//! re-exports it): how keys are validated, which permissions they need,
//! and where each exchange is reached.

use serde::Deserialize;

/// How keys are validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// `exchange`: a signed request and the permission endpoint on the
    /// exchange (the default); `format`: format checks only, no network.
    pub mode: ValidationMode,
    /// Tenants allowed to store keys that can withdraw funds.
    pub allow_withdraw_tenants: Vec<uuid::Uuid>,
    /// Permissions every key must have (`read`, `trade`, `transfer`).
    pub required_permissions: Vec<crate::RequiredPermission>,
    /// Per-tenant requirements (a trading tenant: `["read", "trade"]`).
    pub tenant_required_permissions:
        std::collections::BTreeMap<uuid::Uuid, Vec<crate::RequiredPermission>>,
    /// Per-exchange endpoints (mainnet unless set: testnets, demo, proxies).
    pub exchanges: std::collections::BTreeMap<
        credbroker_core::broker::types::ExchangeId,
        crate::ExchangeEndpoint,
    >,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            mode: ValidationMode::Exchange,
            allow_withdraw_tenants: Vec::new(),
            required_permissions: vec![crate::RequiredPermission::Read],
            tenant_required_permissions: std::collections::BTreeMap::new(),
            exchanges: std::collections::BTreeMap::new(),
        }
    }
}

/// See [`ValidationConfig::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidationMode {
    /// Ask the exchange.
    Exchange,
    /// Format checks only.
    Format,
}
