//! Binance: the signed requests and what their answers mean.

use super::*;

pub(super) async fn binance(
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
