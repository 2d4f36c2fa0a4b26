//! Key management through a master account's key (mint, list, delete a
//! sub-account's keys) against the Bybit simulator, which implements the
//! documented endpoints and their permission rule.

use std::sync::Arc;

use credbroker::{
    broker::{
        error::ValidationError,
        ports::CredentialValidator,
        types::{CredentialSet, ExchangeId, TenantId},
    },
    clock::SystemClock,
    exchange::{
        ExchangeValidator, WithdrawPolicy,
        adapters::MintSpec,
        sim::{SimKey, Simulators},
    },
};
use secrecy::SecretString;
use serde_json::json;

use crate::exchanges::endpoints;

const SUB: &str = "100200300";

fn bybit_master(wallet: &[&str], subs: &[&str]) -> SimKey {
    SimKey::master(
        "bybitMasterSecret000000000000000000",
        json!({"id": "1", "note": "master", "apiKey": "", "readOnly": 0, "secret": "",
               "permissions": {"Wallet": wallet, "Spot": ["SpotTrade"]}, "ips": ["*"],
               "isMaster": true}),
        subs,
    )
}

fn set(key: &str, secret: &str) -> CredentialSet {
    CredentialSet {
        api_key: key.into(),
        api_secret: SecretString::from(secret.to_owned()),
        passphrase: None,
    }
}

fn spec(note: &str) -> MintSpec {
    MintSpec {
        sub_account: SUB.into(),
        note: note.into(),
        trade: true,
        ips: vec!["10.0.0.1".into()],
    }
}

#[tokio::test]
async fn a_master_key_mints_lists_and_deletes_sub_account_keys() {
    let sims = Simulators::start().await.unwrap();
    sims.add_key(
        ExchangeId::Bybit,
        "bybitMasterKey0001",
        bybit_master(&["AccountTransfer"], &[SUB]),
    );
    let master = set("bybitMasterKey0001", "bybitMasterSecret000000000000000000");
    let v = ExchangeValidator::new(
        &endpoints(&sims),
        WithdrawPolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let ex = ExchangeId::Bybit;

    let minted = v
        .mint_key(ex, &master, &spec("credbroker:rotation-1"))
        .await
        .unwrap();
    assert_eq!(minted.api_key.len(), 18, "Bybit keys are 18 characters");
    // The minted key is an ordinary key: it validates, may trade, may not
    // withdraw, and is bound to the IP list it was given.
    let perms = v
        .validate(TenantId::new(uuid::Uuid::new_v4()), ex, &minted)
        .await
        .unwrap();
    assert!(
        perms.trade && !perms.withdraw && !perms.transfer && perms.ip_restricted,
        "{perms:?}"
    );

    let listed = v.list_keys(ex, &master, SUB).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].api_key, minted.api_key);
    assert_eq!(listed[0].note, "credbroker:rotation-1");
    assert!(listed[0].trade);
    assert_eq!(listed[0].ips, vec!["10.0.0.1".to_owned()]);

    assert!(
        v.delete_key(ex, &master, SUB, &minted.api_key)
            .await
            .unwrap()
    );
    assert!(v.list_keys(ex, &master, SUB).await.unwrap().is_empty());
    assert!(
        !v.delete_key(ex, &master, SUB, &minted.api_key)
            .await
            .unwrap(),
        "deleting twice is a no-op"
    );
    // Deleted at the exchange: every later request signed with it fails.
    let gone = v
        .validate(TenantId::new(uuid::Uuid::new_v4()), ex, &minted)
        .await;
    assert!(
        matches!(gone, Err(ValidationError::Rejected { ref code, .. }) if code.as_deref() == Some("10003")),
        "{gone:?}"
    );
}

#[tokio::test]
async fn only_a_master_key_with_a_wallet_permission_manages_its_own_sub_accounts() {
    let sims = Simulators::start().await.unwrap();
    let ex = ExchangeId::Bybit;
    sims.add_key(ex, "bybitNoWalletKey01", bybit_master(&[], &[SUB]));
    sims.add_key(
        ex,
        "bybitPlainKey00001",
        SimKey::hmac(
            "bybitPlainSecret",
            json!({"permissions": {"Wallet": ["AccountTransfer"]}}),
        ),
    );
    sims.add_key(
        ex,
        "bybitMasterKey0002",
        bybit_master(&["SubMemberTransferList"], &[SUB]),
    );
    let v = ExchangeValidator::new(
        &endpoints(&sims),
        WithdrawPolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap();

    let refused = |r: Result<CredentialSet, ValidationError>, code: &str| {
        let e = r.expect_err("refused");
        let text = format!("{e} {e:?}");
        assert!(
            matches!(&e, ValidationError::Rejected { code: Some(c), .. } if c == code),
            "{text}"
        );
        assert!(!text.contains("Secret"), "no secret in the error: {text}");
    };
    let no_wallet = set("bybitNoWalletKey01", "bybitMasterSecret000000000000000000");
    refused(v.mint_key(ex, &no_wallet, &spec("n")).await, "10005");
    let plain = set("bybitPlainKey00001", "bybitPlainSecret");
    refused(v.mint_key(ex, &plain, &spec("n")).await, "10005");
    let master = set("bybitMasterKey0002", "bybitMasterSecret000000000000000000");
    let mut foreign = spec("n");
    foreign.sub_account = "999".into();
    refused(v.mint_key(ex, &master, &foreign).await, "10001");
    assert!(v.mint_key(ex, &master, &spec("ok")).await.is_ok());

    // Exchanges without a key-management adapter say so.
    let e = v
        .mint_key(ExchangeId::Coinbase, &master, &spec("n"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("web UI"), "{e}");
}
