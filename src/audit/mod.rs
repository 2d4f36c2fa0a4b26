//! The audit trail's machinery at the edge: [`layer`] records every call,
//! [`refusals`] counts refused ones, [`spool`] keeps the local hash-chained
//! segments and [`ship`] takes them to PostgreSQL. The record, the sink
//! port and the chain's verification are the core's
//! ([`credbroker_core::audit`], re-exported here).

pub use credbroker_core::audit::*;

pub mod layer;
pub mod refusals;
pub mod ship;
pub mod spool;
