//! Zero-touch rotation: the broker mints the next key at the exchange with
//! the tenant's management key, rotates the fleet onto it, and deletes the
//! old key there when the overlap ends.
//!
//! The rotation is a state machine kept in the [`KeyRotationStore`]
//! (PostgreSQL in production), one step per transition, each step
//! idempotent, so a replica that dies mid-rotation leaves a row another
//! replica finishes (each rotation is worked under its own lease):
//!
//! ```text
//! minting ──▶ rotating ──▶ waiting ──(overlap ends)──▶ deleting ──▶ done
//!    │ (refused: nothing changed for the pods)
//!    ▼
//!  failed
//! ```
//!
//! - **minting**: the new key is created in the management key's
//!   sub-account with the old key's trading permission and IP list (never
//!   withdrawal or transfers) and a note naming the rotation; its set goes
//!   to Vault (`…/minted`) before the step is recorded. A mint whose answer
//!   was lost is found again by listing the sub-account's keys by note:
//!   when its set reached Vault it is used, otherwise (its secret is
//!   unrecoverable) it is deleted before minting again, so no key is left
//!   live behind the rotation.
//! - **rotating**: `Broker::rotate` with the minted set (validated at the
//!   exchange like any key; a retried Rotate converges on the same
//!   version), then the overlap's end is recorded.
//! - **waiting** until the overlap ends; **deleting** deletes the old key
//!   at the exchange (listed first: deleting twice is a no-op) and clears
//!   the minted set from Vault.
//!
//! A failed step is retried with backoff and its error recorded (safe to
//! show); minting gives up after `max_mint_attempts` (`failed`: the pods
//! never saw a change, and the next rotation may start), while a rotation
//! past minting keeps retrying: two live keys beyond the overlap are an
//! alert (`stuck()`), never a silent state.

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::AuditRecord;
use crate::broker::{
    Broker,
    context::RequestContext,
    error::{BrokerError, MetadataStoreError, SecretStoreError, ValidationError},
    ports::{FleetStore, Notice},
    types::{CredentialRecord, CredentialSet, ExchangeId, TenantId},
};

/// What a minted key may do: copied from the key it replaces, never more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintSpec {
    /// The sub-account (Bybit: its UID) the key belongs to.
    pub sub_account: String,
    /// The note the key carries at the exchange (how a lost mint is found).
    pub note: String,
    /// Trading allowed (false: read only).
    pub trade: bool,
    /// The IP allow-list (empty: none).
    pub ips: Vec<String>,
}

/// A sub-account key as the exchange lists it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedKey {
    /// The API key.
    pub api_key: String,
    /// Its note.
    pub note: String,
    /// Whether it may trade.
    pub trade: bool,
    /// Its IP allow-list (empty: none).
    pub ips: Vec<String>,
}

/// An exchange's key-management API, driven with a master account's key.
#[async_trait]
pub trait KeyManager: Send + Sync + 'static {
    /// Creates a key as `spec` says and returns its set.
    ///
    /// # Errors
    /// `Rejected` when the exchange refuses, `Unavailable` without an
    /// answer (the key may then exist: find it by its note).
    async fn mint(
        &self,
        exchange: ExchangeId,
        master: &CredentialSet,
        spec: &MintSpec,
    ) -> Result<CredentialSet, ValidationError>;

    /// The sub-account's keys.
    ///
    /// # Errors
    /// As [`KeyManager::mint`].
    async fn list(
        &self,
        exchange: ExchangeId,
        master: &CredentialSet,
        sub_account: &str,
    ) -> Result<Vec<ManagedKey>, ValidationError>;

    /// Deletes a key; false when the exchange no longer lists it.
    /// `passphrase` is the key's own, when the broker still holds its set
    /// and the exchange asks for it ([`KeyManager::deletes_with_passphrase`]).
    ///
    /// # Errors
    /// As [`KeyManager::mint`].
    async fn delete(
        &self,
        exchange: ExchangeId,
        master: &CredentialSet,
        sub_account: &str,
        api_key: &str,
        passphrase: Option<&SecretString>,
    ) -> Result<bool, ValidationError>;

    /// Whether deleting a key of `exchange` takes that key's passphrase
    /// (KuCoin's does).
    fn deletes_with_passphrase(&self, _exchange: ExchangeId) -> bool {
        false
    }
}

/// Whether `note` is one the broker gives the keys it mints
/// ([`KeyRotation::note`]): `cb` and 22 letters and digits.
pub fn is_minted_note(note: &str) -> bool {
    note.len() == 24 && note.starts_with("cb") && note.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// How long past the overlap's end an old key may stay live at the
/// exchange before its rotation counts as overdue.
pub const OVERDUE_AFTER: time::Duration = time::Duration::minutes(5);

/// Where a rotation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Creating the new key at the exchange.
    Minting,
    /// Storing and announcing it (the pods swap).
    Rotating,
    /// Until the overlap ends.
    Waiting,
    /// Deleting the old key at the exchange.
    Deleting,
    /// Finished: one live key.
    Done,
    /// Gave up before anything changed for the pods.
    Failed,
}

impl Step {
    /// Its name in the store and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Minting => "minting",
            Step::Rotating => "rotating",
            Step::Waiting => "waiting",
            Step::Deleting => "deleting",
            Step::Done => "done",
            Step::Failed => "failed",
        }
    }

    /// Parses [`Step::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Step::Minting,
            Step::Rotating,
            Step::Waiting,
            Step::Deleting,
            Step::Done,
            Step::Failed,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    /// Whether the rotation is over.
    pub fn finished(self) -> bool {
        matches!(self, Step::Done | Step::Failed)
    }
}

/// One rotation at the exchange, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRotation {
    /// Its id (also in the minted key's note).
    pub id: Uuid,
    /// Owner.
    pub tenant: TenantId,
    /// Exchange.
    pub exchange: ExchangeId,
    /// The management key's sub-account.
    pub sub_account: String,
    /// Where it is.
    pub step: Step,
    /// The key being replaced.
    pub old_api_key: String,
    /// The minted key, once minted.
    pub minted_api_key: Option<String>,
    /// The version the minted key became.
    pub new_version: Option<u64>,
    /// The overlap asked for.
    pub overlap_secs: u32,
    /// When the old key is deleted (set by the rotating step).
    pub delete_after: Option<OffsetDateTime>,
    /// Failed attempts of the current step.
    pub attempts: u32,
    /// When to try again.
    pub next_attempt_at: OffsetDateTime,
    /// The last failure (safe to show; never a secret).
    pub last_error: Option<String>,
    /// Created.
    pub created_at: OffsetDateTime,
}

impl KeyRotation {
    /// A rotation of `old_api_key` that starts minting now.
    fn new(
        tenant: TenantId,
        exchange: ExchangeId,
        sub_account: String,
        old_api_key: String,
        overlap_secs: u32,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            tenant,
            exchange,
            sub_account,
            step: Step::Minting,
            old_api_key,
            minted_api_key: None,
            new_version: None,
            overlap_secs,
            delete_after: None,
            attempts: 0,
            next_attempt_at: now,
            last_error: None,
            created_at: now,
        }
    }

    /// Whether its old key is still live at the exchange more than
    /// [`OVERDUE_AFTER`] past the overlap's end: two live keys, to alert on.
    pub fn overdue(&self, now: OffsetDateTime) -> bool {
        !self.step.finished() && self.delete_after.is_some_and(|t| now - t > OVERDUE_AFTER)
    }

    /// When the job should look at it next: the retry time, or in the
    /// waiting step the overlap's end.
    pub fn due_at(&self) -> OffsetDateTime {
        match (self.step, self.delete_after) {
            (Step::Waiting, Some(t)) => t.max(self.next_attempt_at),
            _ => self.next_attempt_at,
        }
    }

    /// The note the minted key carries at the exchange: `cb` and the
    /// rotation's id in base 62, 24 letters and digits, which every
    /// exchange's label takes (KuCoin's remark: at most 24 characters).
    pub fn note(&self) -> String {
        const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut n = self.id.as_u128();
        let mut out = [b'0'; 22];
        for d in out.iter_mut().rev() {
            *d = DIGITS[(n % 62) as usize];
            n /= 62;
        }
        format!("cb{}", String::from_utf8_lossy(&out))
    }

    /// Whether a key listed with `note` is this rotation's mint (also under
    /// the note of releases before the base-62 one).
    fn minted_as(&self, note: &str) -> bool {
        note == self.note() || note == format!("credbroker-{}", self.id.simple())
    }
}

/// The key a manual Rotate replaces, with the sub-account whose management
/// key can delete it ([`KeyRotator::key_to_retire`]).
#[derive(Clone, Debug)]
pub struct Retiring {
    sub_account: String,
    old_api_key: String,
}

/// When the job rotates a credential at the exchange by itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RotationSchedule {
    /// Every this many days (0: only when asked).
    pub every_days: u32,
    /// The overlap of those rotations, in seconds.
    pub overlap_secs: u32,
}

/// A management key with a schedule, and when its credential's last
/// rotation at the exchange started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// Owner.
    pub tenant: TenantId,
    /// Exchange.
    pub exchange: ExchangeId,
    /// Its schedule.
    pub schedule: RotationSchedule,
    /// When the last rotation started (else when the key was stored).
    pub since: OffsetDateTime,
    /// Whether that last rotation failed.
    pub last_failed: bool,
}

impl Scheduled {
    /// Whether a rotation is due at `now`: the schedule's period after the
    /// last one, or a day after a failed one.
    pub fn due(&self, now: OffsetDateTime) -> bool {
        let wait = if self.last_failed {
            time::Duration::days(1)
        } else {
            time::Duration::days(i64::from(self.schedule.every_days))
        };
        self.schedule.every_days > 0 && self.since + wait <= now
    }
}

/// Where rotations at the exchange and the management keys' sub-accounts
/// are kept.
#[async_trait]
pub trait KeyRotationStore: Send + Sync + 'static {
    /// The sub-account the tenant's management key for `exchange` manages.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn management(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<String>, MetadataStoreError>;

    /// Records the management key's sub-account (its secret is in Vault).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn set_management(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        sub_account: &str,
        api_key_hint: &str,
        schedule: RotationSchedule,
    ) -> Result<(), MetadataStoreError>;

    /// Management keys with a schedule whose credential has no unfinished
    /// rotation.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn scheduled(&self) -> Result<Vec<Scheduled>, MetadataStoreError>;

    /// Stores a new rotation, unless one for the same credential is not
    /// finished: that one is returned instead.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn begin(
        &self,
        rotation: &KeyRotation,
    ) -> Result<Option<KeyRotation>, MetadataStoreError>;

    /// Saves a rotation's progress, and queues `notice` for the tenant's
    /// webhook (if it has one) in the same transaction.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn save(
        &self,
        rotation: &KeyRotation,
        notice: Option<&Notice>,
    ) -> Result<(), MetadataStoreError>;

    /// One rotation.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn get(&self, id: Uuid) -> Result<Option<KeyRotation>, MetadataStoreError>;

    /// The unfinished rotation of a credential, if any.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn active(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<KeyRotation>, MetadataStoreError>;

    /// Every unfinished rotation (a handful: at most one per credential
    /// being rotated).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn unfinished(&self) -> Result<Vec<KeyRotation>, MetadataStoreError>;

    /// Unfinished rotations due at `now` (next attempt or overlap end
    /// reached), oldest first.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRotation>, MetadataStoreError>;
}

/// What the rotator reports as it works (metrics; alerts).
pub trait KeyRotationObserver: Send + Sync + 'static {
    /// One step attempted: `ok` or failed (the error is in `r.last_error`).
    fn step(&self, r: &KeyRotation, step: Step, ok: bool);
    /// After each round of the job: every unfinished rotation.
    fn round(&self, unfinished: &[KeyRotation], now: OffsetDateTime);
}

/// Reports nothing.
pub struct Unobserved;

impl KeyRotationObserver for Unobserved {
    fn step(&self, _: &KeyRotation, _: Step, _: bool) {}
    fn round(&self, _: &[KeyRotation], _: OffsetDateTime) {}
}

/// Settings of the rotator.
#[derive(Clone, Debug)]
pub struct MintSettings {
    /// How long one replica owns a rotation it works on.
    pub lease: time::Duration,
    /// Attempts at minting before the rotation is given up.
    pub max_mint_attempts: u32,
    /// First wait after a failed attempt; it doubles per attempt.
    pub retry_min: time::Duration,
    /// Longest wait between attempts.
    pub retry_max: time::Duration,
    /// End the overlap once every recent subscriber adopted the new version
    /// (`[rotation] delete_on_adoption`).
    pub end_on_adoption: bool,
}

/// A subscriber that acknowledged a version of the credential within this
/// long counts as part of the fleet that must adopt the new one.
pub const ADOPTION_WINDOW: time::Duration = time::Duration::days(1);

impl Default for MintSettings {
    fn default() -> Self {
        Self {
            lease: time::Duration::seconds(60),
            max_mint_attempts: 5,
            retry_min: time::Duration::seconds(5),
            retry_max: time::Duration::minutes(10),
            end_on_adoption: false,
        }
    }
}

/// Drives rotations at the exchange (see the module docs).
pub struct KeyRotator {
    broker: Arc<Broker>,
    keys: Arc<dyn KeyManager>,
    store: Arc<dyn KeyRotationStore>,
    leases: Arc<dyn FleetStore>,
    holder: Uuid,
    settings: MintSettings,
    observer: Arc<dyn KeyRotationObserver>,
}

/// A step's failure: a message safe to show.
struct StepError(String);

impl From<BrokerError> for StepError {
    fn from(e: BrokerError) -> Self {
        StepError(e.to_string())
    }
}
impl From<ValidationError> for StepError {
    fn from(e: ValidationError) -> Self {
        StepError(e.to_string())
    }
}
impl From<SecretStoreError> for StepError {
    fn from(e: SecretStoreError) -> Self {
        StepError(BrokerError::from(e).to_string())
    }
}
impl From<MetadataStoreError> for StepError {
    fn from(e: MetadataStoreError) -> Self {
        StepError(BrokerError::from(e).to_string())
    }
}

const JOB: &str = "key-rotation";

/// Failures in a row of a step past minting after which the tenant's
/// webhook hears that its old key stays live (`credential.rotation_stuck`).
const STUCK_AFTER: u32 = 3;

/// A webhook about rotation `r` (Standard Webhooks shape; no secret: the
/// tenant, exchange, rotation, step, attempts and the safe error).
fn rotation_notice(event_type: &'static str, r: &KeyRotation, at: OffsetDateTime) -> Notice {
    let payload = serde_json::json!({
        "type": event_type,
        "timestamp": at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "data": {
            "tenant_id": r.tenant.to_string(),
            "exchange": r.exchange.as_str(),
            "rotation_id": r.id.to_string(),
            "step": r.step.as_str(),
            "attempts": r.attempts,
            "reason": r.last_error,
        },
    });
    Notice {
        id: Uuid::now_v7(),
        event_type,
        payload: payload.to_string(),
        at,
    }
}

impl KeyRotator {
    /// A rotator acting as `holder` (one per replica).
    pub fn new(
        broker: Arc<Broker>,
        keys: Arc<dyn KeyManager>,
        store: Arc<dyn KeyRotationStore>,
        leases: Arc<dyn FleetStore>,
        holder: Uuid,
        settings: MintSettings,
    ) -> Self {
        Self {
            broker,
            keys,
            store,
            leases,
            holder,
            settings,
            observer: Arc::new(Unobserved),
        }
    }

    /// Reports steps and rounds to `observer`.
    #[must_use]
    pub fn observed_by(mut self, observer: Arc<dyn KeyRotationObserver>) -> Self {
        self.observer = observer;
        self
    }

    fn path(&self, tenant: TenantId, exchange: ExchangeId, leaf: &str) -> String {
        format!(
            "{}/{tenant}/exchanges/{exchange}/{leaf}",
            self.broker.vault_path_prefix()
        )
    }

    /// Vault path of the tenant's management key for `exchange`.
    pub fn management_path(&self, tenant: TenantId, exchange: ExchangeId) -> String {
        self.path(tenant, exchange, "management")
    }

    fn minted_path(&self, tenant: TenantId, exchange: ExchangeId) -> String {
        self.path(tenant, exchange, "minted")
    }

    /// Vault path of the replaced key's set, kept from the rotation's swap
    /// until the key is deleted at the exchange, where deleting it takes its
    /// passphrase (the retire job destroys the credential's previous version
    /// when the overlap ends, maybe before the delete step runs).
    fn retiring_path(&self, tenant: TenantId, exchange: ExchangeId) -> String {
        self.path(tenant, exchange, "retiring")
    }

    /// The set of the key being replaced, from the versions of the
    /// credential Vault still holds (newest first); None once they are
    /// destroyed.
    async fn held_set(&self, r: &KeyRotation) -> Result<Option<CredentialSet>, BrokerError> {
        let secrets = self.broker.secrets();
        let path = self.broker.vault_path(r.tenant, r.exchange);
        let mut versions = secrets.versions(&path).await?;
        versions.retain(|v| !v.destroyed);
        versions.sort_by_key(|v| std::cmp::Reverse(v.version));
        for v in versions {
            match secrets.read(&path, v.version).await {
                Ok(set) if set.api_key == r.old_api_key => return Ok(Some(set)),
                Ok(_) | Err(SecretStoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Keeps the replaced key's set at [`Self::retiring_path`] where the
    /// exchange deletes a key only with its passphrase.
    async fn keep_retiring_set(&self, r: &KeyRotation) -> Result<(), BrokerError> {
        if !self.keys.deletes_with_passphrase(r.exchange) {
            return Ok(());
        }
        if let Some(set) = self.held_set(r).await? {
            self.broker
                .write_latest(&self.retiring_path(r.tenant, r.exchange), &set)
                .await?;
        }
        Ok(())
    }

    /// The passphrase of the key being replaced: from the set kept for it,
    /// else from the credential's versions.
    async fn retiring_passphrase(
        &self,
        r: &KeyRotation,
    ) -> Result<Option<SecretString>, BrokerError> {
        let kept = self
            .read_latest(&self.retiring_path(r.tenant, r.exchange))
            .await?
            .filter(|s| s.api_key == r.old_api_key);
        Ok(match kept {
            Some(set) => set.passphrase,
            None => self.held_set(r).await?.and_then(|s| s.passphrase),
        })
    }

    async fn read_latest(&self, path: &str) -> Result<Option<CredentialSet>, BrokerError> {
        let secrets = self.broker.secrets();
        match secrets.latest_version(path).await? {
            Some(v) => match secrets.read(path, v).await {
                Ok(set) => Ok(Some(set)),
                Err(SecretStoreError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
            None => Ok(None),
        }
    }

    /// Stores the tenant's management key for `exchange` after proving at
    /// the exchange that it can list `sub_account`'s keys. It is kept in
    /// Vault under its own path and used by this job only: never served.
    ///
    /// # Errors
    /// `Validation` when the exchange refuses it; store errors.
    pub async fn set_management_key(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        sub_account: &str,
        master: &CredentialSet,
        schedule: RotationSchedule,
    ) -> Result<(), BrokerError> {
        if sub_account.is_empty() {
            return Err(BrokerError::InvalidArgument {
                field: "sub_account",
                reason: "name the sub-account whose keys this key manages".into(),
            });
        }
        self.keys.list(exchange, master, sub_account).await?;
        let path = self.management_path(tenant, exchange);
        let version = self.broker.write_latest(&path, master).await?;
        self.store
            .set_management(tenant, exchange, sub_account, &master.key_hint(), schedule)
            .await?;
        self.broker.audit_system(&AuditRecord::system(
            JOB,
            "SetManagementKey",
            tenant,
            exchange,
            vec![version],
        ));
        Ok(())
    }

    /// Starts a rotation at the exchange and drives it as far as it goes
    /// now (through the fleet's swap; the old key is deleted when the
    /// overlap ends).
    ///
    /// # Errors
    /// `FailedPrecondition` without a management key or while another
    /// rotation of this credential is unfinished; `NotFound` without a
    /// credential.
    pub async fn start(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        overlap_secs: u32,
    ) -> Result<KeyRotation, BrokerError> {
        let Some(sub_account) = self.store.management(tenant, exchange).await? else {
            return Err(BrokerError::FailedPrecondition(format!(
                "tenant {tenant} has no management key for {exchange}: store one first (SetManagementKey)"
            )));
        };
        let (_, old_api_key) =
            self.current_key(tenant, exchange)
                .await?
                .ok_or_else(|| BrokerError::NotFound {
                    tenant: tenant.to_string(),
                    exchange: exchange.as_str(),
                })?;
        let rotation = KeyRotation::new(
            tenant,
            exchange,
            sub_account,
            old_api_key,
            overlap_secs,
            self.broker.clock().now(),
        );
        if let Some(active) = self.store.begin(&rotation).await? {
            return Err(BrokerError::FailedPrecondition(format!(
                "a rotation of {exchange} at the exchange is unfinished (step {}, {} failed attempts{}): it must finish first",
                active.step.as_str(),
                active.attempts,
                active
                    .last_error
                    .as_deref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )));
        }
        self.drive(rotation.id).await
    }

    /// Before a manual Rotate: the key it replaces, when the tenant has a
    /// management key for `exchange` (so the replaced key can be deleted
    /// at the exchange once the overlap ends).
    ///
    /// # Errors
    /// Store errors.
    pub async fn key_to_retire(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<Retiring>, BrokerError> {
        let Some(sub_account) = self.store.management(tenant, exchange).await? else {
            return Ok(None);
        };
        Ok(self
            .current_key(tenant, exchange)
            .await?
            .map(|(_, old_api_key)| Retiring {
                sub_account,
                old_api_key,
            }))
    }

    /// The credential's record and the API key it serves as current.
    async fn current_key(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<(CredentialRecord, String)>, BrokerError> {
        let Some(record) = self.broker.metadata().get(tenant, exchange).await? else {
            return Ok(None);
        };
        let current = self
            .broker
            .secrets()
            .read(&record.vault_path, record.current_version)
            .await?;
        Ok(Some((record, current.api_key)))
    }

    /// After a manual Rotate that replaced `retiring` with `new_api_key`
    /// (`rotated`: the record it committed): the old key is deleted at the
    /// exchange when the overlap ends, as a minted rotation's is (a
    /// rotation that starts at its waiting step). Returns None when nothing
    /// is to be deleted or another rotation of the credential is unfinished
    /// (then the old key stays: logged).
    ///
    /// # Errors
    /// Store errors.
    pub async fn retire_after_overlap(
        &self,
        retiring: Retiring,
        rotated: &CredentialRecord,
        new_api_key: &str,
    ) -> Result<Option<KeyRotation>, BrokerError> {
        if new_api_key == retiring.old_api_key {
            return Ok(None);
        }
        let (tenant, exchange) = (rotated.tenant, rotated.exchange);
        let now = self.broker.clock().now();
        let delete_after = rotated.previous_valid_until.unwrap_or(now).max(now);
        let rotation = KeyRotation {
            step: Step::Waiting,
            new_version: Some(rotated.current_version),
            delete_after: Some(delete_after),
            ..KeyRotation::new(
                tenant,
                exchange,
                retiring.sub_account,
                retiring.old_api_key,
                u32::try_from((delete_after - now).whole_seconds()).unwrap_or(0),
                now,
            )
        };
        if let Some(active) = self.store.begin(&rotation).await? {
            tracing::warn!(%tenant, %exchange, step = active.step.as_str(), "a rotation at the exchange is unfinished: the key this Rotate replaced is not deleted at the exchange automatically; delete it there");
            return Ok(None);
        }
        // The replaced key is the previous version now, until the overlap
        // ends; where deleting it takes its passphrase, keep its set.
        if let Err(e) = self.keep_retiring_set(&rotation).await {
            tracing::warn!(%tenant, %exchange, "the replaced key's set could not be kept for its deletion (it is looked up again then): {e}");
        }
        Ok(Some(rotation))
    }

    /// Whether a waiting rotation's fleet adopted its new version early:
    /// with `end_on_adoption`, every subscriber that acknowledged a version
    /// within [`ADOPTION_WINDOW`] has acknowledged the new one (and there is
    /// at least one).
    async fn adopted(&self, r: &KeyRotation, now: OffsetDateTime) -> Result<bool, BrokerError> {
        let (true, Some(new)) = (self.settings.end_on_adoption, r.new_version) else {
            return Ok(false);
        };
        let fleet: Vec<_> = self
            .broker
            .metadata()
            .adoption(r.tenant, r.exchange)
            .await?
            .into_iter()
            .filter(|a| now - a.acked_at <= ADOPTION_WINDOW)
            .collect();
        Ok(!fleet.is_empty() && fleet.iter().all(|a| a.version >= new))
    }

    /// Ends the credential's overlap now (the retire job's pass runs at
    /// once: PREVIOUS_EXPIRED, the version no longer served), if the
    /// rotation's new version is still the current one.
    async fn end_overlap_now(
        &self,
        r: &mut KeyRotation,
        now: OffsetDateTime,
    ) -> Result<(), StepError> {
        let record = self.broker.metadata().get(r.tenant, r.exchange).await?;
        if let Some(rec) = record.filter(|rec| Some(rec.current_version) == r.new_version)
            && let Some(previous) = rec.previous_version
        {
            self.broker
                .metadata()
                .end_overlap_at(r.tenant, r.exchange, previous, now)
                .await?;
            crate::rotation::retire::retire_once(&self.broker).await?;
            tracing::info!(tenant = %r.tenant, exchange = %r.exchange, "every subscriber adopted the new version: the overlap ended early");
        }
        r.delete_after = Some(now);
        Ok(())
    }

    /// The credential's unfinished rotation at the exchange, if any (what
    /// GetCredentialHealth shows: a stuck one with its attempts and error).
    ///
    /// # Errors
    /// Store errors.
    pub async fn unfinished_of(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<KeyRotation>, BrokerError> {
        Ok(self.store.active(tenant, exchange).await?)
    }

    /// Works on one rotation under its lease until it waits (overlap, a
    /// retry) or finishes; returns it as stored.
    ///
    /// # Errors
    /// Store errors (a step's own failure is recorded, not returned).
    pub async fn drive(&self, id: Uuid) -> Result<KeyRotation, BrokerError> {
        loop {
            let Some(mut r) = self.store.get(id).await? else {
                return Err(BrokerError::FailedPrecondition(format!("no rotation {id}")));
            };
            let now = self.broker.clock().now();
            let waiting = r.step == Step::Waiting
                && r.delete_after.is_some_and(|t| now < t)
                && !self.adopted(&r, now).await?;
            if r.step.finished() || waiting || r.next_attempt_at > now {
                return Ok(r);
            }
            let lease = format!("key-rotation:{id}");
            if !self
                .leases
                .take_lease(&lease, self.holder, now, self.settings.lease)
                .await?
            {
                return Ok(r); // another replica works on it
            }
            let step = r.step;
            match self.step(&mut r, now).await {
                Ok(()) => {
                    r.attempts = 0;
                    r.last_error = None;
                    self.observer.step(&r, step, true);
                }
                Err(StepError(msg)) => {
                    r.attempts += 1;
                    tracing::warn!(tenant = %r.tenant, exchange = %r.exchange, step = r.step.as_str(), attempts = r.attempts, "a rotation at the exchange failed a step: {msg}");
                    r.last_error = Some(msg);
                    let notice;
                    if r.step == Step::Minting && r.attempts >= self.settings.max_mint_attempts {
                        r.step = Step::Failed;
                        notice = Some(rotation_notice("credential.rotation_failed", &r, now));
                    } else {
                        // Past minting the old key stays live until this
                        // succeeds: the tenant hears of it once, at the
                        // third failure in a row.
                        notice = (r.step != Step::Minting && r.attempts == STUCK_AFTER)
                            .then(|| rotation_notice("credential.rotation_stuck", &r, now));
                        let doublings = r.attempts.saturating_sub(1).min(20);
                        let wait = self.settings.retry_min
                            * 2_f64.powi(i32::try_from(doublings).unwrap_or(20));
                        r.next_attempt_at = now + wait.min(self.settings.retry_max);
                    }
                    self.store.save(&r, notice.as_ref()).await?;
                    self.observer.step(&r, step, false);
                    return Ok(r);
                }
            }
            self.store.save(&r, None).await?;
        }
    }

    /// An action at the exchange on the record, Vault's way: its request
    /// record before it (no record, no action), its outcome after.
    async fn at_exchange<T>(
        &self,
        r: &KeyRotation,
        action: &'static str,
        act: impl std::future::Future<Output = Result<T, ValidationError>>,
    ) -> Result<T, StepError> {
        let record = || AuditRecord::system(JOB, action, r.tenant, r.exchange, vec![]);
        self.broker.audit_before(record())?;
        let out = act.await?;
        self.broker.audit_system(&record());
        Ok(out)
    }

    async fn master(&self, r: &KeyRotation) -> Result<CredentialSet, StepError> {
        self.read_latest(&self.management_path(r.tenant, r.exchange))
            .await?
            .ok_or_else(|| {
                StepError("the management key is gone from Vault: store it again".into())
            })
    }

    /// One step; on success `r` holds the next one.
    async fn step(&self, r: &mut KeyRotation, now: OffsetDateTime) -> Result<(), StepError> {
        match r.step {
            Step::Minting => self.mint(r).await,
            Step::Rotating => {
                let set = self
                    .read_latest(&self.minted_path(r.tenant, r.exchange))
                    .await?
                    .filter(|s| Some(&s.api_key) == r.minted_api_key.as_ref())
                    .ok_or_else(|| StepError("the minted key is gone from Vault".into()))?;
                self.keep_retiring_set(r).await?;
                let ctx = RequestContext::system(JOB);
                let overlap = time::Duration::seconds(i64::from(r.overlap_secs));
                let out = self
                    .broker
                    .rotate(&ctx, r.tenant, r.exchange, set, Some(overlap))
                    .await?;
                r.new_version = Some(out.record.current_version);
                r.delete_after = Some(now + overlap);
                r.step = Step::Waiting;
                Ok(())
            }
            Step::Waiting => {
                if r.delete_after.is_some_and(|t| now < t) {
                    // Every subscriber adopted the new version: the
                    // overlap ends now, before the key is deleted.
                    self.end_overlap_now(r, now).await?;
                }
                r.step = Step::Deleting;
                Ok(())
            }
            Step::Deleting => {
                let master = self.master(r).await?;
                let passphrase = if self.keys.deletes_with_passphrase(r.exchange) {
                    self.retiring_passphrase(r).await?
                } else {
                    None
                };
                let deleted = self
                    .at_exchange(
                        r,
                        "DeleteKeyAtExchange",
                        self.keys.delete(
                            r.exchange,
                            &master,
                            &r.sub_account,
                            &r.old_api_key,
                            passphrase.as_ref(),
                        ),
                    )
                    .await?;
                tracing::info!(tenant = %r.tenant, exchange = %r.exchange, deleted, "the replaced key is deleted at the exchange");
                for leaf in [
                    self.minted_path(r.tenant, r.exchange),
                    self.retiring_path(r.tenant, r.exchange),
                ] {
                    self.broker.secrets().purge(&leaf).await?;
                }
                // Deleted here: no health check needs to ask about it.
                self.broker
                    .forget_replaced(r.tenant, r.exchange, &r.old_api_key)
                    .await?;
                r.step = Step::Done;
                Ok(())
            }
            Step::Done | Step::Failed => Ok(()),
        }
    }

    async fn mint(&self, r: &mut KeyRotation) -> Result<(), StepError> {
        let master = self.master(r).await?;
        let listed = self.keys.list(r.exchange, &master, &r.sub_account).await?;
        let note = r.note();
        let minted_path = self.minted_path(r.tenant, r.exchange);
        // A mint whose answer was lost: its key is listed under our note.
        let stored = self.read_latest(&minted_path).await?;
        for k in listed.iter().filter(|k| r.minted_as(&k.note)) {
            if stored.as_ref().is_some_and(|s| s.api_key == k.api_key) {
                r.minted_api_key = Some(k.api_key.clone());
                r.step = Step::Rotating;
                return Ok(()); // its set reached Vault: use it
            }
            // Its secret is lost with the answer: it must not stay live.
            self.at_exchange(
                r,
                "DeleteKeyAtExchange",
                // Its passphrase, where the exchange asks for it, is the
                // one the adapter chose for our note.
                self.keys
                    .delete(r.exchange, &master, &r.sub_account, &k.api_key, None),
            )
            .await?;
        }
        let Some(old) = listed.iter().find(|k| k.api_key == r.old_api_key) else {
            return Err(StepError(format!(
                "the current key is not a key of sub-account {}: the management key cannot replace it",
                r.sub_account
            )));
        };
        let spec = MintSpec {
            sub_account: r.sub_account.clone(),
            note,
            trade: old.trade,
            ips: old.ips.clone(),
        };
        let set = self
            .at_exchange(
                r,
                "MintKeyAtExchange",
                self.keys.mint(r.exchange, &master, &spec),
            )
            .await?;
        self.broker.write_latest(&minted_path, &set).await?;
        r.minted_api_key = Some(set.api_key.clone());
        r.step = Step::Rotating;
        Ok(())
    }

    /// Works on every due rotation once; returns how many it looked at.
    ///
    /// # Errors
    /// Store errors.
    pub async fn run_due(&self) -> Result<usize, BrokerError> {
        self.start_scheduled(self.broker.clock().now()).await?;
        let due = self.store.due(self.broker.clock().now(), 32).await?;
        for r in &due {
            self.drive(r.id).await?;
        }
        if self.settings.end_on_adoption {
            // Waiting rotations are not due before the overlap's end; each
            // is looked at for its fleet's adoption.
            for r in self.store.unfinished().await? {
                if r.step == Step::Waiting {
                    self.drive(r.id).await?;
                }
            }
        }
        let unfinished = self.store.unfinished().await?;
        self.observer.round(&unfinished, self.broker.clock().now());
        Ok(due.len())
    }

    /// Starts the scheduled rotations due at `now`; returns those started.
    /// A start that fails (the exchange refuses, another replica started
    /// it first) is logged and left for the next round.
    ///
    /// # Errors
    /// Store errors.
    pub async fn start_scheduled(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<KeyRotation>, BrokerError> {
        let mut started = Vec::new();
        for s in self.store.scheduled().await? {
            if !s.due(now) {
                continue;
            }
            match self
                .start(s.tenant, s.exchange, s.schedule.overlap_secs)
                .await
            {
                Ok(r) => {
                    tracing::info!(tenant = %s.tenant, exchange = %s.exchange, step = r.step.as_str(), "a scheduled rotation at the exchange started");
                    started.push(r);
                }
                Err(e) => {
                    tracing::warn!(tenant = %s.tenant, exchange = %s.exchange, "a scheduled rotation at the exchange could not start: {e}")
                }
            }
        }
        Ok(started)
    }

    /// Runs [`Self::run_due`] every `every` until cancelled.
    pub async fn task_main(
        self: Arc<Self>,
        every: std::time::Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            if let Err(e) = self.run_due().await {
                tracing::warn!("the key-rotation job could not run: {e}");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
