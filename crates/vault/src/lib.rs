//! Vault KV v2 (or OpenBao) as the [`SecretStore`]: one KV version per
//! credential version, check-and-set on every write, token or AppRole auth.
//!
//! vaultrs silently reads `VAULT_ADDR`/`VAULT_TOKEN` from the environment and
//! panics on a malformed address, so the address is parsed at config time
//! and both are always set explicitly here.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

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

    /// Logs in again with AppRole or Kubernetes (no-op for a static token).
    async fn login(&self) -> Result<(), SecretStoreError> {
        let (info, method) = match &self.auth {
            VaultAuth::Token(_) => return Ok(()),
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => (
                self.failover(|c, _| async move {
                    vaultrs::auth::approle::login(
                        c.as_ref(),
                        mount,
                        role_id,
                        secret_id.expose_secret(),
                    )
                    .await
                    .map_err(|e| classify("approle login", &e))
                })
                .await?,
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
                let jwt = &jwt;
                (
                    self.failover(|c, _| async move {
                        vaultrs::auth::kubernetes::login(
                            c.as_ref(),
                            mount,
                            role,
                            jwt.expose_secret(),
                        )
                        .await
                        .map_err(|e| classify("kubernetes login", &e))
                    })
                    .await?,
                    "Kubernetes",
                )
            }
        };
        // One token for the cluster: every node gets it.
        for node in &self.nodes {
            let current = node.client.load_full();
            let mut fresh = VaultClient::new(current.settings.clone())
                .map_err(|e| SecretStoreError::Other(format!("vault client: {e}")))?;
            fresh.set_token(&info.client_token);
            node.client.store(Arc::new(fresh));
        }
        self.lease_secs
            .store(info.lease_duration, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            lease_secs = info.lease_duration,
            method,
            "logged in to Vault"
        );
        Ok(())
    }

    /// Runs `op` on the preferred node, failing over to the others on an
    /// unavailable answer (see the type's docs). `op` learns whether this is
    /// a retry, so a write can check whether its first attempt landed.
    async fn failover<'a, T, F, Fut>(&'a self, op: F) -> Result<T, SecretStoreError>
    where
        F: Fn(Arc<VaultClient>, bool) -> Fut,
        Fut: std::future::Future<Output = Result<T, SecretStoreError>> + 'a,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.nodes.len();
        let start = self.preferred.load(Relaxed) % n;
        let started = tokio::time::Instant::now();
        let mut pause = PASS_PAUSE;
        let mut last = None;
        let mut retry = false;
        for pass in 0.. {
            if pass > 0 {
                // Passes continue for the failover budget (an election
                // takes a second or two), then the caller hears UNAVAILABLE.
                if started.elapsed() + pause > self.failover_budget {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(PASS_PAUSE_MAX);
            }
            for i in 0..n {
                let idx = (start + i) % n;
                match op(self.nodes[idx].client.load_full(), retry).await {
                    Err(SecretStoreError::Unavailable(e)) => {
                        tracing::debug!(node = %self.nodes[idx].addr, "Vault node unavailable: {e}");
                        last = Some(e);
                        retry = true;
                    }
                    other => {
                        if idx != start && self.preferred.swap(idx, Relaxed) != idx {
                            tracing::info!(node = %self.nodes[idx].addr, "Vault: now using this node");
                        }
                        return other;
                    }
                }
            }
        }
        Err(SecretStoreError::Unavailable(
            last.unwrap_or_else(|| "no Vault node could be reached".into()),
        ))
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
    fn into_error(self, op: &str) -> SecretStoreError {
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
fn is_upgrading(message: &str) -> bool {
    message.contains("upgrade from non-versioned to versioned data")
        || message.starts_with("Upgrading from non-versioned to versioned data")
}

/// Maps a vaultrs error to the store taxonomy without forwarding response
/// bodies that could echo data.
fn classify(op: &str, e: &ClientError) -> SecretStoreError {
    VaultAnswer::of(e).into_error(op)
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

impl VaultSecretStore {
    /// Settles a "no such version" answer: asks every node, in passes with
    /// growing pauses for up to the failover budget. The first node that
    /// holds the version serves it; a destroyed or deleted version's
    /// metadata (which only a node that saw the version can show) or the
    /// *active* node's not-found is the answer; anything else (standbys
    /// behind the write, an election with no active node) ends
    /// `Unavailable`, never "missing".
    ///
    /// # Errors
    /// `Unavailable` when no node could settle it within the budget.
    async fn confirm_missing(
        &self,
        path: &str,
        version: u64,
    ) -> Result<Result<StoredSet, VaultAnswer>, SecretStoreError> {
        let started = tokio::time::Instant::now();
        let mut pause = PASS_PAUSE;
        loop {
            // Any node holding the version serves it; absence counts only
            // once no node had it.
            let mut settled = None;
            for node in &self.nodes {
                let c = node.client.load_full();
                // Asked before the read: a node that was active before it
                // answered holds every write acknowledged until then.
                let active = is_active(&c).await;
                match vaultrs::kv2::read_version::<StoredSet>(
                    c.as_ref(),
                    &self.mount,
                    path,
                    version,
                )
                .await
                {
                    Ok(s) => return Ok(Ok(s)),
                    Err(e) => match VaultAnswer::of(&e) {
                        a @ (VaultAnswer::Destroyed | VaultAnswer::Deleted) => settled = Some(a),
                        VaultAnswer::Missing if active => {
                            settled = settled.or(Some(VaultAnswer::Missing));
                        }
                        a => {
                            tracing::debug!(path, version, node = %node.addr, active, answer = ?a, "version not settled by this node");
                        }
                    },
                }
            }
            if let Some(a) = settled {
                return Ok(Err(a));
            }
            if started.elapsed() + pause > self.failover_budget {
                return Err(SecretStoreError::Unavailable(format!(
                    "read: no active Vault node confirmed version {version} within {} ms (a failover in progress?)",
                    self.failover_budget.as_millis()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PASS_PAUSE_MAX);
        }
    }
}

/// `GET /v1/sys/leader` (vaultrs has no call for it; its `sys::status`
/// cannot read OpenBao's health answer).
struct LeaderRequest;

#[derive(Deserialize)]
struct LeaderResponse {
    ha_enabled: bool,
    /// Absent when HA is off.
    #[serde(default)]
    is_self: bool,
}

#[async_trait]
impl rustify::Endpoint for LeaderRequest {
    type Response = LeaderResponse;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        "sys/leader".into()
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::GET
    }
}

/// Whether the node is the cluster's active node (or alone: no HA).
async fn is_active(c: &VaultClient) -> bool {
    vaultrs::api::exec_with_no_result(c, LeaderRequest)
        .await
        .is_ok_and(|l| l.is_self || !l.ha_enabled)
}

/// The latest version at `path` on one node.
async fn latest_on(
    c: &VaultClient,
    mount: &str,
    path: &str,
) -> Result<Option<u64>, SecretStoreError> {
    match vaultrs::kv2::read_metadata(c, mount, path).await {
        Ok(meta) => Ok(Some(meta.current_version)),
        Err(e) if VaultAnswer::of(&e) == VaultAnswer::Missing => Ok(None),
        Err(e) => Err(classify("read metadata", &e)),
    }
}

/// Whether a write of `set` with check-and-set `cas` already landed: the
/// version after `cas` exists and holds exactly this set.
async fn landed(
    c: &VaultClient,
    mount: &str,
    path: &str,
    set: &CredentialSet,
    cas: u32,
) -> Result<bool, SecretStoreError> {
    let next = u64::from(cas) + 1;
    if latest_on(c, mount, path).await? < Some(next) {
        return Ok(false);
    }
    let read = or_unavailable(
        "read",
        vaultrs::kv2::read_version::<StoredSet>(c, mount, path, next).await,
    )?;
    Ok(read.is_ok_and(|s| {
        s.api_key == set.api_key
            && s.api_secret == set.api_secret.expose_secret()
            && s.passphrase.as_deref() == set.passphrase.as_ref().map(ExposeSecret::expose_secret)
    }))
}

/// Splits a node's answer for [`VaultSecretStore::failover`]: "this node
/// cannot serve now" is the failover's error (the next node is tried);
/// every other answer, good or bad, is the operation's to judge.
fn or_unavailable<T>(
    op: &str,
    r: Result<T, ClientError>,
) -> Result<Result<T, ClientError>, SecretStoreError> {
    match r {
        Err(e) => match VaultAnswer::of(&e).into_error(op) {
            unavailable @ SecretStoreError::Unavailable(_) => Err(unavailable),
            _ => Ok(Err(e)),
        },
        ok => Ok(ok),
    }
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

/// Vault / OpenBao settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Base URL, e.g. `https://vault.internal:8200` (a load-balanced name
    /// or one node).
    pub addr: String,
    /// More nodes of the same cluster, tried in turn when the one in use
    /// does not answer (connection errors, 5xx, sealed or 429).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// How long an operation keeps trying the nodes before UNAVAILABLE.
    #[serde(default = "default_failover_budget")]
    pub failover_budget_ms: u64,
    /// KV v2 mount.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Path prefix under the mount; credentials live at
    /// `{prefix}/{tenant}/exchanges/{exchange}/credentials`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Per-request timeout.
    #[serde(default = "default_vault_timeout")]
    pub timeout_ms: u64,
    /// CA bundle for Vault's TLS certificate.
    #[serde(default)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Vault Enterprise / OpenBao namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Authentication.
    pub auth: VaultAuthConfig,
}

fn default_failover_budget() -> u64 {
    3000
}

fn default_mount() -> String {
    "secret".into()
}
fn default_prefix() -> String {
    "tenants".into()
}
fn default_vault_timeout() -> u64 {
    5000
}

/// How to log in to Vault.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum VaultAuthConfig {
    /// A static token.
    Token {
        /// The token.
        token: SecretString,
    },
    /// AppRole login.
    Approle {
        /// Auth mount.
        #[serde(default = "default_approle_mount")]
        mount: String,
        /// Role ID.
        role_id: String,
        /// Secret ID.
        secret_id: SecretString,
    },
    /// Kubernetes auth: the pod's service-account token, re-read at every
    /// login (projected tokens rotate).
    Kubernetes {
        /// Auth mount.
        #[serde(default = "default_kubernetes_mount")]
        mount: String,
        /// Vault role bound to the broker's service account.
        role: String,
        /// The service-account token file.
        #[serde(default = "default_sa_token_path")]
        token_path: std::path::PathBuf,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}

fn default_kubernetes_mount() -> String {
    "kubernetes".into()
}

fn default_sa_token_path() -> std::path::PathBuf {
    std::path::PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

impl VaultConfig {
    /// Adds what is wrong with this section to `errs` (each naming its
    /// key): URLs, files, names.
    pub fn check(&self, errs: &mut Vec<String>) {
        let mut bad = |key: &str, why: String| errs.push(format!("{key}: {why}"));
        for (key, addr) in std::iter::once(("vault.addr", &self.addr))
            .chain(self.nodes.iter().map(|a| ("vault.nodes", a)))
        {
            match url::Url::parse(addr) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => {
                    bad(key, format!("scheme {:?} is not http or https", u.scheme()));
                }
                Err(e) => bad(key, format!("not a URL ({e})")),
            }
        }
        if let Some(ca) = &self.ca_cert
            && !ca.is_file()
        {
            bad(
                "vault.ca_cert",
                format!("{} is not a readable file", ca.display()),
            );
        }
        if self.mount.is_empty() || self.mount.contains(char::is_whitespace) {
            bad("vault.mount", "must be a non-empty mount name".into());
        }
        if self.prefix.trim_matches('/').is_empty() {
            bad("vault.prefix", "must not be empty".into());
        }
    }
}
