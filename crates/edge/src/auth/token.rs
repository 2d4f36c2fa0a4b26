//! Bearer tokens: JWTs verified with jsonwebtoken, HS256 against a
//! configured secret (the seed's choice) or RS256/ES256/EdDSA against a JWKS
//! file that is re-read when it changes. A verified token is cached (keyed
//! by a seeded hash, confirmed by a constant-time comparison of the whole
//! token) until it expires, so a pod that sends the same token on every call
//! pays for one verification.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header, errors::ErrorKind, jwk::JwkSet,
};
use quick_cache::sync::Cache;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use super::{AuthError, Role};
use crate::broker::types::TenantId;

/// What a verified token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    /// `sub`.
    pub subject: Arc<str>,
    /// `tenant_id` (absent only for an operator).
    pub tenant: Option<TenantId>,
    /// `role`.
    pub role: Role,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    #[serde(default)]
    tenant_id: Option<String>,
    role: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
}

/// How tokens are checked.
#[derive(Clone, Debug)]
pub struct TokenSettings {
    /// HS256 secret.
    pub hs256_secret: Option<SecretString>,
    /// JWKS file with RS256 / ES256 / EdDSA public keys.
    pub jwks_file: Option<PathBuf>,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Longest lifetime a token may claim.
    pub max_lifetime: Duration,
}

/// A JWKS file, re-read at most once a second when its modification time
/// changes (and at once when a token names an unknown key id).
struct JwksFile {
    path: PathBuf,
    keys: ArcSwap<JwkSet>,
    seen: Mutex<(Option<SystemTime>, Instant)>,
}

impl JwksFile {
    fn load(path: PathBuf) -> Result<Self, String> {
        let (keys, mtime) = Self::read(&path)?;
        Ok(Self {
            path,
            keys: ArcSwap::from_pointee(keys),
            seen: Mutex::new((mtime, Instant::now())),
        })
    }

    fn read(path: &PathBuf) -> Result<(JwkSet, Option<SystemTime>), String> {
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("auth.jwks_file: cannot read {}: {e}", path.display()))?;
        let keys = serde_json::from_str(&text).map_err(|e| {
            format!(
                "auth.jwks_file: {} is not a JWKS document: {e}",
                path.display()
            )
        })?;
        Ok((keys, mtime))
    }

    fn current(&self, force: bool) -> Arc<JwkSet> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if force || seen.1.elapsed() >= Duration::from_secs(1) {
            seen.1 = Instant::now();
            let mtime = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if mtime != seen.0 {
                match Self::read(&self.path) {
                    Ok((keys, m)) => {
                        self.keys.store(Arc::new(keys));
                        seen.0 = m;
                        tracing::info!(path = %self.path.display(), "JWKS reloaded");
                    }
                    // Keep the last good key set.
                    Err(e) => tracing::warn!("{e}; keeping the previous keys"),
                }
            }
        }
        self.keys.load_full()
    }
}

/// A verified token: the token itself (compared in constant time on every
/// hit, so a hash collision can never lend one token another's claims) and
/// what it says.
struct Verified {
    token: Box<[u8]>,
    claims: Arc<TokenClaims>,
}

/// Verifies bearer tokens and remembers the good ones until they expire.
/// The cache is keyed by a randomly seeded SipHash of the token (cheap on
/// the hot path; an attacker cannot aim at another token's slot).
pub struct TokenVerifier {
    hs256: Option<DecodingKey>,
    jwks: Option<JwksFile>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: Duration,
    max_lifetime: i64,
    hasher: std::hash::RandomState,
    verified: Cache<u64, Arc<Verified>>,
}

impl TokenVerifier {
    /// Builds a verifier.
    ///
    /// # Errors
    /// A message naming the `auth.*` key when the JWKS file cannot be read.
    pub fn new(s: &TokenSettings) -> Result<Self, String> {
        Ok(Self {
            hs256: s
                .hs256_secret
                .as_ref()
                .map(|k| DecodingKey::from_secret(k.expose_secret().as_bytes())),
            jwks: s.jwks_file.clone().map(JwksFile::load).transpose()?,
            audience: s.audience.clone(),
            issuer: s.issuer.clone(),
            leeway: s.leeway,
            max_lifetime: i64::try_from(s.max_lifetime.as_secs()).unwrap_or(i64::MAX),
            hasher: std::hash::RandomState::new(),
            verified: Cache::new(16_384),
        })
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        self.hs256.is_some() || self.jwks.is_some()
    }

    /// Verifies `token` at `now` (seconds since the epoch).
    ///
    /// # Errors
    /// `Unauthenticated` saying what is wrong: malformed, expired, not yet
    /// valid, bad signature, wrong audience or issuer, unknown key, bad
    /// claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<Arc<TokenClaims>, AuthError> {
        use std::hash::BuildHasher as _;
        let key = self.hasher.hash_one(token.as_bytes());
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(0);
        if let Some(hit) = self.verified.get(&key)
            && bool::from(hit.token.as_ref().ct_eq(token.as_bytes()))
        {
            if now <= hit.claims.expires_at + leeway {
                return Ok(hit.claims.clone());
            }
            self.verified.remove(&key);
        }
        let claims = Arc::new(self.verify_uncached(token, now)?);
        // `now` is authoritative (jsonwebtoken checked against the wall clock).
        if now > claims.expires_at + leeway {
            return Err(AuthError::BadToken("expired".into()));
        }
        self.verified.insert(
            key,
            Arc::new(Verified {
                token: token.as_bytes().into(),
                claims: claims.clone(),
            }),
        );
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str, now: i64) -> Result<TokenClaims, AuthError> {
        let bad = |why: &str| AuthError::BadToken(why.to_owned());
        let header = decode_header(token).map_err(|_| bad("malformed (not a JWT)"))?;
        let key = match header.alg {
            Algorithm::HS256 => self
                .hs256
                .clone()
                .ok_or_else(|| bad("HS256 tokens are not accepted (no auth.hs256_secret)"))?,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
                let jwks = self
                    .jwks
                    .as_ref()
                    .ok_or_else(|| bad("asymmetric tokens are not accepted (no auth.jwks_file)"))?;
                let find = |set: &JwkSet| match &header.kid {
                    Some(kid) => set.find(kid).cloned(),
                    None if set.keys.len() == 1 => set.keys.first().cloned(),
                    None => None,
                };
                let jwk = match find(&jwks.current(false)) {
                    Some(k) => k,
                    // A key rotated in at the identity provider: re-read now.
                    None => find(&jwks.current(true)).ok_or_else(|| {
                        bad("signed with a key that is not in the JWKS (unknown kid)")
                    })?,
                };
                DecodingKey::from_jwk(&jwk).map_err(|_| bad("the JWKS key cannot be used"))?
            }
            _ => {
                return Err(bad(
                    "algorithm not accepted (use HS256, RS256, ES256 or EdDSA)",
                ));
            }
        };
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
        }
        let raw = decode::<RawClaims>(token, &key, &v)
            .map_err(|e| {
                bad(match e.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not yet valid (nbf)",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::InvalidAlgorithm => "algorithm does not match the key",
                    ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => {
                        "missing or malformed claims (sub, tenant_id, role, exp)"
                    }
                    _ => "malformed",
                })
            })?
            .claims;
        // A token that claims to live longer than the cap is refused, not
        // trimmed: whoever minted it should mint shorter ones.
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(0);
        let lifetime = (raw.exp - now - leeway).max(raw.iat.map_or(0, |iat| raw.exp - iat));
        if lifetime > self.max_lifetime {
            return Err(AuthError::BadToken(format!(
                "lives longer than the {} s this broker accepts (auth.max_token_lifetime_secs); issue shorter-lived tokens",
                self.max_lifetime
            )));
        }
        let role = Role::parse(&raw.role)
            .ok_or_else(|| bad("role must be admin, trader, viewer or operator"))?;
        let tenant = raw
            .tenant_id
            .as_deref()
            .map(|t| {
                uuid::Uuid::try_parse(t)
                    .ok()
                    .filter(|u| u.hyphenated().to_string() == t)
                    .map(TenantId::new)
                    .ok_or_else(|| bad("tenant_id is not a lowercase hyphenated UUID"))
            })
            .transpose()?;
        if tenant.is_none() && role != Role::Operator {
            return Err(bad(
                "tenant_id is required for admin, trader and viewer tokens",
            ));
        }
        Ok(TokenClaims {
            subject: raw.sub.into(),
            tenant,
            role,
            expires_at: raw.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const T: &str = "0b2c7a4e-5f1d-4c2a-9e3b-7d6f8a9b0c1d";
    const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn hs(claims: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(&TokenSettings {
            hs256_secret: Some(SECRET.into()),
            jwks_file: None,
            audience: Some("credbroker".into()),
            issuer: None,
            leeway: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(4 * 3600),
        })
        .unwrap()
    }

    #[test]
    fn hs256_tokens_verify_and_say_what_is_wrong() {
        let v = verifier();
        let good =
            json!({"sub":"alice","tenant_id":T,"role":"admin","exp":now()+60,"aud":"credbroker"});
        let c = v.verify(&hs(&good), now()).unwrap();
        // Exactly at the cap is accepted.
        let at_cap = json!({"sub":"b","tenant_id":T,"role":"viewer","iat":now(),"exp":now()+4*3600,"aud":"credbroker"});
        assert!(v.verify(&hs(&at_cap), now()).is_ok());
        assert_eq!((c.role, c.tenant), (Role::Admin, Some(T.parse().unwrap())));
        let cases = [
            (
                json!({"sub":"a","tenant_id":T,"role":"admin","exp":now()-60,"aud":"credbroker"}),
                "expired",
            ),
            (
                json!({"sub":"a","tenant_id":T,"role":"admin","exp":now()+60,"aud":"other"}),
                "wrong audience",
            ),
            (
                json!({"sub":"a","tenant_id":T,"role":"admin","exp":now()+60,"nbf":now()+600,"aud":"credbroker"}),
                "not yet valid",
            ),
            (
                json!({"sub":"a","tenant_id":T,"role":"root","exp":now()+60,"aud":"credbroker"}),
                "role must be",
            ),
            (
                json!({"sub":"a","role":"admin","exp":now()+60,"aud":"credbroker"}),
                "tenant_id is required",
            ),
            (
                json!({"sub":"a","tenant_id":T.to_uppercase(),"role":"admin","exp":now()+60,"aud":"credbroker"}),
                "lowercase",
            ),
            (
                json!({"tenant_id":T,"role":"admin","exp":now()+60,"aud":"credbroker"}),
                "missing or malformed",
            ),
            // Valid for ten years: refused, however well signed.
            (
                json!({"sub":"a","tenant_id":T,"role":"admin","exp":now()+10*365*86400,"aud":"credbroker"}),
                "lives longer than the 14400 s",
            ),
            // Issued long ago for a long life, though little of it is left.
            (
                json!({"sub":"a","tenant_id":T,"role":"admin","iat":now()-30*86400,"exp":now()+60,"aud":"credbroker"}),
                "lives longer",
            ),
        ];
        for (claims, want) in cases {
            let e = v.verify(&hs(&claims), now()).unwrap_err();
            assert!(e.to_string().contains(want), "{claims}: {e}");
        }
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        )
        .unwrap();
        assert!(
            v.verify(&forged, now())
                .unwrap_err()
                .to_string()
                .contains("bad signature")
        );
        assert!(
            v.verify("not.a.jwt", now())
                .unwrap_err()
                .to_string()
                .contains("malformed")
        );
        // A cached token still expires.
        let short =
            hs(&json!({"sub":"a","tenant_id":T,"role":"trader","exp":now()+2,"aud":"credbroker"}));
        assert!(v.verify(&short, now()).is_ok());
        assert!(
            v.verify(&short, now() + 60)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
    }

    #[test]
    fn es256_tokens_verify_against_a_jwks_file_that_is_reread() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let jwk = |kid: &str, key: &rcgen::KeyPair| {
            use base64::Engine as _;
            let raw = key.public_key_raw();
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            json!({"kty":"EC","crv":"P-256","kid":kid,"alg":"ES256","use":"sig",
                   "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65])})
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({"keys":[jwk("k1", &key)]}).to_string()).unwrap();
        let v = TokenVerifier::new(&TokenSettings {
            hs256_secret: None,
            jwks_file: Some(path.clone()),
            audience: None,
            issuer: Some("https://idp.test".into()),
            leeway: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(4 * 3600),
        })
        .unwrap();
        let sign = |kid: &str, key: &rcgen::KeyPair, iss: &str| {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some(kid.into());
            encode(
                &h,
                &json!({"sub":"pod","tenant_id":T,"role":"trader","exp":now()+60,"iss":iss}),
                &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            v.verify(&sign("k1", &key, "https://idp.test"), now())
                .unwrap()
                .role,
            Role::Trader
        );
        assert!(
            v.verify(&sign("k1", &key, "https://evil"), now())
                .unwrap_err()
                .to_string()
                .contains("wrong issuer")
        );
        // A new key appears in the file: tokens signed with it verify.
        let key2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let t2 = sign("k2", &key2, "https://idp.test");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, json!({"keys":[jwk("k2", &key2)]}).to_string()).unwrap();
        assert_eq!(&*v.verify(&t2, now()).unwrap().subject, "pod");
        // HS256 is refused when only a JWKS is configured (no algorithm confusion).
        let e = v
            .verify(
                &hs(&json!({"sub":"a","tenant_id":T,"role":"admin","exp":now()+60})),
                now(),
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("HS256 tokens are not accepted"),
            "{e}"
        );
    }

    proptest! {
        /// Arbitrary bytes as a token never panic and never verify.
        #[test]
        fn arbitrary_tokens_are_refused(s in "\\PC{0,200}") {
            prop_assert!(verifier().verify(&s, now()).is_err());
        }
    }
}
