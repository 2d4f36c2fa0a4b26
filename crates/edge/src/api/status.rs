//! The one place where errors become gRPC statuses. Messages are safe to
//! show: they never carry an upstream error string or a secret.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::auth::model::AuthError;

use crate::broker::error::{BrokerError, ValidationError};

use crate::limits::Limited;

/// The status code's name as grpcurl prints it (audit records, metric
/// labels).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The gRPC code of a response: errors are trailers-only responses, so the
/// status is a header; a response without one is a success (unary
/// trailers, or a stream that opened).
pub fn response_code<B>(resp: &tonic::codegen::http::Response<B>) -> Code {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// UNAUTHENTICATED for a caller without a usable identity, PERMISSION_DENIED
/// for one that may not do what it asked.
pub fn auth(e: AuthError) -> Status {
    if e.is_denial() {
        Status::permission_denied(e.to_string())
    } else {
        Status::unauthenticated(e.to_string())
    }
}

/// UNAVAILABLE for a call whose audit record cannot be written (fail closed).
pub fn audit_unavailable(e: &crate::audit::AuditError) -> Status {
    Status::unavailable(format!("{e}; nothing was done, retry later"))
}

/// UNAVAILABLE for a read whose answer could not be recorded: the answer
/// (a secret, say) is withheld; a read changes nothing.
pub fn audit_withheld(e: &crate::audit::AuditError) -> Status {
    Status::unavailable(format!(
        "{e}; the answer was withheld (a read changes nothing), retry later"
    ))
}

/// RESOURCE_EXHAUSTED for a call shed because `max` calls are in flight.
pub fn overloaded(max: usize, retry_after: std::time::Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("the broker is at its limit of {max} calls in flight; retry with backoff"),
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// UNAVAILABLE while the replica starts and cannot yet hear every committed
/// event (PostgreSQL unreachable), with a `google.rpc.RetryInfo`.
pub fn starting() -> Status {
    Status::with_error_details(
        Code::Unavailable,
        "this replica is starting and PostgreSQL does not answer yet; nothing was done, retry (another replica may serve)",
        ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
    )
}

/// RESOURCE_EXHAUSTED for a stream beyond its replica's or its tenant's
/// stream budget, with a `google.rpc.RetryInfo` (a full replica: soon,
/// another may take it; a tenant at its limit: later).
pub fn streams_full(e: crate::rotation::watch::StreamsFull) -> Status {
    use crate::rotation::watch::StreamsFull;
    let retry = match e {
        StreamsFull::Replica { .. } => std::time::Duration::from_secs(1),
        StreamsFull::Tenant { .. } => std::time::Duration::from_secs(5),
    };
    Status::with_error_details(
        Code::ResourceExhausted,
        e.to_string(),
        ErrorDetails::with_retry_info(Some(retry)),
    )
}

/// RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` saying when to retry.
pub fn limited(l: Limited) -> Status {
    let secs = l.retry_after.as_secs_f64();
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("rate limit: {}; retry in {secs:.1} s", l.what),
        ErrorDetails::with_retry_info(Some(l.retry_after)),
    )
}

/// INVALID_ARGUMENT with a `google.rpc.BadRequest` field violation.
pub fn bad_field(field: &str, reason: &str) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

/// The gRPC status of a broker error (the one place domain errors become
/// statuses).
pub fn broker(e: BrokerError) -> Status {
    let msg = e.to_string();
    match e {
        BrokerError::InvalidArgument { field, reason } => bad_field(field, &reason),
        BrokerError::Validation(ValidationError::InvalidField { field, reason }) => {
            bad_field(field, &reason)
        }
        BrokerError::Validation(ValidationError::Rejected { .. }) => {
            Status::failed_precondition(msg)
        }
        BrokerError::Validation(ValidationError::Unavailable { .. }) => {
            Status::unavailable(format!("{msg}; nothing was stored, retry later"))
        }
        BrokerError::NotFound { .. } => Status::not_found(msg),
        BrokerError::AlreadyExists { .. } => Status::already_exists(msg),
        BrokerError::Conflict => Status::aborted(msg),
        BrokerError::FailedPrecondition(_) => Status::failed_precondition(msg),
        // A backend that cannot answer now (an election, a restart):
        // the caller retries, and RetryInfo says how soon.
        BrokerError::Unavailable { .. } => Status::with_error_details(
            Code::Unavailable,
            msg,
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
        ),
        BrokerError::ShuttingDown { .. } | BrokerError::StreamAged { .. } => {
            Status::unavailable(msg)
        }
        BrokerError::ResumeTooOld { .. } | BrokerError::ResumeAhead { .. } => {
            Status::out_of_range(msg)
        }
        BrokerError::SecretMissing { .. } => Status::data_loss(msg),
        BrokerError::Internal => Status::internal("internal error; the broker logged the cause"),
    }
}
