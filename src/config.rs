//! Typed configuration, loaded from a TOML file and `CREDBROKER__*`
//! environment variables (`CREDBROKER__VAULT__AUTH__TOKEN` sets
//! `vault.auth.token`), checked completely at start-up. Every error names the
//! key; secret values are `SecretString`s and never printed.

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

/// A configuration problem, naming the key.
#[derive(Debug, Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// The whole configuration of `credbroker server`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC server.
    #[serde(default)]
    pub server: ServerConfig,
    /// mTLS material.
    pub tls: TlsConfig,
    /// Vault / OpenBao.
    pub vault: VaultConfig,
    /// PostgreSQL.
    pub postgres: PostgresConfig,
    /// L1 cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Rotation and events.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// How keys are validated before they are stored.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Bearer tokens and roles.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Per-tenant rate limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Metrics (and, when configured, traces).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The background credential health checks.
    #[serde(default)]
    pub checks: ChecksConfig,
    /// Webhook delivery.
    #[serde(default)]
    pub webhooks: WebhookConfig,
}

// Sections owned by the module (or crate) they configure; this file only
// aggregates them and checks the whole.
pub use crate::audit::AuditConfig;
pub use crate::auth::AuthConfig;
pub use crate::checks::ChecksConfig;
pub use crate::exchange::{ValidationConfig, ValidationMode};
pub use crate::limits::{LimitsConfig, TenantLimits};
pub use crate::server::ServerConfig;
pub use crate::telemetry::TelemetryConfig;
pub use crate::tls::TlsConfig;
pub use crate::webhook::WebhookConfig;
pub use credbroker_core::{cache::CacheConfig, rotation::RotationConfig};
pub use credbroker_store::PostgresConfig;
pub use credbroker_vault::{VaultAuthConfig, VaultConfig};

impl Config {
    /// Loads `path` (if given) overlaid with `CREDBROKER__*` variables, then
    /// checks every value.
    ///
    /// # Errors
    /// A `ConfigError` naming the first bad key.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    p.display()
                )));
            }
            b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        b = b.add_source(
            config::Environment::with_prefix("CREDBROKER")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let cfg: Config = b
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks values serde cannot: URLs, files, ranges.
    ///
    /// # Errors
    /// A `ConfigError` naming the first bad key.
    pub fn check(&self) -> Result<(), ConfigError> {
        // Every problem at once, each naming its key: a sections's own
        // checks live with the section.
        let mut errs = Vec::new();
        self.vault.check(&mut errs);
        self.postgres.check(&mut errs);
        let mut bad = |key: &str, why: String| errs.push(format!("{key}: {why}"));
        for (key, p) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if !p.is_file() {
                bad(key, format!("{} is not a readable file", p.display()));
            }
        }
        if self.tls.trust_domain.is_empty() || self.tls.trust_domain.contains('/') {
            bad(
                "tls.trust_domain",
                "must be a bare trust domain such as credbroker.local".into(),
            );
        }
        if self.cache.ttl_secs == 0 {
            bad("cache.ttl_secs", "must be at least 1".into());
        }
        if let Some(secret) = &self.auth.hs256_secret {
            use secrecy::ExposeSecret as _;
            if secret.expose_secret().len() < 32 {
                bad("auth.hs256_secret", "must be at least 32 bytes".into());
            }
        }
        if let Some(p) = &self.auth.jwks_file
            && !p.is_file()
        {
            bad(
                "auth.jwks_file",
                format!("{} is not a readable file", p.display()),
            );
        }
        if self.auth.mode() != crate::auth::model::TokenMode::Ignored
            && self.auth.hs256_secret.is_none()
            && self.auth.jwks_file.is_none()
        {
            bad(
                "auth.token",
                "tokens cannot be verified: set auth.hs256_secret or auth.jwks_file, or token = \"ignored\"".into(),
            );
        }
        if self.auth.workload_role == crate::auth::model::Role::Operator {
            bad(
                "auth.workload_role",
                "a workload certificate cannot be an operator".into(),
            );
        }
        if self.checks.interval_secs < 60 {
            bad("checks.interval_secs", "must be at least 60".into());
        }
        if self.checks.concurrency == 0 || self.checks.requests_per_minute == 0 {
            bad(
                "checks.concurrency",
                "concurrency and requests_per_minute must be at least 1".into(),
            );
        }
        if self.checks.lease_secs < 3 {
            bad("checks.lease_secs", "must be at least 3".into());
        }
        if let Some(e) = &self.telemetry.otlp_endpoint
            && !url::Url::parse(e).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            bad(
                "telemetry.otlp_endpoint",
                format!("{e:?} is not an http(s) URL"),
            );
        }
        if self.telemetry.credentials_refresh_secs == 0 {
            bad(
                "telemetry.credentials_refresh_secs",
                "must be at least 1".into(),
            );
        }
        if self.audit.fsync_ms == 0 || self.audit.ship_ms == 0 {
            bad(
                "audit.fsync_ms",
                "fsync and ship periods must be at least 1 ms".into(),
            );
        }
        if self.audit.max_spool_bytes < 1024 * 1024 {
            bad("audit.max_spool_bytes", "must be at least 1 MiB".into());
        }
        if self.rotation.orphan_grace_secs < 300 {
            bad(
                "rotation.orphan_grace_secs",
                "must be at least 300: a Rotate writes its Vault version before it commits its row, and a younger unreferenced version may still be committed".into(),
            );
        }
        if self.rotation.default_overlap_secs > self.rotation.max_overlap_secs {
            bad(
                "rotation.default_overlap_secs",
                "must not exceed rotation.max_overlap_secs".into(),
            );
        }
        if self.server.heartbeat_secs == 0 || self.server.health_probe_secs == 0 {
            bad(
                "server.heartbeat_secs",
                "heartbeat and health probe periods must be at least 1".into(),
            );
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errs.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, files: bool) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        if files {
            for f in ["cert.pem", "key.pem", "ca.pem"] {
                std::fs::write(dir.path().join(f), "x").unwrap();
            }
        }
        let toml = toml.replace("DIR", &dir.path().display().to_string());
        let path = dir.path().join("credbroker.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path))
    }

    const GOOD: &str = r#"
[tls]
cert = "DIR/cert.pem"
key = "DIR/key.pem"
client_ca = "DIR/ca.pem"
[vault]
addr = "http://127.0.0.1:8200"
[vault.auth]
method = "token"
token = "s.very-secret-token"
[postgres]
url = "host=db user=credbroker password=pg-secret-password"
"#;

    #[test]
    fn a_good_file_loads_with_defaults() {
        let cfg = load(GOOD, true).unwrap();
        assert_eq!(cfg.cache.ttl_secs, 300);
        assert_eq!(cfg.rotation.default_overlap_secs, 3600);
        assert_eq!(cfg.validation.mode, ValidationMode::Exchange);
        // Secret values never show in Debug output.
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("very-secret-token") && !dbg.contains("pg-secret-password"),
            "{dbg}"
        );
    }

    /// Every problem of a file is reported at once, each naming its key,
    /// the adapters' own sections included.
    #[test]
    fn every_bad_value_is_reported_at_once() {
        let toml = GOOD
            .replace("http://127.0.0.1:8200", "ftp://vault")
            .replace("[postgres]", "[postgres]\npool_size = 0")
            + "\n[cache]\nttl_secs = 0\n[checks]\ninterval_secs = 5\n";
        let err = load(&toml, true).unwrap_err().to_string();
        for key in [
            "vault.addr",
            "postgres.pool_size",
            "cache.ttl_secs",
            "checks.interval_secs",
        ] {
            assert!(err.contains(key), "expected {key} in: {err}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                GOOD.replace("http://127.0.0.1:8200", "not a url"),
                true,
                "vault.addr",
            ),
            (
                GOOD.replace("http://127.0.0.1:8200", "ftp://vault"),
                true,
                "vault.addr",
            ),
            (GOOD.to_owned(), false, "tls.cert"),
            (
                GOOD.replace("[postgres]", "[postgres]\npool_size = 0"),
                true,
                "postgres.pool_size",
            ),
            (
                GOOD.replace("[vault]", "[vault]\nmount = \"\""),
                true,
                "vault.mount",
            ),
            (
                format!("{GOOD}\n[rotation]\ndefault_overlap_secs = 99999999\n"),
                true,
                "rotation.default_overlap_secs",
            ),
            (
                format!("{GOOD}\n[server]\nlisten = \"nowhere\"\n"),
                true,
                "listen",
            ),
            (format!("{GOOD}\n[cache]\nttl = 5\n"), true, "ttl"),
            (
                GOOD.replace("method = \"token\"", "method = \"kerberos\""),
                true,
                "kerberos",
            ),
        ];
        for (toml, files, key) in cases {
            let err = load(&toml, files).unwrap_err().to_string();
            assert!(err.contains(key), "expected {key} in: {err}");
            assert!(
                !err.contains("very-secret-token") && !err.contains("pg-secret-password"),
                "{err}"
            );
        }
    }
}
