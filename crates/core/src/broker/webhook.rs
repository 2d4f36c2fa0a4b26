//! How a tenant's webhook endpoint is kept: its signing secret (`whsec_`
//! and base64 of 24 to 64 bytes) and its URL, together in the secret store
//! at `{prefix}/{tenant}/webhook` (a receiver's URL may carry its own
//! secret). Delivery itself is the webhook module's business.

use base64::Engine as _;
use secrecy::SecretString;

use super::types::{CredentialSet, TenantId};

/// The secret-store path of a tenant's signing secret.
pub fn secret_path(prefix: &str, tenant: TenantId) -> String {
    format!("{prefix}/{tenant}/webhook")
}

/// A new signing secret: `whsec_` and base64 of 32 random bytes.
pub fn generate_secret() -> SecretString {
    let bytes: [u8; 32] = rand::random();
    SecretString::from(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Why a secret cannot sign.
#[derive(Debug, thiserror::Error)]
#[error("a webhook secret is `whsec_` followed by base64 of 24 to 64 bytes")]
pub struct BadSecret;

/// The key bytes of a `whsec_…` secret.
///
/// # Errors
/// When it is not one.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, BadSecret> {
    let b64 = secret.strip_prefix("whsec_").ok_or(BadSecret)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| BadSecret)?;
    if (24..=64).contains(&key.len()) {
        Ok(key)
    } else {
        Err(BadSecret)
    }
}

/// The secret-store entry of a webhook endpoint: its signing secret and
/// its URL (which may carry the receiver's own secret, so it is kept with
/// the signing secret, never in PostgreSQL or a log).
pub fn stored_endpoint(secret: SecretString, url: &str) -> CredentialSet {
    CredentialSet {
        api_key: "webhook-signing-secret".into(),
        api_secret: secret,
        passphrase: Some(SecretString::from(url.to_owned())),
    }
}
