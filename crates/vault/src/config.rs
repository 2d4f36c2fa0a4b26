//! The `[vault]` section, owned here (`config` re-exports it).

use super::*;

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
