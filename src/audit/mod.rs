//! The audit trail: the record and its chain are the core's, the layer,
//! spool and shipper the edge's (both re-exported here); the binary adds
//! the two jobs that need PostgreSQL itself: [`reconcile`] writes the
//! outcomes a crash lost and [`retention`] keeps the day partitions.

pub use credbroker_edge::audit::*;

pub mod reconcile;
pub mod retention;
