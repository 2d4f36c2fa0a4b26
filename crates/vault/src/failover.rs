//! Several nodes: each call tries the preferred node and moves on while the
//! answer means "unavailable", for up to `failover_budget_ms`; only the
//! active node (or a destroyed version's metadata) can call a version
//! missing.

use super::*;

impl VaultSecretStore {
    /// Runs `op` on the preferred node, failing over to the others on an
    /// unavailable answer (see the type's docs). `op` learns whether this is
    /// a retry, so a write can check whether its first attempt landed.
    pub(crate) async fn failover<'a, T, F, Fut>(&'a self, op: F) -> Result<T, SecretStoreError>
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
    pub(crate) async fn confirm_missing(
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
pub(crate) async fn is_active(c: &VaultClient) -> bool {
    vaultrs::api::exec_with_no_result(c, LeaderRequest)
        .await
        .is_ok_and(|l| l.is_self || !l.ha_enabled)
}

/// The latest version at `path` on one node.
pub(crate) async fn latest_on(
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
pub(crate) async fn landed(
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
pub(crate) fn or_unavailable<T>(
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
