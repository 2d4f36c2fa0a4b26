//! Everything that moves credential changes: the subscription hub, the watch
//! stream's state machine and the overlap retire job (the core's,
//! re-exported), and the PostgreSQL event listener.

pub use credbroker_core::rotation::{hub, mint, retire, watch};

pub mod listener;
