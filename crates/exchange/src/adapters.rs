//! Per-exchange request building and answer mapping. Every error message is
//! built from the exchange's code and our advice, never from the secret.

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use reqwest::Method;
use secrecy::ExposeSecret as _;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{ExchangeValidator, signing};
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
        ExchangeId::Binance => binance(v, set).await,
        ExchangeId::Bybit => bybit(v, set).await,
        ExchangeId::Okx => okx(v, set).await,
        ExchangeId::Coinbase => coinbase(v, set).await,
        ExchangeId::Kraken => kraken(v, set).await,
        ExchangeId::Kucoin => kucoin(v, set).await,
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

// ---------------------------------------------------------------- Binance

async fn binance(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Binance;
    let mut last = Value::Null;
    for path in ["/api/v3/account", "/sapi/v1/account/apiRestrictions"] {
        let query = format!("timestamp={}&recvWindow={RECV_WINDOW_MS}", v.now_ms());
        let sig = signing::binance(set.api_secret.expose_secret(), &query, "");
        let req = get(
            format!("{path}?{query}&signature={sig}"),
            vec![("X-MBX-APIKEY", set.api_key.clone())],
        );
        let (status, body) = v.send(ex, req).await?;
        let json = parse(ex, &body)?;
        if status != 200 {
            // Binance's own refusal: a 4xx with {"code": <negative>, "msg": ...}.
            let (Some(code), Some(_)) = (json["code"].as_i64(), json["msg"].as_str()) else {
                return Err(not_exchange(
                    ex,
                    &format!("HTTP {status} without Binance's error body"),
                ));
            };
            if code >= 0 || !(400..500).contains(&status) {
                return Err(not_exchange(ex, &format!("HTTP {status} with code {code}")));
            }
            return Err(match code {
                -2014 => rejected(
                    ex,
                    code,
                    "API-key format invalid: check the key was copied whole",
                ),
                -2015 => rejected(
                    ex,
                    code,
                    "invalid API key, IP not in the key's allow-list, or missing permission for this endpoint",
                ),
                -1022 => rejected(ex, code, BAD_SECRET),
                -1021 => rejected(ex, code, CLOCK),
                -1003 => unavailable(ex, "rate limited by Binance (-1003); retry in a minute"),
                _ => rejected(ex, code, "Binance refused the key"),
            });
        }
        let shaped = if path == "/api/v3/account" {
            json["balances"].is_array()
        } else {
            json["enableReading"].is_boolean()
        };
        if !shaped {
            return Err(not_exchange(ex, "an answer of the wrong shape"));
        }
        // `/api/v3/account`'s canTrade / canWithdraw / canDeposit are the
        // *account's* flags (true for a read-only key on an account that may
        // withdraw); only apiRestrictions says what this key may do.
        last = json;
    }
    let b = |k: &str| last[k].as_bool().unwrap_or(false);
    Ok(Permissions {
        read: b("enableReading"),
        trade: b("enableSpotAndMarginTrading") || b("enableMargin") || b("enableFutures"),
        withdraw: b("enableWithdrawals"),
        transfer: b("enableInternalTransfer") || b("permitsUniversalTransfer"),
        ip_restricted: b("ipRestrict"),
        expires_at: last["tradingAuthorityExpirationTime"]
            .as_i64()
            .and_then(|ms| OffsetDateTime::from_unix_timestamp(ms / 1000).ok()),
    })
}

// ------------------------------------------------------------------ Bybit

async fn bybit(v: &ExchangeValidator, set: &CredentialSet) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Bybit;
    let mut last = Value::Null;
    for (path, query) in [
        ("/v5/account/wallet-balance", "accountType=UNIFIED"),
        ("/v5/user/query-api", ""),
    ] {
        let ts = v.now_ms();
        let sig = signing::bybit(
            set.api_secret.expose_secret(),
            ts,
            &set.api_key,
            RECV_WINDOW_MS,
            query,
        );
        let pq = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        };
        let req = get(
            pq,
            vec![
                ("X-BAPI-API-KEY", set.api_key.clone()),
                ("X-BAPI-TIMESTAMP", ts.to_string()),
                ("X-BAPI-SIGN", sig),
                ("X-BAPI-RECV-WINDOW", RECV_WINDOW_MS.to_string()),
            ],
        );
        let (status, body) = v.send(ex, req).await?;
        if status == 403 {
            return Err(unavailable(
                ex,
                "Bybit blocked the broker's IP for too many requests (HTTP 403); retry later",
            ));
        }
        let json = parse(ex, &body)?;
        // Bybit's own answers always carry an integer retCode and a retMsg.
        let (Some(code), Some(_)) = (json["retCode"].as_i64(), json["retMsg"].as_str()) else {
            return Err(not_exchange(
                ex,
                &format!("HTTP {status} without Bybit's retCode"),
            ));
        };
        if code != 0 {
            return Err(match code {
                10003 => rejected(ex, code, BAD_KEY),
                10004 => rejected(ex, code, BAD_SECRET),
                10010 => rejected(ex, code, IP),
                10002 => rejected(ex, code, CLOCK),
                10005 => rejected(ex, code, NO_PERMISSION),
                10006 => unavailable(ex, "rate limited by Bybit (10006); retry in a minute"),
                _ => rejected(ex, code, "Bybit refused the key"),
            });
        }
        if !json["result"].is_object() {
            return Err(not_exchange(ex, "an answer of the wrong shape"));
        }
        last = json["result"].clone();
    }
    let perms = &last["permissions"];
    let has = |group: &str, name: &str| {
        perms[group]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == name))
    };
    let any = |group: &str| perms[group].as_array().is_some_and(|a| !a.is_empty());
    let read_only = last["readOnly"].as_i64() == Some(1);
    let ips_open = last["ips"]
        .as_array()
        .is_none_or(|a| a.is_empty() || a.iter().any(|x| x == "*"));
    Ok(Permissions {
        read: true,
        trade: !read_only
            && (any("ContractTrade") || any("Spot") || any("Options") || any("Derivatives")),
        withdraw: has("Wallet", "Withdraw"),
        transfer: has("Wallet", "AccountTransfer") || has("Wallet", "SubMemberTransfer"),
        ip_restricted: !ips_open,
        expires_at: last["expiredAt"]
            .as_str()
            .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok()),
    })
}

// -------------------------------------------------------------------- OKX

/// OKX timestamps: ISO-8601 UTC with milliseconds.
pub fn okx_timestamp(ms: u64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

async fn okx(v: &ExchangeValidator, set: &CredentialSet) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Okx;
    let pass = set
        .passphrase
        .as_ref()
        .map(|p| p.expose_secret().to_owned())
        .unwrap_or_default();
    let mut last = Value::Null;
    for path in ["/api/v5/account/balance", "/api/v5/account/config"] {
        let ts = okx_timestamp(v.now_ms());
        let sig = signing::okx(set.api_secret.expose_secret(), &ts, "GET", path, "");
        let req = get(
            path.to_owned(),
            vec![
                ("OK-ACCESS-KEY", set.api_key.clone()),
                ("OK-ACCESS-SIGN", sig),
                ("OK-ACCESS-TIMESTAMP", ts),
                ("OK-ACCESS-PASSPHRASE", pass.clone()),
            ],
        );
        let (status, body) = v.send(ex, req).await?;
        let json = parse(ex, &body)?;
        // OKX's own answers: {"code": "<digits>", "msg": ..., "data": [...]}.
        let code = match (json["code"].as_str(), json["msg"].as_str()) {
            (Some(c), Some(_)) if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) => c,
            _ => {
                return Err(not_exchange(
                    ex,
                    &format!("HTTP {status} without OKX's code"),
                ));
            }
        };
        if code != "0" {
            return Err(match code {
                "50111" => rejected(ex, code, BAD_KEY),
                "50113" => rejected(ex, code, BAD_SECRET),
                "50105" => rejected(ex, code, BAD_PASSPHRASE),
                "50102" => rejected(ex, code, CLOCK),
                "50110" => rejected(ex, code, IP),
                "50101" => rejected(
                    ex,
                    code,
                    "the key belongs to the other environment (demo vs live): set exchanges.okx.demo accordingly",
                ),
                "50011" => unavailable(ex, "rate limited by OKX (50011); retry in a minute"),
                _ => rejected(ex, code, "OKX refused the key"),
            });
        }
        if !json["data"].is_array()
            || (path == "/api/v5/account/config" && !json["data"][0].is_object())
        {
            return Err(not_exchange(ex, "an answer of the wrong shape"));
        }
        last = json["data"][0].clone();
    }
    let perm = last["perm"].as_str().unwrap_or("");
    let has = |p: &str| perm.split(',').any(|x| x.trim() == p);
    Ok(Permissions {
        read: true,
        trade: has("trade"),
        withdraw: has("withdraw"),
        transfer: has("withdraw"),
        ip_restricted: !last["ip"].as_str().unwrap_or("").is_empty(),
        expires_at: None,
    })
}

// --------------------------------------------------------------- Coinbase

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

async fn coinbase(
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

// ----------------------------------------------------------------- Kraken

async fn kraken(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Kraken;
    let mut last = Value::Null;
    for path in ["/0/private/Balance", "/0/private/GetApiKeyInfo"] {
        let nonce = v.nonce().to_string();
        let body = format!("nonce={nonce}");
        let sig = signing::kraken(set.api_secret.expose_secret(), path, &nonce, &body)
            .map_err(|_| invalid("credentials.api_secret", "Kraken secrets are base64"))?;
        let req = Request {
            method: Method::POST,
            path_and_query: path.to_owned(),
            headers: vec![("API-Key", set.api_key.clone()), ("API-Sign", sig)],
            body: Some(("application/x-www-form-urlencoded", body)),
        };
        let (status, text) = v.send(ex, req).await?;
        // Kraken's own answers: HTTP 200, an `error` array, and on success a
        // `result` object; its errors read "<E|W><Category>:<message>".
        if status != 200 {
            return Err(not_exchange(ex, &format!("HTTP {status}")));
        }
        let json = parse(ex, &text)?;
        let Some(errors) = json["error"].as_array() else {
            return Err(not_exchange(ex, "an answer without Kraken's error array"));
        };
        if let Some(first) = errors.first() {
            let err = first
                .as_str()
                .filter(|e| {
                    e.split_once(':').is_some_and(|(cat, msg)| {
                        !msg.is_empty()
                            && cat.len() > 1
                            && cat.starts_with(['E', 'W'])
                            && cat.bytes().all(|b| b.is_ascii_alphabetic())
                    })
                })
                .ok_or_else(|| not_exchange(ex, "an error that is not Kraken's"))?;
            // The code the client sees is ours (Kraken's documented error
            // names, from this table): Kraken's text, which may quote the
            // request, never leaves the broker.
            return Err(match err {
                "EAPI:Invalid key" => rejected(ex, "EAPI:Invalid key", BAD_KEY),
                "EAPI:Invalid signature" => rejected(ex, "EAPI:Invalid signature", BAD_SECRET),
                "EAPI:Invalid nonce" => rejected(
                    ex,
                    "EAPI:Invalid nonce",
                    "nonce refused: another client uses this key with larger nonces, or the clock is off; give the broker its own key",
                ),
                "EGeneral:Permission denied" => {
                    rejected(ex, "EGeneral:Permission denied", NO_PERMISSION)
                }
                "EAPI:Rate limit exceeded"
                | "EGeneral:Temporary lockout"
                | "EService:Unavailable"
                | "EService:Busy" => unavailable(
                    ex,
                    "Kraken is rate limiting or unavailable; retry in a minute",
                ),
                e if e.contains("IP") => rejected(ex, "ip_not_allowed", IP),
                _ => rejected(ex, "unrecognised_refusal", "Kraken refused the key"),
            });
        }
        if !json["result"].is_object() {
            return Err(not_exchange(ex, "an answer of the wrong shape"));
        }
        last = json["result"].clone();
    }
    let perms: Vec<&str> = last["permissions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let has = |p: &str| perms.contains(&p);
    Ok(Permissions {
        read: has("query-funds"),
        trade: has("modify-trades") || has("create-modify-orders"),
        withdraw: has("withdraw-funds"),
        transfer: has("withdraw-funds") || has("deposit-funds"),
        ip_restricted: last["ipAllowlist"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        expires_at: last["validUntil"]
            .as_i64()
            .filter(|t| *t > 0)
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
    })
}

// ----------------------------------------------------------------- KuCoin

async fn kucoin(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Kucoin;
    let secret = set.api_secret.expose_secret();
    let pass = set
        .passphrase
        .as_ref()
        .map(|p| p.expose_secret().to_owned())
        .unwrap_or_default();
    let mut last = Value::Null;
    for path in ["/api/v1/accounts", "/api/v1/user/api-key"] {
        let ts = v.now_ms();
        let req = get(
            path.to_owned(),
            vec![
                ("KC-API-KEY", set.api_key.clone()),
                ("KC-API-SIGN", signing::kucoin(secret, ts, "GET", path, "")),
                ("KC-API-TIMESTAMP", ts.to_string()),
                (
                    "KC-API-PASSPHRASE",
                    signing::kucoin_passphrase(secret, &pass),
                ),
                ("KC-API-KEY-VERSION", "2".into()),
            ],
        );
        let (status, body) = v.send(ex, req).await?;
        let json = parse(ex, &body)?;
        // KuCoin's own answers: {"code": "<6 digits>", "data": ...} on
        // success, {"code": ..., "msg": ...} on refusal.
        let code = match json["code"].as_str() {
            Some(c) if c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit()) => c,
            _ => {
                return Err(not_exchange(
                    ex,
                    &format!("HTTP {status} without KuCoin's code"),
                ));
            }
        };
        if code != "200000" && !json["msg"].is_string() {
            return Err(not_exchange(ex, "a refusal without KuCoin's message"));
        }
        if code != "200000" {
            return Err(match code {
                "400003" => rejected(ex, code, BAD_KEY),
                "400005" => rejected(ex, code, BAD_SECRET),
                "400004" => rejected(ex, code, BAD_PASSPHRASE),
                "400002" => rejected(ex, code, CLOCK),
                "400006" | "400007" => rejected(ex, code, IP),
                "429000" => unavailable(ex, "rate limited by KuCoin (429000); retry in a minute"),
                _ => rejected(ex, code, "KuCoin refused the key"),
            });
        }
        if json["data"].is_null() {
            return Err(not_exchange(ex, "an answer of the wrong shape"));
        }
        last = json["data"].clone();
    }
    let perm = last["permission"].as_str().unwrap_or("");
    let has = |p: &str| perm.split(',').any(|x| x.trim().eq_ignore_ascii_case(p));
    Ok(Permissions {
        read: has("General"),
        trade: has("Spot") || has("Margin") || has("Futures"),
        // KuCoin's withdrawal right is not documented separately; a key with
        // Transfer or Withdrawal is treated as able to move funds out.
        withdraw: has("Withdrawal") || has("Transfer"),
        transfer: has("Transfer"),
        ip_restricted: !last["ipWhitelist"].as_str().unwrap_or("").is_empty(),
        expires_at: None,
    })
}
