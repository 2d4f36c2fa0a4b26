//! Vault KV v2 (or OpenBao) as the [`SecretStore`]: one KV version per
//! credential version, check-and-set on every write, token or AppRole auth.
//!
//! vaultrs silently reads `VAULT_ADDR`/`VAULT_TOKEN` from the environment and
//! panics on a malformed address, so the address is parsed at config time
//! and both are always set explicitly here.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::CancellationToken;
use vaultrs::{
    api::kv2::requests::SetSecretRequestOptions,
    client::{Client as _, VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
};

use crate::{
    broker::{
        error::SecretStoreError,
        ports::{SecretStore, VersionInfo},
        types::CredentialSet,
    },
    config::{VaultAuthConfig, VaultConfig},
};

/// How the broker authenticates to Vault.
#[derive(Clone)]
pub enum VaultAuth {
    /// A token given by the operator (renewal is the operator's business).
    Token(SecretString),
    /// AppRole login; the broker logs in again before the lease ends.
    AppRole {
        /// Auth mount, usually `approle`.
        mount: String,
        /// Role ID.
        role_id: String,
        /// Secret ID.
        secret_id: SecretString,
    },
    /// Kubernetes auth; the broker logs in again before the lease ends,
    /// with the token file as it is then.
    Kubernetes {
        /// Auth mount, usually `kubernetes`.
        mount: String,
        /// Vault role.
        role: String,
        /// Service-account token file.
        token_path: std::path::PathBuf,
    },
}

impl std::fmt::Debug for VaultAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VaultAuth::Token(_) => f.write_str("Token([REDACTED])"),
            VaultAuth::AppRole { mount, role_id, .. } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", role_id)
                .field("secret_id", &"[REDACTED]")
                .finish(),
            VaultAuth::Kubernetes {
                mount,
                role,
                token_path,
            } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("token_path", token_path)
                .finish(),
        }
    }
}

/// The KV v2 secret store.
pub struct VaultSecretStore {
    client: ArcSwap<VaultClient>,
    mount: String,
    auth: VaultAuth,
    /// Seconds the current AppRole token lives (0: a static token).
    lease_secs: std::sync::atomic::AtomicU64,
}

/// The fields stored at each KV v2 version.
#[derive(Serialize)]
struct StoredSetRef<'a> {
    api_key: &'a str,
    api_secret: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    passphrase: Option<&'a str>,
}

#[derive(Deserialize)]
struct StoredSet {
    api_key: String,
    api_secret: String,
    #[serde(default)]
    passphrase: Option<String>,
}

fn build_client(cfg: &VaultConfig, token: &str) -> Result<VaultClient, SecretStoreError> {
    let mut b = VaultClientSettingsBuilder::default();
    // The address was parsed as a URL when the config was loaded, so this
    // setter cannot panic.
    b.address(cfg.addr.as_str())
        .token(token)
        .timeout(Some(Duration::from_millis(cfg.timeout_ms)));
    if let Some(ca) = &cfg.ca_cert {
        b.ca_certs(vec![ca.display().to_string()]);
    }
    if let Some(ns) = &cfg.namespace {
        b.set_namespace(ns.clone());
    }
    let settings = b
        .build()
        .map_err(|e| SecretStoreError::Other(format!("vault client settings: {e}")))?;
    VaultClient::new(settings).map_err(|e| SecretStoreError::Other(format!("vault client: {e}")))
}

impl VaultSecretStore {
    /// Connects and, for AppRole, logs in.
    ///
    /// # Errors
    /// Unavailable when Vault cannot be reached; Denied when login fails.
    pub async fn connect(cfg: &VaultConfig) -> Result<Self, SecretStoreError> {
        let auth = match &cfg.auth {
            VaultAuthConfig::Token { token } => VaultAuth::Token(token.clone()),
            VaultAuthConfig::Approle {
                mount,
                role_id,
                secret_id,
            } => VaultAuth::AppRole {
                mount: mount.clone(),
                role_id: role_id.clone(),
                secret_id: secret_id.clone(),
            },
            VaultAuthConfig::Kubernetes {
                mount,
                role,
                token_path,
            } => VaultAuth::Kubernetes {
                mount: mount.clone(),
                role: role.clone(),
                token_path: token_path.clone(),
            },
        };
        let initial = match &auth {
            VaultAuth::Token(t) => t.expose_secret().to_owned(),
            VaultAuth::AppRole { .. } | VaultAuth::Kubernetes { .. } => String::new(),
        };
        let store = Self {
            client: ArcSwap::from_pointee(build_client(cfg, &initial)?),
            mount: cfg.mount.clone(),
            auth,
            lease_secs: std::sync::atomic::AtomicU64::new(0),
        };
        store.login().await?;
        Ok(store)
    }

    /// Logs in again with AppRole or Kubernetes (no-op for a static token).
    async fn login(&self) -> Result<(), SecretStoreError> {
        let current = self.client.load_full();
        let (info, method) = match &self.auth {
            VaultAuth::Token(_) => return Ok(()),
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => (
                vaultrs::auth::approle::login(
                    current.as_ref(),
                    mount,
                    role_id,
                    secret_id.expose_secret(),
                )
                .await
                .map_err(|e| classify("approle login", &e))?,
                "AppRole",
            ),
            VaultAuth::Kubernetes {
                mount,
                role,
                token_path,
            } => {
                let jwt = SecretString::from(
                    std::fs::read_to_string(token_path)
                        .map_err(|e| {
                            SecretStoreError::Denied(format!(
                                "vault.auth.token_path {}: cannot read the service-account token ({e})",
                                token_path.display()
                            ))
                        })?
                        .trim()
                        .to_owned(),
                );
                (
                    vaultrs::auth::kubernetes::login(
                        current.as_ref(),
                        mount,
                        role,
                        jwt.expose_secret(),
                    )
                    .await
                    .map_err(|e| classify("kubernetes login", &e))?,
                    "Kubernetes",
                )
            }
        };
        let mut fresh = VaultClient::new(current.settings.clone())
            .map_err(|e| SecretStoreError::Other(format!("vault client: {e}")))?;
        fresh.set_token(&info.client_token);
        self.client.store(Arc::new(fresh));
        self.lease_secs
            .store(info.lease_duration, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            lease_secs = info.lease_duration,
            method,
            "logged in to Vault"
        );
        Ok(())
    }

    /// Whether the token must be renewed by logging in again (AppRole,
    /// Kubernetes).
    pub fn needs_relogin(&self) -> bool {
        !matches!(self.auth, VaultAuth::Token(_))
    }

    /// Keeps an AppRole token alive: logs in again at two thirds of each
    /// lease, retrying every few seconds while Vault is down. Returns at once
    /// for a static token.
    pub async fn task_main(self: Arc<Self>, cancel: CancellationToken) {
        if matches!(self.auth, VaultAuth::Token(_)) {
            return;
        }
        loop {
            let lease = self.lease_secs.load(std::sync::atomic::Ordering::Relaxed);
            let wait = if lease == 0 {
                5
            } else {
                (lease * 2 / 3).max(1)
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(wait)) => {}
            }
            if let Err(e) = self.login().await {
                tracing::warn!("Vault re-login failed, retrying: {e}");
                self.lease_secs
                    .store(0, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

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
            ClientError::APIError { code, .. } => Self::by_status(*code, None),
            ClientError::RestClientError { source } => match source {
                Rest::ServerResponseError { code, content } => {
                    Self::by_status(*code, content.as_deref())
                }
                Rest::RequestError { source, .. } => {
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
    fn into_error(self, op: &str) -> SecretStoreError {
        match self {
            Self::Denied => SecretStoreError::Denied(format!(
                "{op}: permission denied (check the broker's Vault policy)"
            )),
            Self::Sealed => {
                SecretStoreError::Unavailable(format!("{op}: Vault is sealed or not active (503)"))
            }
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

/// Maps a vaultrs error to the store taxonomy without forwarding response
/// bodies that could echo data.
fn classify(op: &str, e: &ClientError) -> SecretStoreError {
    VaultAnswer::of(e).into_error(op)
}

#[async_trait]
impl SecretStore for VaultSecretStore {
    async fn latest_version(&self, path: &str) -> Result<Option<u64>, SecretStoreError> {
        match vaultrs::kv2::read_metadata(self.client.load().as_ref(), &self.mount, path).await {
            Ok(meta) => Ok(Some(meta.current_version)),
            Err(e) if VaultAnswer::of(&e) == VaultAnswer::Missing => Ok(None),
            Err(e) => Err(classify("read metadata", &e)),
        }
    }

    async fn write(
        &self,
        path: &str,
        set: &CredentialSet,
        cas: u64,
    ) -> Result<u64, SecretStoreError> {
        let data = StoredSetRef {
            api_key: &set.api_key,
            api_secret: set.api_secret.expose_secret(),
            passphrase: set.passphrase.as_ref().map(ExposeSecret::expose_secret),
        };
        let cas =
            u32::try_from(cas).map_err(|_| SecretStoreError::Other("version beyond u32".into()))?;
        let written = vaultrs::kv2::set_with_options(
            self.client.load().as_ref(),
            &self.mount,
            path,
            &data,
            SetSecretRequestOptions { cas },
        )
        .await;
        match written {
            Ok(meta) => Ok(meta.version),
            // Vault answers a lost check-and-set with 400: confirm it by the
            // version that is now latest rather than by the message.
            Err(e) if VaultAnswer::of(&e) == VaultAnswer::BadRequest => {
                match self.latest_version(path).await? {
                    Some(latest) if latest != u64::from(cas) => {
                        Err(SecretStoreError::CasConflict {
                            path: path.to_owned(),
                        })
                    }
                    None if cas != 0 => Err(SecretStoreError::CasConflict {
                        path: path.to_owned(),
                    }),
                    _ => Err(classify("write", &e)),
                }
            }
            Err(e) => Err(classify("write", &e)),
        }
    }

    async fn read(&self, path: &str, version: u64) -> Result<CredentialSet, SecretStoreError> {
        match vaultrs::kv2::read_version::<StoredSet>(
            self.client.load().as_ref(),
            &self.mount,
            path,
            version,
        )
        .await
        {
            Ok(s) => Ok(CredentialSet {
                api_key: s.api_key,
                api_secret: SecretString::from(s.api_secret),
                passphrase: s.passphrase.map(SecretString::from),
            }),
            Err(e) => match VaultAnswer::of(&e) {
                answer if answer.is_not_found() => {
                    tracing::debug!(path, version, ?answer, "Vault has no such version");
                    Err(SecretStoreError::NotFound {
                        path: path.to_owned(),
                        version,
                    })
                }
                answer => Err(answer.into_error("read")),
            },
        }
    }

    async fn destroy_versions(&self, path: &str, versions: &[u64]) -> Result<(), SecretStoreError> {
        if versions.is_empty() {
            return Ok(());
        }
        vaultrs::kv2::destroy_versions(
            self.client.load().as_ref(),
            &self.mount,
            path,
            versions.to_vec(),
        )
        .await
        .map_err(|e| classify("destroy versions", &e))
    }

    async fn purge(&self, path: &str) -> Result<(), SecretStoreError> {
        match vaultrs::kv2::delete_metadata(self.client.load().as_ref(), &self.mount, path).await {
            Ok(()) => Ok(()),
            Err(e) if VaultAnswer::of(&e).is_not_found() => Ok(()),
            Err(e) => Err(classify("delete metadata", &e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SecretStoreError> {
        match vaultrs::kv2::list(self.client.load().as_ref(), &self.mount, prefix).await {
            Ok(keys) => Ok(keys),
            Err(e) if VaultAnswer::of(&e).is_not_found() => Ok(Vec::new()),
            Err(e) => Err(classify("list", &e)),
        }
    }

    async fn versions(&self, path: &str) -> Result<Vec<VersionInfo>, SecretStoreError> {
        let meta = match vaultrs::kv2::read_metadata(self.client.load().as_ref(), &self.mount, path)
            .await
        {
            Ok(m) => m,
            Err(e) if VaultAnswer::of(&e).is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(classify("read metadata", &e)),
        };
        let mut out = meta
            .versions
            .iter()
            .map(|(v, m)| {
                let version = v.parse::<u64>().map_err(|_| {
                    SecretStoreError::Other(format!("read metadata: version {v:?} is not a number"))
                })?;
                let created_at =
                    OffsetDateTime::parse(&m.created_time, &Rfc3339).map_err(|_| {
                        SecretStoreError::Other(
                            "read metadata: created_time is not RFC 3339".into(),
                        )
                    })?;
                Ok(VersionInfo {
                    version,
                    created_at,
                    destroyed: m.destroyed,
                })
            })
            .collect::<Result<Vec<_>, SecretStoreError>>()?;
        out.sort_by_key(|v| v.version);
        Ok(out)
    }

    async fn ping(&self) -> Result<(), SecretStoreError> {
        vaultrs::token::lookup_self(self.client.load().as_ref())
            .await
            .map(|_| ())
            .map_err(|e| classify("token lookup", &e))
    }

    async fn sealed(&self) -> Option<bool> {
        match vaultrs::sys::status(self.client.load().as_ref()).await {
            Ok(vaultrs::sys::ServerStatus::SEALED) => Some(true),
            Ok(_) => Some(false),
            Err(_) => None,
        }
    }
}
