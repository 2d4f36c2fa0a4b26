//! The exchanges' key-management endpoints, as a master account's key
//! calls them to create, list and delete its sub-accounts' API keys.
//!
//! Bybit v5 (bybit-exchange.github.io/docs/v5/user/…):
//! - `POST /v5/user/create-sub-api` `{subuid, note, readOnly, ips,
//!   permissions}` → `{id, note, apiKey, readOnly, secret, permissions}`;
//!   master keys only, with a Wallet permission ("AccountTransfer",
//!   "SubMemberTransferList") or "Withdraw".
//! - `GET /v5/user/sub-apikeys?subMemberId=` → `{result: [{id, ips, apiKey,
//!   note, status, createdAt, type, permissions, secret: "******",
//!   readOnly, flag}], nextPageCursor}`; master keys only.
//! - `POST /v5/user/delete-sub-api` `{apikey}`: the key stops working at
//!   once.
//!
//! KuCoin (kucoin.com/docs/rest/account/sub-account-api/…), every call
//! with the master account's key (General permission; another account's
//! key is refused with 400007, "Access denied, requires more permission"):
//! - `POST /api/v1/sub/api-key` `{subName, passphrase (7–32 characters, no
//!   spaces), remark (1–24 characters), permission ("General", "Spot",
//!   "Futures", "Margin", "InnerTransfer"; default "General"),
//!   ipWhitelist (up to 20, comma-separated), expire}` → `{subName,
//!   remark, apiKey, apiSecret, passphrase, permission, ipWhitelist,
//!   createdAt}`;
//! - `GET /api/v1/sub/api-key?subName=[&apiKey=]` → `[{subName, remark,
//!   apiKey, permission, ipWhitelist, createdAt}]`;
//! - `DELETE /api/v1/sub/api-key?apiKey=&passphrase=&subName=` →
//!   `{subName, apiKey}`: the key's own passphrase is required.
//!
//! KuCoin documents 400100 ("Parameter Error") for bad parameters; it does
//! not say which code a foreign sub-account, an unknown key or a wrong
//! passphrase get, so the simulator answers 400100 for each.
//!
//! A minted key is an ordinary key afterwards: it signs, validates and
//! answers the permission endpoint with the permissions it was created
//! with.

use super::*;

/// Answers a key-management request, or None when `path` is not one.
pub(super) fn manage(
    sim: &Sim,
    method: &str,
    path: &str,
    query: &str,
    body: &str,
    caller: &SimKey,
) -> Option<Response> {
    match (sim.ex, method, path) {
        (ExchangeId::Bybit, "POST", "/v5/user/create-sub-api") => {
            Some(bybit_create(sim, body, caller))
        }
        (ExchangeId::Bybit, "GET", "/v5/user/sub-apikeys") => Some(bybit_list(sim, query, caller)),
        (ExchangeId::Bybit, "POST", "/v5/user/delete-sub-api") => {
            Some(bybit_delete(sim, body, caller))
        }
        (ExchangeId::Kucoin, "POST", "/api/v1/sub/api-key") => {
            Some(kucoin_create(sim, body, caller))
        }
        (ExchangeId::Kucoin, "GET", "/api/v1/sub/api-key") => Some(kucoin_list(sim, query, caller)),
        (ExchangeId::Kucoin, "DELETE", "/api/v1/sub/api-key") => {
            Some(kucoin_delete(sim, query, caller))
        }
        _ => None,
    }
}

fn bybit_reply(code: i64, msg: &str, result: Value) -> Response {
    reply(
        StatusCode::OK,
        json!({"retCode": code, "retMsg": msg, "result": result, "retExtInfo": {}, "time": now_ms()}),
    )
}

/// Bybit's permission rule for the sub-account endpoints: a master key
/// holding a Wallet transfer permission or Withdraw.
fn bybit_may_manage(caller: &SimKey) -> bool {
    let wallet = caller.permissions["permissions"]["Wallet"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    !caller.manages.is_empty()
        && wallet
            .iter()
            .any(|p| p == "AccountTransfer" || p == "SubMemberTransferList" || p == "Withdraw")
}

const BYBIT_DENIED: &str = "Permission denied, please check your API key permissions.";

/// Letters and digits from the system's random source.
fn random_alnum(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source");
    bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

fn bybit_create(sim: &Sim, body: &str, caller: &SimKey) -> Response {
    if !bybit_may_manage(caller) {
        return bybit_reply(10005, BYBIT_DENIED, json!({}));
    }
    let Ok(req) = serde_json::from_str::<Value>(body) else {
        return bybit_reply(10001, "params error: the body is not JSON", json!({}));
    };
    let sub = match &req["subuid"] {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return bybit_reply(10001, "params error: subuid is required", json!({})),
    };
    if !caller.manages.contains(&sub) {
        return bybit_reply(
            10001,
            "params error: the sub UID is not under this master account",
            json!({}),
        );
    }
    let (Some(read_only), Some(perms)) = (req["readOnly"].as_i64(), req["permissions"].as_object())
    else {
        return bybit_reply(
            10001,
            "params error: readOnly and permissions are required",
            json!({}),
        );
    };
    let ips: Vec<String> = req["ips"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| vec!["*".to_owned()]);
    let mut permissions = json!({
        "ContractTrade": [], "Spot": [], "Wallet": [], "Options": [], "Derivatives": [],
        "CopyTrading": [], "BlockTrade": [], "Exchange": [], "NFT": [], "Affiliate": []
    });
    for (group, list) in perms {
        permissions[group.as_str()] = list.clone();
    }
    let (api_key, secret) = (random_alnum(18), random_alnum(36));
    let id = order_id().to_string();
    let note = req["note"].as_str().unwrap_or("").to_owned();
    let mut key = SimKey::hmac(
        &secret,
        json!({
            "id": id, "note": note, "apiKey": api_key, "readOnly": read_only, "secret": "",
            "permissions": permissions, "ips": ips, "type": 1, "deadlineDay": -1,
            "expiredAt": "", "createdAt": "", "isMaster": false
        }),
    );
    key.sub_account = Some(sub);
    key.note.clone_from(&note);
    lock(&sim.keys).insert((sim.ex, api_key.clone()), key);
    bybit_reply(
        0,
        "",
        json!({"id": id, "note": note, "apiKey": api_key, "readOnly": read_only,
               "secret": secret, "permissions": permissions}),
    )
}

fn bybit_list(sim: &Sim, query: &str, caller: &SimKey) -> Response {
    if caller.manages.is_empty() {
        return bybit_reply(10005, BYBIT_DENIED, json!({}));
    }
    let Some(sub) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("subMemberId="))
        .map(str::to_owned)
    else {
        return bybit_reply(10001, "params error: subMemberId is required", json!({}));
    };
    if !caller.manages.contains(&sub) {
        return bybit_reply(
            10001,
            "params error: the sub UID is not under this master account",
            json!({}),
        );
    }
    let keys = lock(&sim.keys);
    let mut list: Vec<(&String, &SimKey)> = keys
        .iter()
        .filter(|((ex, _), k)| *ex == sim.ex && k.sub_account.as_deref() == Some(sub.as_str()))
        .map(|((_, api_key), k)| (api_key, k))
        .collect();
    list.sort_by_key(|(_, k)| k.created_ms);
    let result: Vec<Value> = list
        .iter()
        .map(|(api_key, k)| {
            let p = &k.permissions;
            json!({"id": p["id"], "ips": p["ips"], "apiKey": api_key, "note": k.note, "status": 1,
                   "expiredAt": "", "createdAt": "", "type": 1, "permissions": p["permissions"],
                   "secret": "******", "readOnly": p["readOnly"], "deadlineDay": -1, "flag": "hmac"})
        })
        .collect();
    bybit_reply(0, "", json!({"result": result, "nextPageCursor": ""}))
}

fn bybit_delete(sim: &Sim, body: &str, caller: &SimKey) -> Response {
    if !bybit_may_manage(caller) {
        return bybit_reply(10005, BYBIT_DENIED, json!({}));
    }
    let target = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["apikey"].as_str().map(str::to_owned));
    let Some(target) = target else {
        return bybit_reply(10001, "params error: apikey is required", json!({}));
    };
    let mut keys = lock(&sim.keys);
    let owned = keys
        .get(&(sim.ex, target.clone()))
        .and_then(|k| k.sub_account.clone())
        .is_some_and(|sub| caller.manages.contains(&sub));
    if !owned {
        return bybit_reply(
            10001,
            "params error: no such sub-account API key",
            json!({}),
        );
    }
    keys.remove(&(sim.ex, target));
    bybit_reply(0, "", json!({}))
}

fn kucoin_reply(data: Value) -> Response {
    reply(StatusCode::OK, json!({"code": "200000", "data": data}))
}

fn kucoin_refusal(code: &str, msg: &str) -> Response {
    let status = if code == "400007" {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::BAD_REQUEST
    };
    reply(status, json!({"code": code, "msg": msg}))
}

const KUCOIN_DENIED: &str = "Access denied, requires more permission.";

/// A query parameter, percent-decoded.
fn param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The permission answer of a KuCoin key (`GET /api/v1/user/api-key`).
fn kucoin_answer(api_key: &str, k: &SimKey) -> Value {
    let p = &k.permissions;
    json!({"subName": k.sub_account, "remark": k.note, "apiKey": api_key,
           "permission": p["permission"], "ipWhitelist": p["ipWhitelist"],
           "createdAt": k.created_ms})
}

fn kucoin_create(sim: &Sim, body: &str, caller: &SimKey) -> Response {
    if caller.manages.is_empty() {
        return kucoin_refusal("400007", KUCOIN_DENIED);
    }
    let Ok(req) = serde_json::from_str::<Value>(body) else {
        return kucoin_refusal("400100", "Parameter Error: the body is not JSON");
    };
    let field = |k: &str| req[k].as_str().unwrap_or("").to_owned();
    let (sub, passphrase, remark) = (field("subName"), field("passphrase"), field("remark"));
    if !caller.manages.contains(&sub) {
        return kucoin_refusal("400100", "Parameter Error: subName");
    }
    if !(7..=32).contains(&passphrase.chars().count()) || passphrase.contains(' ') {
        return kucoin_refusal("400100", "Parameter Error: passphrase");
    }
    if !(1..=24).contains(&remark.chars().count()) {
        return kucoin_refusal("400100", "Parameter Error: remark");
    }
    let permission = req["permission"].as_str().unwrap_or("General").to_owned();
    const SETTABLE: [&str; 5] = ["General", "Spot", "Futures", "Margin", "InnerTransfer"];
    if !permission.split(',').all(|p| SETTABLE.contains(&p.trim())) {
        return kucoin_refusal("400100", "Parameter Error: permission");
    }
    let ips = field("ipWhitelist");
    if ips.split(',').filter(|ip| !ip.is_empty()).count() > 20 {
        return kucoin_refusal("400100", "Parameter Error: ipWhitelist");
    }
    // KuCoin's shapes: a 24-digit hex key, a UUID secret.
    let api_key = format!("{:016x}{:08x}", now_ms(), order_id());
    let secret = {
        let h: String = random_alnum(32)
            .bytes()
            .map(|b| char::from(b"0123456789abcdef"[usize::from(b) % 16]))
            .collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    };
    let mut key = SimKey::hmac(
        &secret,
        json!({"remark": remark, "apiKey": api_key, "apiVersion": 2,
               "permission": permission, "ipWhitelist": ips, "createdAt": now_ms()}),
    );
    key.passphrase = Some(passphrase.clone());
    key.sub_account = Some(sub.clone());
    key.note.clone_from(&remark);
    let created = key.created_ms;
    lock(&sim.keys).insert((sim.ex, api_key.clone()), key);
    kucoin_reply(json!({
        "subName": sub, "remark": remark, "apiKey": api_key, "apiSecret": secret,
        "passphrase": passphrase, "permission": permission, "ipWhitelist": ips,
        "createdAt": created
    }))
}

fn kucoin_list(sim: &Sim, query: &str, caller: &SimKey) -> Response {
    if caller.manages.is_empty() {
        return kucoin_refusal("400007", KUCOIN_DENIED);
    }
    let sub = param(query, "subName").unwrap_or_default();
    if !caller.manages.contains(&sub) {
        return kucoin_refusal("400100", "Parameter Error: subName");
    }
    let only = param(query, "apiKey");
    let keys = lock(&sim.keys);
    let mut list: Vec<(&String, &SimKey)> = keys
        .iter()
        .filter(|((ex, api_key), k)| {
            *ex == sim.ex
                && k.sub_account.as_deref() == Some(sub.as_str())
                && only.as_ref().is_none_or(|o| o == api_key)
        })
        .map(|((_, api_key), k)| (api_key, k))
        .collect();
    list.sort_by_key(|(_, k)| k.created_ms);
    kucoin_reply(Value::Array(
        list.iter()
            .map(|(api_key, k)| kucoin_answer(api_key, k))
            .collect(),
    ))
}

fn kucoin_delete(sim: &Sim, query: &str, caller: &SimKey) -> Response {
    if caller.manages.is_empty() {
        return kucoin_refusal("400007", KUCOIN_DENIED);
    }
    let (Some(api_key), Some(passphrase), Some(sub)) = (
        param(query, "apiKey"),
        param(query, "passphrase"),
        param(query, "subName"),
    ) else {
        return kucoin_refusal(
            "400100",
            "Parameter Error: apiKey, passphrase and subName are required",
        );
    };
    let mut keys = lock(&sim.keys);
    let Some(key) = keys.get(&(sim.ex, api_key.clone())).filter(|k| {
        k.sub_account.as_deref() == Some(sub.as_str()) && caller.manages.contains(&sub)
    }) else {
        return kucoin_refusal("400100", "Parameter Error: apiKey");
    };
    if key.passphrase.as_deref() != Some(passphrase.as_str()) {
        return kucoin_refusal("400100", "Parameter Error: passphrase");
    }
    keys.remove(&(sim.ex, api_key.clone()));
    kucoin_reply(json!({"subName": sub, "apiKey": api_key}))
}
