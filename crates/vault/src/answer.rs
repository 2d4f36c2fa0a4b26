//! What one Vault answer means: by HTTP status and body shape, never by
//! message text.

use super::*;

/// What one Vault answer means, decided by the HTTP status and the shape
/// of the body, never by message text (which changes between Vault and
/// OpenBao releases, and which we never forward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaultAnswer {
    /// 404 for a KV v2 version that was destroyed (`metadata.destroyed`).
    Destroyed,
    /// 404 for a KV v2 version that was soft-deleted (`metadata.deletion_time`).
    Deleted,
    /// 404 with an `errors` list: nothing at that path or version.
    Missing,
    /// 400: the request was refused (on a write with `cas`, a lost
    /// check-and-set; the caller confirms by reading the metadata).
    BadRequest,
    /// 400 from a KV v2 mount that is not ready on this node yet: the active
    /// node is upgrading it ("Upgrading from non-versioned to versioned
    /// data"), or a standby has not seen that upgrade finish ("Waiting for
    /// the primary to upgrade"), as after a mount is created or a standby
    /// joins. Vault calls it "unavailable for a brief period": another node,
    /// or the same one a moment later, serves.
    Upgrading,
    /// 403: the token or its policy does not allow the operation.
    Denied,
    /// 503: sealed, or a standby that cannot serve.
    Sealed,
    /// 429: Vault's own rate limit.
    RateLimited,
    /// Any other 5xx.
    ServerError(u16),
    /// No TCP connection (refused, unreachable, TLS failure).
    Unreachable,
    /// No answer within the configured timeout.
    Timeout,
    /// An answer of a status or shape Vault does not give.
    Unexpected,
}

impl VaultAnswer {
    /// Classifies a vaultrs error.
    pub fn of(e: &ClientError) -> Self {
        use rustify::errors::ClientError as Rest;
        match e {
            ClientError::APIError { code: 400, errors }
                if errors.iter().any(|e| is_upgrading(e)) =>
            {
                Self::Upgrading
            }
            ClientError::APIError { code, .. } => Self::by_status(*code, None),
            ClientError::RestClientError { source } => match source {
                Rest::ServerResponseError { code, content } => {
                    Self::by_status(*code, content.as_deref())
                }
                Rest::RequestError { source, .. } => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let mut chain = source.to_string();
                        let mut cur: Option<&dyn std::error::Error> = source.source();
                        while let Some(c) = cur {
                            chain.push_str(": ");
                            chain.push_str(&c.to_string());
                            cur = c.source();
                        }
                        tracing::debug!(error = %chain, "Vault request failed");
                    }
                    match source.downcast_ref::<reqwest::Error>() {
                        Some(r) if r.is_timeout() => Self::Timeout,
                        _ => Self::Unreachable,
                    }
                }
                _ => Self::Unexpected,
            },
            ClientError::ResponseDataEmptyError => Self::Missing,
            _ => Self::Unexpected,
        }
    }

    fn by_status(code: u16, body: Option<&str>) -> Self {
        match code {
            404 => {
                // A destroyed or deleted KV v2 version answers 404 with the
                // version's metadata and no `errors`; a missing path or
                // version answers 404 with `errors`.
                let parsed = body.and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok());
                let meta = parsed
                    .as_ref()
                    .map_or(&serde_json::Value::Null, |v| &v["data"]["metadata"]);
                if meta["destroyed"].as_bool() == Some(true) {
                    Self::Destroyed
                } else if meta["deletion_time"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
                {
                    Self::Deleted
                } else {
                    Self::Missing
                }
            }
            400 => Self::BadRequest,
            403 => Self::Denied,
            429 => Self::RateLimited,
            503 => Self::Sealed,
            500..=599 => Self::ServerError(code),
            _ => Self::Unexpected,
        }
    }

    /// Whether the answer says the version is not there (destroyed,
    /// deleted or never written).
    pub fn is_not_found(self) -> bool {
        matches!(self, Self::Destroyed | Self::Deleted | Self::Missing)
    }

    /// The store error for `op`, with a safe-to-show detail.
    pub(crate) fn into_error(self, op: &str) -> SecretStoreError {
        match self {
            Self::Denied => SecretStoreError::Denied(format!(
                "{op}: permission denied (check the broker's Vault policy)"
            )),
            Self::Sealed => {
                SecretStoreError::Unavailable(format!("{op}: Vault is sealed or not active (503)"))
            }
            Self::Upgrading => SecretStoreError::Unavailable(format!(
                "{op}: the KV v2 mount is still upgrading on this Vault node (400)"
            )),
            Self::RateLimited => {
                SecretStoreError::Unavailable(format!("{op}: Vault rate-limited the broker (429)"))
            }
            Self::ServerError(code) => {
                SecretStoreError::Unavailable(format!("{op}: Vault answered {code}"))
            }
            Self::Unreachable => SecretStoreError::Unavailable(format!("{op}: cannot reach Vault")),
            Self::Timeout => {
                SecretStoreError::Unavailable(format!("{op}: Vault did not answer in time"))
            }
            Self::Destroyed | Self::Deleted | Self::Missing => {
                SecretStoreError::Other(format!("{op}: not found ({self:?})"))
            }
            Self::BadRequest => {
                SecretStoreError::Other(format!("{op}: Vault refused the request (400)"))
            }
            Self::Unexpected => {
                SecretStoreError::Other(format!("{op}: unexpected answer from Vault"))
            }
        }
    }
}

/// Whether a 400's message is the KV v2 backend's "not ready on this node
/// yet" (see [`VaultAnswer::Upgrading`]). Vault gives no code for it, only
/// these two messages.
pub(crate) fn is_upgrading(message: &str) -> bool {
    message.contains("upgrade from non-versioned to versioned data")
        || message.starts_with("Upgrading from non-versioned to versioned data")
}

/// Maps a vaultrs error to the store taxonomy without forwarding response
/// bodies that could echo data.
pub(crate) fn classify(op: &str, e: &ClientError) -> SecretStoreError {
    VaultAnswer::of(e).into_error(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, errors: &[&str]) -> ClientError {
        ClientError::APIError {
            code,
            errors: errors.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    #[test]
    fn a_kv_mount_not_ready_on_a_node_is_that_node_being_unavailable() {
        // OpenBao 2.7's answers: a standby right after the mount was created,
        // and the active node while it upgrades the mount.
        for message in [
            "Waiting for the primary to upgrade from non-versioned to versioned data. This backend will be unavailable for a brief period and will resume service when the primary is finished.",
            "Upgrading from non-versioned to versioned data. This backend will be unavailable for a brief period and will resume service shortly.",
        ] {
            let answer = VaultAnswer::of(&api(400, &[message]));
            assert_eq!(answer, VaultAnswer::Upgrading);
            assert!(matches!(
                answer.into_error("read"),
                SecretStoreError::Unavailable(_)
            ));
        }
        // Any other 400 (a lost check-and-set among them) stays a refusal.
        let cas = api(
            400,
            &["check-and-set parameter did not match the current version"],
        );
        assert_eq!(VaultAnswer::of(&cas), VaultAnswer::BadRequest);
        assert_eq!(VaultAnswer::of(&api(404, &[])), VaultAnswer::Missing);
    }
}
