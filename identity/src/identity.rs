//! SPIFFE workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Identity is a type, never a string passed around. Parsing follows the SPIFFE ID specification
//! (lower-case trust domain of `[a-z0-9.-_]`, path segments of `[A-Za-z0-9.-_]`, no `.`/`..`
//! segments, no query, fragment, port or user info) narrowed to Istio's Kubernetes shape.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// URI scheme of SPIFFE IDs.
pub const SPIFFE_SCHEME: &str = "spiffe://";
/// Trust domain used when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Maximum length of a SPIFFE ID in bytes (SPIFFE ID spec, section 2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Maximum length of a trust domain in bytes (SPIFFE ID spec, section 2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Identity {
    /// A Kubernetes service account in a SPIFFE trust domain.
    Spiffe {
        /// Trust domain, e.g. `cluster.local`.
        trust_domain: String,
        /// Kubernetes namespace.
        namespace: String,
        /// Kubernetes service account.
        service_account: String,
    },
}

/// Why a string is not a valid SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The ID does not start with `spiffe://`.
    #[error("SPIFFE ID {input:?} does not start with {SPIFFE_SCHEME:?}")]
    MissingScheme {
        /// The rejected input.
        input: String,
    },
    /// Longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {len} bytes, longer than the maximum of {MAX_SPIFFE_ID_LEN}")]
    TooLong {
        /// Length of the input.
        len: usize,
    },
    /// The trust domain is empty, too long or has characters outside `[a-z0-9.-_]`.
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        /// The rejected trust domain.
        trust_domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("SPIFFE ID {input:?} does not have the shape spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    InvalidShape {
        /// The rejected input.
        input: String,
    },
    /// A path segment (namespace or service account) is invalid.
    #[error("invalid {what} {segment:?} in SPIFFE ID: {reason}")]
    InvalidSegment {
        /// `namespace` or `service account`.
        what: &'static str,
        /// The rejected segment.
        segment: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Identity {
    /// Builds and validates a SPIFFE identity.
    pub fn spiffe(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (trust_domain, namespace, service_account) =
            (trust_domain.into(), namespace.into(), service_account.into());
        validate_trust_domain(&trust_domain)?;
        validate_segment("namespace", &namespace)?;
        validate_segment("service account", &service_account)?;
        let id = Identity::Spiffe { trust_domain, namespace, service_account };
        let len = id.to_string().len();
        if len > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong { len });
        }
        Ok(id)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        match self {
            Identity::Spiffe { trust_domain, .. } => trust_domain,
        }
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        match self {
            Identity::Spiffe { namespace, .. } => namespace,
        }
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        match self {
            Identity::Spiffe { service_account, .. } => service_account,
        }
    }

    /// The principal as Istio's AuthorizationPolicy writes it: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        self.to_string()[SPIFFE_SCHEME.len()..].to_owned()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Spiffe { trust_domain, namespace, service_account } => {
                write!(f, "{SPIFFE_SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}")
            }
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong { len: s.len() });
        }
        // The scheme is case-insensitive in URIs but SPIFFE requires the lower-case form.
        let rest = s.strip_prefix(SPIFFE_SCHEME).ok_or_else(|| IdentityError::MissingScheme { input: s.to_owned() })?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        let shape = || IdentityError::InvalidShape { input: s.to_owned() };
        let mut parts = path.strip_prefix('/').ok_or_else(shape)?.split('/');
        let (ns_kw, ns, sa_kw, sa, extra) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
        match (ns_kw, ns, sa_kw, sa, extra) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Identity::spiffe(trust_domain, ns, sa),
            _ => Err(shape()),
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a trust domain against the SPIFFE rules.
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let bad = |reason| Err(IdentityError::InvalidTrustDomain { trust_domain: td.to_owned(), reason });
    if td.is_empty() {
        return bad("it is empty");
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return bad("it is longer than 255 bytes");
    }
    if td.contains(':') {
        return bad("a port is not allowed");
    }
    if td.contains('@') {
        return bad("user info is not allowed");
    }
    if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')) {
        return bad("only lower-case letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

fn validate_segment(what: &'static str, seg: &str) -> Result<(), IdentityError> {
    let bad = |reason| Err(IdentityError::InvalidSegment { what, segment: seg.to_owned(), reason });
    if seg.is_empty() {
        return bad("it is empty");
    }
    if seg == "." || seg == ".." {
        return bad("relative segments are not allowed");
    }
    if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
        return bad("only letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo-productpage");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table of (input, expected-error predicate)
    fn malformed_spiffe_ids_are_refused() {
        let cases: &[(&str, fn(&IdentityError) -> bool)] = &[
            ("", |e| matches!(e, IdentityError::MissingScheme { .. })),
            ("https://cluster.local/ns/a/sa/b", |e| matches!(e, IdentityError::MissingScheme { .. })),
            ("SPIFFE://cluster.local/ns/a/sa/b", |e| matches!(e, IdentityError::MissingScheme { .. })),
            ("spiffe:///ns/a/sa/b", |e| matches!(e, IdentityError::InvalidTrustDomain { .. })),
            ("spiffe://Cluster.Local/ns/a/sa/b", |e| matches!(e, IdentityError::InvalidTrustDomain { .. })),
            ("spiffe://cluster.local:443/ns/a/sa/b", |e| matches!(e, IdentityError::InvalidTrustDomain { .. })),
            ("spiffe://user@cluster.local/ns/a/sa/b", |e| matches!(e, IdentityError::InvalidTrustDomain { .. })),
            ("spiffe://cluster.local", |e| matches!(e, IdentityError::InvalidShape { .. })),
            ("spiffe://cluster.local/", |e| matches!(e, IdentityError::InvalidShape { .. })),
            ("spiffe://cluster.local/ns/a", |e| matches!(e, IdentityError::InvalidShape { .. })),
            ("spiffe://cluster.local/ns/a/sa/b/", |e| matches!(e, IdentityError::InvalidShape { .. })),
            ("spiffe://cluster.local/ns/a/sa/b/extra", |e| matches!(e, IdentityError::InvalidShape { .. })),
            ("spiffe://cluster.local/namespace/a/sa/b", |e| matches!(e, IdentityError::InvalidShape { .. })),
            ("spiffe://cluster.local/sa/b/ns/a", |e| matches!(e, IdentityError::InvalidShape { .. })),
            ("spiffe://cluster.local/ns//sa/b", |e| matches!(e, IdentityError::InvalidSegment { .. })),
            ("spiffe://cluster.local/ns/../sa/b", |e| matches!(e, IdentityError::InvalidSegment { .. })),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", |e| matches!(e, IdentityError::InvalidSegment { .. })),
            ("spiffe://cluster.local/ns/a/sa/b#frag", |e| matches!(e, IdentityError::InvalidSegment { .. })),
            ("spiffe://cluster.local/ns/a%20b/sa/b", |e| matches!(e, IdentityError::InvalidSegment { .. })),
        ];
        for (input, want) in cases {
            let err = input.parse::<Identity>().expect_err(input);
            assert!(want(&err), "{input:?}: unexpected error {err:?}");
        }
        let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(long.parse::<Identity>(), Err(IdentityError::TooLong { .. })));
    }

    #[test]
    fn constructor_validates_like_the_parser() {
        assert!(Identity::spiffe("cluster.local", "ns1", "sa-1").is_ok());
        assert!(Identity::spiffe("cluster.local", "ns/1", "sa").is_err());
        assert!(Identity::spiffe("", "ns", "sa").is_err());
    }
}
