//! The one place where errors become gRPC statuses. Messages are safe to
//! show: they never carry an upstream error string or a secret.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::{
    auth::AuthError,
    broker::error::{BrokerError, ValidationError},
    limits::Limited,
};

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
    Status::unavailable(format!(
        "{e}; nothing was done for this call's answer to be trusted, retry later"
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

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
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
            BrokerError::Unavailable { .. }
            | BrokerError::ShuttingDown { .. }
            | BrokerError::StreamAged { .. } => Status::unavailable(msg),
            BrokerError::ResumeTooOld { .. } | BrokerError::ResumeAhead { .. } => {
                Status::out_of_range(msg)
            }
            BrokerError::SecretMissing { .. } => Status::data_loss(msg),
            BrokerError::Internal => {
                Status::internal("internal error; the broker logged the cause")
            }
        }
    }
}
