//! Integration tests against real OpenBao and PostgreSQL over real mTLS.
//! One binary, so the crate links once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod access;
mod audit;
mod chart;
mod checks;
mod clients;
mod core;
mod devmode;
mod examples;
mod exchanges;
mod hygiene;
mod keys;
mod mtls;
mod outages;
mod readpath;
mod replicas;
mod rotation;
mod storage;
mod traces;
mod transport;
mod vault_ha;
mod vault_policy;
mod webhooks;
