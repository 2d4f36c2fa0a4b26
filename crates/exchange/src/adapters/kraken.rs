//! Kraken: the signed requests and what their answers mean.

use super::*;

pub(super) async fn kraken(
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
