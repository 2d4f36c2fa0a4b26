//! Secrets never leave the secret types: the main flows (store, get,
//! rotate, watch, validate, a refused key, import, the agent) run against
//! `credbroker dev` with every log at TRACE and auditing on, and no test
//! secret appears in any log line, audit record or error message.

use std::time::Duration;

use credbroker::api::pb::{self, watch_rotations_response::Message};

use crate::support::{DevBroker, new_tenant, next_non_heartbeat, watch_past_state};

const SECRETS: &[&str] = &[
    "demoSecret0123456789",
    "demoSecret9876543210",
    "okxSecret0123456789",
    "demoKucoinSecret0001",
    "wrongSecret0000000000",
    "p4ss",
];

fn set(key: &str, secret: &str, passphrase: Option<&str>) -> Option<pb::CredentialSet> {
    Some(pb::CredentialSet {
        api_key: key.into(),
        api_secret: secret.into(),
        passphrase: passphrase.map(str::to_owned),
    })
}

async fn run_cli(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(args)
            .env("CREDBROKER_LOG", "trace")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn no_secret_in_trace_logs_audit_records_or_errors() {
    let dev = DevBroker::spawn_logging(&["--validation", "simulated"], "trace").await;
    let t = new_tenant();
    let mut op = dev.operator().await;
    let mut shown = String::new();

    op.validate_and_store(pb::ValidateAndStoreRequest {
        tenant_id: t.clone(),
        exchange: "binance".into(),
        credentials: set("demoKey0123456789", "demoSecret0123456789", None),
    })
    .await
    .unwrap();
    let mut watch = watch_past_state(&mut op, &t).await;
    op.get_credentials(crate::support::get_req(&t, "binance"))
        .await
        .unwrap();
    op.rotate(pb::RotateRequest {
        tenant_id: t.clone(),
        exchange: "binance".into(),
        credentials: set("demoKey9876543210", "demoSecret9876543210", None),
        overlap_seconds: None,
        mint: false,
    })
    .await
    .unwrap();
    assert!(matches!(
        next_non_heartbeat(&mut watch).await,
        Message::Event(_)
    ));
    op.validate_credentials(pb::ValidateCredentialsRequest {
        tenant_id: t.clone(),
        exchange: "binance".into(),
    })
    .await
    .unwrap();
    op.validate_and_store(pb::ValidateAndStoreRequest {
        tenant_id: t.clone(),
        exchange: "okx".into(),
        credentials: set("okxKey0123456789", "okxSecret0123456789", Some("p4ss")),
    })
    .await
    .unwrap();
    // Refused keys: a wrong secret (the exchange refuses it) and a
    // malformed request, with their error messages kept.
    for (exchange, key, secret) in [
        ("bybit", "demoBybitKey0001", "wrongSecret0000000000"),
        ("binance", "", "wrongSecret0000000000"),
    ] {
        let e = op
            .validate_and_store(pb::ValidateAndStoreRequest {
                tenant_id: new_tenant(),
                exchange: exchange.into(),
                credentials: set(key, secret, None),
            })
            .await
            .unwrap_err();
        shown.push_str(e.message());
        shown.push_str(&format!("{:?}", e.details()));
    }

    // Import a legacy file, with the CLI logging at TRACE.
    let legacy = tempfile::tempdir().unwrap();
    std::fs::write(
        legacy.path().join("kucoin.json"),
        r#"{"api_key":"demoKucoinKey0001","api_secret":"demoKucoinSecret0001","passphrase":"p4ss"}"#,
    )
    .unwrap();
    let f = |n: &str| dev.file(n).display().to_string();
    let endpoint = format!("https://localhost:{}", dev.port);
    let conn = [
        "--endpoint",
        &endpoint,
        "--ca",
        &f("ca.pem"),
        "--cert",
        &f("client.pem"),
        "--key",
        &f("client.key"),
        "--server-name",
        "localhost",
    ];
    let mut args = vec!["import", legacy.path().to_str().unwrap(), "--tenant", &t];
    args.extend(conn);
    let import_out = run_cli(&args).await;
    assert!(import_out.contains("stored"), "{import_out}");

    // The agent, at TRACE, until it has written the kucoin file.
    let agent_dir = tempfile::tempdir().unwrap();
    let mut agent_args = vec![
        "agent",
        "--tenant",
        &t,
        "--dir",
        agent_dir.path().to_str().unwrap(),
    ];
    agent_args.extend(conn);
    // Logs to a file: a TRACE stream would fill a pipe nobody reads yet.
    let log_path = agent_dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(&agent_args)
        .env("CREDBROKER_LOG", "trace")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !agent_dir.path().join("kucoin.json").exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the agent wrote its files");
    agent.start_kill().unwrap();
    agent.wait().await.unwrap();
    let agent_log = std::fs::read_to_string(&log_path).unwrap();
    assert!(agent_log.contains("TRACE"), "the agent logged at TRACE");

    // Give the spool its group fsync, then read every audit file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut audit = String::new();
    for entry in std::fs::read_dir(dev.file("audit")).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            audit.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    assert!(
        audit.contains("\"action\":\"Rotate\""),
        "the audit spool holds the calls"
    );
    let broker_log = dev.output.lock().unwrap().clone();
    assert!(broker_log.contains("TRACE"), "the broker logged at TRACE");
    for (what, text) in [
        ("broker log", &broker_log),
        ("import output", &import_out),
        ("agent log", &agent_log),
        ("audit spool", &audit),
        ("error messages", &shown),
    ] {
        for secret in SECRETS {
            let line = text.lines().find(|l| l.contains(secret));
            assert!(
                line.is_none(),
                "{secret:?} appears in the {what}: {}",
                line.unwrap_or_default()
                    .chars()
                    .take(400)
                    .collect::<String>()
            );
        }
    }
}
