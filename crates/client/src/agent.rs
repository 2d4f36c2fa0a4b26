//! `credbroker agent`: a sidecar that keeps one file per exchange in a
//! directory the pod mounts, so an app in any language hot-swaps keys by
//! re-reading a file.
//!
//! Each write is atomic (temp file with mode 0600, fsync, rename, fsync of
//! the directory): a reader sees the old file or the new one, never half of
//! either. After a change the agent optionally runs a command (e.g. one that
//! signals the app).

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use secrecy::ExposeSecret as _;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use credbroker_core::broker::types::ExchangeId;

use crate::{ClientConfig, CredentialHandle, Credentials};

/// Agent settings.
#[derive(Clone)]
pub struct AgentConfig {
    /// How to reach the broker and what to watch.
    pub client: ClientConfig,
    /// Directory the files are written into.
    pub dir: PathBuf,
    /// Shell command run after each change, with `CREDBROKER_EXCHANGE`,
    /// `CREDBROKER_VERSION` and `CREDBROKER_FILE` set (version 0: deleted).
    pub on_change: Option<String>,
}

#[derive(Serialize)]
struct FileSet<'a> {
    api_key: &'a str,
    api_secret: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    passphrase: Option<&'a str>,
}

#[derive(Serialize)]
struct FilePrevious<'a> {
    version: u64,
    valid_until: String,
    #[serde(flatten)]
    set: FileSet<'a>,
}

#[derive(Serialize)]
struct FileBody<'a> {
    exchange: &'a str,
    version: u64,
    #[serde(flatten)]
    current: FileSet<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<FilePrevious<'a>>,
}

fn file_set(s: &credbroker_core::broker::types::CredentialSet) -> FileSet<'_> {
    FileSet {
        api_key: &s.api_key,
        api_secret: s.api_secret.expose_secret(),
        passphrase: s.passphrase.as_ref().map(|p| p.expose_secret()),
    }
}

/// The path of an exchange's file.
pub fn file_for(dir: &Path, exchange: ExchangeId) -> PathBuf {
    dir.join(format!("{exchange}.json"))
}

/// Writes `c` atomically to its file.
///
/// # Errors
/// On I/O failure.
pub fn write_credentials(dir: &Path, c: &Credentials) -> std::io::Result<PathBuf> {
    let body = FileBody {
        exchange: c.exchange.as_str(),
        version: c.version,
        current: file_set(&c.current),
        previous: c.previous.as_ref().map(|(set, v, until)| FilePrevious {
            version: *v,
            valid_until: until.format(&Rfc3339).unwrap_or_default(),
            set: file_set(set),
        }),
    };
    let mut json = serde_json::to_vec_pretty(&body).map_err(std::io::Error::other)?;
    json.push(b'\n');
    let target = file_for(dir, c.exchange);
    let tmp = dir.join(format!(".{}.json.tmp", c.exchange));
    let result = (|| {
        // A temporary file left behind (a crash, or planted by someone who
        // can write the directory) is never reused: it may be readable by
        // others or owned by another user, and an open would keep its mode
        // and owner. Remove it, then create ours exclusively (O_EXCL, no
        // symlink followed) with the mode set at creation.
        match std::fs::remove_file(&tmp) {
            Ok(()) => tracing::warn!(file = %tmp.display(), "removed a stale temporary file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    zeroize::Zeroize::zeroize(&mut json);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| target)
}

/// Runs the agent until `cancel` fires.
///
/// # Errors
/// When the directory cannot be created.
pub async fn run(cfg: AgentConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.dir)
        .map_err(|e| anyhow::anyhow!("--dir {}: {e}", cfg.dir.display()))?;
    let handle = CredentialHandle::start(cfg.client.clone());
    let mut changes = handle.changes();
    // What is on disk: exchange → (version, previous version).
    let mut written: BTreeMap<ExchangeId, (u64, Option<u64>)> = BTreeMap::new();
    loop {
        let snap = handle.snapshot();
        for (ex, c) in &snap.credentials {
            let key = (c.version, c.previous.as_ref().map(|p| p.1));
            if written.get(ex) == Some(&key) {
                continue;
            }
            match write_credentials(&cfg.dir, c) {
                Ok(path) => {
                    tracing::info!(exchange = %ex, version = c.version, path = %path.display(), "credentials written");
                    written.insert(*ex, key);
                    run_hook(&cfg, *ex, c.version, &path).await;
                }
                Err(e) => tracing::error!(exchange = %ex, "cannot write credentials: {e}"),
            }
        }
        let gone: Vec<ExchangeId> = written
            .keys()
            .filter(|e| !snap.credentials.contains_key(e))
            .copied()
            .collect();
        for ex in gone {
            let path = file_for(&cfg.dir, ex);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(exchange = %ex, "credentials deleted; file removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(exchange = %ex, "cannot remove {}: {e}", path.display()),
            }
            written.remove(&ex);
            run_hook(&cfg, ex, 0, &path).await;
        }
        tokio::select! {
            () = cancel.cancelled() => {
                handle.stop();
                return Ok(());
            }
            r = changes.changed() => if r.is_err() {
                anyhow::bail!("credential watcher stopped");
            }
        }
    }
}

async fn run_hook(cfg: &AgentConfig, exchange: ExchangeId, version: u64, path: &Path) {
    let Some(cmd) = &cfg.on_change else { return };
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CREDBROKER_EXCHANGE", exchange.as_str())
        .env("CREDBROKER_VERSION", version.to_string())
        .env("CREDBROKER_FILE", path)
        .status()
        .await;
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::warn!(exchange = %exchange, "on-change command exited with {s}"),
        Err(e) => tracing::warn!(exchange = %exchange, "on-change command could not run: {e}"),
    }
}

/// Reads an agent-written file back (tests and tools).
///
/// # Errors
/// On I/O or JSON failure.
pub fn read_file(path: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use secrecy::SecretString;

    use super::*;
    use credbroker_core::broker::types::CredentialSet;

    fn creds() -> Credentials {
        Credentials {
            exchange: ExchangeId::Binance,
            version: 3,
            current: CredentialSet {
                api_key: "agentKey0001".into(),
                api_secret: SecretString::from("agentSecret01".to_owned()),
                passphrase: None,
            },
            previous: None,
        }
    }

    /// A stale temporary file, world-readable (and, when the test can
    /// arrange it, another user's), under a umask that would let a new file
    /// be world-readable: the keys still land in a file of mode 0600 owned
    /// by the agent, and the stale file's contents are gone.
    #[test]
    fn a_stale_temporary_file_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".binance.json.tmp");
        std::fs::write(&stale, "stale contents that must not survive").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        let me = rustix::process::geteuid();
        if me.is_root() {
            rustix::fs::chown(&stale, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
        }
        let old = rustix::process::umask(rustix::fs::Mode::empty());
        let written = write_credentials(dir.path(), &creds());
        rustix::process::umask(old);
        let target = written.unwrap();
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode());
        assert_eq!(meta.uid(), me.as_raw(), "owned by the agent");
        let text = std::fs::read_to_string(&target).unwrap();
        assert!(
            text.contains("agentKey0001") && !text.contains("stale"),
            "{text}"
        );
        assert!(!stale.exists(), "no temporary file left");
    }

    /// A symlink planted at the temporary name is not followed.
    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(".binance.json.tmp")).unwrap();
        write_credentials(dir.path(), &creds()).unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
    }
}
