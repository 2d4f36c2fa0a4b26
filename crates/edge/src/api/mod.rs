//! The gRPC face of the broker: the only code that sees protobuf types and
//! builds `Status`. Each handler parses its request, checks the caller may
//! touch the tenant, calls the broker, and converts the answer.

pub mod convert;
pub mod pb;
pub mod status;

use std::{
    collections::{BTreeMap, BTreeSet},
    pin::Pin,
    sync::Arc,
};

use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::audit::layer::CallAudit;

use crate::auth::{self, Action, Caller, Role};

use crate::broker::Broker;

use crate::broker::context::{Actor, RequestContext};

use crate::broker::types::{EventKind, ExchangeId, TenantId};

use crate::limits::Limits;

use crate::rotation::mint::{KeyRotation, KeyRotator, RotationSchedule};

use crate::rotation::watch::{
    StreamLimits, StreamSlots, StreamTiming, Subscription, Watch, WatchItem,
};
use pb::credential_broker_server::CredentialBroker;

/// The `credbroker.v1.CredentialBroker` service.
pub struct BrokerService {
    broker: Arc<Broker>,
    /// Rotations at the exchange, where key management is configured.
    keys: Option<Arc<KeyRotator>>,
    timing: StreamTiming,
    slots: Arc<StreamSlots>,
    gate: Gate,
    shutdown: CancellationToken,
}

/// What every call passes before its handler does anything: authorization,
/// the tenant's allowed networks, the tenant's rate limit.
pub struct Gate {
    /// False until this replica hears every committed event (its event
    /// listener connected): calls are refused with UNAVAILABLE until then.
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// Rate limits.
    pub limits: Arc<Limits>,
    /// Networks each tenant's callers must come from (operators exempt).
    pub networks: BTreeMap<TenantId, Vec<ipnet::IpNet>>,
}

impl BrokerService {
    /// Serves `broker`; streams follow `timing`, are admitted within
    /// `streams`, and end with a resumable status when `shutdown` fires.
    pub fn new(
        broker: Arc<Broker>,
        timing: StreamTiming,
        streams: StreamLimits,
        gate: Gate,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            broker,
            keys: None,
            timing,
            slots: StreamSlots::new(streams),
            gate,
            shutdown,
        }
    }

    /// Serves rotations at the exchange (Rotate with mint, SetManagementKey).
    #[must_use]
    pub fn with_key_rotator(mut self, keys: Arc<KeyRotator>) -> Self {
        self.keys = Some(keys);
        self
    }

    fn key_rotator(&self) -> Result<&Arc<KeyRotator>, Status> {
        self.keys.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this broker does not manage keys at the exchange (it needs validation against the exchanges): send the new key in credentials",
            )
        })
    }

    /// Rotate with mint: the rotator mints, swaps the fleet and (after the
    /// overlap) deletes the old key at the exchange.
    async fn rotate_at_exchange(
        &self,
        adm: &Admitted,
        tenant: TenantId,
        exchange: ExchangeId,
        credentials: Option<pb::CredentialSet>,
        overlap_seconds: Option<u32>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        if credentials.is_some() {
            return Err(Status::invalid_argument(
                "credentials: leave them out with mint = true (the broker creates the new key at the exchange)",
            ));
        }
        let keys = self.key_rotator()?;
        let overlap = overlap_seconds.unwrap_or_else(|| {
            u32::try_from(self.broker.default_overlap().whole_seconds()).unwrap_or(u32::MAX)
        });
        let r = keys
            .start(tenant, exchange, overlap)
            .await
            .map_err(status::broker)?;
        let record = self
            .broker
            .metadata()
            .get(tenant, exchange)
            .await
            .map_err(|e| status::broker(e.into()))?;
        if let Some(rec) = &record {
            adm.touched_rotation(rec);
        }
        Ok(Response::new(pb::RotateResponse {
            credential: record.as_ref().map(convert::metadata),
            rotated: r.new_version.is_some(),
            key_rotation: Some(key_rotation_status(&r, self.broker.clock().now())),
        }))
    }

    /// This replica's WatchRotations slots (the open-streams gauge).
    pub fn stream_slots(&self) -> Arc<StreamSlots> {
        self.slots.clone()
    }

    /// Admission of one call, in one place and one order: the audit note
    /// learns what is asked, then the caller the auth layer attached passes
    /// [`auth::authorize`] (a denied caller reads and spends nothing), the
    /// tenant's networks, the tenant's rate limit. Copies no string: the
    /// caller's text is shared, and the request context the broker carries
    /// into its commits is built only by the handlers that write.
    fn admit<T>(
        &self,
        req: &Request<T>,
        tenant: TenantId,
        exchange: Option<ExchangeId>,
        action: Action,
    ) -> Result<Admitted, Status> {
        if !*self.gate.ready.borrow() {
            return Err(status::starting());
        }
        let audit = req.extensions().get::<CallAudit>().cloned();
        if let Some(a) = &audit {
            a.note(|n| {
                n.tenant = Some(tenant);
                n.exchange = exchange;
            });
        }
        let caller = req
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| status::auth(auth::AuthError::NoCertificate))?;
        auth::authorize(caller, tenant, action).map_err(status::auth)?;
        let peer = req
            .extensions()
            .get::<crate::tls::acceptor::PeerInfo>()
            .and_then(|p| p.remote)
            .map(|a| a.ip());
        if caller.role != Role::Operator
            && let Some(nets) = self.gate.networks.get(&tenant)
            && !peer.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
        {
            return Err(status::auth(auth::AuthError::PermissionDenied(format!(
                "tenant {tenant} accepts calls only from its configured networks; this call came from {}",
                peer.map_or_else(|| "an unknown address".to_owned(), |ip| ip.to_string())
            ))));
        }
        self.gate
            .limits
            .check(caller, tenant, action)
            .map_err(status::limited)?;
        // Vault's rule: a call that can change state is on record before it
        // has any effect, or it does not run.
        if action.changes_state()
            && let Some(a) = &audit
        {
            a.record_request()
                .map_err(|e| status::audit_unavailable(&e))?;
        }
        // Inside the call's span: with debug logs on, each admitted call
        // leaves one line carrying its request and trace ids.
        tracing::debug!(%tenant, action = action.name(), subject = %caller.subject, "call admitted");
        Ok(Admitted {
            caller: caller.clone(),
            peer,
            audit,
        })
    }
}

/// How long a stream waits for a set to send before sending its message
/// without it (the client then fetches it).
const PUSH_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The set a stream sends with a message about `exchange` at `version`
/// (WatchRotations with `include_credentials`): read like GetCredentials
/// (cache, one shared load per key), its read recorded before it leaves.
/// None when it cannot be read in time or recorded: the message goes
/// without it, and the client fetches.
async fn pushed_set(
    broker: &Broker,
    deliveries: Option<&crate::audit::layer::Deliveries>,
    tenant: TenantId,
    exchange: ExchangeId,
    version: u64,
) -> Option<pb::GetCredentialsResponse> {
    let view = match tokio::time::timeout(
        PUSH_READ_TIMEOUT,
        broker.get_credentials(tenant, exchange, version),
    )
    .await
    {
        Ok(Ok(view)) => view,
        Ok(Err(e)) => {
            tracing::debug!(%tenant, %exchange, version, "set not sent on the stream: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!(%tenant, %exchange, version, "set not sent on the stream: no answer in time");
            return None;
        }
    };
    if let Some(d) = deliveries {
        d.record(exchange, convert::served_versions(&view))
            .await
            .ok()?;
    }
    Some(convert::credentials(&view))
}

/// An admitted call.
struct Admitted {
    caller: Caller,
    peer: Option<std::net::IpAddr>,
    audit: Option<CallAudit>,
}

impl Admitted {
    /// Who acted, on which request: what a write carries into its commit.
    fn ctx(&self) -> RequestContext {
        let c = &self.caller;
        RequestContext {
            actor: Actor {
                subject: c.subject.to_string(),
                role: c.role.as_str().into(),
                tenant: c.tenant,
                spiffe_id: Some(c.spiffe_id.to_string()),
            },
            request_id: self
                .audit
                .as_ref()
                .map_or_else(uuid::Uuid::now_v7, CallAudit::request_id),
            peer: self.peer,
            user_agent: self
                .audit
                .as_ref()
                .and_then(|a| a.user_agent().map(str::to_owned)),
            trace_id: self
                .audit
                .as_ref()
                .and_then(|a| a.trace_id().map(str::to_owned)),
        }
    }

    /// Tells the audit record which versions (and which masked key) the
    /// call touched.
    fn touched(&self, versions: Vec<u64>, key_hint: Option<String>) {
        if let Some(a) = &self.audit {
            a.note(|n| {
                n.versions = versions;
                n.key_hint = key_hint;
            });
        }
    }

    /// [`Self::touched`] for a rotation that left `record`: its current
    /// version, the previous one it keeps, and the new key's mask.
    fn touched_rotation(&self, record: &crate::broker::types::CredentialRecord) {
        self.touched(
            std::iter::once(record.current_version)
                .chain(record.previous_version)
                .collect(),
            Some(record.api_key_hint.clone()),
        );
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRotationsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CredentialBroker for BrokerService {
    type WatchRotationsStream = WatchStream;

    async fn get_credentials(
        &self,
        req: Request<pb::GetCredentialsRequest>,
    ) -> Result<Response<pb::GetCredentialsResponse>, Status> {
        let pb::GetCredentialsRequest {
            tenant_id,
            exchange,
            min_version,
        } = req.get_ref();
        let (tenant, exchange) = convert::target(tenant_id, exchange)?;
        let adm = self.admit(&req, tenant, Some(exchange), Action::GetCredentials)?;
        let view = self
            .broker
            .get_credentials(tenant, exchange, *min_version)
            .await
            .map_err(status::broker)?;
        adm.touched(convert::served_versions(&view), None);
        Ok(Response::new(convert::credentials(&view)))
    }

    async fn validate_and_store(
        &self,
        req: Request<pb::ValidateAndStoreRequest>,
    ) -> Result<Response<pb::ValidateAndStoreResponse>, Status> {
        let (tenant, exchange) =
            convert::target(&req.get_ref().tenant_id, &req.get_ref().exchange)?;
        let adm = self.admit(&req, tenant, Some(exchange), Action::ValidateAndStore)?;
        let pb::ValidateAndStoreRequest {
            tenant_id: _,
            exchange: _,
            credentials,
        } = req.into_inner();
        let set = convert::credential_set(credentials)?;
        let record = self
            .broker
            .validate_and_store(&adm.ctx(), tenant, exchange, set)
            .await
            .map_err(status::broker)?;
        adm.touched(
            vec![record.current_version],
            Some(record.api_key_hint.clone()),
        );
        Ok(Response::new(pb::ValidateAndStoreResponse {
            credential: Some(convert::metadata(&record)),
        }))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let (tenant, exchange) =
            convert::target(&req.get_ref().tenant_id, &req.get_ref().exchange)?;
        let adm = self.admit(&req, tenant, Some(exchange), Action::Rotate)?;
        let pb::RotateRequest {
            tenant_id: _,
            exchange: _,
            credentials,
            overlap_seconds,
            mint,
        } = req.into_inner();
        if mint {
            return self
                .rotate_at_exchange(&adm, tenant, exchange, credentials, overlap_seconds)
                .await;
        }
        let set = convert::credential_set(credentials)?;
        let overlap = overlap_seconds.map(|s| time::Duration::seconds(i64::from(s)));
        // With a management key, the replaced key is deleted at the
        // exchange when the overlap ends, as after a minted rotation.
        let retiring = match &self.keys {
            Some(k) => k
                .key_to_retire(tenant, exchange)
                .await
                .map_err(status::broker)?,
            None => None,
        };
        let new_api_key = retiring.as_ref().map(|_| set.api_key.clone());
        let out = self
            .broker
            .rotate(&adm.ctx(), tenant, exchange, set, overlap)
            .await
            .map_err(status::broker)?;
        let mut key_rotation = None;
        if let (Some(k), Some(old), Some(new_api_key)) = (&self.keys, retiring, new_api_key)
            && out.rotated
        {
            match k.retire_after_overlap(old, &out.record, &new_api_key).await {
                Ok(r) => {
                    let now = self.broker.clock().now();
                    key_rotation = r.as_ref().map(|r| key_rotation_status(r, now));
                }
                Err(e) => {
                    tracing::warn!(%tenant, %exchange, "the replaced key will not be deleted at the exchange automatically: {e}")
                }
            }
        }
        adm.touched_rotation(&out.record);
        Ok(Response::new(pb::RotateResponse {
            credential: Some(convert::metadata(&out.record)),
            rotated: out.rotated,
            key_rotation,
        }))
    }

    async fn watch_rotations(
        &self,
        req: Request<pb::WatchRotationsRequest>,
    ) -> Result<Response<Self::WatchRotationsStream>, Status> {
        let pb::WatchRotationsRequest {
            tenant_id,
            exchanges,
            after_seq,
            include_credentials,
        } = req.get_ref();
        let tenant = convert::tenant(tenant_id)?;
        let adm = self.admit(&req, tenant, None, Action::WatchRotations)?;
        // Sets on the stream are reads: the caller must be one who may read.
        let deliveries = if *include_credentials {
            auth::authorize(&adm.caller, tenant, Action::GetCredentials).map_err(|e| {
                status::auth(auth::AuthError::PermissionDenied(format!(
                    "include_credentials sends the credential sets themselves, which this caller may not read ({e}); watch without it"
                )))
            })?;
            Some(adm.audit.as_ref().map(CallAudit::deliveries))
        } else {
            None
        };
        let caller = adm.caller;
        let exchanges = exchanges
            .iter()
            .map(|e| convert::exchange_id("exchanges", e))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let after_seq = *after_seq;
        let sub = Subscription {
            tenant,
            exchanges,
            after_seq,
        };
        // Operators' streams (tools, dashboards) do not take the tenant's
        // stream slots (the tenant's pods keep all of them), only the
        // replica's.
        let slot = self
            .slots
            .acquire((caller.role != Role::Operator).then_some(tenant))
            .map_err(status::streams_full)?;
        let watch = Watch::new(
            self.broker.clone(),
            sub,
            self.timing,
            self.shutdown.clone(),
            Some(slot),
        );
        let to_pb = |item| {
            use pb::watch_rotations_response::Message;
            let message = match item {
                WatchItem::State(r) => Message::State(convert::metadata(&r)),
                WatchItem::Event(e) => Message::Event(convert::event(&e)),
                WatchItem::Heartbeat { seq, head } => Message::Heartbeat(pb::Heartbeat {
                    seq,
                    head_seq: head,
                    sent_at: Some(convert::ts(time::OffsetDateTime::now_utc())),
                }),
                WatchItem::End(e) => return Err(status::broker(*e)),
            };
            Ok(pb::WatchRotationsResponse {
                message: Some(message),
                credentials: None,
            })
        };
        let Some(deliveries) = deliveries else {
            return Ok(Response::new(Box::pin(watch.into_stream().map(to_pb))));
        };
        let broker = self.broker.clone();
        let stream = watch.into_stream().then(move |item| {
            let wanted = match &item {
                // A resuming client has seen every change up to its
                // `after_seq`, so it holds the set already (or fetches it).
                WatchItem::State(r) if after_seq == 0 || r.event_seq > after_seq => {
                    Some((r.exchange, r.current_version))
                }
                WatchItem::Event(e) if matches!(e.kind, EventKind::Stored | EventKind::Rotated) => {
                    Some((e.exchange, e.version))
                }
                _ => None,
            };
            // Heartbeats and other messages carry nothing: no clones.
            let push = wanted.map(|w| (w, broker.clone(), deliveries.clone()));
            async move {
                let mut msg = to_pb(item)?;
                if let Some(((exchange, version), broker, deliveries)) = push {
                    msg.credentials =
                        pushed_set(&broker, deliveries.as_ref(), tenant, exchange, version).await;
                }
                Ok(msg)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_credentials(
        &self,
        req: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let pb::ListCredentialsRequest { tenant_id } = req.get_ref();
        let tenant = convert::tenant(tenant_id)?;
        self.admit(&req, tenant, None, Action::ListCredentials)?;
        let records = self.broker.list(tenant).await.map_err(status::broker)?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: records.iter().map(convert::metadata).collect(),
        }))
    }

    async fn describe_credential(
        &self,
        req: Request<pb::DescribeCredentialRequest>,
    ) -> Result<Response<pb::CredentialMetadata>, Status> {
        let pb::DescribeCredentialRequest {
            tenant_id,
            exchange,
        } = req.get_ref();
        let (tenant, exchange) = convert::target(tenant_id, exchange)?;
        self.admit(&req, tenant, Some(exchange), Action::DescribeCredential)?;
        let (record, adoption) = self
            .broker
            .describe_with_adoption(tenant, exchange)
            .await
            .map_err(status::broker)?;
        let mut meta = convert::metadata(&record);
        meta.adoption = convert::adoption(&record, &adoption);
        Ok(Response::new(meta))
    }

    async fn acknowledge_version(
        &self,
        req: Request<pb::AcknowledgeVersionRequest>,
    ) -> Result<Response<pb::AcknowledgeVersionResponse>, Status> {
        let pb::AcknowledgeVersionRequest {
            tenant_id,
            exchange,
            version,
            instance,
        } = req.get_ref();
        let (tenant, exchange) = convert::target(tenant_id, exchange)?;
        let adm = self.admit(&req, tenant, Some(exchange), Action::AcknowledgeVersion)?;
        if *version == 0 {
            return Err(status::bad_field(
                "version",
                "must be a stored version (1 or more)",
            ));
        }
        if instance.len() > 128 || instance.chars().any(|c| c.is_control() || c == '#') {
            return Err(status::bad_field(
                "instance",
                "at most 128 printable characters, no '#'",
            ));
        }
        let subscriber = if instance.is_empty() {
            adm.caller.spiffe_id.to_string()
        } else {
            format!("{}#{instance}", adm.caller.spiffe_id)
        };
        adm.touched(vec![*version], None);
        self.broker
            .acknowledge(&adm.ctx(), tenant, exchange, &subscriber, *version)
            .await
            .map_err(status::broker)?;
        Ok(Response::new(pb::AcknowledgeVersionResponse {}))
    }

    async fn delete_credentials(
        &self,
        req: Request<pb::DeleteCredentialsRequest>,
    ) -> Result<Response<pb::DeleteCredentialsResponse>, Status> {
        let pb::DeleteCredentialsRequest {
            tenant_id,
            exchange,
        } = req.get_ref();
        let (tenant, exchange) = convert::target(tenant_id, exchange)?;
        let adm = self.admit(&req, tenant, Some(exchange), Action::DeleteCredentials)?;
        let deleted = self
            .broker
            .delete(&adm.ctx(), tenant, exchange)
            .await
            .map_err(status::broker)?;
        Ok(Response::new(pb::DeleteCredentialsResponse { deleted }))
    }

    async fn validate_credentials(
        &self,
        req: Request<pb::ValidateCredentialsRequest>,
    ) -> Result<Response<pb::ValidateCredentialsResponse>, Status> {
        let pb::ValidateCredentialsRequest {
            tenant_id,
            exchange,
        } = req.get_ref();
        let (tenant, exchange) = convert::target(tenant_id, exchange)?;
        let adm = self.admit(&req, tenant, Some(exchange), Action::ValidateCredentials)?;
        let record = self
            .broker
            .revalidate(&adm.ctx(), tenant, exchange)
            .await
            .map_err(status::broker)?;
        adm.touched(vec![record.current_version], None);
        Ok(Response::new(pb::ValidateCredentialsResponse {
            health: Some(convert::health(&record)),
        }))
    }

    async fn get_credential_health(
        &self,
        req: Request<pb::GetCredentialHealthRequest>,
    ) -> Result<Response<pb::CredentialHealth>, Status> {
        let pb::GetCredentialHealthRequest {
            tenant_id,
            exchange,
        } = req.get_ref();
        let (tenant, exchange) = convert::target(tenant_id, exchange)?;
        self.admit(&req, tenant, Some(exchange), Action::GetCredentialHealth)?;
        let record = self
            .broker
            .describe(tenant, exchange)
            .await
            .map_err(status::broker)?;
        let mut health = convert::health(&record);
        if let Some(keys) = &self.keys {
            let now = self.broker.clock().now();
            health.key_rotation = keys
                .unfinished_of(tenant, exchange)
                .await
                .map_err(status::broker)?
                .map(|r| key_rotation_status(&r, now));
        }
        Ok(Response::new(health))
    }

    async fn set_webhook(
        &self,
        req: Request<pb::SetWebhookRequest>,
    ) -> Result<Response<pb::SetWebhookResponse>, Status> {
        let pb::SetWebhookRequest {
            tenant_id,
            url,
            secret,
        } = req.get_ref();
        let tenant = convert::tenant(tenant_id)?;
        let adm = self.admit(&req, tenant, None, Action::SetWebhook)?;
        let secret = (!secret.is_empty()).then(|| secrecy::SecretString::from(secret.clone()));
        let (shown, generated) = self
            .broker
            .set_webhook(&adm.ctx(), tenant, url, secret)
            .await
            .map_err(status::broker)?;
        Ok(Response::new(pb::SetWebhookResponse {
            url: shown,
            secret: generated
                .map(|s| secrecy::ExposeSecret::expose_secret(&s).to_owned())
                .unwrap_or_default(),
        }))
    }

    async fn set_management_key(
        &self,
        req: Request<pb::SetManagementKeyRequest>,
    ) -> Result<Response<pb::SetManagementKeyResponse>, Status> {
        let (tenant, exchange) =
            convert::target(&req.get_ref().tenant_id, &req.get_ref().exchange)?;
        let adm = self.admit(&req, tenant, Some(exchange), Action::SetManagementKey)?;
        let pb::SetManagementKeyRequest {
            credentials,
            sub_account,
            rotate_every_days,
            overlap_seconds,
            ..
        } = req.into_inner();
        if rotate_every_days > 3650 {
            return Err(Status::invalid_argument(
                "rotate_every_days: at most 3650 (0: only when asked)",
            ));
        }
        let overlap = overlap_seconds.map_or(self.broker.default_overlap(), |s| {
            time::Duration::seconds(i64::from(s))
        });
        if overlap > self.broker.max_overlap() {
            return Err(Status::invalid_argument(format!(
                "overlap_seconds: at most {} (the broker's rotation.max_overlap_secs)",
                self.broker.max_overlap().whole_seconds()
            )));
        }
        let schedule = RotationSchedule {
            every_days: rotate_every_days,
            overlap_secs: u32::try_from(overlap.whole_seconds()).unwrap_or(u32::MAX),
        };
        let set = convert::credential_set(credentials)?;
        let hint = set.key_hint();
        self.key_rotator()?
            .set_management_key(tenant, exchange, sub_account.trim(), &set, schedule)
            .await
            .map_err(status::broker)?;
        adm.touched(Vec::new(), Some(hint.clone()));
        Ok(Response::new(pb::SetManagementKeyResponse {
            api_key_hint: hint,
            sub_account: sub_account.trim().to_owned(),
            rotate_every_days,
        }))
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let pb::ListAuditEventsRequest {
            tenant_id,
            page_size,
            page_token,
            since,
        } = req.get_ref();
        let tenant = convert::tenant(tenant_id)?;
        self.admit(&req, tenant, None, Action::ListAuditEvents)?;
        let limit = match *page_size {
            0 => 100,
            n => n.min(1000),
        };
        let before = convert::audit_page_token(page_token)?;
        let since = since.as_ref().map(convert::from_ts).transpose()?;
        let rows = self
            .broker
            .audit_page(tenant, before, since, limit)
            .await
            .map_err(status::broker)?;
        let next_page_token = if rows.len() == limit as usize {
            rows.last()
                .map(convert::audit_page_token_of)
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: rows.iter().filter_map(convert::audit_event).collect(),
            next_page_token,
        }))
    }
}

/// A rotation at the exchange as the contract shows it.
fn key_rotation_status(r: &KeyRotation, now: time::OffsetDateTime) -> pb::KeyRotationStatus {
    pb::KeyRotationStatus {
        overdue: r.overdue(now),
        id: r.id.to_string(),
        step: r.step.as_str().to_owned(),
        attempts: r.attempts,
        last_error: r.last_error.clone().unwrap_or_default(),
        delete_after: r.delete_after.map(convert::ts),
        minted_api_key_hint: r
            .minted_api_key
            .as_deref()
            .map(crate::broker::types::key_hint)
            .unwrap_or_default(),
        new_version: r.new_version.unwrap_or(0),
    }
}
