//! `credbroker dev` as a newcomer meets it: the printed grpcurl commands work
//! as shown against the bundled exchange simulators, and `credbroker import`
//! moves legacy files in.

use credbroker::api::pb;
use tonic::Code;

use crate::support::{DevBroker, new_tenant, store_req};

fn grpcurl_bin() -> String {
    std::env::var("GRPCURL_BIN").unwrap_or_else(|_| "grpcurl".into())
}

#[tokio::test]
async fn the_printed_grpcurl_commands_work_against_the_simulators() {
    let dev = DevBroker::spawn_with(&[]).await;
    assert!(dev.banner.contains("SIMULATORS"), "{}", dev.banner);
    let commands: Vec<String> = dev
        .banner
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("grpcurl ") && !l.contains("WatchRotations"))
        .map(|l| l.replacen("grpcurl", &grpcurl_bin(), 1))
        .collect();
    assert!(commands.len() >= 4, "{}", dev.banner);
    let mut outputs = Vec::new();
    for cmd in &commands {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd}\n{text}");
        outputs.push(text);
    }
    assert!(
        outputs.iter().any(|o| o.contains("demoSecret0123456789")),
        "{outputs:?}"
    );
    assert!(
        outputs.iter().any(|o| o.contains("\"rotated\": true")),
        "{outputs:?}"
    );
    // The minted rotation swapped the fleet and waits for the overlap.
    assert!(
        outputs.iter().any(|o| o.contains("\"step\": \"waiting\"")),
        "{outputs:?}"
    );

    // A made-up key is refused by the simulated exchange.
    let e = dev
        .operator()
        .await
        .validate_and_store(store_req(
            &new_tenant(),
            "binance",
            "madeUpKey000000",
            "madeUpSecret0000",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("-2015"), "{e:?}");
}

#[tokio::test]
async fn import_validates_each_legacy_file_and_never_prints_a_secret() {
    let dev = DevBroker::spawn_with(&[]).await;
    let legacy = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| std::fs::write(legacy.path().join(name), text).unwrap();
    w(
        "binance.json",
        r#"{"api_key": "demoKey0123456789", "api_secret": "demoSecret0123456789"}"#,
    );
    w(
        "okx.json",
        r#"{"apiKey": "okxKey0123456789", "secret": "okxSecret0123456789"}"#,
    );
    w("broken.json", "{");
    w(
        "legacy.env",
        "# old deployment\nexport BYBIT_API_KEY=demoBybitKey0001\nBYBIT_API_SECRET=\"demoBybitSecret0001\"\nKUCOIN_API_KEY=kcKeyOnly000\nKRAKEN_API_KEY=krakenKey0001\nKRAKEN_API_SECRET=not-base64-at-all!\n",
    );
    w("notes.txt", "call ops before rotating");
    let tenant = new_tenant();
    let f = |n: &str| dev.file(n).display().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .arg("import")
        .arg(legacy.path())
        .args([
            "--tenant",
            &tenant,
            "--endpoint",
            &format!("https://localhost:{}", dev.port),
        ])
        .args([
            "--ca",
            &f("ca.pem"),
            "--cert",
            &f("client.pem"),
            "--key",
            &f("client.key"),
        ])
        .args(["--server-name", "localhost"])
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let line = |prefix: &str, file: &str, ex: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix) && l.contains(file) && l.contains(ex))
            .unwrap_or_else(|| panic!("no `{prefix} {file} {ex}` line in:\n{text}"))
            .to_owned()
    };
    line("stored", "binance.json", "binance");
    assert!(
        line("rejected", "okx.json", "okx").contains("passphrase"),
        "{text}"
    );
    line("skipped", "broken.json", "");
    line("stored", "legacy.env", "bybit");
    assert!(
        line("rejected", "legacy.env", "kraken").contains("base64"),
        "{text}"
    );
    assert!(
        line("skipped", "legacy.env", "kucoin").contains("secret"),
        "{text}"
    );
    line("skipped", "notes.txt", "");
    assert!(text.contains("2 stored"), "{text}");
    for secret in [
        "demoSecret0123456789",
        "okxSecret0123456789",
        "demoBybitSecret0001",
        "not-base64-at-all!",
    ] {
        assert!(!text.contains(secret), "secret printed:\n{text}");
    }
    // And the stored ones are really there.
    let mut c = dev.operator().await;
    let l = c
        .list_credentials(pb::ListCredentialsRequest { tenant_id: tenant })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = l.credentials.iter().map(|c| c.exchange.as_str()).collect();
    assert_eq!(names, ["binance", "bybit"]);
}
