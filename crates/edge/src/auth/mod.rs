//! Who is calling, and what they may do.
//!
//! Identity comes from two places, both verified before any handler runs
//! (the tower layer [`AuthLayer`]):
//! - the client certificate: exactly one URI SAN, a SPIFFE ID parsed
//!   strictly ([`spiffe`]): `spiffe://{td}/tenant/{uuid}/...` is a workload
//!   of that tenant, `spiffe://{td}/operator/{name}` an operator. Derived
//!   once per connection.
//! - an optional (or required) bearer token ([`token`]): `sub`,
//!   `tenant_id`, `role`. Verified once per distinct token.
//!
//! When both are present they must agree on the tenant. The result is one
//! [`Caller`]. Whether it may do an [`Action`] on a tenant is decided in one
//! place, [`authorize`].

pub mod model;
pub mod spiffe;
pub mod token;

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use quick_cache::sync::Cache;
use rustls_pki_types::CertificateDer;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::broker::types::TenantId;
use spiffe::CertSubject;
use token::TokenVerifier;

pub use model::{Action, AuthError, Caller, Role, TokenMode, authorize};

/// What the layer needs to know.
pub struct AuthSettings {
    /// Accepted SPIFFE trust domain.
    pub trust_domain: String,
    /// Token policy.
    pub mode: TokenMode,
    /// Token verification.
    pub tokens: TokenVerifier,
    /// Role of a workload certificate without a token.
    pub workload_role: Role,
}

/// A certificate's identity, remembered per connection.
#[derive(Clone)]
struct CertEntry {
    /// Held so the connection's certificate chain (and so the cache key, its
    /// address) stays unique while the entry lives.
    chain: Arc<Vec<CertificateDer<'static>>>,
    result: Result<(Arc<str>, CertSubject), AuthError>,
}

/// Tower layer deriving the [`Caller`] of every broker call.
#[derive(Clone)]
pub struct AuthLayer {
    inner: Arc<LayerState>,
}

struct LayerState {
    settings: AuthSettings,
    certs: Cache<usize, CertEntry>,
}

impl AuthLayer {
    /// A layer enforcing `settings`.
    pub fn new(settings: AuthSettings) -> Self {
        Self {
            inner: Arc::new(LayerState {
                settings,
                certs: Cache::new(4096),
            }),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.inner.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<LayerState>,
}

impl LayerState {
    /// The certificate's identity, parsed once per connection: tonic hands
    /// every request of a connection the same `Arc` of the peer chain.
    fn cert_identity(
        &self,
        chain: Arc<Vec<CertificateDer<'static>>>,
    ) -> Result<(Arc<str>, CertSubject), AuthError> {
        let key = Arc::as_ptr(&chain) as usize;
        if let Some(hit) = self.certs.get(&key)
            && Arc::ptr_eq(&hit.chain, &chain)
        {
            return hit.result;
        }
        let result =
            chain
                .first()
                .ok_or(AuthError::NoCertificate)
                .and_then(|leaf| {
                    let sans = crate::tls::uri_sans(leaf.as_ref());
                    if sans.len() != 1 {
                        return Err(AuthError::UriSanCount(sans.len()));
                    }
                    let id = &sans[0];
                    let (parsed, subject) = spiffe::subject(id, &self.settings.trust_domain)
                        .map_err(|why| AuthError::BadSpiffeId {
                            id: crate::broker::types::truncate_for_message(id),
                            why,
                        })?;
                    Ok((Arc::from(parsed.as_str()), subject))
                });
        self.certs.insert(
            key,
            CertEntry {
                chain,
                result: result.clone(),
            },
        );
        result
    }

    /// Who a refused call claimed to be, and for which tenant: the
    /// certificate's workload tenant if it names one, else the bearer
    /// token's `sub` and `tenant_id` read *without* verification (bounded,
    /// and only a canonical UUID counts). For the audit trail only, marked
    /// unverified there; never for a decision.
    fn claimed<B>(&self, req: &http::Request<B>) -> Option<(Arc<str>, TenantId)> {
        let chain = req
            .extensions()
            .get::<crate::tls::acceptor::PeerInfo>()
            .and_then(|p| p.certs.clone());
        if let Some(chain) = chain
            && let Ok((id, CertSubject::Workload(tenant))) = self.cert_identity(chain)
        {
            return Some((id, tenant));
        }
        let token = bearer(req).ok().flatten()?;
        let payload = token.split('.').nth(1).filter(|p| p.len() <= 8192)?;
        let json = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            payload.trim_end_matches('='),
        )
        .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
        let tenant = claims["tenant_id"]
            .as_str()
            .and_then(|t| {
                uuid::Uuid::try_parse(t)
                    .ok()
                    .filter(|u| u.hyphenated().to_string() == t)
            })
            .map(TenantId::new)?;
        let sub: String = claims["sub"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(256)
            .collect();
        Some((Arc::from(format!("token sub {sub:?}").as_str()), tenant))
    }

    fn caller_of<B>(&self, req: &http::Request<B>) -> Result<Caller, AuthError> {
        let chain = req
            .extensions()
            .get::<crate::tls::acceptor::PeerInfo>()
            .and_then(|p| p.certs.clone())
            .ok_or(AuthError::NoCertificate)?;
        let (spiffe_id, subject) = self.cert_identity(chain)?;
        let s = &self.settings;
        let bearer = match s.mode {
            TokenMode::Ignored => None,
            TokenMode::Required | TokenMode::Optional => bearer(req)?,
        };
        let claims = match (bearer, s.mode) {
            (None, TokenMode::Required) => return Err(AuthError::MissingToken),
            (None, _) => None,
            (Some(t), _) => Some(
                s.tokens
                    .verify(t, time::OffsetDateTime::now_utc().unix_timestamp())?,
            ),
        };
        Ok(match (subject, claims) {
            (CertSubject::Workload(tenant), None) => Caller {
                subject: spiffe_id.clone(),
                spiffe_id,
                tenant: Some(tenant),
                role: s.workload_role,
            },
            (CertSubject::Operator, None) => Caller {
                subject: spiffe_id.clone(),
                spiffe_id,
                tenant: None,
                role: Role::Operator,
            },
            (CertSubject::Workload(cert_tenant), Some(c)) => {
                if c.role == Role::Operator || c.tenant != Some(cert_tenant) {
                    return Err(AuthError::Mismatch(format!(
                        "the token ({} of {}) does not belong to the certificate's tenant {cert_tenant}",
                        c.role.as_str(),
                        c.tenant
                            .map_or_else(|| "every tenant".to_owned(), |t| format!("tenant {t}")),
                    )));
                }
                Caller {
                    spiffe_id,
                    subject: Arc::clone(&c.subject),
                    tenant: c.tenant,
                    role: c.role,
                }
            }
            (CertSubject::Operator, Some(c)) => Caller {
                spiffe_id,
                subject: Arc::clone(&c.subject),
                tenant: c.tenant,
                role: c.role,
            },
        })
    }
}

/// The bearer token in `authorization` metadata, if any.
fn bearer<B>(req: &http::Request<B>) -> Result<Option<&str>, AuthError> {
    let Some(v) = req.headers().get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| AuthError::BadToken("malformed authorization metadata".into()))?;
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(AuthError::BadToken(
            "authorization metadata must be `Bearer <jwt>`".into(),
        )),
    }
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
            match self.state.caller_of(&req) {
                Ok(caller) => {
                    if let Some(audit) = req.extensions().get::<crate::audit::layer::CallAudit>() {
                        audit.note(|n| {
                            n.user = Some((Arc::clone(&caller.subject), caller.role.as_str()))
                        });
                    }
                    req.extensions_mut().insert(caller);
                }
                Err(e) => {
                    tracing::info!(method = %req.uri().path(), "unauthenticated call refused: {e}");
                    // Recorded under the tenant the caller claimed, marked
                    // unverified, so that tenant's admin sees attempts on it.
                    if let Some(audit) = req.extensions().get::<crate::audit::layer::CallAudit>()
                        && let Some((subject, tenant)) = self.state.claimed(&req)
                    {
                        audit.note(|n| {
                            n.user = Some((subject, "unverified"));
                            n.tenant = Some(tenant);
                        });
                    }
                    let resp = crate::api::status::auth(e).into_http();
                    return Box::pin(async move { Ok(resp) });
                }
            }
        }
        let mut inner = crate::ready::take_ready(&mut self.inner);
        Box::pin(inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0b2c7a4e-5f1d-4c2a-9e3b-7d6f8a9b0c1d";
    const B: &str = "1b2c7a4e-5f1d-4c2a-9e3b-7d6f8a9b0c1d";

    fn caller(role: Role, tenant: Option<&str>) -> Caller {
        Caller {
            spiffe_id: "spiffe://td/x".into(),
            subject: "s".into(),
            tenant: tenant.map(|t| t.parse().unwrap()),
            role,
        }
    }

    /// The role table of docs/identity.md, written out (not computed from
    /// `Action::needs`, the code under test).
    fn documented(role: Role, action: Action) -> bool {
        use Action::*;
        let viewer = [ListCredentials, DescribeCredential, GetCredentialHealth];
        let trader = [GetCredentials, WatchRotations, AcknowledgeVersion];
        match role {
            Role::Viewer => viewer.contains(&action),
            Role::Trader => viewer.contains(&action) || trader.contains(&action),
            Role::Admin | Role::Operator => true,
        }
    }

    #[test]
    fn the_role_table() {
        let a: TenantId = A.parse().unwrap();
        let b: TenantId = B.parse().unwrap();
        for action in Action::ALL {
            let op = caller(Role::Operator, None);
            assert!(authorize(&op, a, action).is_ok());
            for role in [Role::Viewer, Role::Trader, Role::Admin] {
                let c = caller(role, Some(A));
                let allowed = documented(role, action);
                assert_eq!(
                    authorize(&c, a, action).is_ok(),
                    allowed,
                    "{role:?} {action:?}"
                );
                let e = authorize(&c, b, action).unwrap_err();
                assert!(e.is_denial() && e.to_string().contains("may not access tenant"));
                if !allowed {
                    let e = authorize(&c, a, action).unwrap_err().to_string();
                    assert!(e.contains("needs role "), "{e}");
                }
            }
        }
    }
}

// ---- configuration: the [auth] section, owned here (`config` re-exports it).

/// Bearer tokens and the role of a certificate without one.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `required`, `optional` or `ignored`; default: `optional` when a key
    /// is configured, else `ignored`.
    pub token: Option<crate::auth::model::TokenMode>,
    /// HS256 secret (at least 32 bytes).
    pub hs256_secret: Option<secrecy::SecretString>,
    /// JWKS file with RS256 / ES256 / EdDSA public keys, re-read on change.
    pub jwks_file: Option<std::path::PathBuf>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Tolerated clock skew on `exp` / `nbf`.
    pub leeway_secs: u64,
    /// Longest lifetime a token may claim (`exp` from now, and `exp - iat`
    /// when it has `iat`): a leaked long-lived token is refused rather than
    /// trusted for years. Default 4 hours.
    pub max_token_lifetime_secs: u64,
    /// Role of a workload certificate that sends no token.
    pub workload_role: crate::auth::model::Role,
    /// Networks each tenant's callers must come from (unset: anywhere).
    pub tenant_networks: std::collections::BTreeMap<uuid::Uuid, Vec<ipnet::IpNet>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token: None,
            hs256_secret: None,
            jwks_file: None,
            audience: None,
            issuer: None,
            leeway_secs: 30,
            max_token_lifetime_secs: 4 * 3600,
            workload_role: crate::auth::model::Role::Trader,
            tenant_networks: std::collections::BTreeMap::new(),
        }
    }
}

impl AuthConfig {
    /// The token policy in force.
    pub fn mode(&self) -> crate::auth::model::TokenMode {
        use crate::auth::model::TokenMode;
        self.token
            .unwrap_or(if self.hs256_secret.is_some() || self.jwks_file.is_some() {
                TokenMode::Optional
            } else {
                TokenMode::Ignored
            })
    }
}
