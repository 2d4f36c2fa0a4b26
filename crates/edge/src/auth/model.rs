//! The vocabulary of identity and authorization, apart from the layer that
//! derives it: roles, actions, the caller, why a caller is refused, and the
//! one decision. It imports nothing of the broker's edge, so configuration,
//! limits, the audit trail and metrics can name these without depending on
//! the auth layer.

use std::sync::Arc;

use thiserror::Error;

use super::spiffe;
use crate::broker::types::TenantId;

/// A role, per tenant (operator: every tenant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Metadata and health only.
    Viewer,
    /// Reads and watches keys, acknowledges versions, and everything a
    /// viewer may.
    Trader,
    /// Stores, rotates, deletes and re-validates keys, and everything a
    /// trader may.
    Admin,
    /// The platform: every action on every tenant.
    Operator,
}

impl Role {
    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "trader" => Some(Self::Trader),
            "admin" => Some(Self::Admin),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Trader => "trader",
            Self::Admin => "admin",
            Self::Operator => "operator",
        }
    }

    pub(crate) fn rank(self) -> u8 {
        match self {
            Self::Viewer => 0,
            Self::Trader => 1,
            Self::Admin => 2,
            Self::Operator => 3,
        }
    }
}

/// Everything a caller can ask of the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// GetCredentials.
    GetCredentials,
    /// WatchRotations.
    WatchRotations,
    /// AcknowledgeVersion.
    AcknowledgeVersion,
    /// ListCredentials.
    ListCredentials,
    /// DescribeCredential.
    DescribeCredential,
    /// GetCredentialHealth.
    GetCredentialHealth,
    /// ValidateAndStore.
    ValidateAndStore,
    /// Rotate.
    Rotate,
    /// DeleteCredentials.
    DeleteCredentials,
    /// ValidateCredentials.
    ValidateCredentials,
    /// ListAuditEvents.
    ListAuditEvents,
    /// SetWebhook.
    SetWebhook,
    /// SetManagementKey.
    SetManagementKey,
}

impl Action {
    /// Every action, for tests and docs.
    pub const ALL: [Action; 13] = [
        Action::GetCredentials,
        Action::WatchRotations,
        Action::AcknowledgeVersion,
        Action::ListCredentials,
        Action::DescribeCredential,
        Action::GetCredentialHealth,
        Action::ValidateAndStore,
        Action::Rotate,
        Action::DeleteCredentials,
        Action::ValidateCredentials,
        Action::ListAuditEvents,
        Action::SetWebhook,
        Action::SetManagementKey,
    ];

    /// Whether the action can change state (a store, a rotation, a delete,
    /// a health status, a webhook, an adoption record): such a call is
    /// recorded before it runs (and refused if it cannot be), and its
    /// outcome is recorded whatever happens to the caller.
    pub fn changes_state(self) -> bool {
        matches!(
            self,
            Action::ValidateAndStore
                | Action::Rotate
                | Action::DeleteCredentials
                | Action::ValidateCredentials
                | Action::SetWebhook
                | Action::SetManagementKey
                | Action::AcknowledgeVersion
        )
    }

    /// The broker action a request path names
    /// (`/credbroker.v1.CredentialBroker/Rotate`); `None` for other
    /// services (health, reflection) and unknown methods.
    pub fn from_path(path: &str) -> Option<Action> {
        let name = path.strip_prefix("/credbroker.")?.rsplit('/').next()?;
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The least role that may do it.
    pub fn needs(self) -> Role {
        match self {
            Action::ListCredentials | Action::DescribeCredential | Action::GetCredentialHealth => {
                Role::Viewer
            }
            Action::GetCredentials | Action::WatchRotations | Action::AcknowledgeVersion => {
                Role::Trader
            }
            Action::ValidateAndStore
            | Action::Rotate
            | Action::DeleteCredentials
            | Action::ValidateCredentials
            | Action::ListAuditEvents
            | Action::SetWebhook
            | Action::SetManagementKey => Role::Admin,
        }
    }

    /// The RPC name.
    pub fn name(self) -> &'static str {
        match self {
            Action::GetCredentials => "GetCredentials",
            Action::WatchRotations => "WatchRotations",
            Action::AcknowledgeVersion => "AcknowledgeVersion",
            Action::ListCredentials => "ListCredentials",
            Action::DescribeCredential => "DescribeCredential",
            Action::GetCredentialHealth => "GetCredentialHealth",
            Action::ValidateAndStore => "ValidateAndStore",
            Action::Rotate => "Rotate",
            Action::DeleteCredentials => "DeleteCredentials",
            Action::ValidateCredentials => "ValidateCredentials",
            Action::ListAuditEvents => "ListAuditEvents",
            Action::SetWebhook => "SetWebhook",
            Action::SetManagementKey => "SetManagementKey",
        }
    }
}

/// The authenticated caller, stored in the request's extensions. Its text
/// is shared (`Arc<str>`) with the per-connection and per-token caches, so
/// deriving it on a call copies no string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The certificate's SPIFFE ID.
    pub spiffe_id: Arc<str>,
    /// Who acted: the token's `sub`, or the SPIFFE ID without a token.
    pub subject: Arc<str>,
    /// The tenant it belongs to (`None`: an operator).
    pub tenant: Option<TenantId>,
    /// Its role.
    pub role: Role,
}

impl Caller {
    fn describe(&self) -> String {
        match self.tenant {
            Some(t) => format!("{} ({} of tenant {t})", self.subject, self.role.as_str()),
            None => format!("{} ({})", self.subject, self.role.as_str()),
        }
    }
}

/// Why a caller was refused. Every message is safe to show and says what
/// to fix; none holds a token or key.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    /// No client certificate reached the broker.
    #[error("a client certificate is required")]
    NoCertificate,
    /// The certificate's URI SANs are not exactly one SPIFFE ID.
    #[error("the client certificate must carry exactly one URI SAN (a SPIFFE ID); it carries {0}")]
    UriSanCount(usize),
    /// The SPIFFE ID breaks a rule.
    #[error("client identity {id:?}: {why}")]
    BadSpiffeId {
        /// The ID (cut to a safe length).
        id: String,
        /// The rule it breaks.
        why: spiffe::SpiffeError,
    },
    /// A token is required and none was sent.
    #[error("a bearer token is required: send `authorization: Bearer <jwt>` metadata")]
    MissingToken,
    /// The token is not usable.
    #[error("bearer token refused: {0}")]
    BadToken(String),
    /// Token and certificate name different tenants or roles.
    #[error("{0}")]
    Mismatch(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
}

impl AuthError {
    /// Whether this is an authorization (not authentication) failure.
    pub fn is_denial(&self) -> bool {
        matches!(self, AuthError::PermissionDenied(_))
    }
}

/// May `caller` do `action` on `tenant`? The one authorization decision.
///
/// # Errors
/// `PermissionDenied` naming the missing role or the foreign tenant.
pub fn authorize(caller: &Caller, tenant: TenantId, action: Action) -> Result<(), AuthError> {
    if caller.role != Role::Operator && caller.tenant != Some(tenant) {
        return Err(AuthError::PermissionDenied(format!(
            "{} may not access tenant {tenant}",
            caller.describe()
        )));
    }
    let needs = action.needs();
    if caller.role.rank() < needs.rank() {
        return Err(AuthError::PermissionDenied(format!(
            "{} may not call {}: it needs role {} (or higher)",
            caller.describe(),
            action.name(),
            needs.as_str()
        )));
    }
    Ok(())
}

/// Whether a token must, may or may not be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenMode {
    /// Every broker call needs a token.
    Required,
    /// A token is verified when sent; without one the certificate decides.
    Optional,
    /// Tokens are not read.
    Ignored,
}
