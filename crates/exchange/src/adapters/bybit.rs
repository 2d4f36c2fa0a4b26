//! Bybit: the signed requests and what their answers mean.

use super::*;

pub(super) async fn bybit(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
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
