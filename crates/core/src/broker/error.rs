//! Errors of the domain layer and of the ports it calls. Each knows which text
//! is safe to show a client; none holds a secret value.

use thiserror::Error;

/// A failure of the secret store (Vault).
#[derive(Debug, Error)]
pub enum SecretStoreError {
    /// Vault could not be reached, is sealed, or timed out.
    #[error("secret store unavailable: {0}")]
    Unavailable(String),
    /// A check-and-set write lost against a concurrent writer.
    #[error("check-and-set conflict at {path}")]
    CasConflict {
        /// Path written.
        path: String,
    },
    /// The requested version does not exist or was destroyed.
    #[error("secret version {version} not found at {path}")]
    NotFound {
        /// Path read.
        path: String,
        /// Version read.
        version: u64,
    },
    /// Vault refused the broker's token or policy.
    #[error("secret store denied access: {0}")]
    Denied(String),
    /// Anything else (malformed data, unexpected answer).
    #[error("secret store error: {0}")]
    Other(String),
}

/// A failure of the metadata store (PostgreSQL).
#[derive(Clone, Debug, Error)]
pub enum MetadataStoreError {
    /// The database could not be reached.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// A row for (tenant, exchange) already exists.
    #[error("credential already exists")]
    AlreadyExists,
    /// The row changed since it was read (a concurrent rotation).
    #[error("credential changed concurrently")]
    Conflict,
    /// The row does not exist.
    #[error("credential not found")]
    NotFound,
    /// Anything else.
    #[error("metadata store error: {0}")]
    Other(String),
}

/// Why a credential set failed validation.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ValidationError {
    /// A field is malformed; checked before any network call.
    #[error("{field}: {reason}")]
    InvalidField {
        /// Request field, e.g. `credentials.api_secret`.
        field: &'static str,
        /// What is wrong, never the value itself.
        reason: String,
    },
    /// The exchange rejected the key (bad key, signature, passphrase, IP,
    /// permission) or the broker's policy refused it.
    #[error(
        "rejected by {exchange}{}: {reason}",
        code.as_ref().map(|c| format!(" (code {c})")).unwrap_or_default()
    )]
    Rejected {
        /// Exchange name.
        exchange: &'static str,
        /// The exchange's code, if any.
        code: Option<String>,
        /// What the operator should do.
        reason: String,
    },
    /// The exchange could not give an answer (down, 5xx, timeout, rate
    /// limit): the key is neither stored nor marked invalid.
    #[error("{exchange} unavailable: {reason}")]
    Unavailable {
        /// Exchange name.
        exchange: &'static str,
        /// What happened and when to retry.
        reason: String,
    },
}

/// A failure of a broker operation, as the API layer sees it. `Clone`: one
/// failed load is shared by every caller that waited on it.
#[derive(Clone, Debug, Error)]
pub enum BrokerError {
    /// A request field is malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Request field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Nothing stored for (tenant, exchange).
    #[error("no credentials stored for tenant {tenant} on {exchange}")]
    NotFound {
        /// Tenant.
        tenant: String,
        /// Exchange.
        exchange: &'static str,
    },
    /// A credential already exists.
    #[error(
        "credentials for tenant {tenant} on {exchange} already exist; use Rotate to replace them"
    )]
    AlreadyExists {
        /// Tenant.
        tenant: String,
        /// Exchange.
        exchange: &'static str,
    },
    /// A concurrent write won; the caller may retry.
    #[error("the credential was changed concurrently; retry the request")]
    Conflict,
    /// The credential exists but cannot be served in its state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Validation refused the set.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// A backend is down; `what` names it, safe to show.
    #[error("{what} is unavailable; retry later")]
    Unavailable {
        /// "Vault", "PostgreSQL", ...
        what: &'static str,
    },
    /// A bug or an unexpected backend answer; the detail is logged, not shown.
    #[error("internal error")]
    Internal,
    /// This replica is shutting down; the stream may resume elsewhere.
    #[error(
        "the broker is shutting down; reconnect (to any replica) with after_seq={resume_after}"
    )]
    ShuttingDown {
        /// The last sequence number delivered on the stream.
        resume_after: u64,
    },
    /// The stream reached its maximum age; the client reconnects (possibly
    /// to another replica) and resumes.
    #[error(
        "this stream reached its maximum age (load balancing); reconnect with after_seq={resume_after}"
    )]
    StreamAged {
        /// The last sequence number delivered on the stream.
        resume_after: u64,
    },
    /// The Vault version a row names as current is gone (destroyed outside
    /// the broker): nothing can serve it until a new set is rotated in.
    #[error(
        "version {version} of the credentials for tenant {tenant} on {exchange} is missing from Vault (destroyed outside the broker?); rotate in a new set"
    )]
    SecretMissing {
        /// Tenant.
        tenant: String,
        /// Exchange.
        exchange: &'static str,
        /// The missing version.
        version: u64,
    },
    /// A resume point ahead of the newest event (a database restore, a bug,
    /// a hostile client): nothing would ever arrive after it.
    #[error(
        "resume point after_seq={after_seq} is ahead of the newest event ({head}); resync: reconnect with after_seq=0 and take the full state"
    )]
    ResumeAhead {
        /// The requested resume point.
        after_seq: u64,
        /// The newest event seq of the tenant.
        head: u64,
    },
    /// A resume point older than event retention.
    #[error(
        "events after seq {after_seq} are no longer retained; resync: reconnect with after_seq=0 and take the full state"
    )]
    ResumeTooOld {
        /// The requested resume point.
        after_seq: u64,
    },
}

impl From<SecretStoreError> for BrokerError {
    fn from(e: SecretStoreError) -> Self {
        match e {
            SecretStoreError::Unavailable(_) => BrokerError::Unavailable { what: "Vault" },
            SecretStoreError::CasConflict { .. } => BrokerError::Conflict,
            SecretStoreError::NotFound { .. }
            | SecretStoreError::Denied(_)
            | SecretStoreError::Other(_) => {
                tracing::error!(error = %e, "secret store failure");
                BrokerError::Internal
            }
        }
    }
}

impl From<MetadataStoreError> for BrokerError {
    fn from(e: MetadataStoreError) -> Self {
        match e {
            MetadataStoreError::Unavailable(_) => BrokerError::Unavailable { what: "PostgreSQL" },
            MetadataStoreError::Conflict => BrokerError::Conflict,
            MetadataStoreError::AlreadyExists
            | MetadataStoreError::NotFound
            | MetadataStoreError::Other(_) => {
                tracing::error!(error = %e, "metadata store failure");
                BrokerError::Internal
            }
        }
    }
}
