//! Who acted, on which request: built once at the edge (or for a background
//! job), carried through every broker operation into the store commit, so
//! audit records, events and webhooks name the actor.

use std::net::IpAddr;

use uuid::Uuid;

use super::types::TenantId;

/// The authenticated principal behind an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// Token subject, SPIFFE ID, or `system:<job>`.
    pub subject: String,
    /// viewer, trader, admin, operator or system.
    pub role: String,
    /// Its tenant (none for operators and the system).
    pub tenant: Option<TenantId>,
    /// The certificate's SPIFFE ID, when it came over mTLS.
    pub spiffe_id: Option<String>,
}

/// One operation's context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestContext {
    /// Who.
    pub actor: Actor,
    /// Request id (the audit record's, and `x-request-id`).
    pub request_id: Uuid,
    /// Peer address.
    pub peer: Option<IpAddr>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// W3C trace id.
    pub trace_id: Option<String>,
}

impl RequestContext {
    /// A background job acting as the system.
    pub fn system(job: &str) -> Self {
        Self {
            actor: Actor {
                subject: format!("system:{job}"),
                role: "system".into(),
                tenant: None,
                spiffe_id: None,
            },
            request_id: Uuid::now_v7(),
            peer: None,
            user_agent: None,
            trace_id: None,
        }
    }

    /// How the actor is written into events: `subject (role)`.
    pub fn actor_label(&self) -> String {
        format!("{} ({})", self.actor.subject, self.actor.role)
    }

    /// Who changes something in this call, as its event records it.
    pub fn changed_by(&self) -> super::ports::ChangedBy {
        super::ports::ChangedBy {
            actor: self.actor_label(),
            request_id: Some(self.request_id),
        }
    }
}
