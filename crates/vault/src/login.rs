//! How the broker authenticates to Vault, and the loop that logs in again
//! before each lease runs out.

use super::*;

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

impl VaultSecretStore {
    /// Logs in again with AppRole or Kubernetes (no-op for a static token).
    pub(crate) async fn login(&self) -> Result<(), SecretStoreError> {
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
