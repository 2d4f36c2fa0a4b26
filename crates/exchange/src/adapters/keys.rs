//! Key management through a master account's key: create (mint), list and
//! delete a sub-account's API keys, for rotation without a person at the
//! exchange's web UI. The master key is used for nothing else.
//!
//! As the exchanges document them (recorded in docs/zero-touch.md):
//! - Bybit v5: `POST /v5/user/create-sub-api`, `GET /v5/user/sub-apikeys`,
//!   `POST /v5/user/delete-sub-api`, signed like every v5 call (a POST
//!   signs its JSON body). The master key needs a Wallet transfer
//!   permission ("AccountTransfer" or "SubMemberTransferList") or
//!   "Withdraw": it is powerful, which is why it never leaves the broker.
//! - KuCoin: `POST`, `GET` and `DELETE /api/v1/sub/api-key`, signed like
//!   every KuCoin call, with the master account's key (General
//!   permission). The creator chooses a key's passphrase, and deleting a
//!   key takes it: the broker derives the passphrase of a key it mints
//!   from the master secret and the key's note, so even a key whose
//!   creation answer was lost can be deleted.
//!
//! Other exchanges answer INVALID_ARGUMENT here until their adapters exist.

use super::*;

use secrecy::SecretString;

pub use credbroker_core::rotation::mint::{KeyManager, ManagedKey, MintSpec};

/// Not worth retrying: INVALID_ARGUMENT, naming what to do instead.
fn unsupported(ex: ExchangeId) -> ValidationError {
    ValidationError::InvalidField {
        field: "exchange",
        reason: format!(
            "the broker cannot manage {ex}'s keys through its API yet (key management: bybit, kucoin); create and delete keys in its web UI"
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

impl ExchangeValidator {
    /// Creates a key in `spec.sub_account` with `master`, and returns it.
    ///
    /// # Errors
    /// `Rejected` when the exchange refuses (the master key's permissions, a
    /// foreign sub-account), `Unavailable` when no answer could be had (the
    /// key may then exist: find it with [`KeyManager::list`] by its note).
    async fn bybit_mint(
        &self,
        master: &CredentialSet,
        spec: &MintSpec,
    ) -> Result<CredentialSet, ValidationError> {
        let ex = ExchangeId::Bybit;
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
    async fn bybit_list(
        &self,
        master: &CredentialSet,
        sub_account: &str,
    ) -> Result<Vec<ManagedKey>, ValidationError> {
        let ex = ExchangeId::Bybit;
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

    /// Deletes `api_key` (listed).
    async fn bybit_delete(
        &self,
        master: &CredentialSet,
        api_key: &str,
    ) -> Result<bool, ValidationError> {
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

/// The passphrase of the key the broker mints under `note`: derived from
/// the master secret, so it is never stored outside Vault's copy of the
/// set and can be found again for a key whose creation answer was lost.
/// 32 letters and digits (KuCoin: 7 to 32 characters, no spaces).
fn minted_passphrase(master: &CredentialSet, note: &str) -> SecretString {
    let mac = signing::kucoin_raw(
        master.api_secret.expose_secret(),
        &format!("credbroker minted-key passphrase {note}"),
    );
    let p: String = mac
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    SecretString::from(p)
}

impl ExchangeValidator {
    async fn kucoin_call(
        &self,
        master: &CredentialSet,
        method: Method,
        endpoint: &str,
        body: Option<String>,
    ) -> Result<Value, ValidationError> {
        let ex = ExchangeId::Kucoin;
        let req = super::kucoin::signed(self, master, method, endpoint, body);
        let (status, answer) = self.send(ex, req).await?;
        super::kucoin::answer(status, &answer).map_err(|e| match e {
            ValidationError::Rejected { code: Some(code), .. } if code == "400007" => rejected(
                ex,
                code,
                "the management key may not manage sub-account keys: it must be the master account's key",
            ),
            e => e,
        })
    }

    async fn kucoin_mint(
        &self,
        master: &CredentialSet,
        spec: &MintSpec,
    ) -> Result<CredentialSet, ValidationError> {
        let ex = ExchangeId::Kucoin;
        let passphrase = minted_passphrase(master, &spec.note);
        let mut body = serde_json::json!({
            "subName": spec.sub_account,
            "passphrase": passphrase.expose_secret(),
            "remark": spec.note,
            "permission": if spec.trade { "General,Spot" } else { "General" },
        });
        if !spec.ips.is_empty() {
            body["ipWhitelist"] = spec.ips.join(",").into();
        }
        let r = self
            .kucoin_call(
                master,
                Method::POST,
                "/api/v1/sub/api-key",
                Some(body.to_string()),
            )
            .await?;
        match (r["apiKey"].as_str(), r["apiSecret"].as_str()) {
            (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Ok(CredentialSet {
                api_key: k.to_owned(),
                api_secret: s.to_owned().into(),
                passphrase: Some(passphrase),
            }),
            _ => Err(not_exchange(
                ex,
                "a created key without apiKey and apiSecret",
            )),
        }
    }

    async fn kucoin_list(
        &self,
        master: &CredentialSet,
        sub_account: &str,
    ) -> Result<Vec<ManagedKey>, ValidationError> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("subName", sub_account)
            .finish();
        let r = self
            .kucoin_call(
                master,
                Method::GET,
                &format!("/api/v1/sub/api-key?{query}"),
                None,
            )
            .await?;
        let Some(list) = r.as_array() else {
            return Err(not_exchange(
                ExchangeId::Kucoin,
                "a key list of the wrong shape",
            ));
        };
        Ok(list
            .iter()
            .map(|k| {
                let has = super::kucoin::permits(k["permission"].as_str().unwrap_or(""));
                ManagedKey {
                    api_key: k["apiKey"].as_str().unwrap_or("").to_owned(),
                    note: k["remark"].as_str().unwrap_or("").to_owned(),
                    trade: has("Spot") || has("Margin") || has("Futures"),
                    ips: k["ipWhitelist"]
                        .as_str()
                        .unwrap_or("")
                        .split(',')
                        .map(str::trim)
                        .filter(|ip| !ip.is_empty())
                        .map(str::to_owned)
                        .collect(),
                }
            })
            .collect())
    }

    /// Deletes `key` (listed): KuCoin asks for its passphrase, the one the
    /// broker holds or, for a key it minted, the one it derives.
    async fn kucoin_delete(
        &self,
        master: &CredentialSet,
        sub_account: &str,
        key: &ManagedKey,
        passphrase: Option<&SecretString>,
    ) -> Result<bool, ValidationError> {
        let derived;
        let passphrase = match passphrase {
            Some(p) => p,
            None if credbroker_core::rotation::mint::is_minted_note(&key.note) => {
                derived = minted_passphrase(master, &key.note);
                &derived
            }
            None => {
                return Err(invalid(
                    "passphrase",
                    &format!(
                        "KuCoin deletes a key only with its passphrase, and the broker no longer holds the set of key {}: delete it in KuCoin's web UI",
                        credbroker_core::broker::types::key_hint(&key.api_key)
                    ),
                ));
            }
        };
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("apiKey", &key.api_key)
            .append_pair("passphrase", passphrase.expose_secret())
            .append_pair("subName", sub_account)
            .finish();
        self.kucoin_call(
            master,
            Method::DELETE,
            &format!("/api/v1/sub/api-key?{query}"),
            None,
        )
        .await?;
        Ok(true)
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
        match ex {
            ExchangeId::Bybit => self.bybit_mint(master, spec).await,
            ExchangeId::Kucoin => self.kucoin_mint(master, spec).await,
            _ => Err(unsupported(ex)),
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
        match ex {
            ExchangeId::Bybit => self.bybit_list(master, sub_account).await,
            ExchangeId::Kucoin => self.kucoin_list(master, sub_account).await,
            _ => Err(unsupported(ex)),
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
        passphrase: Option<&SecretString>,
    ) -> Result<bool, ValidationError> {
        let listed = self.list(ex, master, sub_account).await?;
        let Some(key) = listed.iter().find(|k| k.api_key == api_key) else {
            return Ok(false);
        };
        match ex {
            ExchangeId::Bybit => self.bybit_delete(master, api_key).await,
            ExchangeId::Kucoin => {
                self.kucoin_delete(master, sub_account, key, passphrase)
                    .await
            }
            _ => Err(unsupported(ex)),
        }
    }

    fn deletes_with_passphrase(&self, ex: ExchangeId) -> bool {
        ex == ExchangeId::Kucoin
    }
}
