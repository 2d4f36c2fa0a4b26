//! TLS material: loading the server's identity and client CA, reading the
//! SPIFFE ID out of a client certificate, and the development PKI.

pub mod acceptor;
pub mod pki;

use std::sync::Arc;

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

use acceptor::ReloadingTls;

/// The server side of mutual TLS, re-read when its files change: our
/// certificate, and client certificates required and verified against the
/// configured CA. A client without a certificate, or with one from another
/// CA, fails the handshake.
///
/// # Errors
/// When a file cannot be read or used (the message names the key).
pub fn server_config(cfg: &TlsConfig) -> anyhow::Result<Arc<ReloadingTls>> {
    ReloadingTls::load(cfg)
}

/// Every URI SAN of a DER certificate (empty when it cannot be parsed or
/// has none).
pub fn uri_sans(cert_der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(cert_der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

// ---- configuration: the [tls] section, owned here (`config` re-exports it).

/// Server certificate and the CA that signs client certificates.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: std::path::PathBuf,
    /// Server private key (PEM).
    pub key: std::path::PathBuf,
    /// CA bundle client certificates must chain to (PEM).
    pub client_ca: std::path::PathBuf,
    /// SPIFFE trust domain accepted in client URI SANs.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Accept TLS 1.2 as well as 1.3 (off: TLS 1.3 only).
    #[serde(default)]
    pub allow_tls12: bool,
    /// How often the three files are checked for changes (0: never).
    #[serde(default = "default_tls_reload")]
    pub reload_secs: u64,
}

fn default_tls_reload() -> u64 {
    10
}

fn default_trust_domain() -> String {
    "credbroker.local".into()
}
