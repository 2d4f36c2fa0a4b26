//! Integration tests against real OpenBao and PostgreSQL over real mTLS.
//! One binary, so the crate links once.

mod support;

mod core;
mod mtls;
mod rotation;
mod storage;
