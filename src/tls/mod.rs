//! TLS material: loading the server's identity and client CA, reading the
//! SPIFFE ID out of a client certificate, and the development PKI.

pub mod pki;

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

use crate::config::TlsConfig;

fn read(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{key}: cannot read {}: {e}", path.display()))
}

/// The server side of mutual TLS: our certificate, and client certificates
/// required and verified against the configured CA. A client without a
/// certificate, or with one from another CA, fails the handshake.
///
/// # Errors
/// When a file cannot be read.
pub fn server_config(cfg: &TlsConfig) -> anyhow::Result<ServerTlsConfig> {
    let cert = read("tls.cert", &cfg.cert)?;
    let key = read("tls.key", &cfg.key)?;
    let ca = read("tls.client_ca", &cfg.client_ca)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false))
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
