//! The tower layer that records every broker call. It puts an
//! [`AuditNote`] in the request's extensions (the auth layer writes who
//! called, the handler what was touched), lets the call run, then appends
//! one record with the outcome, before the response leaves. Every response
//! carries `x-request-id`.
//!
//! Vault's rule, for calls that can change state
//! ([`Action::changes_state`](crate::auth::model::Action::changes_state)): a
//! *request* record is written once the call is admitted and before it has
//! any effect (`CallAudit::record_request`, from `Gate::admit`); if it
//! cannot be, nothing runs and the caller hears so. The call then runs in a
//! task of its own, so a deadline, a client's cancel or a dropped
//! connection cannot drop it halfway or lose its *outcome* record (the true
//! one: what the broker did, whatever the caller saw); the tasks are
//! tracked and waited for at shutdown. Should the outcome record fail after
//! an effect, the caller still gets the true answer (the request record
//! already shows the call) and the outcome is kept for the spool's recovery
//! probe to write. A read whose record cannot be written is answered
//! UNAVAILABLE instead, its answer withheld (fail closed, as Vault's audit
//! devices do).

use std::{
    borrow::Cow,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Instant,
};

use futures::{FutureExt as _, future::BoxFuture};
use time::OffsetDateTime;
use tonic::{Code, codegen::http};
use tower::{Layer, Service};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{AuditError, AuditRecord, AuditSink};
use crate::broker::types::{ExchangeId, TenantId};
use crate::telemetry::traces::{CallIds, fast_v7};

/// Yields while another append writes before waiting on the spool's lock
/// (each a yield to the worker's other tasks; a group's write holds the
/// lock for a few µs).
const MAX_TRIES: u32 = 64;

/// What the inner layers learned about the call.
#[derive(Clone, Debug, Default)]
pub struct AuditNote {
    /// Who called (subject) and in which role.
    pub user: Option<(Arc<str>, &'static str)>,
    /// Tenant named.
    pub tenant: Option<TenantId>,
    /// Exchange named.
    pub exchange: Option<ExchangeId>,
    /// Versions involved.
    pub versions: Vec<u64>,
    /// Masked key written.
    pub key_hint: Option<String>,
}

/// The note of one call, shared by the layers and the handler (cloning it
/// bumps a reference count).
#[derive(Clone, Debug)]
pub struct CallAudit(Arc<Call>);

struct Call {
    request_id: Uuid,
    trace_id: Option<String>,
    user_agent: Option<String>,
    note: Mutex<AuditNote>,
    sink: Arc<dyn AuditSink>,
    peer: Option<std::net::IpAddr>,
    action: Cow<'static, str>,
    timestamp: OffsetDateTime,
    started: Instant,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("request_id", &self.request_id)
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

impl CallAudit {
    /// Request id (returned as `x-request-id`).
    pub fn request_id(&self) -> Uuid {
        self.0.request_id
    }

    /// W3C trace id from `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        self.0.trace_id.as_deref()
    }

    /// Client user agent.
    pub fn user_agent(&self) -> Option<&str> {
        self.0.user_agent.as_deref()
    }

    /// Updates the note.
    pub fn note(&self, f: impl FnOnce(&mut AuditNote)) {
        f(&mut self.0.note.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn take_note(&self) -> AuditNote {
        std::mem::take(&mut *self.0.note.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The call's outcome record from `note`, answered `code` (its id is the
    /// request id).
    fn record(&self, note: AuditNote, code: Code) -> AuditRecord {
        let c = &self.0;
        let (user, role) = note.user.map_or_else(
            || ("unauthenticated".to_owned(), "none"),
            |(user, role)| (user.to_string(), role),
        );
        let action = c.action.clone();
        AuditRecord {
            id: c.request_id,
            timestamp: c.timestamp,
            event_type: Cow::Borrowed(event_type(code, &action)),
            user,
            role: Cow::Borrowed(role),
            resource: note.exchange.map_or_else(
                || {
                    Cow::Borrowed(if action == "ListAuditEvents" {
                        "audit_log"
                    } else {
                        "tenant_credentials"
                    })
                },
                |e| Cow::Borrowed(e.audit_resource()),
            ),
            action,
            result: Cow::Borrowed(result(code)),
            ip_address: c.peer.map(|ip| ip.to_string()),
            user_agent: c.user_agent.clone(),
            tenant_id: note.tenant,
            exchange: note.exchange,
            versions: note.versions,
            request_id: c.request_id,
            trace_id: c.trace_id.clone(),
            grpc_code: Cow::Borrowed(crate::api::status::code_name(code)),
            duration_ms: c.started.elapsed().as_secs_f64() * 1e3,
            key_hint: note.key_hint,
            count: None,
        }
    }

    /// Writes the request record of an admitted call that can change state,
    /// before it has any effect: who, what, on which tenant and exchange.
    ///
    /// # Errors
    /// When it cannot be written: the call must not run.
    pub fn record_request(&self) -> Result<(), AuditError> {
        let note = self
            .0
            .note
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.0
            .sink
            .append(&self.record_of_its_own(note).into_request())
    }

    /// A record from `note` with an id and a time of its own, besides the
    /// call's outcome record; the request id links them.
    fn record_of_its_own(&self, note: AuditNote) -> AuditRecord {
        AuditRecord {
            id: fast_v7(),
            timestamp: OffsetDateTime::now_utc(),
            ..self.record(note, Code::Ok)
        }
    }

    /// The recorder of the credential sets this call's stream sends
    /// (WatchRotations with `include_credentials`), taken while the call's
    /// note still names the caller (the note is consumed when the call
    /// answers, and a stream outlives its answer's headers).
    pub fn deliveries(&self) -> Deliveries {
        let note = self.0.note.lock().unwrap_or_else(PoisonError::into_inner);
        Deliveries {
            call: self.clone(),
            user: note.user.clone(),
            tenant: note.tenant,
        }
    }
}

/// Records each credential set a stream sends: a read like GetCredentials's
/// (secret_access), one record per set, its own id, the stream's request id.
#[derive(Clone, Debug)]
pub struct Deliveries {
    call: CallAudit,
    user: Option<(Arc<str>, &'static str)>,
    tenant: Option<TenantId>,
}

impl Deliveries {
    /// Writes the record of `exchange`'s set (`versions`: current, then
    /// previous) before it is sent.
    ///
    /// # Errors
    /// When it cannot be written: the set must not be sent.
    pub async fn record(&self, exchange: ExchangeId, versions: Vec<u64>) -> Result<(), AuditError> {
        let note = AuditNote {
            user: self.user.clone(),
            tenant: self.tenant,
            exchange: Some(exchange),
            versions,
            key_hint: None,
        };
        let record = AuditRecord {
            event_type: Cow::Borrowed("secret_access"),
            duration_ms: 0.0,
            ..self.call.record_of_its_own(note)
        };
        append_grouped(&self.call.0.sink, &record).await.inspect_err(|e| {
            tracing::warn!(request_id = %record.request_id, "a credential set was not sent on a stream: its read could not be recorded: {e}");
            // Kept for the spool's recovery probe to write, as a withheld
            // read's record is.
            self.call.0.sink.defer(withheld(record.clone()));
        })
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct AuditLayer {
    sink: Arc<dyn AuditSink>,
    refusals: Arc<super::refusals::Refusals>,
    calls: tokio_util::task::TaskTracker,
}

impl AuditLayer {
    /// Records into `sink`, rate-limited calls tallied in `refusals`;
    /// state-changing calls run as tasks of `calls` (wait for it at
    /// shutdown).
    pub fn new(
        sink: Arc<dyn AuditSink>,
        refusals: Arc<super::refusals::Refusals>,
        calls: tokio_util::task::TaskTracker,
    ) -> Self {
        Self {
            sink,
            refusals,
            calls,
        }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Audit {
            inner,
            sink: self.sink.clone(),
            refusals: self.refusals.clone(),
            calls: self.calls.clone(),
        }
    }
}

/// See [`AuditLayer`].
#[derive(Clone)]
pub struct Audit<S> {
    inner: S,
    sink: Arc<dyn AuditSink>,
    refusals: Arc<super::refusals::Refusals>,
    calls: tokio_util::task::TaskTracker,
}

/// The RPC name of a path (`/credbroker.v1.CredentialBroker/Rotate`),
/// without an allocation for the broker's own methods, and its action.
fn method(path: &str) -> (Cow<'static, str>, Option<crate::auth::model::Action>) {
    let action = crate::auth::model::Action::from_path(path);
    let name = action.map_or_else(
        || Cow::Owned(path.rsplit('/').next().unwrap_or(path).to_owned()),
        |a| Cow::Borrowed(a.name()),
    );
    (name, action)
}

fn event_type(code: Code, action: &str) -> &'static str {
    match code {
        Code::Unauthenticated => "auth_failure",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "rate_limited",
        _ => match action {
            "GetCredentials" | "ValidateCredentials" => "secret_access",
            "ValidateAndStore" | "Rotate" | "DeleteCredentials" => "secret_write",
            _ => "metadata_access",
        },
    }
}

fn result(code: Code) -> &'static str {
    match code {
        Code::Ok => "success",
        Code::Unauthenticated | Code::PermissionDenied => "denied",
        _ => "failure",
    }
}

impl<S, B> Service<http::Request<B>> for Audit<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let mut inner = crate::ready::take_ready(&mut self.inner);
        if !req.uri().path().starts_with("/credbroker.") {
            return Box::pin(inner.call(req));
        }
        // Fail closed before anything runs: a call that could not be
        // audited must change nothing.
        // (The spool logs its failure once; no line per refused call.) The
        // refusals are tallied like any other, and the tally is written
        // once the spool takes records again.
        if let Err(e) = self.sink.check() {
            let peer = req.extensions().get::<crate::tls::acceptor::PeerInfo>();
            self.refusals.note(
                super::refusals::Who::Connection(peer.and_then(|p| p.certs.clone())),
                peer.and_then(|p| p.remote).map(|a| a.ip()),
                method(req.uri().path()).0,
                super::refusals::Refusal::AuditUnavailable,
                None,
            );
            let resp = crate::api::status::audit_unavailable(&e).into_http();
            return Box::pin(async move { Ok(resp) });
        }
        // The ids the outermost layer gave the call (and its span), taken
        // rather than copied: nothing after this layer reads them.
        let ids = req
            .extensions_mut()
            .remove::<CallIds>()
            .unwrap_or_else(|| CallIds::of(&req));
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let path = req.uri().path();
        let (name, action) = method(path);
        let changes = action.is_some_and(crate::auth::model::Action::changes_state);
        if !self.sink.keeps() {
            // Auditing is off: no note for the inner layers to fill, no
            // record; the answer still names its call, and a call that
            // can change state still runs to its end.
            let id = ids.request_id;
            let work = async move { Ok(with_request_id(inner.call(req).await?, id)) };
            return if changes {
                self.run_to_end(work)
            } else {
                Box::pin(work)
            };
        }
        let call = CallAudit(Arc::new(Call {
            request_id: ids.request_id,
            trace_id: ids.trace_id,
            // Bounded: a user agent is shown, never trusted.
            user_agent: header("user-agent").map(|u| u.chars().take(256).collect()),
            note: Mutex::default(),
            sink: self.sink.clone(),
            peer: req
                .extensions()
                .get::<crate::tls::acceptor::PeerInfo>()
                .and_then(|p| p.remote)
                .map(|a| a.ip()),
            action: name,
            timestamp: OffsetDateTime::now_utc(),
            started: Instant::now(),
        }));
        req.extensions_mut().insert(call.clone());
        let sink = self.sink.clone();
        let refusals = self.refusals.clone();
        let work = async move {
            let resp = if changes {
                // A panic is an outcome too: recorded as INTERNAL.
                match std::panic::AssertUnwindSafe(inner.call(req))
                    .catch_unwind()
                    .await
                {
                    Ok(r) => r?,
                    Err(_) => {
                        tracing::error!(request_id = %call.request_id(), "a call panicked");
                        tonic::Status::internal("internal error; the broker logged the cause")
                            .into_http()
                    }
                }
            } else {
                inner.call(req).await?
            };
            Ok(finish(&sink, &refusals, &call, resp, changes).await)
        };
        if !changes {
            return Box::pin(work);
        }
        self.run_to_end(work)
    }
}

impl<S> Audit<S> {
    /// Runs `work` as a tracked task, to the end whatever happens to the
    /// caller (see module docs), and answers with its result.
    fn run_to_end<E: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<http::Response<tonic::body::Body>, E>>
        + Send
        + 'static,
    ) -> BoxFuture<'static, Result<http::Response<tonic::body::Body>, E>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.spawn(
            async move {
                let _ = tx.send(work.await);
            }
            .in_current_span(),
        );
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Ok(
                    tonic::Status::internal("internal error; the broker logged the cause")
                        .into_http(),
                )
            })
        })
    }
}

/// Records the outcome of a call that answered `resp`, and returns the
/// answer to send (with `x-request-id`).
async fn finish(
    sink: &Arc<dyn AuditSink>,
    refusals: &super::refusals::Refusals,
    call: &CallAudit,
    mut resp: http::Response<tonic::body::Body>,
    changes: bool,
) -> http::Response<tonic::body::Body> {
    let code = crate::api::status::response_code(&resp);
    let note = call.take_note();
    // A refusal for a rate limit is tallied, not recorded one by one: a
    // flood stays visible without the trail amplifying it.
    if code == Code::ResourceExhausted {
        refusals.note(
            note.user
                .map_or(super::refusals::Who::Connection(None), |(s, r)| {
                    super::refusals::Who::Known(s, r)
                }),
            call.0.peer,
            call.0.action.clone(),
            super::refusals::Refusal::RateLimited,
            note.tenant,
        );
        return with_request_id(resp, call.request_id());
    }
    let record = call.record(note, code);
    if let Err(e) = append_grouped(sink, &record).await {
        // Kept for the spool's recovery probe to write.
        if changes {
            // It ran (its request record says so): the caller hears the
            // truth.
            tracing::error!(request_id = %record.request_id, action = %record.action,
                "a call's outcome record could not be written; kept for the spool's recovery: {e}");
        } else {
            // A read changes nothing: its answer (a secret) is withheld.
            resp = crate::api::status::audit_withheld(&e).into_http();
        }
        sink.defer(if changes { record } else { withheld(record) });
    }
    with_request_id(resp, call.request_id())
}

/// Appends `record` to the spool as part of a group: the record is handed
/// over, then this task yields once, so the calls this worker runs
/// meanwhile hand theirs over too, and the first to come back writes them
/// all with one write(2). No task sleeps waiting for another thread: each
/// writes the group itself unless another is writing it (then it yields and
/// looks again). Bounded: should that writer's thread be descheduled, this
/// one waits on the lock after all. Returns once the record is written.
async fn append_grouped(sink: &Arc<dyn AuditSink>, record: &AuditRecord) -> Result<(), AuditError> {
    let ticket = sink.submit(record);
    let mut tries = 0;
    loop {
        if let Some(done) = ticket.result() {
            return done;
        }
        if tries > 0 && sink.write_submitted(tries == MAX_TRIES) {
            // Written by this task or the one before it.
            continue;
        }
        tries += 1;
        tokio::task::yield_now().await;
    }
}

/// The record of a read whose answer was withheld because its record could
/// not be written.
fn withheld(record: AuditRecord) -> AuditRecord {
    AuditRecord {
        result: Cow::Borrowed("failure"),
        grpc_code: Cow::Borrowed("UNAVAILABLE"),
        ..record
    }
}

/// Every answer names its call.
fn with_request_id(
    mut resp: http::Response<tonic::body::Body>,
    request_id: Uuid,
) -> http::Response<tonic::body::Body> {
    let mut id = Uuid::encode_buffer();
    if let Ok(v) = http::HeaderValue::from_str(request_id.as_hyphenated().encode_lower(&mut id)) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditError;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A sink whose writer is always busy to a caller that does not
    /// wait, and records what the wait on the lock writes.
    #[derive(Default)]
    struct Busy {
        tries: AtomicU32,
        queued: Mutex<Vec<(AuditRecord, crate::audit::Ticket)>>,
        appended: Mutex<Vec<AuditRecord>>,
    }

    impl AuditSink for Busy {
        fn append(&self, record: &AuditRecord) -> Result<(), AuditError> {
            self.appended.lock().unwrap().push(record.clone());
            Ok(())
        }

        fn submit(&self, record: &AuditRecord) -> crate::audit::Ticket {
            let t = crate::audit::Ticket::default();
            self.queued
                .lock()
                .unwrap()
                .push((record.clone(), t.clone()));
            t
        }

        fn write_submitted(&self, wait: bool) -> bool {
            if !wait {
                self.tries.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            for (r, t) in self.queued.lock().unwrap().drain(..) {
                self.appended.lock().unwrap().push(r);
                t.settle(Ok(()));
            }
            true
        }
    }

    #[tokio::test]
    async fn a_spool_that_stays_busy_is_waited_on_after_a_bounded_number_of_tries() {
        let sink = Arc::new(Busy::default());
        let inner = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut svc = AuditLayer::new(
            sink.clone(),
            crate::audit::refusals::Refusals::new(sink.clone()),
            tokio_util::task::TaskTracker::new(),
        )
        .layer(inner);
        let req = http::Request::builder()
            .uri("/credbroker.v1.CredentialBroker/GetCredentials")
            .body(())
            .unwrap();
        let resp = svc.call(req).await.unwrap();
        assert_eq!(sink.tries.load(Ordering::Relaxed), MAX_TRIES - 1);
        let appended = sink.appended.lock().unwrap();
        assert_eq!(appended.len(), 1, "recorded once, by waiting");
        assert_eq!(appended[0].action, "GetCredentials");
        assert_eq!(
            resp.headers()["x-request-id"].to_str().unwrap(),
            appended[0].request_id.to_string()
        );
    }

    /// With auditing off (a sink that keeps nothing) the layer builds no
    /// note for the inner layers, still names every answer's call, and
    /// still runs a state-changing call to its end when its caller goes.
    #[tokio::test]
    async fn with_auditing_off_answers_are_named_and_writes_still_finish() {
        let sink: Arc<dyn AuditSink> = Arc::new(crate::audit::Discard);
        let finished = Arc::new(AtomicU32::new(0));
        let seen = finished.clone();
        let inner = tower::service_fn(move |req: http::Request<()>| {
            let finished = seen.clone();
            async move {
                assert!(
                    req.extensions().get::<CallAudit>().is_none(),
                    "no note to fill with auditing off"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
            }
        });
        let calls = tokio_util::task::TaskTracker::new();
        let mut svc = AuditLayer::new(
            sink.clone(),
            crate::audit::refusals::Refusals::new(sink),
            calls.clone(),
        )
        .layer(inner);
        let call = |method: &str| {
            let mut req = http::Request::builder()
                .uri(format!("/credbroker.v1.CredentialBroker/{method}"))
                .body(())
                .unwrap();
            let ids = CallIds::of(&req);
            let id = ids.request_id;
            req.extensions_mut().insert(ids);
            (req, id)
        };
        let (req, id) = call("GetCredentials");
        let resp = svc.call(req).await.unwrap();
        assert_eq!(
            resp.headers()["x-request-id"].to_str().unwrap(),
            id.to_string()
        );
        // A Rotate whose caller gives up at once still runs to its end.
        let (req, _) = call("Rotate");
        drop(svc.call(req));
        calls.close();
        calls.wait().await;
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn names_and_kinds() {
        assert_eq!(
            crate::api::status::code_name(Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(event_type(Code::Ok, "GetCredentials"), "secret_access");
        assert_eq!(event_type(Code::Ok, "Rotate"), "secret_write");
        assert_eq!(event_type(Code::Unauthenticated, "Rotate"), "auth_failure");
        assert_eq!(method("/credbroker.v1.CredentialBroker/Rotate").0, "Rotate");
        assert_eq!(
            crate::audit::trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(crate::audit::trace_id("garbage"), None);
    }
}
