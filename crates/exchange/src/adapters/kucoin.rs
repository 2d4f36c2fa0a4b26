//! KuCoin: the signed requests and what their answers mean.

use super::*;

pub(super) async fn kucoin(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Kucoin;
    let secret = set.api_secret.expose_secret();
    let pass = passphrase(set);
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
