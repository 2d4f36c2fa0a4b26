//! Everything that moves credential changes: the subscription hub, the watch
//! stream's state machine and the overlap retire job.

pub mod hub;
pub mod listener;
pub mod retire;
pub mod watch;
