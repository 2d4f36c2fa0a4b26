//! OKX: the signed requests and what their answers mean.

use super::*;

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

pub(super) async fn okx(
    v: &ExchangeValidator,
    set: &CredentialSet,
) -> Result<Permissions, ValidationError> {
    let ex = ExchangeId::Okx;
    let pass = passphrase(set);
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
