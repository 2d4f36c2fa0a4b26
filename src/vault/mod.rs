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
use tokio_util::sync::CancellationToken;
use vaultrs::{
    api::kv2::requests::SetSecretRequestOptions,
    client::{Client as _, VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
};

use crate::{
    broker::{error::SecretStoreError, ports::SecretStore, types::CredentialSet},
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
        };
        let initial = match &auth {
            VaultAuth::Token(t) => t.expose_secret().to_owned(),
            VaultAuth::AppRole { .. } => String::new(),
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

    /// Logs in again with AppRole (no-op for a static token).
    async fn login(&self) -> Result<(), SecretStoreError> {
        let VaultAuth::AppRole {
            mount,
            role_id,
            secret_id,
        } = &self.auth
        else {
            return Ok(());
        };
        let current = self.client.load_full();
        let info = vaultrs::auth::approle::login(
            current.as_ref(),
            mount,
            role_id,
            secret_id.expose_secret(),
        )
        .await
        .map_err(|e| classify("approle login", e))?;
        let mut fresh = VaultClient::new(current.settings.clone())
            .map_err(|e| SecretStoreError::Other(format!("vault client: {e}")))?;
        fresh.set_token(&info.client_token);
        self.client.store(Arc::new(fresh));
        self.lease_secs
            .store(info.lease_duration, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            lease_secs = info.lease_duration,
            "logged in to Vault with AppRole"
        );
        Ok(())
    }

    /// Whether the token must be renewed by logging in again (AppRole).
    pub fn needs_relogin(&self) -> bool {
        matches!(self.auth, VaultAuth::AppRole { .. })
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

/// Maps a vaultrs error to the store taxonomy without forwarding response
/// bodies that could echo data.
fn classify(op: &str, e: ClientError) -> SecretStoreError {
    match e {
        ClientError::APIError { code, errors } => match code {
            403 => SecretStoreError::Denied(format!(
                "{op}: permission denied (check the broker's Vault policy)"
            )),
            429 | 500..=599 => {
                SecretStoreError::Unavailable(format!("{op}: Vault answered {code}"))
            }
            _ if errors.iter().any(|m| m.contains("check-and-set")) => {
                SecretStoreError::CasConflict {
                    path: op.to_owned(),
                }
            }
            _ => SecretStoreError::Other(format!("{op}: Vault answered {code}")),
        },
        ClientError::RestClientError { .. } => {
            SecretStoreError::Unavailable(format!("{op}: cannot reach Vault"))
        }
        other => SecretStoreError::Other(format!("{op}: {other}")),
    }
}

#[async_trait]
impl SecretStore for VaultSecretStore {
    async fn latest_version(&self, path: &str) -> Result<Option<u64>, SecretStoreError> {
        match vaultrs::kv2::read_metadata(self.client.load().as_ref(), &self.mount, path).await {
            Ok(meta) => Ok(Some(meta.current_version)),
            Err(ClientError::APIError { code: 404, .. }) => Ok(None),
            Err(e) => Err(classify("read metadata", e)),
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
        let meta = vaultrs::kv2::set_with_options(
            self.client.load().as_ref(),
            &self.mount,
            path,
            &data,
            SetSecretRequestOptions { cas },
        )
        .await
        .map_err(|e| match classify("write", e) {
            SecretStoreError::CasConflict { .. } => SecretStoreError::CasConflict {
                path: path.to_owned(),
            },
            other => other,
        })?;
        Ok(meta.version)
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
            // A destroyed or deleted version answers 404, and so does a
            // version whose data is empty.
            Err(ClientError::APIError { code: 404, .. } | ClientError::ResponseDataEmptyError) => {
                Err(SecretStoreError::NotFound {
                    path: path.to_owned(),
                    version,
                })
            }
            Err(ClientError::RestClientError { source }) if source.to_string().contains("404") => {
                Err(SecretStoreError::NotFound {
                    path: path.to_owned(),
                    version,
                })
            }
            Err(e) => Err(classify("read", e)),
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
        .map_err(|e| classify("destroy versions", e))
    }

    async fn purge(&self, path: &str) -> Result<(), SecretStoreError> {
        match vaultrs::kv2::delete_metadata(self.client.load().as_ref(), &self.mount, path).await {
            Ok(()) | Err(ClientError::APIError { code: 404, .. }) => Ok(()),
            Err(e) => Err(classify("delete metadata", e)),
        }
    }

    async fn ping(&self) -> Result<(), SecretStoreError> {
        vaultrs::token::lookup_self(self.client.load().as_ref())
            .await
            .map(|_| ())
            .map_err(|e| classify("token lookup", e))
    }
}
