//! Exchange simulators: local HTTP servers that check each request's
//! signature, timestamp window, passphrase and IP rule exactly as the
//! exchange documents it, and answer like the exchange does, error bodies and
//! HTTP statuses included. The tests validate against them, and
//! `credbroker dev` can too. They are simulators: they hold no real keys and
//! reach no exchange.

#![forbid(unsafe_code)]

mod keys;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::to_bytes,
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse as _, Response},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use credbroker_core::broker::types::ExchangeId;
use credbroker_exchange::{adapters::RECV_WINDOW_MS, signing};

/// A failure the simulator plays instead of answering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// HTTP 503.
    ServerError,
    /// Answer only after this long.
    Slow(Duration),
    /// HTTP 429 with Retry-After (and the exchange's rate-limit code).
    RateLimited,
}

/// Public key of a Coinbase CDP key, for verifying its JWTs.
#[derive(Clone, Debug)]
pub enum CdpPublicKey {
    /// Uncompressed P-256 point.
    Es256(Vec<u8>),
    /// Ed25519 public key.
    EdDsa(Vec<u8>),
}

/// One key the simulated exchange knows.
#[derive(Clone, Debug)]
pub struct SimKey {
    /// HMAC secret (unused for Coinbase).
    pub secret: String,
    /// Passphrase (OKX, KuCoin).
    pub passphrase: Option<String>,
    /// The exchange-native answer of its permission endpoint.
    pub permissions: Value,
    /// Whether requests come from an allowed IP.
    pub ip_allowed: bool,
    /// Failure to play.
    pub fault: Fault,
    /// Coinbase: the public key its JWTs are verified with.
    pub cdp_public_key: Option<CdpPublicKey>,
    /// A master account's key: the sub-accounts whose API keys it may
    /// create, list and delete (empty: an ordinary key).
    pub manages: Vec<String>,
    /// The sub-account a key belongs to (keys minted through the API).
    pub sub_account: Option<String>,
    /// The note (label, remark) given when the key was created.
    pub note: String,
    /// When the key was created (Unix milliseconds).
    pub created_ms: i64,
}

impl SimKey {
    /// An HMAC key with the given permission answer.
    pub fn hmac(secret: &str, permissions: Value) -> Self {
        Self {
            secret: secret.into(),
            passphrase: None,
            permissions,
            ip_allowed: true,
            fault: Fault::None,
            cdp_public_key: None,
            manages: Vec::new(),
            sub_account: None,
            note: String::new(),
            created_ms: now_ms(),
        }
    }

    /// A master account's key that manages the API keys of `subs`.
    pub fn master(secret: &str, permissions: Value, subs: &[&str]) -> Self {
        let mut k = Self::hmac(secret, permissions);
        k.manages = subs.iter().map(|s| (*s).to_owned()).collect();
        k
    }
}

type Keys = Arc<Mutex<HashMap<(ExchangeId, String), SimKey>>>;

/// Requests answered, by exchange and path.
type Calls = Arc<Mutex<HashMap<ExchangeId, HashMap<String, u64>>>>;

/// The running simulators and their key registry.
pub struct Simulators {
    /// Base URL per exchange.
    pub urls: BTreeMap<ExchangeId, String>,
    keys: Keys,
    calls: Calls,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Simulators {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Clone)]
struct Sim {
    ex: ExchangeId,
    keys: Keys,
    calls: Calls,
    nonces: Arc<Mutex<HashMap<String, u64>>>,
}

impl Simulators {
    /// Starts one simulator per exchange on loopback.
    ///
    /// # Errors
    /// When a port cannot be bound.
    pub async fn start() -> std::io::Result<Self> {
        let keys: Keys = Arc::default();
        let calls: Calls = Arc::default();
        let nonces = Arc::default();
        let mut urls = BTreeMap::new();
        let mut tasks = Vec::new();
        for ex in ExchangeId::ALL {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            urls.insert(ex, format!("http://{}", listener.local_addr()?));
            let sim = Sim {
                ex,
                keys: Arc::clone(&keys),
                calls: Arc::clone(&calls),
                nonces: Arc::clone(&nonces),
            };
            let app = Router::new().fallback(handle).with_state(sim);
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }
        Ok(Self {
            urls,
            keys,
            calls,
            tasks,
        })
    }

    /// Validator endpoints pointing at these simulators.
    pub fn endpoints(
        &self,
        timeout_ms: u64,
        requests_per_minute: u32,
    ) -> BTreeMap<ExchangeId, credbroker_exchange::ExchangeEndpoint> {
        self.urls
            .iter()
            .map(|(ex, url)| {
                let endpoint = credbroker_exchange::ExchangeEndpoint {
                    base_url: url.clone(),
                    timeout_ms,
                    requests_per_minute,
                    demo: false,
                };
                (*ex, endpoint)
            })
            .collect()
    }

    /// Registers (or replaces) a key.
    pub fn add_key(&self, ex: ExchangeId, api_key: &str, key: SimKey) {
        lock(&self.keys).insert((ex, api_key.to_owned()), key);
    }

    /// Deletes a key, as the exchange does when its owner deletes it:
    /// every later request signed with it is refused.
    pub fn remove_key(&self, ex: ExchangeId, api_key: &str) {
        lock(&self.keys).remove(&(ex, api_key.to_owned()));
    }

    /// Whether the exchange knows `api_key` (it was not deleted).
    pub fn has_key(&self, ex: ExchangeId, api_key: &str) -> bool {
        lock(&self.keys).contains_key(&(ex, api_key.to_owned()))
    }

    /// Requests `ex`'s simulator has answered on `path`, signed or not.
    pub fn calls(&self, ex: ExchangeId, path: &str) -> u64 {
        lock(&self.calls)
            .get(&ex)
            .and_then(|paths| paths.get(path))
            .copied()
            .unwrap_or(0)
    }

    /// Changes a registered key.
    pub fn update_key(&self, ex: ExchangeId, api_key: &str, f: impl FnOnce(&mut SimKey)) {
        if let Some(k) = lock(&self.keys).get_mut(&(ex, api_key.to_owned())) {
            f(k);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// What a simulator decided about a request.
enum Verdict {
    Ok(SimKey),
    Deny(Response),
}

/// Counts a request on `path` (no allocation once the path was seen: the
/// drill's load runs through here).
fn count_call(sim: &Sim, path: &str) {
    let mut calls = lock(&sim.calls);
    let paths = calls.entry(sim.ex).or_default();
    match paths.get_mut(path) {
        Some(n) => *n += 1,
        None => {
            paths.insert(path.to_owned(), 1);
        }
    }
}

async fn handle(State(sim): State<Sim>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = to_bytes(body, 1 << 20).await else {
        return reply(StatusCode::PAYLOAD_TOO_LARGE, json!({}));
    };
    let body = String::from_utf8_lossy(&body).to_string();
    let path = parts.uri.path().to_owned();
    count_call(&sim, &path);
    let query = parts.uri.query().unwrap_or("").to_owned();
    let method = parts.method.as_str().to_owned();
    let h = &parts.headers;
    if let Some(api_key) = path.strip_prefix(CONTROL_KEYS) {
        return control(&sim, &method, api_key, &body);
    }
    let verdict = match sim.ex {
        ExchangeId::Binance => binance(&sim, h, &query, &body),
        ExchangeId::Bybit => bybit(&sim, h, &method, &query, &body),
        ExchangeId::Okx => okx(&sim, h, &method, &path, &query, &body),
        ExchangeId::Coinbase => coinbase(&sim, h, &method, &path),
        ExchangeId::Kraken => kraken(&sim, h, &path, &body),
        ExchangeId::Kucoin => kucoin(&sim, h, &method, &path, &query, &body),
    };
    let key = match verdict {
        Verdict::Ok(k) => k,
        Verdict::Deny(r) => return r,
    };
    if let Some(r) = keys::manage(&sim, &method, &path, &query, &body, &key) {
        return r;
    }
    match key.fault {
        Fault::None => {}
        Fault::ServerError => {
            return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response();
        }
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::RateLimited => {
            let body = match sim.ex {
                ExchangeId::Binance => json!({"code": -1003, "msg": "Too many requests."}),
                ExchangeId::Okx => json!({"code": "50011", "msg": "Too Many Requests", "data": []}),
                ExchangeId::Kucoin => json!({"code": "429000", "msg": "Too Many Requests"}),
                _ => json!({"error": "rate limited"}),
            };
            let mut r = reply(StatusCode::TOO_MANY_REQUESTS, body);
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("7"));
            return r;
        }
    }
    answer(sim.ex, &path, &key)
}

/// The successful answer for a path.
fn answer(ex: ExchangeId, path: &str, key: &SimKey) -> Response {
    let perms = key.permissions.clone();
    let (status, body) = match (ex, path) {
        // The account's own flags, as Binance reports them: they say what the
        // *account* may do, whatever the key's restrictions (a read-only key
        // on an ordinary account sees all three true).
        (ExchangeId::Binance, "/api/v3/account") => (
            200,
            json!({
                "makerCommission": 10, "takerCommission": 10,
                "canTrade": true,
                "canWithdraw": true,
                "canDeposit": true,
                "brokered": false,
                "requireSelfTradePrevention": false,
                "updateTime": 0,
                "accountType": "SPOT",
                "balances": [],
                "permissions": ["SPOT"]
            }),
        ),
        (ExchangeId::Binance, "/sapi/v1/account/apiRestrictions") => (200, perms),
        (ExchangeId::Bybit, "/v5/account/wallet-balance") => (
            200,
            json!({"retCode": 0, "retMsg": "OK", "result": {"list": []}}),
        ),
        (ExchangeId::Bybit, "/v5/user/query-api") => {
            (200, json!({"retCode": 0, "retMsg": "", "result": perms}))
        }
        (ExchangeId::Okx, "/api/v5/account/balance") => (
            200,
            json!({"code": "0", "msg": "", "data": [{"details": []}]}),
        ),
        (ExchangeId::Okx, "/api/v5/account/config") => {
            (200, json!({"code": "0", "msg": "", "data": [perms]}))
        }
        (ExchangeId::Coinbase, "/api/v3/brokerage/accounts") => {
            (200, json!({"accounts": [], "has_next": false}))
        }
        (ExchangeId::Coinbase, "/api/v3/brokerage/key_permissions") => (200, perms),
        (ExchangeId::Kraken, "/0/private/Balance") => {
            (200, json!({"error": [], "result": {"ZUSD": "0.0000"}}))
        }
        (ExchangeId::Kraken, "/0/private/GetApiKeyInfo") => {
            (200, json!({"error": [], "result": perms}))
        }
        (ExchangeId::Kucoin, "/api/v1/accounts") => (200, json!({"code": "200000", "data": []})),
        // Order placement, answered as each exchange acknowledges a new
        // order (nothing is matched: the simulators check who signed).
        (ExchangeId::Binance, "/api/v3/order") => (
            200,
            json!({"symbol": "BTCUSDT", "orderId": order_id(), "orderListId": -1,
                   "clientOrderId": "sim", "transactTime": now_ms()}),
        ),
        (ExchangeId::Bybit, "/v5/order/create") => (
            200,
            json!({"retCode": 0, "retMsg": "OK",
                   "result": {"orderId": order_id().to_string(), "orderLinkId": ""},
                   "retExtInfo": {}, "time": now_ms()}),
        ),
        (ExchangeId::Okx, "/api/v5/trade/order") => (
            200,
            json!({"code": "0", "msg": "", "data": [{"ordId": order_id().to_string(),
                   "clOrdId": "", "tag": "", "sCode": "0", "sMsg": "Order placed"}]}),
        ),
        (ExchangeId::Kucoin, "/api/v1/orders") => (
            200,
            json!({"code": "200000", "data": {"orderId": order_id().to_string()}}),
        ),
        (ExchangeId::Kucoin, "/api/v1/user/api-key") => {
            (200, json!({"code": "200000", "data": perms}))
        }
        _ => (404, json!({"msg": "not found"})),
    };
    reply(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body)
}

fn order_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Where a simulator takes key changes, as an exchange's web UI would:
/// `PUT {CONTROL_KEYS}{api_key}` with `{"secret": .., "passphrase": ..,
/// "withdraw": false}` creates (or replaces) a key that can read and trade;
/// `DELETE` deletes it. Not an exchange endpoint: dev mode and tests only.
pub const CONTROL_KEYS: &str = "/__sim/keys/";

fn control(sim: &Sim, method: &str, api_key: &str, body: &str) -> Response {
    if api_key.is_empty() {
        return reply(StatusCode::BAD_REQUEST, json!({"error": "name the key"}));
    }
    let entry = (sim.ex, api_key.to_owned());
    match method {
        "DELETE" => {
            let existed = lock(&sim.keys).remove(&entry).is_some();
            reply(StatusCode::OK, json!({"deleted": existed}))
        }
        "PUT" => {
            let Ok(v) = serde_json::from_str::<Value>(body) else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "a JSON body"}));
            };
            let Some(secret) = v["secret"].as_str() else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "secret is required"}),
                );
            };
            let withdraw = v["withdraw"].as_bool().unwrap_or(false);
            let mut key = SimKey::hmac(secret, native_permissions(sim.ex, withdraw, true));
            key.passphrase = v["passphrase"].as_str().map(str::to_owned);
            lock(&sim.keys).insert(entry, key);
            reply(StatusCode::OK, json!({"created": true}))
        }
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "PUT or DELETE"}),
        ),
    }
}

fn known(sim: &Sim, api_key: &str) -> Option<SimKey> {
    lock(&sim.keys).get(&(sim.ex, api_key.to_owned())).cloned()
}

// Binance: query + body signed, signature last; timestamp rule
// `timestamp < serverTime + 1000 && serverTime - timestamp <= recvWindow`.
fn binance(sim: &Sim, h: &HeaderMap, query: &str, body: &str) -> Verdict {
    let err = |status: StatusCode, code: i64, msg: &str| {
        Verdict::Deny(reply(status, json!({"code": code, "msg": msg})))
    };
    let api_key = header(h, "x-mbx-apikey");
    if api_key.is_empty() {
        return err(StatusCode::BAD_REQUEST, -2014, "API-key format invalid.");
    }
    let Some(key) = known(sim, api_key) else {
        return err(
            StatusCode::UNAUTHORIZED,
            -2015,
            "Invalid API-key, IP, or permissions for action.",
        );
    };
    // The signature may close the query string or the body; the HMAC covers
    // the query string followed by the body, both without it ("totalParams").
    let Some((query, body, sig)) = split_signature(query, body) else {
        return err(
            StatusCode::BAD_REQUEST,
            -1102,
            "Mandatory parameter 'signature' was not sent.",
        );
    };
    let param = |name: &str| {
        query
            .split('&')
            .chain(body.split('&'))
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse::<i64>().ok())
    };
    let ts = param("timestamp").unwrap_or(0);
    let window = param("recvWindow").unwrap_or(5000);
    let server = now_ms();
    if !(ts < server + 1000 && server - ts <= window) {
        return err(
            StatusCode::BAD_REQUEST,
            -1021,
            "Timestamp for this request is outside of the recvWindow.",
        );
    }
    if signing::binance(&key.secret, query, body) != sig {
        return err(
            StatusCode::BAD_REQUEST,
            -1022,
            "Signature for this request is not valid.",
        );
    }
    if !key.ip_allowed {
        return err(
            StatusCode::UNAUTHORIZED,
            -2015,
            "Invalid API-key, IP, or permissions for action.",
        );
    }
    Verdict::Ok(key)
}

/// Binance's `signature` parameter, last in the query string or, failing
/// that, last in the body: (query, body, signature) with it removed.
fn split_signature<'a>(query: &'a str, body: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
    let cut = |s: &'a str| {
        s.rsplit_once("&signature=")
            .or_else(|| s.strip_prefix("signature=").map(|sig| ("", sig)))
    };
    if let Some((q, sig)) = cut(query) {
        return Some((q, body, sig));
    }
    cut(body).map(|(b, sig)| (query, b, sig))
}

// Bybit v5: `ts + key + recvWindow + (queryString | jsonBodyString)` (the
// body for POST); rule `server - recvWindow <= ts < server + 1000`; errors in
// retCode, HTTP 200.
fn bybit(sim: &Sim, h: &HeaderMap, method: &str, query: &str, body: &str) -> Verdict {
    let err = |code: i64, msg: &str| {
        Verdict::Deny(reply(
            StatusCode::OK,
            json!({"retCode": code, "retMsg": msg, "result": {}}),
        ))
    };
    let api_key = header(h, "x-bapi-api-key");
    let Some(key) = known(sim, api_key) else {
        return err(10003, "API key is invalid.");
    };
    let ts: i64 = header(h, "x-bapi-timestamp").parse().unwrap_or(0);
    let recv: i64 = header(h, "x-bapi-recv-window").parse().unwrap_or(5000);
    let server = now_ms();
    if !(server - recv <= ts && ts < server + 1000) {
        return err(
            10002,
            "invalid request, please check your server timestamp or recv_window param",
        );
    }
    let expected = signing::bybit(
        &key.secret,
        u64::try_from(ts).unwrap_or(0),
        api_key,
        u64::try_from(recv).unwrap_or(0),
        if method == "POST" { body } else { query },
    );
    if expected != header(h, "x-bapi-sign") {
        return err(10004, "error sign! origin_string[...]");
    }
    if !key.ip_allowed {
        return err(
            10010,
            "Unmatched IP, please check your API key's bound IP addresses.",
        );
    }
    Verdict::Ok(key)
}

// OKX v5: base64 HMAC of `ts + METHOD + path(?query) + body`, passphrase
// in plain, 30 s expiry; 501xx errors with HTTP 401.
fn okx(sim: &Sim, h: &HeaderMap, method: &str, path: &str, query: &str, body: &str) -> Verdict {
    let err = |code: &str, msg: &str| {
        Verdict::Deny(reply(
            StatusCode::UNAUTHORIZED,
            json!({"code": code, "msg": msg, "data": []}),
        ))
    };
    let Some(key) = known(sim, header(h, "ok-access-key")) else {
        return err("50111", "Invalid OK-ACCESS-KEY");
    };
    let ts = header(h, "ok-access-timestamp");
    let Ok(t) = OffsetDateTime::parse(ts, &Rfc3339) else {
        return err("50112", "Invalid OK-ACCESS-TIMESTAMP");
    };
    if (OffsetDateTime::now_utc() - t).abs() > time::Duration::seconds(30) {
        return err("50102", "Timestamp request expired");
    }
    let pq = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    if signing::okx(&key.secret, ts, method, &pq, body) != header(h, "ok-access-sign") {
        return err("50113", "Invalid Sign");
    }
    if key.passphrase.as_deref() != Some(header(h, "ok-access-passphrase")) {
        return err("50105", "Invalid OK-ACCESS-PASSPHRASE");
    }
    if !key.ip_allowed {
        return err("50110", "Your IP is not in linking trusted IP addresses.");
    }
    Verdict::Ok(key)
}

// Coinbase CDP: a fresh JWT per request, verified with the key's public key;
// claims sub/iss/nbf/exp/uri checked; any failure is 401 "Unauthorized".
fn coinbase(sim: &Sim, h: &HeaderMap, method: &str, path: &str) -> Verdict {
    let unauthorized =
        || Verdict::Deny((StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response());
    let Some(jwt) = header(h, "authorization").strip_prefix("Bearer ") else {
        return unauthorized();
    };
    let mut parts = jwt.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return unauthorized();
    };
    let decode = |s: &str| {
        B64URL
            .decode(s)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    let (Some(hdr), Some(claims), Ok(sig)) = (decode(h64), decode(c64), B64URL.decode(s64)) else {
        return unauthorized();
    };
    let kid = hdr["kid"].as_str().unwrap_or("");
    let Some(key) = known(sim, kid) else {
        return unauthorized();
    };
    let Some(pk) = &key.cdp_public_key else {
        return unauthorized();
    };
    let signed = format!("{h64}.{c64}");
    let ok = match (pk, hdr["alg"].as_str()) {
        (CdpPublicKey::Es256(p), Some("ES256")) => aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            p,
        )
        .verify(signed.as_bytes(), &sig)
        .is_ok(),
        (CdpPublicKey::EdDsa(p), Some("EdDSA")) => {
            aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, p)
                .verify(signed.as_bytes(), &sig)
                .is_ok()
        }
        _ => false,
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let (nbf, exp) = (
        claims["nbf"].as_i64().unwrap_or(i64::MAX),
        claims["exp"].as_i64().unwrap_or(0),
    );
    let uri = signing::coinbase_uri(method, header(h, "host"), path);
    let claims_ok = claims["sub"] == kid
        && claims["iss"] == "cdp"
        && nbf <= now + 5
        && now <= exp
        && exp - nbf <= 120
        && claims["uri"].as_str() == Some(uri.as_str())
        && hdr["nonce"].as_str().is_some_and(|n| !n.is_empty());
    if !(ok && claims_ok && key.ip_allowed) {
        return unauthorized();
    }
    Verdict::Ok(key)
}

// Kraken: API-Sign = base64(HMAC-SHA512(b64decode(secret), path +
// SHA256(nonce + postData))); nonces must grow per key; errors in `error`.
fn kraken(sim: &Sim, h: &HeaderMap, path: &str, body: &str) -> Verdict {
    let err = |e: &str| Verdict::Deny(reply(StatusCode::OK, json!({"error": [e]})));
    let api_key = header(h, "api-key");
    let Some(key) = known(sim, api_key) else {
        return err("EAPI:Invalid key");
    };
    let nonce = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("nonce="))
        .unwrap_or("")
        .to_owned();
    match signing::kraken(&key.secret, path, &nonce, body) {
        Ok(sig) if sig == header(h, "api-sign") => {}
        _ => return err("EAPI:Invalid signature"),
    }
    let n: u64 = nonce.parse().unwrap_or(0);
    {
        let mut seen = lock(&sim.nonces);
        let last = seen.entry(api_key.to_owned()).or_insert(0);
        if n <= *last {
            return err("EAPI:Invalid nonce");
        }
        *last = n;
    }
    if !key.ip_allowed {
        return err("EGeneral:Permission denied");
    }
    Verdict::Ok(key)
}

// KuCoin: KC-API-SIGN over `ts + METHOD + endpoint + body`, passphrase
// signed with the secret (key version 2), 5 s window.
fn kucoin(sim: &Sim, h: &HeaderMap, method: &str, path: &str, query: &str, body: &str) -> Verdict {
    let err = |code: &str, msg: &str| {
        Verdict::Deny(reply(
            StatusCode::UNAUTHORIZED,
            json!({"code": code, "msg": msg}),
        ))
    };
    let Some(key) = known(sim, header(h, "kc-api-key")) else {
        return err("400003", "KC-API-KEY not exists");
    };
    let ts: i64 = header(h, "kc-api-timestamp").parse().unwrap_or(0);
    if (now_ms() - ts).abs() > i64::try_from(RECV_WINDOW_MS).unwrap_or(5000) {
        return err("400002", "KC-API-TIMESTAMP Invalid");
    }
    let endpoint = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    if signing::kucoin(
        &key.secret,
        u64::try_from(ts).unwrap_or(0),
        method,
        &endpoint,
        body,
    ) != header(h, "kc-api-sign")
    {
        return err("400005", "Signature error");
    }
    let pass = key.passphrase.clone().unwrap_or_default();
    if signing::kucoin_passphrase(&key.secret, &pass) != header(h, "kc-api-passphrase") {
        return err("400004", "Invalid KC-API-PASSPHRASE");
    }
    if !key.ip_allowed {
        return err("400006", "Invalid request ip");
    }
    Verdict::Ok(key)
}

/// Native permission answers, as each exchange would send them, for keys
/// that can read and trade (and optionally withdraw), IP-bound or not.
pub fn native_permissions(ex: ExchangeId, withdraw: bool, ip_bound: bool) -> Value {
    match ex {
        ExchangeId::Binance => json!({
            "ipRestrict": ip_bound, "createTime": 1_700_000_000_000_i64, "enableReading": true,
            "enableWithdrawals": withdraw, "enableInternalTransfer": false, "enableMargin": false,
            "enableFutures": false, "permitsUniversalTransfer": false, "enableVanillaOptions": false,
            "enableSpotAndMarginTrading": true, "enablePortfolioMarginTrading": false
        }),
        ExchangeId::Bybit => json!({
            "id": "1", "note": "sim", "apiKey": "", "readOnly": 0, "secret": "",
            "permissions": {
                "ContractTrade": ["Order", "Position"], "Spot": ["SpotTrade"],
                "Wallet": if withdraw { json!(["AccountTransfer", "Withdraw"]) } else { json!(["AccountTransfer"]) },
                "Options": [], "Derivatives": [], "Exchange": []
            },
            "ips": if ip_bound { json!(["10.0.0.1"]) } else { json!(["*"]) },
            "expiredAt": "2027-01-01T00:00:00Z", "deadlineDay": 40
        }),
        ExchangeId::Okx => json!({
            "uid": "1", "label": "sim", "perm": if withdraw { "read_only,withdraw,trade" } else { "read_only,trade" },
            "ip": if ip_bound { "10.0.0.1" } else { "" }
        }),
        ExchangeId::Coinbase => json!({
            "can_view": true, "can_trade": true, "can_transfer": withdraw,
            "portfolio_uuid": "00000000-0000-0000-0000-000000000000", "portfolio_type": "DEFAULT"
        }),
        ExchangeId::Kraken => {
            let mut p = vec!["query-funds", "query-open-trades", "modify-trades"];
            if withdraw {
                p.push("withdraw-funds");
            }
            json!({
                "permissions": p, "ipAllowlist": if ip_bound { json!(["10.0.0.1"]) } else { json!([]) },
                "validUntil": 0, "nonceWindow": 0
            })
        }
        ExchangeId::Kucoin => json!({
            "remark": "sim", "apiKey": "", "apiVersion": 2,
            "permission": if withdraw { "General,Spot,Transfer" } else { "General,Spot" },
            "ipWhitelist": if ip_bound { "10.0.0.1" } else { "" }, "createdAt": 1_700_000_000_000_i64
        }),
    }
}
