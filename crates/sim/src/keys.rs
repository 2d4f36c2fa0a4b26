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
//! A minted key is an ordinary key afterwards: it signs, validates and
//! answers `query-api` with the permissions it was created with.

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
