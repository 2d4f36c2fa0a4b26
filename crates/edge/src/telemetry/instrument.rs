//! Decorators that measure the outside world without the broker knowing:
//! every Vault operation (count by outcome, latency, a span) and every
//! exchange validation (duration by exchange, count by result, a span).

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use tracing::Instrument as _;

use super::metrics::{
    ExchangeLabel, ExchangeResult, Metrics, OperationLabel, VaultOp, vault_status,
};
use crate::broker::error::{SecretStoreError, ValidationError};
use crate::broker::ports::{CredentialValidator, SecretStore, VersionInfo};
use crate::broker::types::{CredentialSet, ExchangeId, Permissions, TenantId};

/// A [`SecretStore`] that counts and times every call of the one it wraps.
pub struct MeteredSecretStore {
    inner: Arc<dyn SecretStore>,
    metrics: Metrics,
}

impl MeteredSecretStore {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn SecretStore>, metrics: Metrics) -> Arc<dyn SecretStore> {
        Arc::new(Self { inner, metrics })
    }

    async fn timed<T, F>(&self, operation: &'static str, f: F) -> Result<T, SecretStoreError>
    where
        F: std::future::Future<Output = Result<T, SecretStoreError>>,
    {
        let started = Instant::now();
        let span = tracing::info_span!(
            "vault",
            otel.name = operation,
            otel.kind = "client",
            operation
        );
        let r = f.instrument(span).await;
        let m = self.metrics.families();
        m.vault_duration
            .get_or_create(&OperationLabel { operation })
            .observe(started.elapsed().as_secs_f64());
        m.vault_ops
            .get_or_create(&VaultOp {
                operation,
                status: vault_status(&r),
            })
            .inc();
        r
    }
}

#[async_trait]
impl SecretStore for MeteredSecretStore {
    async fn latest_version(&self, path: &str) -> Result<Option<u64>, SecretStoreError> {
        self.timed("latest_version", self.inner.latest_version(path))
            .await
    }

    async fn write(
        &self,
        path: &str,
        set: &CredentialSet,
        cas: u64,
    ) -> Result<u64, SecretStoreError> {
        self.timed("write", self.inner.write(path, set, cas)).await
    }

    async fn read(&self, path: &str, version: u64) -> Result<CredentialSet, SecretStoreError> {
        self.timed("read", self.inner.read(path, version)).await
    }

    async fn destroy_versions(&self, path: &str, versions: &[u64]) -> Result<(), SecretStoreError> {
        self.timed("destroy", self.inner.destroy_versions(path, versions))
            .await
    }

    async fn purge(&self, path: &str) -> Result<(), SecretStoreError> {
        self.timed("purge", self.inner.purge(path)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SecretStoreError> {
        self.timed("list", self.inner.list(prefix)).await
    }

    async fn versions(&self, path: &str) -> Result<Vec<VersionInfo>, SecretStoreError> {
        self.timed("versions", self.inner.versions(path)).await
    }

    async fn ping(&self) -> Result<(), SecretStoreError> {
        self.timed("ping", self.inner.ping()).await
    }

    async fn sealed(&self) -> Option<bool> {
        self.inner.sealed().await
    }
}

/// A [`CredentialValidator`] that times every validation of the one it
/// wraps.
pub struct MeteredValidator {
    inner: Arc<dyn CredentialValidator>,
    metrics: Metrics,
}

impl MeteredValidator {
    /// Wraps `inner`.
    pub fn wrap(
        inner: Arc<dyn CredentialValidator>,
        metrics: Metrics,
    ) -> Arc<dyn CredentialValidator> {
        Arc::new(Self { inner, metrics })
    }
}

#[async_trait]
impl CredentialValidator for MeteredValidator {
    async fn validate(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        set: &CredentialSet,
    ) -> Result<Permissions, ValidationError> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "exchange.validate",
            exchange = exchange.as_str(),
            otel.kind = "client"
        );
        let r = self
            .inner
            .validate(tenant, exchange, set)
            .instrument(span)
            .await;
        let m = self.metrics.families();
        let exchange = exchange.as_str();
        m.validation_duration
            .get_or_create(&ExchangeLabel { exchange })
            .observe(started.elapsed().as_secs_f64());
        let result = match &r {
            Ok(_) => "accepted",
            Err(ValidationError::Rejected { .. }) => "rejected",
            Err(ValidationError::Unavailable { .. }) => "unavailable",
            Err(ValidationError::InvalidField { .. }) => "invalid_argument",
        };
        m.validations
            .get_or_create(&ExchangeResult { exchange, result })
            .inc();
        r
    }
}
