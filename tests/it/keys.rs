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
        adapters::{KeyManager as _, MintSpec},
        sim::{SimKey, Simulators},
    },
};
use secrecy::SecretString;
use serde_json::json;

use crate::exchanges::endpoints;

const SUB: &str = "100200300";

/// The operator's gRPC client.
type Operator = credbroker::api::pb::credential_broker_client::CredentialBrokerClient<
    tonic::transport::Channel,
>;

fn bybit_master(wallet: &[&str], subs: &[&str]) -> SimKey {
    SimKey::master(
        "bybitMasterSecret000000000000000000",
        json!({"id": "1", "note": "master", "apiKey": "", "readOnly": 0, "secret": "",
               "permissions": {"Wallet": wallet, "Spot": ["SpotTrade"]}, "ips": ["*"],
               "isMaster": true}),
        subs,
    )
}

/// Bybit's simulator with the master key `master` managing [`SUB`] and a
/// key of that sub-account made by hand (`old`, its permission answer
/// `perms`), a broker validating against it, and that key stored for a new
/// tenant: (simulators, broker, tenant).
async fn bybit_fleet(
    master: &str,
    old: (&str, &str),
    perms: serde_json::Value,
) -> (Simulators, crate::support::Env, String) {
    bybit_fleet_with(master, old, perms, crate::support::EnvOptions::default()).await
}

/// [`bybit_fleet`] with the broker's options (its `[rotation]` settings,
/// its clock); validation is the simulators'.
async fn bybit_fleet_with(
    master: &str,
    old: (&str, &str),
    perms: serde_json::Value,
    opts: crate::support::EnvOptions,
) -> (Simulators, crate::support::Env, String) {
    let mut key = SimKey::hmac(old.1, perms);
    key.sub_account = Some(SUB.into());
    key.note = "made by hand".into();
    fleet(
        ExchangeId::Bybit,
        (master, bybit_master(&["AccountTransfer"], &[SUB])),
        (old.0, key),
        crate::support::set(old.0, old.1),
        opts,
    )
    .await
}

/// `ex`'s simulator with `master` and the hand-made key `old`, a broker
/// validating against it, and `stored` (the old key's set) stored for a
/// new tenant: (simulators, broker, tenant).
async fn fleet(
    ex: ExchangeId,
    master: (&str, SimKey),
    old: (&str, SimKey),
    stored: credbroker::api::pb::CredentialSet,
    opts: crate::support::EnvOptions,
) -> (Simulators, crate::support::Env, String) {
    use credbroker::config::{ValidationConfig, ValidationMode};

    let sims = Simulators::start().await.unwrap();
    sims.add_key(ex, master.0, master.1);
    sims.add_key(ex, old.0, old.1);
    let env = crate::support::Env::start_with(crate::support::EnvOptions {
        validation: Some(ValidationConfig {
            mode: ValidationMode::Exchange,
            exchanges: endpoints(&sims),
            ..ValidationConfig::default()
        }),
        ..opts
    })
    .await;
    let tenant = crate::support::new_tenant();
    env.operator()
        .await
        .validate_and_store(credbroker::api::pb::ValidateAndStoreRequest {
            tenant_id: tenant.clone(),
            exchange: ex.as_str().into(),
            credentials: Some(stored),
        })
        .await
        .unwrap();
    (sims, env, tenant)
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
        .mint(ex, &master, &spec("credbroker:rotation-1"))
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

    let listed = v.list(ex, &master, SUB).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].api_key, minted.api_key);
    assert_eq!(listed[0].note, "credbroker:rotation-1");
    assert!(listed[0].trade);
    assert_eq!(listed[0].ips, vec!["10.0.0.1".to_owned()]);

    assert!(
        v.delete(ex, &master, SUB, &minted.api_key, None)
            .await
            .unwrap()
    );
    assert!(v.list(ex, &master, SUB).await.unwrap().is_empty());
    assert!(
        !v.delete(ex, &master, SUB, &minted.api_key, None)
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
    refused(v.mint(ex, &no_wallet, &spec("n")).await, "10005");
    let plain = set("bybitPlainKey00001", "bybitPlainSecret");
    refused(v.mint(ex, &plain, &spec("n")).await, "10005");
    let master = set("bybitMasterKey0002", "bybitMasterSecret000000000000000000");
    let mut foreign = spec("n");
    foreign.sub_account = "999".into();
    refused(v.mint(ex, &master, &foreign).await, "10001");
    assert!(v.mint(ex, &master, &spec("ok")).await.is_ok());

    // Exchanges without a key-management adapter say so.
    let e = v
        .mint(ExchangeId::Coinbase, &master, &spec("n"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            ValidationError::InvalidField {
                field: "exchange",
                ..
            }
        ) && e.to_string().contains("web UI"),
        "not worth retrying, and says what to do: {e}"
    );
}

// ---- zero-touch rotation: the state machine, end to end and at every crash point.

mod zero_touch {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    };
    use std::time::Duration;

    use async_trait::async_trait;
    use credbroker::{
        api::pb,
        broker::{
            error::{BrokerError, MetadataStoreError, ValidationError},
            ports::CredentialValidator,
            types::{CredentialSet, ExchangeId, TenantId},
        },
        clock::SystemClock,
        exchange::{
            ExchangeValidator, WithdrawPolicy,
            sim::{Simulators, native_permissions},
        },
        rotation::mint::{
            KeyManager, KeyRotation, KeyRotationStore, KeyRotator, ManagedKey, MintSettings,
            MintSpec, RotationSchedule, Scheduled, Step,
        },
        store::PgMetadataStore,
    };
    use secrecy::{ExposeSecret as _, SecretString};

    use super::{SUB, bybit_master, set};
    use crate::exchanges::endpoints;
    use crate::support::Env;

    const EX: ExchangeId = ExchangeId::Bybit;
    const MASTER: &str = "bybitMasterKey0003";
    const MASTER_SECRET: &str = "bybitMasterSecret000000000000000000";

    /// The real adapter; can lose one mint's answer (the key is created at
    /// the exchange, the broker never hears back) and counts mints.
    struct Keys {
        inner: Arc<ExchangeValidator>,
        lose_next_mint: AtomicBool,
        mints: AtomicU32,
    }

    #[async_trait]
    impl KeyManager for Keys {
        async fn mint(
            &self,
            ex: ExchangeId,
            master: &CredentialSet,
            spec: &MintSpec,
        ) -> Result<CredentialSet, ValidationError> {
            let set = self.inner.mint(ex, master, spec).await?;
            self.mints.fetch_add(1, Ordering::SeqCst);
            if self.lose_next_mint.swap(false, Ordering::SeqCst) {
                return Err(ValidationError::Unavailable {
                    exchange: "bybit",
                    reason: "the answer was lost".into(),
                });
            }
            Ok(set)
        }
        async fn list(
            &self,
            ex: ExchangeId,
            master: &CredentialSet,
            sub: &str,
        ) -> Result<Vec<ManagedKey>, ValidationError> {
            self.inner.list(ex, master, sub).await
        }
        async fn delete(
            &self,
            ex: ExchangeId,
            master: &CredentialSet,
            sub: &str,
            key: &str,
            passphrase: Option<&SecretString>,
        ) -> Result<bool, ValidationError> {
            self.inner.delete(ex, master, sub, key, passphrase).await
        }
        fn deletes_with_passphrase(&self, ex: ExchangeId) -> bool {
            self.inner.deletes_with_passphrase(ex)
        }
    }

    /// The real store; can "crash" right before recording a step (its
    /// effects happened, its record did not).
    struct Store {
        inner: Arc<PgMetadataStore>,
        crash_before: Mutex<Option<Step>>,
    }

    #[async_trait]
    impl KeyRotationStore for Store {
        async fn management(
            &self,
            t: TenantId,
            e: ExchangeId,
        ) -> Result<Option<String>, MetadataStoreError> {
            self.inner.management(t, e).await
        }
        async fn set_management(
            &self,
            t: TenantId,
            e: ExchangeId,
            sub: &str,
            hint: &str,
            schedule: RotationSchedule,
        ) -> Result<(), MetadataStoreError> {
            self.inner.set_management(t, e, sub, hint, schedule).await
        }
        async fn scheduled(&self) -> Result<Vec<Scheduled>, MetadataStoreError> {
            self.inner.scheduled().await
        }
        async fn begin(&self, r: &KeyRotation) -> Result<Option<KeyRotation>, MetadataStoreError> {
            self.inner.begin(r).await
        }
        async fn save(
            &self,
            r: &KeyRotation,
            notice: Option<&credbroker::broker::ports::Notice>,
        ) -> Result<(), MetadataStoreError> {
            let crashed = {
                let mut crash = self.crash_before.lock().unwrap();
                let now = *crash == Some(r.step);
                if now {
                    *crash = None;
                }
                now
            };
            if crashed {
                return Err(MetadataStoreError::Unavailable("the replica died".into()));
            }
            self.inner.save(r, notice).await
        }
        async fn get(&self, id: uuid::Uuid) -> Result<Option<KeyRotation>, MetadataStoreError> {
            self.inner.get(id).await
        }
        async fn active(
            &self,
            t: TenantId,
            e: ExchangeId,
        ) -> Result<Option<KeyRotation>, MetadataStoreError> {
            self.inner.active(t, e).await
        }
        async fn unfinished(&self) -> Result<Vec<KeyRotation>, MetadataStoreError> {
            self.inner.unfinished().await
        }
        async fn due(
            &self,
            now: time::OffsetDateTime,
            limit: u32,
        ) -> Result<Vec<KeyRotation>, MetadataStoreError> {
            self.inner.due(now, limit).await
        }
    }

    struct World {
        env: Env,
        sims: Simulators,
        keys: Arc<Keys>,
        store: Arc<Store>,
        pg: Arc<PgMetadataStore>,
        validator: Arc<ExchangeValidator>,
        tenant: TenantId,
        old_key: String,
    }

    const LEASE: time::Duration = time::Duration::milliseconds(500);
    const OVERLAP: u32 = 2;

    impl World {
        async fn new() -> World {
            // The key pods use today: a key of the sub-account, made in the
            // exchange's web UI, stored through the broker.
            let old_key = format!(
                "bybitOldKey{}",
                &uuid::Uuid::new_v4().simple().to_string()[..7]
            );
            let (sims, env, tenant) = super::bybit_fleet(
                MASTER,
                (&old_key, "bybitOldSecret0000000000000000000000"),
                native_permissions(EX, false, true),
            )
            .await;
            let validator = Arc::new(
                ExchangeValidator::new(
                    &endpoints(&sims),
                    WithdrawPolicy::default(),
                    Arc::new(SystemClock),
                )
                .unwrap(),
            );
            let pg = Arc::new(env.db.migrated_store(2).await);
            let keys = Arc::new(Keys {
                inner: validator.clone(),
                lose_next_mint: AtomicBool::new(false),
                mints: AtomicU32::new(0),
            });
            let store = Arc::new(Store {
                inner: pg.clone(),
                crash_before: Mutex::new(None),
            });
            let w = World {
                env,
                sims,
                keys,
                store,
                pg,
                validator,
                tenant: TenantId::new(tenant.parse().unwrap()),
                old_key,
            };
            w.rotator()
                .set_management_key(
                    w.tenant,
                    EX,
                    SUB,
                    &set(MASTER, MASTER_SECRET),
                    RotationSchedule::default(),
                )
                .await
                .unwrap();
            w
        }

        /// A replica's rotator (each its own lease holder).
        fn rotator(&self) -> KeyRotator {
            KeyRotator::new(
                self.env.broker().clone(),
                self.keys.clone(),
                self.store.clone(),
                self.pg.clone(),
                uuid::Uuid::new_v4(),
                MintSettings {
                    lease: LEASE,
                    retry_min: time::Duration::ZERO,
                    ..MintSettings::default()
                },
            )
        }

        /// Drives the rotation to its end as replicas would: a fresh
        /// rotator after the lease of a dead one expired, the job's rounds
        /// until the overlap ends.
        async fn finish(&self, id: uuid::Uuid) -> KeyRotation {
            for _ in 0..40 {
                match self.rotator().drive(id).await {
                    Ok(r) if r.step.finished() => return r,
                    Ok(_) => {}
                    // A replica that died mid-step: its lease must expire.
                    Err(BrokerError::Unavailable { .. }) => {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            panic!(
                "the rotation did not finish: {:?}",
                self.pg.get(id).await.unwrap()
            );
        }

        /// What must hold after every rotation: the broker serves the
        /// minted key, the exchange lists exactly that key in the
        /// sub-account, and the old key is refused there.
        async fn assert_one_live_key(&self, r: &KeyRotation) {
            assert_eq!(r.step, Step::Done, "{r:?}");
            let listed = self
                .validator
                .list(EX, &set(MASTER, MASTER_SECRET), SUB)
                .await
                .unwrap();
            let minted = r.minted_api_key.clone().unwrap();
            assert_eq!(
                listed.iter().map(|k| k.api_key.clone()).collect::<Vec<_>>(),
                vec![minted.clone()],
                "exactly one live key in the sub-account: the minted one"
            );
            let mut pod = self.env.tenant_client(&self.tenant.to_string()).await;
            let got = pod
                .get_credentials(pb::GetCredentialsRequest {
                    tenant_id: self.tenant.to_string(),
                    exchange: "bybit".into(),
                    min_version: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let current = got.current.unwrap();
            assert_eq!(current.api_key, minted);
            assert_eq!(got.version, 2);
            let old = CredentialSet {
                api_key: self.old_key.clone(),
                api_secret: SecretString::from("bybitOldSecret0000000000000000000000".to_owned()),
                passphrase: None,
            };
            let refused = self.validator.validate(self.tenant, EX, &old).await;
            assert!(
                matches!(refused, Err(ValidationError::Rejected { .. })),
                "{refused:?}"
            );
            let new = CredentialSet {
                api_key: current.api_key,
                api_secret: SecretString::from(current.api_secret),
                passphrase: None,
            };
            let perms = self
                .validator
                .validate(self.tenant, EX, &new)
                .await
                .unwrap();
            assert!(
                perms.trade && !perms.withdraw && perms.ip_restricted,
                "copied, never more: {perms:?}"
            );
            assert!(!new.api_secret.expose_secret().is_empty());
        }
    }

    #[tokio::test]
    async fn a_rotation_mints_swaps_and_deletes_the_old_key() {
        let w = World::new().await;
        let r = w.rotator().start(w.tenant, EX, OVERLAP).await.unwrap();
        assert_eq!(
            r.step,
            Step::Waiting,
            "the fleet swapped; the old key waits for the overlap: {r:?}"
        );
        assert_eq!(r.new_version, Some(2));
        // Another rotation cannot start while this one is unfinished.
        let busy = w.rotator().start(w.tenant, EX, OVERLAP).await.unwrap_err();
        assert!(
            matches!(&busy, BrokerError::FailedPrecondition(m) if m.contains("unfinished")),
            "{busy}"
        );
        let done = w.finish(r.id).await;
        w.assert_one_live_key(&done).await;
        assert_eq!(w.keys.mints.load(Ordering::SeqCst), 1);
        // The next rotation may start now.
        let next = w.rotator().start(w.tenant, EX, OVERLAP).await.unwrap();
        assert_eq!(next.old_api_key, done.minted_api_key.unwrap());
    }

    /// A replica dies right before recording `step` (what the step did at
    /// the exchange, in Vault or PostgreSQL happened); another takes over.
    async fn crash_before(step: Step) {
        let w = World::new().await;
        *w.store.crash_before.lock().unwrap() = Some(step);
        let first = w.rotator();
        let crashed = first.start(w.tenant, EX, OVERLAP).await;
        // The start itself or the job's round reports the failure.
        let id = match crashed {
            Ok(r) => r.id,
            Err(_) => w.pg.active(w.tenant, EX).await.unwrap().unwrap().id,
        };
        drop(first);
        tokio::time::sleep(Duration::from_millis(600)).await; // its lease expires
        let done = w.finish(id).await;
        w.assert_one_live_key(&done).await;
        assert_eq!(
            w.keys.mints.load(Ordering::SeqCst),
            1,
            "no key minted twice"
        );
    }

    #[tokio::test]
    async fn crash_after_minting_reuses_the_minted_key() {
        crash_before(Step::Rotating).await;
    }

    #[tokio::test]
    async fn crash_after_rotating_does_not_rotate_twice() {
        crash_before(Step::Waiting).await;
    }

    #[tokio::test]
    async fn crash_after_the_overlap_still_deletes_the_old_key() {
        crash_before(Step::Deleting).await;
    }

    #[tokio::test]
    async fn crash_after_deleting_finishes() {
        crash_before(Step::Done).await;
    }

    #[tokio::test]
    async fn a_lost_mint_answer_leaves_no_orphan_key() {
        let w = World::new().await;
        w.keys.lose_next_mint.store(true, Ordering::SeqCst);
        let r = w.rotator().start(w.tenant, EX, OVERLAP).await.unwrap();
        assert_eq!(r.step, Step::Minting);
        assert_eq!(r.attempts, 1);
        assert!(
            r.last_error.as_deref().unwrap().contains("answer was lost"),
            "{r:?}"
        );
        let done = w.finish(r.id).await;
        // The first key's secret was never known: it was found by its note
        // and deleted, and one key minted in its place.
        w.assert_one_live_key(&done).await;
        assert_eq!(w.keys.mints.load(Ordering::SeqCst), 2);
        // Both deletions at the exchange are on record, each before and
        // after it: the orphan's and the replaced key's.
        let sql = format!(
            "SELECT count(*) FROM audit_log WHERE tenant_id = '{}' \
             AND body::jsonb->>'action' = 'DeleteKeyAtExchange'",
            w.tenant
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while w.env.count(&sql).await < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "deletions at the exchange missing from the audit trail"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(w.env.count(&sql).await, 4);
    }

    #[tokio::test]
    async fn a_schedule_rotates_by_itself_when_its_period_has_passed() {
        let w = World::new().await;
        let schedule = RotationSchedule {
            every_days: 30,
            overlap_secs: OVERLAP,
        };
        w.rotator()
            .set_management_key(w.tenant, EX, SUB, &set(MASTER, MASTER_SECRET), schedule)
            .await
            .unwrap();
        let now = time::OffsetDateTime::now_utc();
        assert!(
            w.rotator().start_scheduled(now).await.unwrap().is_empty(),
            "not yet due"
        );
        let later = now + time::Duration::days(31);
        let started = w.rotator().start_scheduled(later).await.unwrap();
        assert_eq!(started.len(), 1, "due after 30 days");
        assert_eq!(started[0].step, Step::Waiting, "{:?}", started[0]);
        assert!(
            w.rotator().start_scheduled(later).await.unwrap().is_empty(),
            "never while one is unfinished"
        );
        let done = w.finish(started[0].id).await;
        w.assert_one_live_key(&done).await;
        // The period counts from the last rotation's start.
        assert!(
            w.rotator()
                .start_scheduled(now + time::Duration::days(29))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_rotation_that_cannot_mint_tells_the_tenants_webhook_and_frees_the_next() {
        let w = World::new().await;
        let (receiver, url) = crate::support::Receiver::start(0).await;
        w.env
            .operator()
            .await
            .set_webhook(pb::SetWebhookRequest {
                tenant_id: w.tenant.to_string(),
                url,
                secret: String::new(),
            })
            .await
            .unwrap();
        // The key pods use is no longer a key of the managed sub-account:
        // the management key cannot replace it.
        w.sims.update_key(EX, &w.old_key, |k| k.sub_account = None);
        let rotator = KeyRotator::new(
            w.env.broker().clone(),
            w.keys.clone(),
            w.store.clone(),
            w.pg.clone(),
            uuid::Uuid::new_v4(),
            MintSettings {
                lease: LEASE,
                max_mint_attempts: 1,
                ..MintSettings::default()
            },
        );
        let r = rotator.start(w.tenant, EX, OVERLAP).await.unwrap();
        assert_eq!(r.step, Step::Failed, "{r:?}");
        assert!(
            r.last_error
                .as_deref()
                .unwrap()
                .contains("not a key of sub-account"),
            "{r:?}"
        );
        assert_eq!(
            w.keys.mints.load(Ordering::SeqCst),
            0,
            "nothing minted, nothing changed"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let body = loop {
            if let Some((_, body)) = receiver
                .requests()
                .into_iter()
                .find(|(_, b)| b.contains("rotation_failed"))
            {
                break body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no webhook: {:?}",
                receiver.requests()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "credential.rotation_failed");
        assert_eq!(v["data"]["rotation_id"], r.id.to_string());
        assert_eq!(v["data"]["step"], "failed");
        assert!(!body.contains("Secret"), "no secret in the webhook: {body}");
        // A failed rotation does not block the next one.
        w.sims
            .update_key(EX, &w.old_key, |k| k.sub_account = Some(SUB.into()));
        let next = w.rotator().start(w.tenant, EX, OVERLAP).await.unwrap();
        assert_eq!(next.step, Step::Waiting, "{next:?}");
    }

    #[tokio::test]
    async fn a_management_key_that_cannot_manage_is_refused_and_nothing_starts() {
        let w = World::new().await;
        w.sims
            .add_key(EX, "bybitWeakMaster01", bybit_master(&[], &[]));
        let refused = w
            .rotator()
            .set_management_key(
                w.tenant,
                EX,
                SUB,
                &set("bybitWeakMaster01", MASTER_SECRET),
                RotationSchedule::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                BrokerError::Validation(ValidationError::Rejected { .. })
            ),
            "{refused}"
        );
        let other = TenantId::new(uuid::Uuid::new_v4());
        let none = w.rotator().start(other, EX, OVERLAP).await.unwrap_err();
        assert!(
            matches!(&none, BrokerError::FailedPrecondition(m) if m.contains("no management key")),
            "{none}"
        );
    }
}

/// The operators' path: SetManagementKey and Rotate with mint over mTLS,
/// the replica's own job deleting the old key when the overlap ends.
#[tokio::test]
async fn operators_rotate_at_the_exchange_over_grpc() {
    use credbroker::{api::pb, exchange::sim::native_permissions};
    use tonic::Code;

    let ex = ExchangeId::Bybit;
    let (sims, env, tenant) = bybit_fleet(
        "bybitMasterKey0004",
        ("bybitOldKeyGrpc001", "bybitOldSecretGrpc00000000000000000"),
        native_permissions(ex, false, true),
    )
    .await;
    let mut op = env.operator().await;
    let rotate = |credentials: Option<pb::CredentialSet>| pb::RotateRequest {
        tenant_id: tenant.clone(),
        exchange: "bybit".into(),
        credentials,
        overlap_seconds: Some(1),
        mint: true,
    };

    // No management key yet: a clear FAILED_PRECONDITION, nothing changes.
    let e = op.rotate(rotate(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("SetManagementKey"), "{}", e.message());

    let stored = op
        .set_management_key(pb::SetManagementKeyRequest {
            tenant_id: tenant.clone(),
            exchange: "bybit".into(),
            credentials: Some(crate::support::set(
                "bybitMasterKey0004",
                "bybitMasterSecret000000000000000000",
            )),
            sub_account: SUB.into(),
            rotate_every_days: 0,
            overlap_seconds: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.api_key_hint, "****0004");

    let e = op
        .rotate(rotate(Some(crate::support::set("bybitOtherKey00001", "s"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let r = op.rotate(rotate(None)).await.unwrap().into_inner();
    let status = r.key_rotation.unwrap();
    assert_eq!(status.step, "waiting", "{status:?}");
    assert_eq!(status.new_version, 2);
    assert_eq!(r.credential.unwrap().version, 2);
    assert!(status.minted_api_key_hint.starts_with("****"));

    // The replica's job deletes the old key once the overlap ends.
    let master = set("bybitMasterKey0004", "bybitMasterSecret000000000000000000");
    let v = ExchangeValidator::new(
        &endpoints(&sims),
        WithdrawPolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let keys = v.list(ex, &master, SUB).await.unwrap();
        if keys.len() == 1 && keys[0].api_key != "bybitOldKeyGrpc001" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old key is still live: {keys:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // A manual rotation (a key made by hand in the sub-account) deletes the
    // replaced key at the exchange too, once the overlap ends.
    let mut manual = SimKey::hmac(
        "bybitManualSecret000000000000000000",
        native_permissions(ex, false, true),
    );
    manual.sub_account = Some(SUB.into());
    sims.add_key(ex, "bybitManualKey0001", manual);
    let r = op
        .rotate(pb::RotateRequest {
            mint: false,
            ..rotate(Some(crate::support::set(
                "bybitManualKey0001",
                "bybitManualSecret000000000000000000",
            )))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.key_rotation.unwrap().step, "waiting");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let keys = v.list(ex, &master, SUB).await.unwrap();
        if keys.iter().map(|k| k.api_key.as_str()).collect::<Vec<_>>() == ["bybitManualKey0001"] {
            break;
        }
        if std::time::Instant::now() >= deadline {
            use credbroker::rotation::mint::KeyRotationStore as _;
            let rows = env.db.migrated_store(1).await;
            panic!(
                "the replaced key is still live: {keys:?} {:?}",
                rows.unfinished().await
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Both deletions show in the replica's metrics, and nothing is overdue.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, samples) = crate::checks::scrape(&env).await;
        let deleted = crate::checks::value(
            &samples,
            "credbroker_key_rotation_steps_total",
            &[
                ("exchange", "bybit"),
                ("step", "deleting"),
                ("result", "ok"),
            ],
        );
        let waiting =
            crate::checks::value(&samples, "credbroker_key_rotations", &[("step", "waiting")]);
        if deleted == Some(2.0) && waiting == Some(0.0) {
            assert_eq!(
                crate::checks::value(&samples, "credbroker_key_rotations_overdue", &[]),
                Some(0.0)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{deleted:?} {waiting:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// A key the exchange says expires within the warning window is replaced by
/// a minted one when the health check sees it (its tenant stored a
/// management key).
#[tokio::test]
async fn the_health_check_rotates_an_expiring_key_at_the_exchange() {
    use credbroker::exchange::sim::native_permissions;
    use time::format_description::well_known::Rfc3339;

    let ex = ExchangeId::Bybit;
    let mut perms = native_permissions(ex, false, true);
    perms["expiredAt"] = (time::OffsetDateTime::now_utc() + time::Duration::days(2))
        .format(&Rfc3339)
        .unwrap()
        .into();
    let (_sims, env, tenant) = bybit_fleet(
        "bybitMasterKey0005",
        ("bybitExpiringKey01", "bybitExpiringSecret0000000000000000"),
        perms,
    )
    .await;
    let mut op = env.operator().await;
    manage_bybit(&mut op, &tenant, "bybitMasterKey0005").await;

    let report = env.running.as_ref().unwrap().checks.round().await.unwrap();
    assert_eq!(report.count("drift"), 1, "{report:?}");
    assert_replaced_at_the_exchange(&mut op, &tenant, "bybitExpiringKey01").await;
}

/// Stores `master` (a master key [`bybit_fleet`] made) as `tenant`'s Bybit
/// management key, without a schedule.
async fn manage_bybit(op: &mut Operator, tenant: &str, master: &str) {
    op.set_management_key(credbroker::api::pb::SetManagementKeyRequest {
        tenant_id: tenant.into(),
        exchange: "bybit".into(),
        credentials: Some(crate::support::set(
            master,
            "bybitMasterSecret000000000000000000",
        )),
        sub_account: SUB.into(),
        rotate_every_days: 0,
        overlap_seconds: None,
    })
    .await
    .unwrap();
}

/// `tenant`'s Bybit credential as GetCredentials serves it.
async fn served_bybit(
    op: &mut Operator,
    tenant: &str,
) -> credbroker::api::pb::GetCredentialsResponse {
    op.get_credentials(credbroker::api::pb::GetCredentialsRequest {
        tenant_id: tenant.into(),
        exchange: "bybit".into(),
        min_version: 0,
    })
    .await
    .unwrap()
    .into_inner()
}

/// A rotation at the exchange replaced `old`: version 2 is a minted key,
/// `old` still served as the previous version until the overlap ends.
async fn assert_replaced_at_the_exchange(op: &mut Operator, tenant: &str, old: &str) {
    let got = served_bybit(op, tenant).await;
    assert_eq!(
        got.version, 2,
        "the check started a rotation at the exchange"
    );
    assert_ne!(got.current.unwrap().api_key, old);
    assert_eq!(
        got.previous.unwrap().api_key,
        old,
        "served until the overlap ends"
    );
}

/// A key older than the rotation policy (`[checks] max_key_age_days`, 90 by
/// default) is drift; where its tenant stored a management key, the health
/// check replaces it at the exchange instead of only reminding.
#[tokio::test]
async fn the_health_check_rotates_a_key_older_than_the_policy_at_the_exchange() {
    use credbroker::{clock::ManualClock, exchange::sim::native_permissions};

    let ex = ExchangeId::Bybit;
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    // A key without an expiry of its own (IP-bound keys do not expire).
    let mut perms = native_permissions(ex, false, true);
    perms["expiredAt"] = "".into();
    perms["deadlineDay"] = 0.into();
    let (_sims, env, tenant) = bybit_fleet_with(
        "bybitMasterKey0008",
        ("bybitAgedKey000001", "bybitAgedSecret00000000000000000000"),
        perms,
        crate::support::EnvOptions {
            clock: Some(clock.clone()),
            ..crate::support::EnvOptions::default()
        },
    )
    .await;
    let mut op = env.operator().await;
    manage_bybit(&mut op, &tenant, "bybitMasterKey0008").await;
    let checks = &env.running.as_ref().unwrap().checks;

    // Within the policy: nothing happens.
    clock.advance(time::Duration::days(89));
    let report = checks.round().await.unwrap();
    assert_eq!(report.count("healthy"), 1, "{report:?}");
    assert_eq!(served_bybit(&mut op, &tenant).await.version, 1);

    // Past it: reported, and replaced at the exchange.
    clock.advance(time::Duration::days(2));
    let report = checks.round().await.unwrap();
    assert_eq!(report.count("drift"), 1, "{report:?}");
    assert_replaced_at_the_exchange(&mut op, &tenant, "bybitAgedKey000001").await;
}

/// KuCoin's sub-account keys: the master account's key, a passphrase per
/// key chosen by its creator and asked for again to delete it.
mod kucoin {
    use super::*;
    use credbroker::{api::pb, exchange::sim::native_permissions};

    pub(super) const SUB: &str = "kcsub01";
    const MASTER: (&str, &str, &str) = (
        "kcMasterKey00000000001",
        "kc-master-secret",
        "kc-master-pass",
    );

    fn master_key() -> SimKey {
        let mut k = SimKey::master(
            MASTER.1,
            native_permissions(ExchangeId::Kucoin, false, false),
            &[SUB],
        );
        k.passphrase = Some(MASTER.2.into());
        k
    }

    fn master() -> CredentialSet {
        CredentialSet {
            passphrase: Some(SecretString::from(MASTER.2.to_owned())),
            ..set(MASTER.0, MASTER.1)
        }
    }

    /// A key made by hand in [`SUB`] with `passphrase`.
    fn by_hand(secret: &str, passphrase: &str) -> SimKey {
        let mut k = SimKey::hmac(secret, native_permissions(ExchangeId::Kucoin, false, true));
        k.passphrase = Some(passphrase.into());
        k.sub_account = Some(SUB.into());
        k.note = "made by hand".into();
        k
    }

    async fn health(
        op: &mut credbroker::api::pb::credential_broker_client::CredentialBrokerClient<
            tonic::transport::Channel,
        >,
        tenant: &str,
    ) -> pb::CredentialHealth {
        op.get_credential_health(pb::GetCredentialHealthRequest {
            tenant_id: tenant.into(),
            exchange: "kucoin".into(),
        })
        .await
        .unwrap()
        .into_inner()
    }

    fn validator(sims: &Simulators) -> ExchangeValidator {
        ExchangeValidator::new(
            &endpoints(sims),
            WithdrawPolicy::default(),
            Arc::new(SystemClock),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_master_key_mints_lists_and_deletes_kucoin_sub_account_keys() {
        let ex = ExchangeId::Kucoin;
        let sims = Simulators::start().await.unwrap();
        sims.add_key(ex, MASTER.0, master_key());
        let v = validator(&sims);
        let note = "cb0123456789ABCDEFGHabcd";
        assert!(credbroker::rotation::mint::is_minted_note(note));

        let minted = v
            .mint(
                ex,
                &master(),
                &MintSpec {
                    sub_account: SUB.into(),
                    ..spec(note)
                },
            )
            .await
            .unwrap();
        assert_eq!(minted.api_key.len(), 24, "KuCoin keys are 24 hex digits");
        let pass = minted
            .passphrase
            .as_ref()
            .expect("the passphrase the broker chose");
        assert_eq!(secrecy::ExposeSecret::expose_secret(pass).len(), 32);
        let perms = v
            .validate(TenantId::new(uuid::Uuid::new_v4()), ex, &minted)
            .await
            .unwrap();
        assert!(
            perms.trade && !perms.withdraw && perms.ip_restricted,
            "{perms:?}"
        );

        let listed = v.list(ex, &master(), SUB).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                listed[0].api_key.as_str(),
                listed[0].note.as_str(),
                listed[0].trade
            ),
            (minted.api_key.as_str(), note, true)
        );
        assert_eq!(listed[0].ips, ["10.0.0.1"]);

        // A key it minted is deleted without being handed its passphrase
        // (a lost mint's key): it is derived from the master secret again.
        assert!(
            v.delete(ex, &master(), SUB, &minted.api_key, None)
                .await
                .unwrap()
        );
        assert!(v.list(ex, &master(), SUB).await.unwrap().is_empty());
        assert!(
            !v.delete(ex, &master(), SUB, &minted.api_key, None)
                .await
                .unwrap()
        );

        // A key made by hand: only with its own passphrase.
        sims.add_key(
            ex,
            "kcHandKey0000000000001",
            by_hand("kc-hand-secret", "kc-hand-pass"),
        );
        let e = v
            .delete(ex, &master(), SUB, "kcHandKey0000000000001", None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ValidationError::InvalidField { reason, .. } if reason.contains("web UI")),
            "{e:?}"
        );
        let wrong = SecretString::from("not-its-pass".to_owned());
        let e = v
            .delete(ex, &master(), SUB, "kcHandKey0000000000001", Some(&wrong))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ValidationError::Rejected { code: Some(c), .. } if c == "400100"),
            "{e:?}"
        );
        let right = SecretString::from("kc-hand-pass".to_owned());
        assert!(
            v.delete(ex, &master(), SUB, "kcHandKey0000000000001", Some(&right))
                .await
                .unwrap()
        );

        // Not the master account's key: KuCoin's 400007, said plainly.
        sims.add_key(
            ex,
            "kcOtherKey000000000001",
            by_hand("kc-other-secret", "kc-other-pass"),
        );
        let other = CredentialSet {
            passphrase: Some(SecretString::from("kc-other-pass".to_owned())),
            ..set("kcOtherKey000000000001", "kc-other-secret")
        };
        let e = v.list(ex, &other, SUB).await.unwrap_err();
        assert!(
            matches!(&e, ValidationError::Rejected { code: Some(c), reason, .. } if c == "400007" && reason.contains("master account")),
            "{e:?}"
        );
    }

    /// End to end over gRPC: the hand-made key is replaced by a minted one
    /// and deleted at KuCoin with the passphrase Vault holds for it, even
    /// when the retire job destroyed the replaced version first (the set
    /// kept for the deletion is what it comes from); the next rotation
    /// deletes the minted key the same way.
    #[tokio::test]
    async fn operators_rotate_kucoin_keys_at_the_exchange() {
        let ex = ExchangeId::Kucoin;
        let (sims, env, tenant) = fleet(
            ex,
            (MASTER.0, master_key()),
            (
                "kcOldKey00000000000001",
                by_hand("kc-old-secret", "kc-old-pass"),
            ),
            pb::CredentialSet {
                api_key: "kcOldKey00000000000001".into(),
                api_secret: "kc-old-secret".into(),
                passphrase: Some("kc-old-pass".into()),
            },
            crate::support::EnvOptions::default(),
        )
        .await;
        let mut op = env.operator().await;
        op.set_management_key(pb::SetManagementKeyRequest {
            tenant_id: tenant.clone(),
            exchange: "kucoin".into(),
            credentials: Some(pb::CredentialSet {
                api_key: MASTER.0.into(),
                api_secret: MASTER.1.into(),
                passphrase: Some(MASTER.2.into()),
            }),
            sub_account: SUB.into(),
            rotate_every_days: 0,
            overlap_seconds: None,
        })
        .await
        .unwrap();
        let v = validator(&sims);
        let mut replaced = "kcOldKey00000000000001".to_owned();
        for round in 1..=2 {
            let r = op
                .rotate(pb::RotateRequest {
                    tenant_id: tenant.clone(),
                    exchange: "kucoin".into(),
                    credentials: None,
                    // Round 2 removes the master key before the overlap ends.
                    overlap_seconds: Some(if round == 2 { 3 } else { 1 }),
                    mint: true,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.key_rotation.unwrap().step, "waiting", "round {round}");
            if round == 1 {
                // The retire job ends the overlap before the delete step
                // runs: the replaced version is destroyed in Vault.
                let broker = &env.running.as_ref().unwrap().broker;
                let t = TenantId::new(tenant.parse().unwrap());
                broker
                    .secrets()
                    .destroy_versions(&broker.vault_path(t, ex), &[1])
                    .await
                    .unwrap();
            }
            if round == 2 {
                // The master key is gone at the exchange: the deletion
                // fails, and GetCredentialHealth shows the rotation stuck
                // with its error, until the key is back.
                sims.remove_key(ex, MASTER.0);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                let stuck = loop {
                    let k = health(&mut op, &tenant)
                        .await
                        .key_rotation
                        .expect("an unfinished rotation shows");
                    if k.attempts > 0 {
                        break k;
                    }
                    assert!(std::time::Instant::now() < deadline, "never failed: {k:?}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                };
                assert_eq!(stuck.step, "deleting", "{stuck:?}");
                assert!(stuck.last_error.contains("400003"), "{stuck:?}");
                assert!(!stuck.overdue, "within 5 minutes of the overlap's end");
                sims.add_key(ex, MASTER.0, master_key());
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let live = loop {
                let keys = v.list(ex, &master(), SUB).await.unwrap();
                if keys.len() == 1 && keys[0].api_key != replaced {
                    break keys[0].clone();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the replaced key is still live: {keys:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            };
            // The one live key is the one the broker serves, with the
            // passphrase it was minted with.
            let served = op
                .get_credentials(pb::GetCredentialsRequest {
                    tenant_id: tenant.clone(),
                    exchange: "kucoin".into(),
                    min_version: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let current = served.current.unwrap();
            assert_eq!(current.api_key, live.api_key);
            assert!(
                credbroker::rotation::mint::is_minted_note(&live.note),
                "{}",
                live.note
            );
            let set = CredentialSet {
                passphrase: current.passphrase.map(SecretString::from),
                ..set(&current.api_key, &current.api_secret)
            };
            v.validate(TenantId::new(uuid::Uuid::new_v4()), ex, &set)
                .await
                .unwrap();
            // Done: nothing unfinished shows.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while let Some(k) = health(&mut op, &tenant).await.key_rotation {
                assert!(std::time::Instant::now() < deadline, "still shown: {k:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            replaced = live.api_key;
        }
    }
}

/// With `[rotation] delete_on_adoption`, the old key is deleted at the
/// exchange as soon as every subscriber adopted the new version, long
/// before the overlap's end (which ends then too); a subscriber that has
/// not acknowledged the new version keeps the old key live until the
/// overlap ends.
#[tokio::test]
async fn the_old_key_goes_once_every_subscriber_adopted_the_new_one() {
    use credbroker::{
        api::pb, client::CredentialHandle, config::RotationConfig,
        exchange::sim::native_permissions,
    };
    use std::time::{Duration, Instant};

    let ex = ExchangeId::Bybit;
    let (master_key, master_secret) = ("bybitMasterKey0007", "bybitMasterSecret000000000000000000");
    let (sims, env, tenant) = bybit_fleet_with(
        master_key,
        ("bybitOldKeyAdopt01", "bybitOldSecretAdopt0000000000000000"),
        native_permissions(ex, false, true),
        crate::support::EnvOptions {
            rotation: RotationConfig {
                delete_on_adoption: true,
                ..RotationConfig::default()
            },
            ..crate::support::EnvOptions::default()
        },
    )
    .await;
    let mut op = env.operator().await;
    op.set_management_key(pb::SetManagementKeyRequest {
        tenant_id: tenant.clone(),
        exchange: "bybit".into(),
        credentials: Some(crate::support::set(master_key, master_secret)),
        sub_account: SUB.into(),
        rotate_every_days: 0,
        overlap_seconds: None,
    })
    .await
    .unwrap();
    // One pod, on the Rust handle: it acknowledges what it holds.
    let mut cfg = crate::clients::client_config(&env, vec![env.endpoint()], &tenant);
    cfg.exchanges = vec![ex];
    let pod = CredentialHandle::start(cfg);
    let viewer = op.clone();
    let adopted = |version: u64| {
        let mut op = viewer.clone();
        let tenant = tenant.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let meta = crate::support::describe(&mut op, &tenant, "bybit").await;
                if meta.adoption.iter().any(|a| a.version >= version) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "version {version} never acknowledged"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    adopted(1).await;
    let master = set(master_key, master_secret);
    let v = ExchangeValidator::new(
        &endpoints(&sims),
        WithdrawPolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let rotate = |overlap: u32| pb::RotateRequest {
        tenant_id: tenant.clone(),
        exchange: "bybit".into(),
        credentials: None,
        overlap_seconds: Some(overlap),
        mint: true,
    };
    let live_keys = || async { v.list(ex, &master, SUB).await.unwrap() };

    // An hour's overlap: the pod adopts version 2, and the old key goes in
    // seconds; the overlap ended with it (the pod dropped the previous set).
    let r = op.rotate(rotate(3600)).await.unwrap().into_inner();
    assert_eq!(r.key_rotation.unwrap().step, "waiting");
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_keys()
        .await
        .iter()
        .any(|k| k.api_key == "bybitOldKeyAdopt01")
    {
        assert!(
            Instant::now() < deadline,
            "the old key outlived the fleet's adoption"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pod
        .get(ex)
        .is_none_or(|c| c.version != 2 || c.previous.is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the pod still holds the previous set"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The overlap's end kept the replaced set for the health checks; the
    // rotation deleted that key at the exchange, so its copy goes too.
    let kept = env.broker().replaced_path(tenant.parse().unwrap(), ex);
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .broker()
        .secrets()
        .versions(&kept)
        .await
        .unwrap()
        .iter()
        .any(|v| !v.destroyed)
    {
        assert!(
            Instant::now() < deadline,
            "the deleted key's copy is still kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A second subscriber that acknowledged version 2 and then went
    // silent: the next rotation's old key waits for the overlap's end.
    let mut silent = env
        .client_for(&format!(
            "spiffe://{}/tenant/{tenant}/pod/silent",
            crate::support::TD
        ))
        .await;
    silent
        .acknowledge_version(pb::AcknowledgeVersionRequest {
            tenant_id: tenant.clone(),
            exchange: "bybit".into(),
            version: 2,
            instance: "silent".into(),
        })
        .await
        .unwrap();
    let replaced = pod.get(ex).unwrap().current.api_key.clone();
    let started = Instant::now();
    op.rotate(rotate(6)).await.unwrap();
    adopted(3).await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    assert!(
        live_keys().await.iter().any(|k| k.api_key == replaced),
        "deleted before the silent subscriber adopted it or the overlap ended"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_keys().await.iter().any(|k| k.api_key == replaced) {
        assert!(
            Instant::now() < deadline,
            "the old key outlived the overlap"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "not before the overlap's end"
    );
    pod.stop();
}
