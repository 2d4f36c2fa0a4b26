//! Vault KV v2 (or OpenBao) as the [`SecretStore`]: one KV version per
//! credential version, check-and-set on every write, token, AppRole or
//! Kubernetes auth. Here the store and the port; [`answer`] classifies
//! every answer, [`login`] keeps the token alive, [`failover`] moves
//! between nodes and tells a missing version from an unreachable one,
//! [`config`] is the `[vault]` section.
//!
//! vaultrs silently reads `VAULT_ADDR`/`VAULT_TOKEN` from the environment and
//! panics on a malformed address, so the address is parsed at config time
//! and both are always set explicitly here.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod answer;
mod config;
mod failover;
mod login;

pub use answer::VaultAnswer;
pub use config::{VaultAuthConfig, VaultConfig};
pub use login::VaultAuth;

use answer::classify;
use failover::{landed, latest_on, or_unavailable};

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

use credbroker_core::broker::error::SecretStoreError;

use credbroker_core::broker::ports::{SecretStore, VersionInfo};

use credbroker_core::broker::types::CredentialSet;

/// One Vault/OpenBao node the broker may talk to.
struct Node {
    addr: String,
    client: ArcSwap<VaultClient>,
}

/// The KV v2 secret store. With several nodes (`vault.addr` plus
/// `vault.nodes`) every operation goes to the node that last answered and
/// fails over to the next on an answer that says "not here, not now"
/// (connection refused or timed out, 5xx, sealed or standby 503, 429): at
/// passes over the nodes with short, growing pauses for at most
/// `vault.failover_budget_ms` (3 s: longer than an election). Standbys
/// forward writes to the active node, so any unsealed node takes them; since
/// OpenBao 2.5 they serve reads from their own copy, which can trail a write
/// by a replication round, so a read that a node answers "no such version"
/// is reported missing only when the active node says so too (or a node
/// shows the version's destroyed metadata); while no node can settle it,
/// as in an election, the read is `Unavailable`, never "missing". A
/// check-and-set write is never replayed blindly: before writing again on
/// another node the store reads whether the first attempt landed (the
/// version after `cas` holds exactly this set) and, if so, adopts it.
pub struct VaultSecretStore {
    nodes: Vec<Node>,
    failover_budget: Duration,
    preferred: std::sync::atomic::AtomicUsize,
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

/// First pause between passes over the nodes (doubling, capped).
const PASS_PAUSE: Duration = Duration::from_millis(100);
const PASS_PAUSE_MAX: Duration = Duration::from_millis(500);

fn build_client(
    cfg: &VaultConfig,
    addr: &str,
    token: &str,
) -> Result<VaultClient, SecretStoreError> {
    let mut b = VaultClientSettingsBuilder::default();
    // Every address was parsed as a URL when the config was loaded, so this
    // setter cannot panic.
    b.address(addr)
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
        let mut nodes = Vec::new();
        for addr in std::iter::once(&cfg.addr).chain(&cfg.nodes) {
            if nodes.iter().any(|n: &Node| &n.addr == addr) {
                continue;
            }
            nodes.push(Node {
                addr: addr.clone(),
                client: ArcSwap::from_pointee(build_client(cfg, addr, &initial)?),
            });
        }
        let store = Self {
            nodes,
            failover_budget: Duration::from_millis(cfg.failover_budget_ms),
            preferred: std::sync::atomic::AtomicUsize::new(0),
            mount: cfg.mount.clone(),
            auth,
            lease_secs: std::sync::atomic::AtomicU64::new(0),
        };
        store.login().await?;
        Ok(store)
    }
}

#[async_trait]
impl SecretStore for VaultSecretStore {
    async fn latest_version(&self, path: &str) -> Result<Option<u64>, SecretStoreError> {
        self.failover(|c, _| async move { latest_on(&c, &self.mount, path).await })
            .await
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
        let data = &data;
        let written = self
            .failover(|c, retry| async move {
                // An earlier attempt may have landed before its answer was
                // lost: adopt it instead of writing the set twice.
                if retry && landed(&c, &self.mount, path, set, cas).await? {
                    return Ok(Ok(u64::from(cas) + 1));
                }
                let r = vaultrs::kv2::set_with_options(
                    c.as_ref(),
                    &self.mount,
                    path,
                    data,
                    SetSecretRequestOptions { cas },
                )
                .await;
                or_unavailable("write", r.map(|meta| meta.version))
            })
            .await?;
        match written {
            Ok(version) => Ok(version),
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
        let read = self
            .failover(|c, _| async move {
                or_unavailable(
                    "read",
                    vaultrs::kv2::read_version::<StoredSet>(c.as_ref(), &self.mount, path, version)
                        .await,
                )
            })
            .await?;
        let e = match read {
            Ok(s) => return Ok(s.into()),
            Err(e) => e,
        };
        let answer = VaultAnswer::of(&e);
        // "No such version" from a node proves nothing by itself: a standby
        // serves reads from its own copy, which trails the write, and during
        // an election no node is active. PostgreSQL named this version, so
        // only the active node's not-found settles it.
        let answer = if answer == VaultAnswer::Missing {
            match self.confirm_missing(path, version).await? {
                Ok(s) => return Ok(s.into()),
                Err(confirmed) => confirmed,
            }
        } else {
            answer
        };
        if answer.is_not_found() {
            tracing::debug!(path, version, ?answer, "Vault has no such version");
            return Err(SecretStoreError::NotFound {
                path: path.to_owned(),
                version,
            });
        }
        Err(answer.into_error("read"))
    }

    async fn destroy_versions(&self, path: &str, versions: &[u64]) -> Result<(), SecretStoreError> {
        if versions.is_empty() {
            return Ok(());
        }
        self.failover(|c, _| async move {
            vaultrs::kv2::destroy_versions(c.as_ref(), &self.mount, path, versions.to_vec())
                .await
                .map_err(|e| classify("destroy versions", &e))
        })
        .await
    }

    async fn purge(&self, path: &str) -> Result<(), SecretStoreError> {
        self.failover(|c, _| async move {
            match vaultrs::kv2::delete_metadata(c.as_ref(), &self.mount, path).await {
                Ok(()) => Ok(()),
                Err(e) if VaultAnswer::of(&e).is_not_found() => Ok(()),
                Err(e) => Err(classify("delete metadata", &e)),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SecretStoreError> {
        self.failover(|c, _| async move {
            match vaultrs::kv2::list(c.as_ref(), &self.mount, prefix).await {
                Ok(keys) => Ok(keys),
                Err(e) if VaultAnswer::of(&e).is_not_found() => Ok(Vec::new()),
                Err(e) => Err(classify("list", &e)),
            }
        })
        .await
    }

    async fn versions(&self, path: &str) -> Result<Vec<VersionInfo>, SecretStoreError> {
        let meta = self
            .failover(|c, _| async move {
                match vaultrs::kv2::read_metadata(c.as_ref(), &self.mount, path).await {
                    Ok(m) => Ok(Some(m)),
                    Err(e) if VaultAnswer::of(&e).is_not_found() => Ok(None),
                    Err(e) => Err(classify("read metadata", &e)),
                }
            })
            .await?;
        let Some(meta) = meta else {
            return Ok(Vec::new());
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
        // Serving needs one node that answers.
        self.failover(|c, _| async move {
            vaultrs::token::lookup_self(c.as_ref())
                .await
                .map(|_| ())
                .map_err(|e| classify("token lookup", &e))
        })
        .await
    }

    /// Sealed when a node that answers says so.
    async fn sealed(&self) -> Option<bool> {
        let mut answer = None;
        for node in &self.nodes {
            match vaultrs::sys::status(node.client.load().as_ref()).await {
                Ok(vaultrs::sys::ServerStatus::SEALED) => return Some(true),
                Ok(_) => answer = Some(false),
                Err(_) => {}
            }
        }
        answer
    }
}

impl From<StoredSet> for CredentialSet {
    fn from(s: StoredSet) -> Self {
        CredentialSet {
            api_key: s.api_key,
            api_secret: SecretString::from(s.api_secret),
            passphrase: s.passphrase.map(SecretString::from),
        }
    }
}
