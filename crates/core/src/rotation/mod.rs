//! What moves credential changes in the core: the subscription hub, the
//! watch stream's state machine and the overlap retire job (the PostgreSQL
//! event listener is an adapter, in the broker binary's crate).

pub mod hub;
pub mod retire;
pub mod watch;
