//! Per-exchange request building and answer mapping, one module per
//! exchange; here what they share (the request, the format check, the
//! error constructors and advice). Every error message is built from the
//! exchange's code and our advice, never from the secret.

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use reqwest::Method;
use secrecy::ExposeSecret as _;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{ExchangeValidator, signing};

mod binance;
mod bybit;
mod coinbase;
mod keys;
mod kraken;
mod kucoin;
mod okx;

pub use coinbase::{CoinbaseKey, coinbase_jwt, coinbase_key};
pub use keys::{KeyManager, ManagedKey, MintSpec};
pub use okx::okx_timestamp;

use credbroker_core::broker::error::ValidationError;
use credbroker_core::broker::types::{CredentialSet, ExchangeId, Permissions};

/// Milliseconds the exchange accepts between our timestamp and its clock.
pub const RECV_WINDOW_MS: u64 = 5000;

/// One signed HTTP request.
pub struct Request {
    /// Method.
    pub method: Method,
    /// Path with query, e.g. `/api/v3/account?timestamp=...`.
    pub path_and_query: String,
    /// Headers.
    pub headers: Vec<(&'static str, String)>,
    /// Content type and body.
    pub body: Option<(&'static str, String)>,
}

fn get(path_and_query: String, headers: Vec<(&'static str, String)>) -> Request {
    Request {
        method: Method::GET,
        path_and_query,
        headers,
        body: None,
    }
}

/// The key's passphrase (OKX, KuCoin), empty when none was given (the
/// format check has already required it).
fn passphrase(set: &CredentialSet) -> String {
    set.passphrase
        .as_ref()
        .map(|p| p.expose_secret().to_owned())
        .unwrap_or_default()
}

fn invalid(field: &'static str, reason: &str) -> ValidationError {
    ValidationError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// Shapes the generic format check cannot know.
///
/// # Errors
/// `InvalidField` naming the field.
pub fn check_exchange_format(ex: ExchangeId, set: &CredentialSet) -> Result<(), ValidationError> {
    let secret = set.api_secret.expose_secret();
    let alnum = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric());
    match ex {
        ExchangeId::Binance => {
            if !alnum(&set.api_key) || !alnum(secret) {
                return Err(invalid(
                    "credentials.api_key",
                    "Binance HMAC keys and secrets are letters and digits only",
                ));
            }
        }
        ExchangeId::Bybit => {
            if !alnum(&set.api_key) || !alnum(secret) {
                return Err(invalid(
                    "credentials.api_key",
                    "Bybit keys and secrets are letters and digits only",
                ));
            }
        }
        ExchangeId::Kraken => {
            if B64.decode(secret).is_err() {
                return Err(invalid(
                    "credentials.api_secret",
                    "Kraken secrets are base64 (as shown when the key was created)",
                ));
            }
        }
        ExchangeId::Coinbase => {
            coinbase_key(secret)?;
        }
        ExchangeId::Okx | ExchangeId::Kucoin => {}
    }
    Ok(())
}

/// Validates `set` on `ex`: the account request, then the permission request.
///
/// # Errors
/// `Rejected` or `Unavailable` as the exchange answers.
pub async fn probe(
    v: &ExchangeValidator,
    ex: ExchangeId,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    match ex {
        ExchangeId::Binance => binance::binance(v, set).await,
        ExchangeId::Bybit => bybit::bybit(v, set).await,
        ExchangeId::Okx => okx::okx(v, set).await,
        ExchangeId::Coinbase => coinbase::coinbase(v, set).await,
        ExchangeId::Kraken => kraken::kraken(v, set).await,
        ExchangeId::Kucoin => kucoin::kucoin(v, set).await,
    }
}

fn rejected(ex: ExchangeId, code: impl ToString, reason: &str) -> ValidationError {
    ValidationError::Rejected {
        exchange: ex.as_str(),
        code: Some(code.to_string()),
        reason: reason.into(),
    }
}

fn unavailable(ex: ExchangeId, reason: &str) -> ValidationError {
    ValidationError::Unavailable {
        exchange: ex.as_str(),
        reason: reason.into(),
    }
}

/// An answer that is not recognisably the exchange's own (a proxy's page,
/// an empty or cut-off body, the wrong shape): nothing is refused on it,
/// nothing is stored, no stored key changes status.
fn not_exchange(ex: ExchangeId, what: &str) -> ValidationError {
    unavailable(
        ex,
        &format!(
            "no usable answer from the exchange ({what}); nothing was stored or changed, retry later"
        ),
    )
}

fn parse(ex: ExchangeId, body: &str) -> Result<Value, ValidationError> {
    serde_json::from_str::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| not_exchange(ex, "not a JSON object"))
}

const CLOCK: &str =
    "the request timestamp is outside the exchange's window: check the broker host's clock (NTP)";
const IP: &str =
    "the exchange refuses requests from the broker's IP: add it to the key's IP allow-list";
const BAD_KEY: &str =
    "the exchange does not know this API key (typo, deleted key, or a key of another environment)";
const BAD_SECRET: &str = "the signature does not match: the API secret is wrong";
const BAD_PASSPHRASE: &str = "the passphrase is wrong (it was chosen when the key was created)";
const NO_PERMISSION: &str =
    "the key lacks a permission the broker needs to validate it (read access)";
