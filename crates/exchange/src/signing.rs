//! Request signing, exactly as each exchange documents it. Pure functions of
//! their inputs (clock and nonce are parameters), so the exchanges'
//! published examples are unit tests and the simulators reuse them to check
//! what they receive.

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256, Sha512};

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// Binance: lowercase hex HMAC-SHA256 of the query string concatenated with
/// the body (no separator).
pub fn binance(secret: &str, query: &str, body: &str) -> String {
    hex::encode(hmac_sha256(
        secret.as_bytes(),
        format!("{query}{body}").as_bytes(),
    ))
}

/// Bybit v5: lowercase hex HMAC-SHA256 of `ts + key + recvWindow +
/// (queryString | jsonBody)`.
pub fn bybit(secret: &str, ts_ms: u64, api_key: &str, recv_window: u64, payload: &str) -> String {
    hex::encode(hmac_sha256(
        secret.as_bytes(),
        format!("{ts_ms}{api_key}{recv_window}{payload}").as_bytes(),
    ))
}

/// OKX v5: base64 HMAC-SHA256 of `ts + METHOD + requestPath(+?query) + body`,
/// `ts` in ISO-8601 UTC with milliseconds.
pub fn okx(secret: &str, ts_iso: &str, method: &str, path_and_query: &str, body: &str) -> String {
    B64.encode(hmac_sha256(
        secret.as_bytes(),
        format!("{ts_iso}{method}{path_and_query}{body}").as_bytes(),
    ))
}

/// Kraken: base64 HMAC-SHA512, keyed with the base64-decoded secret, of
/// `uriPath + SHA256(nonce + postData)`.
///
/// # Errors
/// When the secret is not base64.
pub fn kraken(
    secret_b64: &str,
    uri_path: &str,
    nonce: &str,
    post_data: &str,
) -> Result<String, base64::DecodeError> {
    let key = B64.decode(secret_b64)?;
    let inner = Sha256::digest(format!("{nonce}{post_data}").as_bytes());
    let mut msg = uri_path.as_bytes().to_vec();
    msg.extend_from_slice(&inner);
    let mut mac = Hmac::<Sha512>::new_from_slice(&key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(&msg);
    Ok(B64.encode(mac.finalize().into_bytes()))
}

/// KuCoin: base64 HMAC-SHA256 of `ts + METHOD + endpoint(+?query) + body`.
pub fn kucoin(secret: &str, ts_ms: u64, method: &str, endpoint: &str, body: &str) -> String {
    kucoin_raw(secret, &format!("{ts_ms}{method}{endpoint}{body}"))
}

/// KuCoin's signer primitive: base64 HMAC-SHA256 of `message`.
pub fn kucoin_raw(secret: &str, message: &str) -> String {
    B64.encode(hmac_sha256(secret.as_bytes(), message.as_bytes()))
}

/// KuCoin key versions 2 and 3 send the passphrase signed with the secret.
pub fn kucoin_passphrase(secret: &str, passphrase: &str) -> String {
    kucoin_raw(secret, passphrase)
}

/// The Coinbase CDP JWT `uri` claim: `METHOD host/path`, no scheme, no query.
pub fn coinbase_uri(method: &str, host: &str, path: &str) -> String {
    format!("{method} {host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Binance's request-security docs (HMAC examples).
    const BN_SECRET: &str = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";

    #[test]
    fn binance_published_examples() {
        assert_eq!(
            binance(
                BN_SECRET,
                "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559",
                ""
            ),
            "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        );
        assert_eq!(
            binance(
                BN_SECRET,
                "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC",
                "quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
            ),
            "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"
        );
        // ccxt 4.5.90 reference, clock fixed at 1700000000000.
        assert_eq!(
            binance(BN_SECRET, "timestamp=1700000000000&recvWindow=5000", ""),
            "1e007ef2535aaa12a2584e410f756c0f06b159ddad46fe71baa45f1ec8c7f9ec"
        );
    }

    // Source: ccxt 4.5.90 (an independent implementation), clock fixed at
    // 1700000000000 ms, as gathered in EXCHANGES.md ("Reference signatures
    // computed by ccxt").
    #[test]
    fn bybit_reference() {
        assert_eq!(
            bybit(
                "YYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY",
                1_700_000_000_000,
                "XXXXXXXXXX",
                5000,
                "accountType=UNIFIED"
            ),
            "022f707db12ba29c321c8b8770b60ea1bbd354aba05516bc0b93481c6f1eeed0"
        );
    }

    // Source: ccxt 4.5.90, as above.
    #[test]
    fn okx_reference() {
        assert_eq!(
            okx(
                "okx-secret",
                "2023-11-14T22:13:20.000Z",
                "GET",
                "/api/v5/account/balance",
                ""
            ),
            "KzoL7EXzaeDYjvV0aKuN/zgHl51VNo4isfB++yCxZEY="
        );
    }

    // Kraken's spot REST authentication guide.
    const KR_SECRET: &str =
        "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";

    #[test]
    fn kraken_published_example() {
        assert_eq!(
            kraken(
                KR_SECRET,
                "/0/private/AddOrder",
                "1616492376594",
                "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"
            )
            .unwrap(),
            "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
        );
        assert_eq!(
            kraken(
                KR_SECRET,
                "/0/private/Balance",
                "1700000000000",
                "nonce=1700000000000"
            )
            .unwrap(),
            "czhu1TvpTUkVtUbRiqwKniRXzZlg53wZmCdUIPWVLRoRMbTDwnq4frkWOdPSH9Q5YwHV5wqsA77JHXvM+XqHVQ=="
        );
        assert!(kraken("not base64!", "/0/private/Balance", "1", "nonce=1").is_err());
    }

    #[test]
    fn kucoin_sdk_example_and_reference() {
        // Source: KuCoin's official universal SDK's signer test.
        assert_eq!(
            kucoin_raw("test_api_secret", "test_plain"),
            "jie/gxS38wLFFaBwl/cAzFbAzlI8MIny96jSXrB+iP4="
        );
        // Source: ccxt 4.5.90, clock fixed at 1700000000000 ms.
        assert_eq!(
            kucoin(
                "kc-secret",
                1_700_000_000_000,
                "GET",
                "/api/v1/accounts",
                ""
            ),
            "EW+esrWLNz/gOL0OpUxbepCqrfIxOBhlg/w4w1I1UEg="
        );
        assert_eq!(
            kucoin_passphrase("kc-secret", "kc-passphrase"),
            "In0tsJHvZZhc6Qp0178v96bdGxVmSEWmNK1VQhZaWT8="
        );
    }

    #[test]
    fn coinbase_uri_has_no_scheme_or_query() {
        assert_eq!(
            coinbase_uri("GET", "api.coinbase.com", "/api/v3/brokerage/accounts"),
            "GET api.coinbase.com/api/v3/brokerage/accounts"
        );
    }
}

#[cfg(test)]
mod properties {
    //! Every signer against an independent implementation: the exchange's
    //! documented formula built here by hand, with aws-lc-rs's HMAC and
    //! SHA-2 (the signers use the `hmac` and `sha2` crates).

    use aws_lc_rs::{digest, hmac as lc};
    use proptest::prelude::*;

    use super::*;

    fn mac(alg: lc::Algorithm, key: &[u8], msg: &[u8]) -> Vec<u8> {
        lc::sign(&lc::Key::new(alg, key), msg).as_ref().to_vec()
    }

    proptest! {
        #[test]
        fn signers_match_the_documented_formulas(
            secret in "[A-Za-z0-9]{8,64}",
            key in "[A-Za-z0-9]{8,32}",
            ts in 1_600_000_000_000u64..1_900_000_000_000,
            query in "[a-z]{1,8}=[a-z0-9]{1,8}",
            body in "[a-z]{0,8}=?[a-z0-9]{0,8}",
            path in "/[a-z]{1,8}/[a-z]{1,8}",
        ) {
            let s = secret.as_bytes();
            // Binance: hex HMAC-SHA256 of query then body, no separator.
            prop_assert_eq!(
                binance(&secret, &query, &body),
                hex::encode(mac(lc::HMAC_SHA256, s, format!("{query}{body}").as_bytes()))
            );
            // Bybit v5 GET: hex HMAC-SHA256 of ts + key + recvWindow + query.
            prop_assert_eq!(
                bybit(&secret, ts, &key, 5000, &query),
                hex::encode(mac(lc::HMAC_SHA256, s, format!("{ts}{key}5000{query}").as_bytes()))
            );
            // OKX: base64 HMAC-SHA256 of ts + METHOD + path + body.
            let iso = "2023-11-14T22:13:20.000Z";
            prop_assert_eq!(
                okx(&secret, iso, "POST", &path, &body),
                B64.encode(mac(lc::HMAC_SHA256, s, format!("{iso}POST{path}{body}").as_bytes()))
            );
            // KuCoin: base64 HMAC-SHA256 of ts + METHOD + endpoint + body,
            // and the passphrase signed with the secret (key version 2).
            prop_assert_eq!(
                kucoin(&secret, ts, "GET", &path, &body),
                B64.encode(mac(lc::HMAC_SHA256, s, format!("{ts}GET{path}{body}").as_bytes()))
            );
            prop_assert_eq!(
                kucoin_passphrase(&secret, &key),
                B64.encode(mac(lc::HMAC_SHA256, s, key.as_bytes()))
            );
            // Kraken: base64 HMAC-SHA512, keyed by the base64-decoded
            // secret, of path + SHA-256(nonce + POST data).
            let b64 = B64.encode(s);
            let nonce = ts.to_string();
            let post = format!("nonce={nonce}");
            let mut msg = path.as_bytes().to_vec();
            msg.extend_from_slice(
                digest::digest(&digest::SHA256, format!("{nonce}{post}").as_bytes()).as_ref(),
            );
            prop_assert_eq!(
                kraken(&b64, &path, &nonce, &post).ok(),
                Some(B64.encode(mac(lc::HMAC_SHA512, s, &msg)))
            );
        }
    }
}
