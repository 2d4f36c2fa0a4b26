//! The Helm chart, checked offline with real tools (`helm/tests/
//! check_chart.py`: Helm v4's linter and renderer through helm-python-sdk,
//! Kubernetes' published schemas in strict mode through kubernetes-validate,
//! and the deployment facts read from the parsed manifests). The metrics it
//! names are checked against a real scrape in `checks.rs`.

use std::process::Command;

/// Runs the chart checker with `args`; panics with its output on failure.
pub fn check_chart(args: &[&str]) -> String {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/helm/tests/check_chart.py"
        ))
        .args(args)
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn the_chart_lints_renders_and_validates_with_defaults_and_every_feature() {
    let out = check_chart(&[]);
    assert!(
        out.contains("defaults:") && out.contains("all features:"),
        "{out}"
    );
}
