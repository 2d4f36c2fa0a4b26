//! credbroker's core: the domain types and ports, the broker, the cache,
//! the rotation hub and watch state machine, the overlap retire job, the
//! audit record and its chain, injectable time and the one backoff. It
//! depends on no gRPC, SQL, Vault, HTTP or metrics crate (its Cargo.toml is
//! the proof): adapters implement its ports, the edge speaks protobuf.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod audit;
pub mod backoff;
pub mod broker;
pub mod cache;
pub mod clock;
pub mod memstore;
pub mod rotation;
