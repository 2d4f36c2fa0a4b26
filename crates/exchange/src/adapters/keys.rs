//! Key management through a master account's key: create (mint), list and
//! delete a sub-account's API keys, for rotation without a person at the
//! exchange's web UI. The master key is used for nothing else.
//!
//! Bybit v5, as its documentation describes it (recorded in
//! docs/exchanges.md): `POST /v5/user/create-sub-api`, `GET
//! /v5/user/sub-apikeys`, `POST /v5/user/delete-sub-api`, signed like
//! every v5 call (a POST signs its JSON body). The master key needs a
//! Wallet transfer permission ("AccountTransfer" or
//! "SubMemberTransferList") or "Withdraw": it is powerful, which is why it
//! never leaves the broker. Other exchanges answer `Unsupported` here
//! until their adapters exist.

use super::*;

pub use credbroker_core::rotation::mint::{KeyManager, ManagedKey, MintSpec};

/// Not worth retrying: INVALID_ARGUMENT, naming what to do instead.
fn unsupported(ex: ExchangeId) -> ValidationError {
    ValidationError::InvalidField {
        field: "exchange",
        reason: format!(
            "the broker cannot manage {ex}'s keys through its API yet (key management: bybit); create and delete keys in its web UI"
        ),
    }
}

/// Bybit's answer: the `result` of a retCode 0, or the error it names.
fn bybit_result(status: u16, body: &str) -> Result<Value, ValidationError> {
    let ex = ExchangeId::Bybit;
    let json = parse(ex, body)?;
    let (Some(code), Some(msg)) = (json["retCode"].as_i64(), json["retMsg"].as_str()) else {
        return Err(not_exchange(
            ex,
            &format!("HTTP {status} without Bybit's retCode"),
        ));
    };
    match code {
        0 => Ok(json["result"].clone()),
        10003 => Err(rejected(ex, code, BAD_KEY)),
        10004 => Err(rejected(ex, code, BAD_SECRET)),
        10010 => Err(rejected(ex, code, IP)),
        10002 => Err(rejected(ex, code, CLOCK)),
        10005 => Err(rejected(
            ex,
            code,
            "the management key may not manage sub-account keys: it must be the master account's key with a Wallet transfer permission",
        )),
        10006 => Err(unavailable(
            ex,
            "rate limited by Bybit (10006); retry in a minute",
        )),
        // A parameter error names the field, never a secret.
        10001 => Err(rejected(
            ex,
            code,
            &format!("Bybit refused the request: {msg}"),
        )),
        _ => Err(rejected(
            ex,
            code,
            "Bybit refused the key-management request",
        )),
    }
}

impl ExchangeValidator {
    async fn bybit_call(
        &self,
        master: &CredentialSet,
        method: reqwest::Method,
        path: &str,
        payload: String,
    ) -> Result<Value, ValidationError> {
        let ts = self.now_ms();
        let sig = signing::bybit(
            master.api_secret.expose_secret(),
            ts,
            &master.api_key,
            RECV_WINDOW_MS,
            &payload,
        );
        let headers = vec![
            ("X-BAPI-API-KEY", master.api_key.clone()),
            ("X-BAPI-TIMESTAMP", ts.to_string()),
            ("X-BAPI-SIGN", sig),
            ("X-BAPI-RECV-WINDOW", RECV_WINDOW_MS.to_string()),
        ];
        let req = if method == reqwest::Method::GET {
            get(format!("{path}?{payload}"), headers)
        } else {
            Request {
                method,
                path_and_query: path.to_owned(),
                headers,
                body: Some(("application/json", payload)),
            }
        };
        let (status, body) = self.send(ExchangeId::Bybit, req).await?;
        bybit_result(status, &body)
    }
}

#[async_trait::async_trait]
impl KeyManager for ExchangeValidator {
    /// Creates a key in `spec.sub_account` with `master`, and returns it.
    ///
    /// # Errors
    /// `Rejected` when the exchange refuses (the master key's permissions, a
    /// foreign sub-account), `Unavailable` when no answer could be had (the
    /// key may then exist: find it with [`KeyManager::list`] by its note).
    async fn mint(
        &self,
        ex: ExchangeId,
        master: &CredentialSet,
        spec: &MintSpec,
    ) -> Result<CredentialSet, ValidationError> {
        if ex != ExchangeId::Bybit {
            return Err(unsupported(ex));
        }
        let sub: u64 = spec
            .sub_account
            .parse()
            .map_err(|_| invalid("sub_account", "a Bybit sub-account is its numeric UID"))?;
        let permissions = if spec.trade {
            serde_json::json!({"Spot": ["SpotTrade"], "ContractTrade": ["Order", "Position"]})
        } else {
            serde_json::json!({})
        };
        let mut body = serde_json::json!({
            "subuid": sub,
            "note": spec.note,
            "readOnly": i32::from(!spec.trade),
            "permissions": permissions,
        });
        if !spec.ips.is_empty() {
            body["ips"] = spec.ips.join(",").into();
        }
        let r = self
            .bybit_call(
                master,
                reqwest::Method::POST,
                "/v5/user/create-sub-api",
                body.to_string(),
            )
            .await?;
        match (r["apiKey"].as_str(), r["secret"].as_str()) {
            (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Ok(CredentialSet {
                api_key: k.to_owned(),
                api_secret: s.to_owned().into(),
                passphrase: None,
            }),
            _ => Err(not_exchange(ex, "a created key without apiKey and secret")),
        }
    }

    /// The keys of `sub_account`, without secrets.
    ///
    /// # Errors
    /// As [`KeyManager::mint`].
    async fn list(
        &self,
        ex: ExchangeId,
        master: &CredentialSet,
        sub_account: &str,
    ) -> Result<Vec<ManagedKey>, ValidationError> {
        if ex != ExchangeId::Bybit {
            return Err(unsupported(ex));
        }
        let mut keys = Vec::new();
        let mut cursor = String::new();
        loop {
            let mut query = format!("subMemberId={sub_account}&limit=20");
            if !cursor.is_empty() {
                query.push_str(&format!("&cursor={cursor}"));
            }
            let r = self
                .bybit_call(master, reqwest::Method::GET, "/v5/user/sub-apikeys", query)
                .await?;
            let Some(list) = r["result"].as_array() else {
                return Err(not_exchange(ex, "a key list of the wrong shape"));
            };
            for k in list {
                let perms = &k["permissions"];
                let any = |g: &str| perms[g].as_array().is_some_and(|a| !a.is_empty());
                keys.push(ManagedKey {
                    api_key: k["apiKey"].as_str().unwrap_or("").to_owned(),
                    note: k["note"].as_str().unwrap_or("").to_owned(),
                    trade: any("Spot")
                        || any("ContractTrade")
                        || any("Options")
                        || any("Derivatives"),
                    ips: k["ips"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .filter(|ip| *ip != "*")
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
            cursor = r["nextPageCursor"].as_str().unwrap_or("").to_owned();
            if cursor.is_empty() || list.is_empty() {
                return Ok(keys);
            }
        }
    }

    /// Deletes `api_key` of `sub_account`; false when the exchange no longer
    /// lists it (already deleted: deleting is idempotent).
    ///
    /// # Errors
    /// As [`KeyManager::mint`].
    async fn delete(
        &self,
        ex: ExchangeId,
        master: &CredentialSet,
        sub_account: &str,
        api_key: &str,
    ) -> Result<bool, ValidationError> {
        if ex != ExchangeId::Bybit {
            return Err(unsupported(ex));
        }
        let listed = self.list(ex, master, sub_account).await?;
        if !listed.iter().any(|k| k.api_key == api_key) {
            return Ok(false);
        }
        let body = serde_json::json!({"apikey": api_key}).to_string();
        self.bybit_call(
            master,
            reqwest::Method::POST,
            "/v5/user/delete-sub-api",
            body,
        )
        .await?;
        Ok(true)
    }
}
