//! KuCoin: the signed requests and what their answers mean.

use super::*;

/// A KuCoin request signed with `set` (key version 2: the passphrase is
/// sent signed with the secret). `endpoint` is the path with its query,
/// as KuCoin signs it.
pub(super) fn signed(
    v: &ExchangeValidator,
    set: &CredentialSet,
    method: Method,
    endpoint: &str,
    body: Option<String>,
) -> Request {
    let secret = set.api_secret.expose_secret();
    let ts = v.now_ms();
    let signature = signing::kucoin(
        secret,
        ts,
        method.as_str(),
        endpoint,
        body.as_deref().unwrap_or(""),
    );
    Request {
        method,
        path_and_query: endpoint.to_owned(),
        headers: vec![
            ("KC-API-KEY", set.api_key.clone()),
            ("KC-API-SIGN", signature),
            ("KC-API-TIMESTAMP", ts.to_string()),
            (
                "KC-API-PASSPHRASE",
                signing::kucoin_passphrase(secret, &passphrase(set)),
            ),
            ("KC-API-KEY-VERSION", "2".into()),
        ],
        body: body.map(|b| ("application/json", b)),
    }
}

/// KuCoin's answer: the `data` of a code 200000, or the error it names.
/// KuCoin's own answers are `{"code": "<6 digits>", "data": ...}` on
/// success and `{"code": ..., "msg": ...}` on refusal.
pub(super) fn answer(status: u16, body: &str) -> Result<Value, ValidationError> {
    let ex = ExchangeId::Kucoin;
    let json = parse(ex, body)?;
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
    match code {
        "200000" if json["data"].is_null() => Err(not_exchange(ex, "an answer of the wrong shape")),
        "200000" => Ok(json["data"].clone()),
        "400003" => Err(rejected(ex, code, BAD_KEY)),
        "400005" => Err(rejected(ex, code, BAD_SECRET)),
        "400004" => Err(rejected(ex, code, BAD_PASSPHRASE)),
        "400002" => Err(rejected(ex, code, CLOCK)),
        "400006" => Err(rejected(ex, code, IP)),
        // "Access denied, requires more permission" (KuCoin's gateway codes).
        "400007" => Err(rejected(
            ex,
            code,
            "KuCoin denied access: the key lacks a permission this call needs",
        )),
        "429000" => Err(unavailable(
            ex,
            "rate limited by KuCoin (429000); retry in a minute",
        )),
        _ => Err(rejected(ex, code, "KuCoin refused the key")),
    }
}

/// What a KuCoin `permission` list ("General,Spot") allows.
pub(super) fn permits(permission: &str) -> impl Fn(&str) -> bool + '_ {
    move |p| {
        permission
            .split(',')
            .any(|x| x.trim().eq_ignore_ascii_case(p))
    }
}

pub(super) async fn kucoin(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Kucoin;
    let mut last = Value::Null;
    for path in ["/api/v1/accounts", "/api/v1/user/api-key"] {
        let (status, body) = v.send(ex, signed(v, set, Method::GET, path, None)).await?;
        last = answer(status, &body)?;
    }
    let has = permits(last["permission"].as_str().unwrap_or(""));
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
