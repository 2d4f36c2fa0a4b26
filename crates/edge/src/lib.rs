//! credbroker's network edge: everything between a client's TCP connection
//! and the core's `Broker`.
//!
//! A call flows [`tls::acceptor`] (connection cap, handshake, `PeerInfo`) →
//! the tower stack [`server`] assembles: [`limits::admission`] (shed beyond
//! N in flight, the gRPC metrics) → [`audit::layer`] (a record per call,
//! spooled before the answer leaves) → [`auth`] (the `Caller`) → [`api`]
//! (protobuf ↔ domain, `Gate::admit`, the one authorization decision) → the
//! core. [`telemetry`] holds the metrics registry and the traces.
//!
//! The edge depends on the core's ports and the contract only: the
//! adapters (PostgreSQL, Vault, the exchanges) are wired in by the binary,
//! so a wrong-way import fails to compile.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

// The core's modules under the paths the edge's code names them by.
#[cfg(test)]
use credbroker_core::memstore;
use credbroker_core::{backoff, broker, cache, rotation};

pub mod api;
pub mod audit;
pub mod auth;
pub mod limits;
pub mod ready;
pub mod server;
pub mod telemetry;
pub mod tls;
