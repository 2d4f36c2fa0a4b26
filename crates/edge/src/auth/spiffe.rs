//! SPIFFE IDs parsed strictly to the SPIFFE-ID specification (§2): the
//! `spiffe` scheme, a trust domain of lowercase letters, digits, `.`, `-`
//! and `_`, and a path of segments of letters, digits, `.`, `-` and `_`,
//! none empty, `.` or `..`. No percent-encoding, port, userinfo, query or
//! fragment can pass, because none of their characters may appear. At most
//! 2,048 bytes.
//!
//! On top of the spec, the broker's own layout:
//! `spiffe://{td}/tenant/{uuid}/...` (a workload of that tenant; the UUID in
//! canonical lowercase hyphenated form) and `spiffe://{td}/operator/{name}`.

use std::fmt;

use thiserror::Error;
use uuid::Uuid;

use crate::broker::types::TenantId;

/// Longest SPIFFE ID accepted, in bytes (the spec's limit).
pub const MAX_LEN: usize = 2048;

/// A syntactically valid SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (after the trust domain).
    path_at: usize,
}

/// Why a string is not a SPIFFE ID, or not one the broker accepts.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SpiffeError {
    /// Longer than [`MAX_LEN`].
    #[error("longer than 2048 bytes")]
    TooLong,
    /// Not `spiffe://` (lowercase).
    #[error("does not start with spiffe://")]
    Scheme,
    /// Empty trust domain.
    #[error("empty trust domain")]
    EmptyTrustDomain,
    /// A character a trust domain may not hold (uppercase, `:` of a port,
    /// `@` of userinfo, `%`...).
    #[error("trust domain holds a character other than a-z, 0-9, '.', '-', '_'")]
    TrustDomainChar,
    /// An empty path segment (`//` or a trailing `/`).
    #[error("empty path segment")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("'.' or '..' path segment")]
    DotSegment,
    /// A character a path may not hold (`%`, `?`, `#`, `:`, `{`...).
    #[error("path holds a character other than letters, digits, '.', '-', '_'")]
    PathChar,
    /// Another trust domain than the broker's.
    #[error("not in the broker's trust domain")]
    ForeignTrustDomain,
    /// Neither `/tenant/{uuid}/...` nor `/operator/{name}`.
    #[error("neither /tenant/<uuid>/... nor /operator/<name>")]
    UnknownLayout,
    /// The tenant segment is not a canonical lowercase hyphenated UUID.
    #[error("tenant segment is not a lowercase hyphenated UUID")]
    TenantNotCanonical,
}

impl SpiffeId {
    /// Parses `s` strictly.
    ///
    /// # Errors
    /// The first rule `s` breaks.
    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        if s.len() > MAX_LEN {
            return Err(SpiffeError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeError::Scheme)?;
        let td_end = rest.find('/').unwrap_or(rest.len());
        let td = &rest[..td_end];
        if td.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain);
        }
        if !td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(SpiffeError::TrustDomainChar);
        }
        let path = &rest[td_end..];
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(SpiffeError::EmptySegment);
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeError::DotSegment);
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return Err(SpiffeError::PathChar);
                }
            }
        }
        Ok(Self {
            id: s.to_owned(),
            path_at: "spiffe://".len() + td_end,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.path_at]
    }

    /// The path segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.id[self.path_at..].split('/').skip(1)
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

/// Who a certificate names, in the broker's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSubject {
    /// A workload (pod, sidecar) of one tenant.
    Workload(TenantId),
    /// A platform operator.
    Operator,
}

/// Parses a certificate's SPIFFE ID under `trust_domain` into whom it names.
///
/// # Errors
/// The first rule it breaks, the spec's or the broker's layout.
pub fn subject(id: &str, trust_domain: &str) -> Result<(SpiffeId, CertSubject), SpiffeError> {
    let id = SpiffeId::parse(id)?;
    if id.trust_domain() != trust_domain {
        return Err(SpiffeError::ForeignTrustDomain);
    }
    let segs: Vec<&str> = id.segments().collect();
    let subject = match segs.as_slice() {
        ["operator", _] => CertSubject::Operator,
        ["tenant", t, ..] => {
            let uuid = Uuid::try_parse(t).map_err(|_| SpiffeError::TenantNotCanonical)?;
            if uuid.hyphenated().to_string() != *t {
                return Err(SpiffeError::TenantNotCanonical);
            }
            CertSubject::Workload(TenantId::new(uuid))
        }
        _ => return Err(SpiffeError::UnknownLayout),
    };
    Ok((id, subject))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const TD: &str = "credbroker.local";
    const T: &str = "0b2c7a4e-5f1d-4c2a-9e3b-7d6f8a9b0c1d";

    #[test]
    fn accepts_the_layout() {
        let (_, s) = subject(&format!("spiffe://{TD}/tenant/{T}/pod/a-1_b.c"), TD).unwrap();
        assert_eq!(s, CertSubject::Workload(T.parse().unwrap()));
        let (_, s) = subject(&format!("spiffe://{TD}/tenant/{T}"), TD).unwrap();
        assert_eq!(s, CertSubject::Workload(T.parse().unwrap()));
        let (id, s) = subject(&format!("spiffe://{TD}/operator/alice"), TD).unwrap();
        assert_eq!(s, CertSubject::Operator);
        assert_eq!(id.trust_domain(), TD);
    }

    #[test]
    fn refuses_everything_else() {
        let upper = T.to_uppercase();
        let simple = T.replace('-', "");
        let long = format!("spiffe://{TD}/tenant/{T}/{}", "a".repeat(2048));
        let cases: Vec<(String, SpiffeError)> = vec![
            (format!("SPIFFE://{TD}/operator/a"), SpiffeError::Scheme),
            (format!("https://{TD}/operator/a"), SpiffeError::Scheme),
            ("spiffe:///operator/a".into(), SpiffeError::EmptyTrustDomain),
            (
                format!("spiffe://{TD}:443/operator/a"),
                SpiffeError::TrustDomainChar,
            ),
            (
                format!("spiffe://user@{TD}/operator/a"),
                SpiffeError::TrustDomainChar,
            ),
            (
                "spiffe://Credbroker.local/operator/a".to_owned(),
                SpiffeError::TrustDomainChar,
            ),
            (
                format!("spiffe://{TD}/operator/a/"),
                SpiffeError::EmptySegment,
            ),
            (
                format!("spiffe://{TD}//operator/a"),
                SpiffeError::EmptySegment,
            ),
            (
                format!("spiffe://{TD}/tenant/{T}/.."),
                SpiffeError::DotSegment,
            ),
            (
                format!("spiffe://{TD}/tenant/{T}/./pod"),
                SpiffeError::DotSegment,
            ),
            (
                format!("spiffe://{TD}/tenant/%7B{T}%7D"),
                SpiffeError::PathChar,
            ),
            (
                format!("spiffe://{TD}/tenant/{{{T}}}"),
                SpiffeError::PathChar,
            ),
            (
                format!("spiffe://{TD}/tenant/urn:uuid:{T}"),
                SpiffeError::PathChar,
            ),
            (
                format!("spiffe://{TD}/operator/a?x=1"),
                SpiffeError::PathChar,
            ),
            (format!("spiffe://{TD}/operator/a#f"), SpiffeError::PathChar),
            (
                format!("spiffe://{TD}/tenant/{upper}"),
                SpiffeError::TenantNotCanonical,
            ),
            (
                format!("spiffe://{TD}/tenant/{simple}"),
                SpiffeError::TenantNotCanonical,
            ),
            (
                format!("spiffe://{TD}.evil/operator/a"),
                SpiffeError::ForeignTrustDomain,
            ),
            (
                format!("spiffe://{TD}/operator"),
                SpiffeError::UnknownLayout,
            ),
            (
                format!("spiffe://{TD}/operator/a/b"),
                SpiffeError::UnknownLayout,
            ),
            (format!("spiffe://{TD}/admin/a"), SpiffeError::UnknownLayout),
            (format!("spiffe://{TD}"), SpiffeError::UnknownLayout),
            (long, SpiffeError::TooLong),
        ];
        for (id, want) in cases {
            assert_eq!(subject(&id, TD).map(|_| ()), Err(want), "{id}");
        }
    }

    proptest! {
        /// Arbitrary input never panics, and whatever parses is printed back
        /// unchanged (it is already the canonical form).
        #[test]
        fn never_panics_and_round_trips(s in "\\PC{0,80}", tail in "[a-zA-Z0-9._/-]{0,40}") {
            for input in [s.clone(), format!("spiffe://{TD}/{tail}"), format!("spiffe://{s}")] {
                if let Ok(id) = SpiffeId::parse(&input) {
                    prop_assert_eq!(id.as_str(), input.as_str());
                    let again = SpiffeId::parse(id.as_str()).unwrap();
                    prop_assert_eq!(again, id);
                }
                let _ = subject(&input, TD);
            }
        }
    }
}
