//! Who is calling: the tower layer that turns the verified client
//! certificate's SPIFFE ID into a [`Caller`], and the tenant check the API
//! layer applies to every request.
//!
//! IDs under the configured trust domain:
//! - `spiffe://{td}/tenant/{tenant_uuid}/...`: a workload of that tenant
//!   (trading pod, sidecar); it may only touch its own tenant.
//! - `spiffe://{td}/operator/...`: an operator; it may touch every tenant.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use thiserror::Error;
use tonic::{
    Status,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use crate::broker::types::TenantId;

/// The authenticated caller, stored in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The SPIFFE ID from the client certificate.
    pub spiffe_id: String,
    /// What it may touch.
    pub role: CallerRole,
}

/// What a caller may touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerRole {
    /// Every tenant.
    Operator,
    /// One tenant's credentials.
    Workload(TenantId),
}

/// Why a caller was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    /// No usable identity in the certificate.
    #[error("{0}")]
    Unauthenticated(String),
    /// The identity may not touch this tenant.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => Status::unauthenticated(m),
            AuthError::PermissionDenied(m) => Status::permission_denied(m),
        }
    }
}

impl Caller {
    /// Parses a SPIFFE ID under `trust_domain`.
    ///
    /// # Errors
    /// `Unauthenticated` for another trust domain or an unknown path.
    pub fn from_spiffe_id(id: &str, trust_domain: &str) -> Result<Self, AuthError> {
        let rest = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.strip_prefix(trust_domain))
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                AuthError::Unauthenticated(format!(
                    "client identity {id} is not in trust domain {trust_domain}"
                ))
            })?;
        let mut parts = rest.split('/');
        let role = match (parts.next(), parts.next()) {
            (Some("operator"), Some(name)) if !name.is_empty() => CallerRole::Operator,
            (Some("tenant"), Some(t)) => CallerRole::Workload(t.parse().map_err(|_| {
                AuthError::Unauthenticated(format!(
                    "client identity {id}: tenant segment is not a UUID"
                ))
            })?),
            _ => {
                return Err(AuthError::Unauthenticated(format!(
                    "client identity {id} is neither spiffe://{trust_domain}/tenant/<uuid>/... nor spiffe://{trust_domain}/operator/<name>"
                )));
            }
        };
        Ok(Self {
            spiffe_id: id.to_owned(),
            role,
        })
    }

    /// Checks that the caller may act on `tenant`.
    ///
    /// # Errors
    /// `PermissionDenied` for another tenant's workload.
    pub fn authorize(&self, tenant: TenantId) -> Result<(), AuthError> {
        match &self.role {
            CallerRole::Operator => Ok(()),
            CallerRole::Workload(own) if *own == tenant => Ok(()),
            CallerRole::Workload(_) => Err(AuthError::PermissionDenied(format!(
                "{} may not access tenant {tenant}",
                self.spiffe_id
            ))),
        }
    }
}

/// Tower layer deriving the [`Caller`] of every broker call.
#[derive(Clone)]
pub struct AuthLayer {
    trust_domain: Arc<str>,
}

impl AuthLayer {
    /// Accepts SPIFFE IDs under `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    trust_domain: Arc<str>,
}

fn caller_of<B>(req: &http::Request<B>, trust_domain: &str) -> Result<Caller, AuthError> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .ok_or_else(|| AuthError::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| AuthError::Unauthenticated("a client certificate is required".into()))?;
    let id = crate::tls::spiffe_id(leaf.as_ref()).ok_or_else(|| {
        AuthError::Unauthenticated("the client certificate carries no spiffe:// URI SAN".into())
    })?;
    Caller::from_spiffe_id(&id, trust_domain)
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Health and reflection stay open to any certificate the CA signed;
        // every broker call needs a caller identity.
        if req.uri().path().starts_with("/credbroker.") {
            match caller_of(&req, &self.trust_domain) {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                }
                Err(e) => {
                    let resp = Status::from(e).into_http();
                    return Box::pin(async move { Ok(resp) });
                }
            }
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "00000000-0000-0000-0000-000000000001";

    #[test]
    fn spiffe_ids() {
        let td = "credbroker.local";
        let w = Caller::from_spiffe_id(&format!("spiffe://{td}/tenant/{T}/pod/a"), td).unwrap();
        assert_eq!(w.role, CallerRole::Workload(T.parse().unwrap()));
        assert!(w.authorize(T.parse().unwrap()).is_ok());
        assert!(matches!(
            w.authorize("00000000-0000-0000-0000-000000000002".parse().unwrap()),
            Err(AuthError::PermissionDenied(_))
        ));
        let op = Caller::from_spiffe_id(&format!("spiffe://{td}/operator/alice"), td).unwrap();
        assert_eq!(op.role, CallerRole::Operator);
        for bad in [
            "spiffe://other.domain/operator/alice".to_owned(),
            format!("spiffe://{td}.evil/operator/alice"),
            format!("spiffe://{td}/tenant/not-a-uuid"),
            format!("spiffe://{td}/admin"),
            format!("spiffe://{td}/operator/"),
        ] {
            assert!(
                matches!(
                    Caller::from_spiffe_id(&bad, td),
                    Err(AuthError::Unauthenticated(_))
                ),
                "{bad}"
            );
        }
    }
}
