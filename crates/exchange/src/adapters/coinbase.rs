//! Coinbase Advanced Trade (CDP keys, ES256 JWT per request): the signed requests and what their answers mean.

use super::*;

/// A Coinbase CDP signing key: EC P-256 (ES256) or Ed25519 (EdDSA).
pub enum CoinbaseKey {
    /// PKCS#8 DER of an EC P-256 key.
    Es256(Vec<u8>),
    /// PKCS#8 DER of an Ed25519 key.
    EdDsa(Vec<u8>),
}

/// Parses a CDP secret: a PEM EC key (SEC1 or PKCS#8) or base64 of the
/// 64-byte Ed25519 seed‖public key.
///
/// # Errors
/// `InvalidField` on `credentials.api_secret`.
pub fn coinbase_key(secret: &str) -> Result<CoinbaseKey, ValidationError> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
    use rustls_pki_types::{PrivateKeyDer, pem::PemObject as _};
    const FIELD: &str = "credentials.api_secret";
    let secret = secret.replace("\\n", "\n");
    if secret.contains("-----BEGIN") {
        let der = PrivateKeyDer::from_pem_slice(secret.as_bytes())
            .map_err(|_| invalid(FIELD, "not a readable PEM private key"))?;
        let pair =
            EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_der())
                .map_err(|_| {
                    invalid(
                        FIELD,
                        "not an EC P-256 private key (Coinbase CDP keys are ES256 or Ed25519)",
                    )
                })?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| invalid(FIELD, "cannot re-encode the EC key"))?;
        return Ok(CoinbaseKey::Es256(pkcs8.as_ref().to_vec()));
    }
    let raw = B64
        .decode(secret.trim())
        .map_err(|_| invalid(FIELD, "neither a PEM EC key nor a base64 Ed25519 key"))?;
    if raw.len() != 64 && raw.len() != 32 {
        return Err(invalid(
            FIELD,
            "a base64 Ed25519 key must decode to 64 bytes (seed and public key)",
        ));
    }
    let pair = Ed25519KeyPair::from_seed_unchecked(raw.get(..32).unwrap_or_default())
        .map_err(|_| invalid(FIELD, "not a valid Ed25519 seed"))?;
    if raw.len() == 64
        && raw.get(32..) != Some(aws_lc_rs::signature::KeyPair::public_key(&pair).as_ref())
    {
        return Err(invalid(
            FIELD,
            "the Ed25519 public half does not match its seed",
        ));
    }
    let pkcs8 = pair
        .to_pkcs8v1()
        .map_err(|_| invalid(FIELD, "cannot re-encode the Ed25519 key"))?;
    Ok(CoinbaseKey::EdDsa(pkcs8.as_ref().to_vec()))
}

/// The CDP JWT for one request.
///
/// # Errors
/// When signing fails.
pub fn coinbase_jwt(
    key_name: &str,
    key: &CoinbaseKey,
    uri: &str,
    now: i64,
    nonce: &str,
) -> Result<String, jsonwebtoken::errors::Error> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let (alg, enc) = match key {
        CoinbaseKey::Es256(der) => (Algorithm::ES256, EncodingKey::from_ec_der(der)),
        CoinbaseKey::EdDsa(der) => (Algorithm::EdDSA, EncodingKey::from_ed_der(der)),
    };
    let mut header = Header::new(alg);
    header.kid = Some(key_name.to_owned());
    header.extras.insert("nonce", nonce);
    let claims = serde_json::json!({
        "sub": key_name, "iss": "cdp", "nbf": now, "exp": now + 120, "uri": uri,
    });
    jsonwebtoken::encode(&header, &claims, &enc)
}

pub(super) async fn coinbase(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Coinbase;
    let key = coinbase_key(set.api_secret.expose_secret())?;
    let ep = v.endpoint(ex)?;
    let host = match (ep.base.host_str(), ep.base.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => return Err(unavailable(ex, "the configured base URL has no host")),
    };
    // The JWT names the path the request really goes to, prefix included.
    let prefix = ep.base.path().trim_end_matches('/').to_owned();
    let mut last = Value::Null;
    for path in [
        "/api/v3/brokerage/accounts",
        "/api/v3/brokerage/key_permissions",
    ] {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let now = v.clock.now().unix_timestamp();
        let jwt = coinbase_jwt(
            &set.api_key,
            &key,
            &signing::coinbase_uri("GET", &host, &format!("{prefix}{path}")),
            now,
            &nonce,
        )
        .map_err(|_| invalid("credentials.api_secret", "the key cannot sign a CDP token"))?;
        let req = get(
            path.to_owned(),
            vec![("Authorization", format!("Bearer {jwt}"))],
        );
        let (status, body) = v.send(ex, req).await?;
        // Coinbase's own refusals: 401 with its plain "Unauthorized" body,
        // 401/403 with its JSON error ({"error": ..., "message": ...}).
        let coinbase_error = || {
            serde_json::from_str::<Value>(&body)
                .ok()
                .is_some_and(|j| j["error"].is_string() && j["message"].is_string())
        };
        match status {
            200 => {
                let json = parse(ex, &body)?;
                let shaped = if path.ends_with("/accounts") {
                    json["accounts"].is_array()
                } else {
                    json["can_view"].is_boolean()
                };
                if !shaped {
                    return Err(not_exchange(ex, "an answer of the wrong shape"));
                }
                last = json;
            }
            401 if body.trim() == "Unauthorized" || coinbase_error() => {
                return Err(rejected(
                    ex,
                    401,
                    "Unauthorized: the key name or private key is wrong, the key was deleted, or the broker's clock is off",
                ));
            }
            403 if coinbase_error() => return Err(rejected(ex, 403, NO_PERMISSION)),
            other => {
                return Err(not_exchange(
                    ex,
                    &format!("HTTP {other} without Coinbase's error body"),
                ));
            }
        }
    }
    let b = |k: &str| last[k].as_bool().unwrap_or(false);
    Ok(Permissions {
        read: b("can_view"),
        trade: b("can_trade"),
        // CDP's can_transfer is the right to send funds off the exchange.
        withdraw: b("can_transfer"),
        transfer: b("can_transfer"),
        // Coinbase does not report IP binding through the API.
        ip_restricted: false,
        expires_at: None,
    })
}
