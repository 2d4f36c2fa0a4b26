//! `credbroker import <dir>`: moves legacy plain credential files (the old
//! `config/credentials/*.json` and `.env` files) into the broker, through
//! ValidateAndStore, so every key is validated exactly like a new one.
//!
//! Accepted shapes:
//! - `{exchange}.json`: `{"api_key": "...", "api_secret": "...",
//!   "passphrase": "..."}` (also `apiKey`/`secret`/`password` as ccxt names
//!   them); an `"exchange"` field overrides the file name.
//! - `*.env` / `.env`: `BINANCE_API_KEY=...`, `BINANCE_API_SECRET=...`
//!   (or `_SECRET`), `OKX_PASSPHRASE=...`; one credential per exchange prefix.
//!
//! The report names each file, the exchange and the outcome; it never
//! prints a secret (keys appear masked).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_json::Value;
use zeroize::Zeroizing;

use crate::api::pb;

use crate::broker::types::{ExchangeId, TenantId, key_hint};

/// One credential found in a legacy file.
pub struct Found {
    /// File it came from.
    pub file: PathBuf,
    /// Exchange.
    pub exchange: ExchangeId,
    /// Key.
    pub api_key: String,
    /// Secret (wiped on drop).
    pub api_secret: Zeroizing<String>,
    /// Passphrase (wiped on drop).
    pub passphrase: Option<Zeroizing<String>>,
}

/// What happened to one file or credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored as version 1.
    Stored,
    /// The broker refused it (the reason is the broker's safe message).
    Rejected(String),
    /// Not a credential file, or unreadable.
    Skipped(String),
}

/// One report line.
#[derive(Debug, Clone)]
pub struct ReportLine {
    /// File.
    pub file: PathBuf,
    /// Exchange, when known.
    pub exchange: Option<ExchangeId>,
    /// Masked key, when known.
    pub key_hint: Option<String>,
    /// Outcome.
    pub outcome: Outcome,
}

impl std::fmt::Display for ReportLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self
            .file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let ex = self.exchange.map_or("-", |e| e.as_str());
        let key = self.key_hint.as_deref().unwrap_or("-");
        match &self.outcome {
            Outcome::Stored => write!(f, "stored    {name}  {ex}  {key}"),
            Outcome::Rejected(why) => write!(f, "rejected  {name}  {ex}  {key}  {why}"),
            Outcome::Skipped(why) if self.exchange.is_some() => {
                write!(f, "skipped   {name}  {ex}  {why}")
            }
            Outcome::Skipped(why) => write!(f, "skipped   {name}  {why}"),
        }
    }
}

fn field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| v.get(*n).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
}

/// Parses one JSON credential file.
///
/// # Errors
/// A reason to skip the file.
pub fn parse_json(path: &Path, text: &str) -> Result<Found, String> {
    let v: Value = serde_json::from_str(text).map_err(|_| "not valid JSON".to_owned())?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let exchange = field(&v, &["exchange"]).map_or(stem, str::to_owned);
    let exchange: ExchangeId = exchange.parse().map_err(|e: String| e)?;
    let api_key = field(&v, &["api_key", "apiKey", "key"]).ok_or("no api_key field")?;
    let api_secret =
        field(&v, &["api_secret", "secret", "apiSecret"]).ok_or("no api_secret field")?;
    Ok(Found {
        file: path.to_owned(),
        exchange,
        api_key: api_key.to_owned(),
        api_secret: Zeroizing::new(api_secret.to_owned()),
        passphrase: field(&v, &["passphrase", "password"]).map(|p| Zeroizing::new(p.to_owned())),
    })
}

/// Parses one `.env` file into a credential per exchange prefix.
pub fn parse_env(path: &Path, text: &str) -> Vec<Result<Found, (Option<ExchangeId>, String)>> {
    let mut by_ex: BTreeMap<ExchangeId, BTreeMap<&'static str, Zeroizing<String>>> =
        BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.starts_with('#') {
            continue;
        }
        let v = v.trim().trim_matches('"').trim_matches('\'');
        let k = k.trim().to_ascii_uppercase();
        for ex in ExchangeId::ALL {
            let Some(rest) = k.strip_prefix(&format!("{}_", ex.as_str().to_ascii_uppercase()))
            else {
                continue;
            };
            let slot = match rest {
                "API_KEY" | "KEY" => "key",
                "API_SECRET" | "SECRET" | "SECRET_KEY" => "secret",
                "PASSPHRASE" | "API_PASSPHRASE" | "PASSWORD" => "passphrase",
                _ => continue,
            };
            by_ex
                .entry(ex)
                .or_default()
                .insert(slot, Zeroizing::new(v.to_owned()));
        }
    }
    by_ex
        .into_iter()
        .map(|(ex, mut f)| {
            let key = f
                .remove("key")
                .ok_or((Some(ex), "no API key variable".to_owned()))?;
            let secret = f
                .remove("secret")
                .ok_or((Some(ex), "no API secret variable".to_owned()))?;
            Ok(Found {
                file: path.to_owned(),
                exchange: ex,
                api_key: key.to_string(),
                api_secret: secret,
                passphrase: f.remove("passphrase"),
            })
        })
        .collect()
}

/// Imports every credential file in `dir` for `tenant`.
///
/// # Errors
/// When `dir` cannot be read; per-file problems are report lines.
pub async fn run(
    dir: &Path,
    tenant: TenantId,
    client: &mut crate::client::token::BrokerClient,
) -> anyhow::Result<Vec<ReportLine>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    let mut report = Vec::new();
    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let skip = |why: String| ReportLine {
            file: path.clone(),
            exchange: None,
            key_hint: None,
            outcome: Outcome::Skipped(why),
        };
        let Ok(text) = std::fs::read_to_string(&path).map(Zeroizing::new) else {
            report.push(skip("unreadable".into()));
            continue;
        };
        let found: Vec<Result<Found, (Option<ExchangeId>, String)>> = if name.ends_with(".json") {
            vec![parse_json(&path, &text).map_err(|e| (None, e))]
        } else if name == ".env" || name.ends_with(".env") {
            parse_env(&path, &text)
        } else {
            report.push(skip("not a .json or .env file".into()));
            continue;
        };
        if found.is_empty() {
            report.push(skip("no credential variables".into()));
        }
        for f in found {
            let f = match f {
                Ok(f) => f,
                Err((ex, why)) => {
                    report.push(ReportLine {
                        file: path.clone(),
                        exchange: ex,
                        key_hint: None,
                        outcome: Outcome::Skipped(why),
                    });
                    continue;
                }
            };
            let req = pb::ValidateAndStoreRequest {
                tenant_id: tenant.to_string(),
                exchange: f.exchange.as_str().to_owned(),
                credentials: Some(pb::CredentialSet {
                    api_key: f.api_key.clone(),
                    api_secret: f.api_secret.to_string(),
                    passphrase: f.passphrase.as_ref().map(|p| p.to_string()),
                }),
            };
            let outcome = match client.validate_and_store(req).await {
                Ok(_) => Outcome::Stored,
                Err(s) => Outcome::Rejected(format!("{:?}: {}", s.code(), s.message())),
            };
            report.push(ReportLine {
                file: f.file.clone(),
                exchange: Some(f.exchange),
                key_hint: Some(key_hint(&f.api_key)),
                outcome,
            });
        }
    }
    Ok(report)
}
