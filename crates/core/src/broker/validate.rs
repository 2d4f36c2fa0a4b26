//! The format check: the validator that runs with no network call. It is the
//! first stage of every exchange adapter, and on its own it is what the dev
//! mode and the core tests validate with ("format check only": it proves a
//! set is well-formed, not that the exchange accepts it).

use async_trait::async_trait;
use secrecy::ExposeSecret;

use super::{
    error::ValidationError,
    ports::CredentialValidator,
    types::{CredentialSet, ExchangeId, MAX_FIELD_LEN, Permissions, TenantId},
};

/// Checks field presence, lengths and alphabets per exchange, and the
/// passphrase rule; reports read-only permissions since nothing was asked of
/// the exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct FormatCheckValidator;

#[async_trait]
impl CredentialValidator for FormatCheckValidator {
    async fn validate(
        &self,
        _tenant: TenantId,
        exchange: ExchangeId,
        set: &CredentialSet,
    ) -> Result<Permissions, ValidationError> {
        check_format(exchange, set)?;
        Ok(Permissions {
            read: true,
            ..Permissions::default()
        })
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ValidationError {
    ValidationError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// Checks one field: present, not too long, printable ASCII with no spaces.
fn check_token(field: &'static str, value: &str, min: usize) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if value.len() > MAX_FIELD_LEN {
        return Err(invalid(
            field,
            format!("is {} bytes; at most {MAX_FIELD_LEN} allowed", value.len()),
        ));
    }
    if value.len() < min {
        return Err(invalid(
            field,
            format!(
                "is too short ({} characters; at least {min} expected)",
                value.len()
            ),
        ));
    }
    if let Some(pos) = value.chars().position(|c| !c.is_ascii_graphic()) {
        return Err(invalid(
            field,
            format!("contains a space or non-printable character at position {pos}"),
        ));
    }
    Ok(())
}

/// Format rules per exchange, without any network call.
///
/// # Errors
/// `InvalidField` naming the first bad field.
pub fn check_format(exchange: ExchangeId, set: &CredentialSet) -> Result<(), ValidationError> {
    const KEY: &str = "credentials.api_key";
    const SECRET: &str = "credentials.api_secret";
    const PASS: &str = "credentials.passphrase";
    let secret = set.api_secret.expose_secret();
    match exchange {
        ExchangeId::Coinbase => {
            // CDP key names look like organizations/{org}/apiKeys/{id}; secrets
            // are a PEM EC key (ES256) or a base64 Ed25519 key (EdDSA).
            check_token(KEY, &set.api_key, 8)?;
            if secret.is_empty() {
                return Err(invalid(SECRET, "is required"));
            }
            if secret.len() > MAX_FIELD_LEN {
                return Err(invalid(
                    SECRET,
                    format!("is {} bytes; at most {MAX_FIELD_LEN} allowed", secret.len()),
                ));
            }
            let pem = secret.contains("-----BEGIN");
            if !pem {
                check_token(SECRET, secret, 32)?;
            } else if !secret.contains("PRIVATE KEY-----") {
                return Err(invalid(
                    SECRET,
                    "PEM must hold an EC PRIVATE KEY or PRIVATE KEY block",
                ));
            }
        }
        _ => {
            check_token(KEY, &set.api_key, 8)?;
            check_token(SECRET, secret, 8)?;
        }
    }
    match (&set.passphrase, exchange.requires_passphrase()) {
        (None, true) => Err(invalid(PASS, format!("is required for {exchange}"))),
        (Some(p), true) => {
            let p = p.expose_secret();
            if p.is_empty() || p.len() > 256 {
                Err(invalid(PASS, "must be 1 to 256 characters"))
            } else if p.chars().any(char::is_control) {
                Err(invalid(PASS, "contains a control character"))
            } else {
                Ok(())
            }
        }
        (Some(_), false) => Err(invalid(
            PASS,
            format!("{exchange} keys have no passphrase; leave it unset"),
        )),
        (None, false) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn set(key: &str, secret: &str, pass: Option<&str>) -> CredentialSet {
        CredentialSet {
            api_key: key.into(),
            api_secret: SecretString::from(secret.to_owned()),
            passphrase: pass.map(|p| SecretString::from(p.to_owned())),
        }
    }

    #[test]
    fn table() {
        let long = "x".repeat(MAX_FIELD_LEN + 1);
        let cases: &[(ExchangeId, CredentialSet, Option<&str>)] = &[
            (
                ExchangeId::Binance,
                set("abcdefgh12", "secretsecret", None),
                None,
            ),
            (
                ExchangeId::Binance,
                set("", "secretsecret", None),
                Some("credentials.api_key"),
            ),
            (
                ExchangeId::Binance,
                set("abcdefgh12", "", None),
                Some("credentials.api_secret"),
            ),
            (
                ExchangeId::Binance,
                set("abc def gh", "secretsecret", None),
                Some("credentials.api_key"),
            ),
            (
                ExchangeId::Binance,
                set("abcdefgh12", &long, None),
                Some("credentials.api_secret"),
            ),
            (
                ExchangeId::Binance,
                set("abcdefgh12", "secretsecret", Some("p")),
                Some("credentials.passphrase"),
            ),
            (
                ExchangeId::Okx,
                set("abcdefgh12", "secretsecret", None),
                Some("credentials.passphrase"),
            ),
            (
                ExchangeId::Okx,
                set("abcdefgh12", "secretsecret", Some("pass")),
                None,
            ),
            (
                ExchangeId::Kucoin,
                set("abcdefgh12", "secretsecret", Some("")),
                Some("credentials.passphrase"),
            ),
            (
                ExchangeId::Coinbase,
                set(
                    "organizations/o/apiKeys/k",
                    "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n",
                    None,
                ),
                None,
            ),
            (
                ExchangeId::Coinbase,
                set(
                    "organizations/o/apiKeys/k",
                    "-----BEGIN CERTIFICATE-----",
                    None,
                ),
                Some("credentials.api_secret"),
            ),
        ];
        for (i, (ex, s, want)) in cases.iter().enumerate() {
            let got = check_format(*ex, s).err().map(|e| match e {
                ValidationError::InvalidField { field, .. } => field,
                other => panic!("case {i}: unexpected {other:?}"),
            });
            assert_eq!(got, *want, "case {i}");
        }
    }

    #[test]
    fn errors_never_echo_the_secret() {
        let s = set("abcdefgh12", "has space-SECRETVALUE", None);
        let e = check_format(ExchangeId::Binance, &s)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("SECRETVALUE"), "{e}");
    }
}
