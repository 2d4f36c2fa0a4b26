//! The Python example (grpcio stubs generated from proto/) against the dev
//! broker binary, exactly as the README runs it.

use std::time::Duration;

use credbroker::api::pb;
use tokio::io::AsyncBufReadExt as _;

use crate::support::{DevBroker, new_tenant, set, store_req};

#[tokio::test]
async fn the_python_example_hot_swaps_on_rotation() {
    let dev = DevBroker::spawn().await;
    let mut op = dev.operator().await;
    let tenant = new_tenant();
    op.validate_and_store(store_req(
        &tenant,
        "bybit",
        "bybitKeyPython0001",
        "bybitSecretPython0001",
    ))
    .await
    .unwrap();

    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let f = |n: &str| dev.file(n).display().to_string();
    let mut child = tokio::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/python/credbroker_example.py"
        ))
        .args(["--target", &format!("localhost:{}", dev.port)])
        .args([
            "--ca",
            &f("ca.pem"),
            "--cert",
            &f("client.pem"),
            "--key",
            &f("client.key"),
        ])
        .args([
            "--tenant",
            &tenant,
            "--exchange",
            "bybit",
            "--max-changes",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = next_line(&mut lines).await;
    assert_eq!(first, "swapped bybit to version 1 key ****0001");

    op.rotate(pb::RotateRequest {
        tenant_id: tenant.clone(),
        exchange: "bybit".into(),
        credentials: Some(set("bybitKeyPython0002", "bybitSecretPython0002")),
        overlap_seconds: None,
        mint: false,
    })
    .await
    .unwrap();
    let second = next_line(&mut lines).await;
    assert_eq!(second, "swapped bybit to version 2 key ****0002");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>) -> String {
    tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the example printed nothing within 60 s")
        .unwrap()
        .expect("the example exited early")
}
