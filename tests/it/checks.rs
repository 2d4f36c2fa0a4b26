//! Keys that die quietly: the health-check job against the exchange
//! simulators on real OpenBao and PostgreSQL, webhooks delivered from the
//! outbox (signatures checked with the `standardwebhooks` crate as oracle),
//! and the metrics endpoint parsed with Prometheus' own Python parser.

use std::{collections::HashMap, sync::Arc, time::Duration};

use credbroker::{
    api::pb::{self, CredentialStatus},
    broker::types::ExchangeId,
    clock::ManualClock,
    config::{ValidationConfig, ValidationMode},
    exchange::sim::{Fault, Simulators, native_permissions},
    rotation::retire,
};

use crate::{
    exchanges::{endpoints, register, store_req},
    support::{Env, EnvOptions, Receiver, new_tenant},
};

/// One parsed sample: name, labels, value.
pub(crate) type Sample = (String, HashMap<String, String>, f64);

/// Scrapes `/metrics` and parses it with `prometheus_client`'s OpenMetrics
/// parser (strict: a malformed exposition fails the test).
pub(crate) async fn scrape(env: &Env) -> (String, Vec<Sample>) {
    let addr = env.running.as_ref().unwrap().metrics_addr.unwrap();
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = resp.text().await.unwrap();
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(py)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<Sample> = serde_json::from_slice(&out.stdout).unwrap();
    (text, samples)
}

pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

/// The exchange simulators, a clock the test moves, and a broker that
/// validates against the simulators and checks by that clock.
async fn checked_env() -> (Simulators, Arc<ManualClock>, Env) {
    let sims = Simulators::start().await.unwrap();
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let env = Env::start_with(EnvOptions {
        validation: Some(ValidationConfig {
            mode: ValidationMode::Exchange,
            exchanges: endpoints(&sims),
            ..ValidationConfig::default()
        }),
        clock: Some(clock.clone()),
        ..EnvOptions::default()
    })
    .await;
    (sims, clock, env)
}

async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn health_checks_catch_dead_keys_tell_the_tenant_and_are_observable() {
    let (sims, clock, env) = checked_env().await;
    let running = env.running.as_ref().unwrap();
    let mut op = env.operator().await;
    let tenant = new_tenant();

    // The tenant's admin sets a webhook; the broker generates the secret.
    let (receiver, url) = Receiver::start(1).await;
    let secret = op
        .set_webhook(pb::SetWebhookRequest {
            tenant_id: tenant.clone(),
            url: url.clone(),
            secret: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert!(
        secret.starts_with("whsec_"),
        "a generated secret is returned once"
    );
    // Bad input is refused, naming the field.
    let e = op
        .set_webhook(pb::SetWebhookRequest {
            tenant_id: tenant.clone(),
            url: "ftp://example".into(),
            secret: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("url"), "{}", e.message());
    // PostgreSQL keeps the URL's host and a Vault version, never the
    // secret, nor the URL's path (a receiver's secret may be there).
    assert_eq!(
        env.count(
            "SELECT count(*) FROM tenant_webhooks WHERE host = '127.0.0.1' AND secret_version = 1"
        )
        .await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM tenant_webhooks WHERE host LIKE '%hook%'")
            .await,
        0
    );

    let (bybit_key, bybit_secret, _) = register(&sims, ExchangeId::Bybit, "hc", false);
    let (bn_key, bn_secret, _) = register(&sims, ExchangeId::Binance, "hc", false);
    for (ex, k, s) in [
        (ExchangeId::Bybit, &bybit_key, &bybit_secret),
        (ExchangeId::Binance, &bn_key, &bn_secret),
    ] {
        op.validate_and_store(store_req(&tenant, ex, k, s, None))
            .await
            .unwrap();
    }
    let checks = &running.checks;

    // Round 1: both healthy. At once again: nothing is due (never twice).
    let r = checks.round().await.unwrap();
    assert!(r.held_lease);
    assert_eq!(r.count("healthy"), 2, "{r:?}");
    assert!(checks.round().await.unwrap().checked.is_empty());

    // The exchange is down: only the health detail changes.
    sims.update_key(ExchangeId::Bybit, &bybit_key, |k| {
        k.fault = Fault::ServerError
    });
    clock.advance(time::Duration::hours(4));
    let r = checks.round().await.unwrap();
    assert_eq!(
        (r.count("unreachable"), r.count("healthy")),
        (1, 1),
        "{r:?}"
    );
    let health = |ex: &str| {
        let mut op = op.clone();
        let req = pb::GetCredentialHealthRequest {
            tenant_id: tenant.clone(),
            exchange: ex.into(),
        };
        async move { op.get_credential_health(req).await.unwrap().into_inner() }
    };
    let h = health("bybit").await;
    assert_eq!(h.credential_status, CredentialStatus::Active as i32);
    assert!(h.detail.contains("no usable answer"), "{}", h.detail);

    // Revoked at the exchange; Binance lost its IP allow-list.
    sims.update_key(ExchangeId::Bybit, &bybit_key, |k| {
        k.fault = Fault::None;
        k.secret = "rotatedElsewhere000000".into();
    });
    sims.update_key(ExchangeId::Binance, &bn_key, |k| {
        k.permissions = native_permissions(ExchangeId::Binance, false, false);
    });
    clock.advance(time::Duration::hours(4));
    let r = checks.round().await.unwrap();
    assert_eq!((r.count("refused"), r.count("drift")), (1, 1), "{r:?}");
    let h = health("bybit").await;
    assert_eq!(h.credential_status, CredentialStatus::Invalid as i32);
    let h = health("binance").await;
    assert_eq!(h.credential_status, CredentialStatus::Active as i32);
    assert!(h.detail.contains("IP allow-list"), "{}", h.detail);
    assert_eq!(
        env.count("SELECT count(*) FROM credential_events WHERE kind = 'invalidated'")
            .await,
        1
    );

    // Two messages; the first attempt was refused (503) and is retried.
    wait_for("the first attempts", || receiver.requests().len() >= 2).await;
    assert_eq!(
        env.count("SELECT count(*) FROM webhook_outbox WHERE last_result = 'HTTP 503' AND attempts = 1 AND delivered_at IS NULL")
            .await,
        1
    );
    // Skip the backoff instead of sleeping through it.
    env.db
        .connect()
        .await
        .execute(
            "UPDATE webhook_outbox SET next_attempt_at = now() WHERE delivered_at IS NULL",
            &[],
        )
        .await
        .unwrap();
    wait_for("the retry", || receiver.requests().len() >= 3).await;
    let oracle = standardwebhooks::Webhook::new(&secret).unwrap();
    let mut kinds = Vec::new();
    let mut ids = Vec::new();
    for (headers, body) in receiver.requests() {
        oracle
            .verify(body.as_bytes(), &headers)
            .expect("a valid Standard Webhooks signature");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"]["tenant_id"], tenant.as_str());
        for s in [&bybit_secret, &bn_secret] {
            assert!(!body.contains(s.as_str()), "no secret in a webhook");
        }
        kinds.push(v["type"].as_str().unwrap().to_owned());
        ids.push(headers["webhook-id"].to_str().unwrap().to_owned());
    }
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds, ["credential.drift", "credential.invalidated"]);
    // The retried message kept its id.
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2);
    // A tampered body fails the oracle (the check can fail).
    let (headers, body) = &receiver.requests()[0];
    assert!(
        oracle
            .verify(body.replace("tenant", "tenanx").as_bytes(), headers)
            .is_err()
    );

    // The metrics, parsed by Prometheus' own parser.
    // Counts and the outbox depth are refreshed every second: scraped once
    // a refresh after the check and the deliveries shows them.
    let t = tenant.as_str();
    let invalid = [
        ("tenant_id", t),
        ("exchange", "bybit"),
        ("status", "invalid"),
    ];
    let (text, m) = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (text, m) = scrape(&env).await;
            if value(&m, "alphapulse_credentials_total", &invalid).is_some()
                && value(&m, "credbroker_webhook_outbox_depth", &[]) == Some(0.0)
            {
                return (text, m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the credential counts show the checked credential, the outbox is drained");
    assert_eq!(
        value(
            &m,
            "alphapulse_credentials_total",
            &[
                ("tenant_id", t),
                ("exchange", "bybit"),
                ("status", "invalid")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &m,
            "alphapulse_credentials_total",
            &[
                ("tenant_id", t),
                ("exchange", "binance"),
                ("status", "active")
            ]
        ),
        Some(1.0)
    );
    for ex in ["bybit", "binance"] {
        assert_eq!(
            value(
                &m,
                "alphapulse_credentials_health_check_failures_total",
                &[("tenant_id", t), ("exchange", ex)]
            ),
            Some(1.0),
            "{ex}"
        );
    }
    // Two stores plus six checks (two rounds of two, one outage, ...).
    let validations = value(
        &m,
        "alphapulse_credentials_validation_duration_seconds_count",
        &[("exchange", "bybit")],
    )
    .unwrap();
    assert_eq!(validations, 4.0, "store + three checks");
    assert_eq!(
        value(
            &m,
            "credbroker_validations_total",
            &[("exchange", "bybit"), ("result", "unavailable")]
        ),
        Some(1.0)
    );
    assert!(
        value(
            &m,
            "alphapulse_vault_operations_total",
            &[("operation", "write"), ("status", "success")]
        )
        .unwrap()
            >= 3.0
    );
    assert_eq!(
        value(
            &m,
            "credbroker_grpc_server_handled_total",
            &[("method", "ValidateAndStore"), ("code", "OK")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &m,
            "credbroker_grpc_server_handled_total",
            &[("method", "SetWebhook"), ("code", "INVALID_ARGUMENT")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "credbroker_webhook_deliveries_total",
            &[("result", "delivered")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &m,
            "credbroker_webhook_deliveries_total",
            &[("result", "retry")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&m, "credbroker_webhook_outbox_depth", &[]), Some(0.0));
    assert_eq!(value(&m, "credbroker_vault_up", &[]), Some(1.0));
    assert_eq!(value(&m, "credbroker_vault_sealed", &[]), Some(0.0));
    assert_eq!(value(&m, "credbroker_postgres_up", &[]), Some(1.0));
    assert!(value(&m, "credbroker_audit_spool_max_bytes", &[]).unwrap() > 0.0);
    // 7 calls, 6 checks and 3 webhook attempts, each audited once; and a
    // request record before each of the 4 state-changing calls (two
    // SetWebhook, two ValidateAndStore) and each of the 6 checks.
    assert_eq!(
        value(&m, "credbroker_audit_records_total", &[]),
        Some(16.0 + 4.0 + 6.0)
    );
    assert!(value(&m, "credbroker_event_lag_seconds_count", &[]).unwrap() >= 3.0);
    assert_eq!(
        value(
            &m,
            "credbroker_health_checks_total",
            &[("result", "refused")]
        ),
        Some(1.0)
    );
    // No label holds a secret.
    for s in [&bybit_secret, &bn_secret, &secret] {
        assert!(!text.contains(s.as_str()));
    }
    // Every series the chart's alerts and dashboard use is one this broker
    // really exports.
    let scrape = env.pki.path("scrape.txt");
    std::fs::write(&scrape, &text).unwrap();
    crate::chart::check_chart(&["--metrics-only", "--scrape", scrape.to_str().unwrap()]);
}

/// Alerts count failures with `increase()`, which cannot see a series'
/// first sample: a stored credential's failure counter is exported at 0
/// before any check fails, and the checks' findings start at 0 too.
#[tokio::test]
async fn failure_counters_exist_at_zero_before_the_first_failure() {
    let (sims, _clock, env) = checked_env().await;
    let mut op = env.operator().await;
    let tenant = new_tenant();
    let (key, secret, _) = register(&sims, ExchangeId::Kraken, "zero", false);
    op.validate_and_store(store_req(&tenant, ExchangeId::Kraken, &key, &secret, None))
        .await
        .unwrap();
    let labels = [("tenant_id", tenant.as_str()), ("exchange", "kraken")];
    let m = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, m) = scrape(&env).await;
            if value(&m, "alphapulse_credentials_total", &labels).is_some() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the credential counts show the stored credential");
    assert_eq!(
        value(
            &m,
            "alphapulse_credentials_health_check_failures_total",
            &labels
        ),
        Some(0.0)
    );
    for result in ["refused", "expired", "drift"] {
        assert_eq!(
            value(&m, "credbroker_health_checks_total", &[("result", result)]),
            Some(0.0),
            "{result}"
        );
    }
    assert_eq!(
        value(
            &m,
            "credbroker_validations_total",
            &[("exchange", "okx"), ("result", "rejected")]
        ),
        Some(0.0),
        "an exchange nothing was validated on yet"
    );
}

/// One replica at a time: a second replica's round does nothing while the
/// first holds the lease, and takes over once it lapses.
#[tokio::test]
async fn the_health_check_lease_lets_one_replica_work_and_another_take_over() {
    let env = Env::start().await;
    let b = env.replica(None).await;
    let a = env.running.as_ref().unwrap();
    let mut op = env.operator().await;
    let tenant = new_tenant();
    op.validate_and_store(crate::support::store_n(&tenant, "binance"))
        .await
        .unwrap();
    let r = a.checks.round().await.unwrap();
    assert!(r.held_lease);
    assert_eq!(r.count("healthy"), 1);
    let r = b.checks.round().await.unwrap();
    assert!(!r.held_lease, "the lease is held by the first replica");
    // The holder dies (its lease is not renewed) and expires.
    env.db
        .connect()
        .await
        .execute(
            "UPDATE job_leases SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let r = b.checks.round().await.unwrap();
    assert!(r.held_lease, "taken over");
    assert!(
        r.checked.is_empty(),
        "the credential was checked this round already"
    );
    b.stop().await.unwrap();
}

/// The value of the counter `name` for `exchange` on the broker's scrape.
async fn exchange_counter(env: &Env, name: &str, exchange: &str) -> Option<f64> {
    let (_, samples) = scrape(env).await;
    value(&samples, name, &[("exchange", exchange)])
}

/// Another check round a while later reports `finding` again, and the
/// tenant's webhook has heard of it exactly once (once per change, not
/// every round): its payload.
async fn reported_again_but_told_once(
    clock: &ManualClock,
    checks: &credbroker::checks::HealthChecks,
    receiver: &Receiver,
    finding: &str,
) -> serde_json::Value {
    clock.advance(time::Duration::hours(4));
    assert_eq!(checks.round().await.unwrap().count(finding), 1);
    wait_for("the reminder", || !receiver.requests().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = receiver.requests();
    assert_eq!(sent.len(), 1, "once per change, not every round");
    serde_json::from_str(&sent[0].1).unwrap()
}

/// Kraken has no key-management API: the broker cannot rotate its keys by
/// itself, so a key older than the rotation policy (`max_key_age_days`,
/// 90 by default) is reported instead: in the health detail, as drift, and
/// once to the tenant's webhook.
#[tokio::test]
async fn a_key_older_than_the_rotation_policy_is_reported_once() {
    let (sims, clock, env) = checked_env().await;
    let checks = &env.running.as_ref().unwrap().checks;
    let mut op = env.operator().await;
    let tenant = new_tenant();
    let receiver = Receiver::for_tenant(&mut op, &tenant, 0).await;
    let (key, secret, _) = register(&sims, ExchangeId::Kraken, "age", false);
    op.validate_and_store(store_req(&tenant, ExchangeId::Kraken, &key, &secret, None))
        .await
        .unwrap();
    let health = || {
        let mut op = op.clone();
        let req = pb::GetCredentialHealthRequest {
            tenant_id: tenant.clone(),
            exchange: "kraken".into(),
        };
        async move { op.get_credential_health(req).await.unwrap().into_inner() }
    };

    // 89 days on: within the policy.
    clock.advance(time::Duration::days(89));
    assert_eq!(checks.round().await.unwrap().count("healthy"), 1);
    assert!(health().await.detail.is_empty());

    // 91 days on: reported, and the tenant hears it once.
    clock.advance(time::Duration::days(2));
    assert_eq!(checks.round().await.unwrap().count("drift"), 1);
    let h = health().await;
    assert_eq!(
        h.credential_status,
        CredentialStatus::Active as i32,
        "it still works"
    );
    assert!(
        h.detail
            .contains("older than the rotation policy (90 days)"),
        "{}",
        h.detail
    );
    assert_eq!(
        exchange_counter(&env, "credbroker_keys_past_rotation_policy_total", "kraken").await,
        Some(1.0)
    );
    let v = reported_again_but_told_once(&clock, checks, &receiver, "drift").await;
    assert_eq!(v["type"], "credential.drift");
    assert!(
        v["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("rotation policy"),
        "{v}"
    );
    assert!(!v.to_string().contains(secret.as_str()));
}

/// A Rotate of `ex` to `key` with a minute's overlap.
fn rotate_req(tenant: &str, ex: ExchangeId, key: &str, secret: &str) -> pb::RotateRequest {
    pb::RotateRequest {
        tenant_id: tenant.into(),
        exchange: ex.as_str().into(),
        credentials: store_req(tenant, ex, key, secret, None).credentials,
        overlap_seconds: Some(60),
        mint: false,
    }
}

/// A broker checking against the simulators (by a clock the test moves)
/// and a tenant whose `ex` credential was replaced: two keys made at the
/// simulator (tagged `tags`), the first stored, then replaced by the
/// second with a minute's overlap.
struct Replaced {
    sims: Simulators,
    clock: Arc<ManualClock>,
    env: Env,
    op: pb::credential_broker_client::CredentialBrokerClient<tonic::transport::Channel>,
    tenant: String,
    ex: ExchangeId,
    /// The replaced key: (key, secret).
    old: (String, String),
    /// The key that replaced it.
    new: (String, String),
}

impl Replaced {
    async fn start(ex: ExchangeId, tags: (&str, &str)) -> Self {
        let (sims, clock, env) = checked_env().await;
        let mut op = env.operator().await;
        let tenant = new_tenant();
        let (old_key, old_secret, _) = register(&sims, ex, tags.0, false);
        let (new_key, new_secret, _) = register(&sims, ex, tags.1, false);
        op.validate_and_store(store_req(&tenant, ex, &old_key, &old_secret, None))
            .await
            .unwrap();
        op.rotate(rotate_req(&tenant, ex, &new_key, &new_secret))
            .await
            .unwrap();
        Self {
            sims,
            clock,
            env,
            op,
            tenant,
            ex,
            old: (old_key, old_secret),
            new: (new_key, new_secret),
        }
    }

    fn checks(&self) -> &credbroker::checks::HealthChecks {
        &self.env.running.as_ref().unwrap().checks
    }

    /// The overlap ends: the retire pass retires the replaced version.
    async fn end_overlap(&self) {
        self.clock.advance(time::Duration::minutes(2));
        assert_eq!(retire::retire_once(self.env.broker()).await.unwrap(), 1);
    }

    /// How many replaced keys Vault keeps for the credential.
    async fn kept(&self) -> usize {
        kept_copies(&self.env, &self.tenant, self.ex).await
    }
}

/// How many replaced keys of `tenant`'s `ex` credential Vault keeps.
async fn kept_copies(env: &Env, tenant: &str, ex: ExchangeId) -> usize {
    let path = env.broker().replaced_path(tenant.parse().unwrap(), ex);
    env.broker()
        .secrets()
        .versions(&path)
        .await
        .unwrap()
        .into_iter()
        .filter(|v| !v.destroyed)
        .count()
}

/// Coinbase has no key-management API: after a Rotate the operator must
/// delete the replaced key in the exchange's web UI. When the overlap ends
/// the retire pass keeps the replaced set (in Vault, `…/replaced`), and each
/// check asks the exchange whether that key still works: while it does, the
/// health detail says so, the tenant's webhook hears it once
/// (`credential.old_key_live`) and `credbroker_replaced_keys_live_total`
/// counts it; once the key is deleted at the exchange the reminder clears and
/// the copy is destroyed.
#[tokio::test]
async fn a_replaced_key_left_live_at_the_exchange_is_reported_until_it_is_deleted_there() {
    let mut r = Replaced::start(ExchangeId::Coinbase, ("old", "new")).await;
    let receiver = Receiver::for_tenant(&mut r.op, &r.tenant, 0).await;
    let (sims, clock, env, op, tenant, ex) = (&r.sims, &r.clock, &r.env, &r.op, &r.tenant, r.ex);
    let ((old_key, old_secret), (new_key, _)) = (&r.old, &r.new);
    let checks = r.checks();
    let kept = || r.kept();
    let health = || {
        let mut op = op.clone();
        let req = pb::GetCredentialHealthRequest {
            tenant_id: tenant.clone(),
            exchange: ex.as_str().into(),
        };
        async move { op.get_credential_health(req).await.unwrap().into_inner() }
    };

    // Inside the overlap both keys are meant to work: nothing to report.
    assert_eq!(checks.round().await.unwrap().count("healthy"), 1);
    assert_eq!(kept().await, 0, "nothing kept before the overlap ends");

    // The overlap ends: the replaced set is kept, the served one destroyed.
    r.end_overlap().await;
    assert_eq!(kept().await, 1);

    // The operator forgot to delete it at Coinbase: reported.
    clock.advance(time::Duration::hours(4));
    let round = checks.round().await.unwrap();
    assert_eq!(round.count("drift"), 1, "{round:?}");
    let h = health().await;
    assert_eq!(h.credential_status, CredentialStatus::Active as i32);
    assert!(
        h.detail.contains("the replaced key")
            && h.detail.contains("still works at coinbase")
            && h.detail.contains("delete it at the exchange"),
        "{}",
        h.detail
    );
    assert!(!h.detail.contains(old_key.as_str()), "only the key's hint");
    assert_eq!(
        exchange_counter(env, "credbroker_replaced_keys_live_total", "coinbase").await,
        Some(1.0)
    );
    // Every round says it again in the detail, the tenant hears it once.
    let v = reported_again_but_told_once(clock, checks, &receiver, "drift").await;
    assert_eq!(v["type"], "credential.old_key_live", "{v}");
    assert!(!v.to_string().contains(old_secret.as_str()));
    assert!(!v.to_string().contains(old_key.as_str()));

    // Deleted at the exchange: the reminder clears and the copy goes.
    sims.remove_key(ex, old_key);
    clock.advance(time::Duration::hours(4));
    assert_eq!(checks.round().await.unwrap().count("healthy"), 1);
    assert!(health().await.detail.is_empty());
    assert_eq!(kept().await, 0, "the copy is destroyed");
    assert_eq!(
        exchange_counter(env, "credbroker_replaced_keys_live_total", "coinbase").await,
        Some(2.0),
        "counted once per check that found it"
    );
    // The new key is untouched and served.
    assert!(sims.has_key(ex, new_key));
    // Keeping the copy and destroying it are on record.
    let t: credbroker::broker::types::TenantId = tenant.parse().unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let actions: Vec<_> = crate::audit::all_records(env)
                .await
                .into_iter()
                .filter(|r| r.tenant_id == Some(t))
                .map(|r| r.action.to_string())
                .collect();
            if ["KeepReplacedKey", "DestroyReplacedKey"]
                .iter()
                .all(|a| actions.iter().any(|x| x == a))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the copy's keeping and destruction reached the audit trail");
}

/// A replaced key deleted at the exchange before its overlap ended (as the
/// operator should) is checked once and its copy destroyed.
#[tokio::test]
async fn a_replaced_key_deleted_in_time_is_checked_once_and_forgotten() {
    let r = Replaced::start(ExchangeId::Kraken, ("gone", "kept")).await;
    r.sims.remove_key(r.ex, &r.old.0);
    r.end_overlap().await;
    assert_eq!(r.kept().await, 1);
    r.clock.advance(time::Duration::hours(4));
    assert_eq!(r.checks().round().await.unwrap().count("healthy"), 1);
    assert_eq!(r.kept().await, 0, "the copy is destroyed");
}

/// A replaced key rotated back in is served again, not left live: no
/// reminder (it would tell the operator to delete the key the pods use),
/// and its kept copy is destroyed.
#[tokio::test]
async fn a_replaced_key_rotated_back_in_is_not_reported() {
    let mut r = Replaced::start(ExchangeId::Kraken, ("back", "forth")).await;
    r.end_overlap().await;
    // A comes back: current again, B in its overlap.
    let back = rotate_req(&r.tenant, r.ex, &r.old.0, &r.old.1);
    r.op.rotate(back).await.unwrap();
    assert_eq!(r.kept().await, 1);
    let round = r.checks().round().await.unwrap();
    assert_eq!(round.count("healthy"), 1, "{round:?}");
    assert_eq!(r.kept().await, 0, "the served key's copy is destroyed");
}
