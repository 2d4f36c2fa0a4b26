//! A throw-away certificate authority for `credbroker dev` and the tests:
//! one CA, a server certificate for localhost, and client certificates whose
//! URI SAN carries a SPIFFE ID.

use std::{fs, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct PemPair {
    /// Certificate chain (PEM).
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair")
            .field("key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// A CA that can issue server and client certificates.
pub struct DevPki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl DevPki {
    /// A new CA named `name`.
    ///
    /// # Errors
    /// When key generation fails.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A server certificate for `localhost`, 127.0.0.1 and ::1 plus `extra` names.
    ///
    /// # Errors
    /// When signing fails.
    pub fn server(&self, extra: &[String]) -> anyhow::Result<PemPair> {
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.extend(extra.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "credbroker");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate carrying `spiffe_id` as its URI SAN.
    ///
    /// # Errors
    /// When the ID is not a valid IA5 string or signing fails.
    pub fn client(&self, spiffe_id: &str) -> anyhow::Result<PemPair> {
        self.client_with_uris(&[spiffe_id])
    }

    /// A client certificate carrying each of `uris` as a URI SAN, in order
    /// (tests of certificates a careless CA might issue).
    ///
    /// # Errors
    /// When an ID is not a valid IA5 string or signing fails.
    pub fn client_with_uris(&self, uris: &[&str]) -> anyhow::Result<PemPair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            uris.first().copied().unwrap_or("no-uri"),
        );
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI((*u).try_into()?)))
            .collect::<anyhow::Result<_>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> anyhow::Result<PemPair> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Writes a file readable only by its owner (keys, tokens).
///
/// # Errors
/// On I/O failure.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}
