//! credbroker: a multi-tenant gRPC credential broker for exchange API keys.
//!
//! See ARCHITECTURE.md for the map. A request flows mTLS → tower stack
//! (`auth`) → `api` (protobuf ↔ domain) → `broker` → `cache` → `vault` and
//! `store`; a change flows commit → cache invalidation → `rotation::hub` →
//! each WatchRotations stream.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub use credbroker_core::{backoff, broker, cache, clock, memstore};
/// The PostgreSQL metadata store and its migrations (its own crate).
pub use credbroker_store as store;
/// The Vault / OpenBao secret store (its own crate).
pub use credbroker_vault as vault;

/// The exchange adapter (its own crate), with the simulators (`sim`, their
/// own crate, for dev mode and tests).
pub mod exchange {
    pub use credbroker_exchange::*;
    pub use credbroker_sim as sim;
}

pub use credbroker_client as client;
pub use credbroker_client::agent;

/// The network edge (its own crate): the TLS front door, identity, limits
/// and admission, the gRPC service and its stack, metrics and traces.
pub use credbroker_edge::{api, auth, limits, ready, server, telemetry, tls};

pub mod app;
pub mod audit;
pub mod checks;
pub mod config;
pub mod dev;
pub mod import;
pub mod rotation;
pub mod webhook;
