//! rustls mTLS configurations for workload identities.
//!
//! - TLS 1.3 only, AES-GCM suites only; aws-lc-rs for key exchange and signatures, the record
//!   layer's AES-GCM from aws-lc or ring, whichever is faster on the CPU ([`RecordCipher`]).
//! - `COMPLIANCE_POLICY=pqc` restricts key exchange to the hybrid `X25519MLKEM768` group, so a
//!   peer that cannot negotiate it fails the handshake.
//! - Peers are verified by [`SpiffeVerifier`]: chain to the current [`TrustBundle`] (several
//!   roots during a root rotation), expiry against the injected [`Clock`], CRLs (a revoked
//!   certificate fails with an error naming its serial), and exactly one well-formed SPIFFE ID in
//!   an accepted trust domain. DNS names are irrelevant: the peer is authenticated by identity.
//! - Trust bundle and CRLs live behind an [`ArcSwap`], certificates behind [`CertSlot`]s, so
//!   updates and rotations apply to new handshakes without restarting anything and without
//!   touching established connections.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, TrustAnchor, UnixTime};
/// Which extended key usage a verification demands (`KeyUsage::client_auth()` /
/// `KeyUsage::server_auth()`), re-exported for [`SpiffeVerifier::verify`].
pub use webpki::KeyUsage;
use webpki::{CertRevocationList, EndEntityCert, OwnedCertRevocationList, RevocationOptionsBuilder};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ca::serial_hex;
use crate::clock::{Clock, rfc3339};
use crate::identity::{Identity, IdentityError};

/// Environment variable selecting the [`CompliancePolicy`].
pub const COMPLIANCE_POLICY_ENV: &str = "COMPLIANCE_POLICY";
/// Interval at which [`TrustBundle::spawn_file_watcher`] polls the trust bundle and CRL files.
pub const DEFAULT_TRUST_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Key-exchange policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompliancePolicy {
    /// Hybrid post-quantum first, classical groups accepted.
    #[default]
    Default,
    /// Only `X25519MLKEM768`: peers that cannot negotiate it are refused.
    Pqc,
}

impl CompliancePolicy {
    /// Reads [`COMPLIANCE_POLICY_ENV`]; unset or empty means [`CompliancePolicy::Default`].
    pub fn from_env() -> Result<Self, TlsError> {
        std::env::var(COMPLIANCE_POLICY_ENV).unwrap_or_default().parse()
    }
}

impl std::str::FromStr for CompliancePolicy {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        match s.trim() {
            "" | "default" => Ok(Self::Default),
            "pqc" => Ok(Self::Pqc),
            other => Err(TlsError::UnknownCompliancePolicy { value: other.to_owned() }),
        }
    }
}

/// Errors building TLS configuration or trust state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// `COMPLIANCE_POLICY` has an unknown value.
    #[error("unknown {COMPLIANCE_POLICY_ENV} value {value:?}; expected \"pqc\" or unset")]
    UnknownCompliancePolicy {
        /// The value.
        value: String,
    },
    /// A root certificate cannot be used as a trust anchor.
    #[error("root certificate #{index} of the trust bundle is unusable: {reason}")]
    BadRoot {
        /// Position in the bundle.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The trust bundle is empty.
    #[error("the trust bundle has no root certificate")]
    EmptyBundle,
    /// A CRL cannot be parsed.
    #[error("CRL #{index} is unusable: {reason}")]
    BadCrl {
        /// Position in the list.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A trust bundle or CRL file cannot be read or parsed.
    #[error("cannot load {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("rustls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a peer certificate was refused. Carried inside rustls' `CertificateError::Other`, so the
/// handshake error names the cause (rustls prints the inner error with `Debug`, which is therefore
/// the same as `Display`).
#[derive(Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The peer sent no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate is not parseable.
    #[error("peer certificate is malformed: {reason}")]
    Malformed {
        /// Why.
        reason: String,
    },
    /// The certificate (or an issuer) has expired.
    #[error("peer certificate expired at {not_after} (now {now})")]
    Expired {
        /// notAfter, RFC 3339.
        not_after: String,
        /// Verification time, RFC 3339.
        now: String,
    },
    /// The certificate is not valid yet.
    #[error("peer certificate is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// notBefore, RFC 3339.
        not_before: String,
        /// Verification time, RFC 3339.
        now: String,
    },
    /// The certificate does not chain to any root of the trust bundle.
    #[error("peer certificate does not chain to the trust bundle: {reason}")]
    UntrustedChain {
        /// webpki's reason.
        reason: String,
    },
    /// The certificate (or an issuer in its chain) is on a CRL.
    #[error("peer certificate serial {serial} is revoked")]
    Revoked {
        /// Serial number, lower-case hex.
        serial: String,
    },
    /// No SPIFFE URI SAN, or more than one.
    #[error("peer certificate must carry exactly one SPIFFE URI SAN, found {found}")]
    SpiffeIdCount {
        /// How many were found.
        found: usize,
    },
    /// The SPIFFE ID is malformed.
    #[error("peer SPIFFE ID is malformed: {0}")]
    MalformedSpiffeId(#[from] IdentityError),
    /// The SPIFFE ID is in a trust domain that is not accepted.
    #[error("peer identity {identity} is outside the accepted trust domains {accepted:?}")]
    ForeignTrustDomain {
        /// The peer identity.
        identity: Identity,
        /// Accepted trust domains.
        accepted: Vec<String>,
    },
    /// The SPIFFE ID is valid but not the one expected for this connection.
    #[error("peer identity {identity} is not one of the expected {expected:?}")]
    UnexpectedIdentity {
        /// The peer identity.
        identity: Identity,
        /// Identities this connection accepts.
        expected: Vec<String>,
    },
}

impl fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The crypto provider for a policy: aws-lc-rs, the policy's groups, and TLS 1.3 AES-GCM suites
/// from whichever library is faster on this CPU ([`RecordCipher`]).
pub fn crypto_provider(policy: CompliancePolicy) -> Arc<CryptoProvider> {
    provider_with(policy, RecordCipher::for_this_cpu())
}

fn provider_with(policy: CompliancePolicy, records: RecordCipher) -> Arc<CryptoProvider> {
    let base = aws_lc_rs::default_provider();
    let kx_groups = match policy {
        CompliancePolicy::Default => {
            vec![aws_lc_rs::kx_group::X25519MLKEM768, aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1]
        }
        CompliancePolicy::Pqc => vec![aws_lc_rs::kx_group::X25519MLKEM768],
    };
    Arc::new(CryptoProvider { cipher_suites: records.suites(), kx_groups, ..base })
}

struct TrustState {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    crls: Arc<Vec<CertRevocationList<'static>>>,
    /// Revoked serial (normalised bytes) -> nothing; used to name the serial on failure.
    revoked: HashMap<Vec<u8>, ()>,
    crl_this_update: Option<SystemTime>,
    trust_domains: Vec<String>,
}

/// The roots, CRLs and accepted trust domains every verifier reads on each handshake.
pub struct TrustBundle {
    state: ArcSwap<TrustState>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.load();
        f.debug_struct("TrustBundle")
            .field("roots", &s.roots.len())
            .field("crls", &s.crls.len())
            .field("trust_domains", &s.trust_domains)
            .finish()
    }
}

fn anchors(roots: &[CertificateDer<'static>]) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::EmptyBundle);
    }
    roots
        .iter()
        .enumerate()
        .map(|(index, r)| {
            webpki::anchor_from_trusted_cert(r)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::BadRoot { index, reason: e.to_string() })
        })
        .collect()
}

type ParsedCrls = (Vec<CertRevocationList<'static>>, HashMap<Vec<u8>, ()>, Option<SystemTime>);

fn parse_crls(crls: &[CertificateRevocationListDer<'static>]) -> Result<ParsedCrls, TlsError> {
    let mut parsed = Vec::with_capacity(crls.len());
    let mut revoked = HashMap::new();
    let mut newest: Option<SystemTime> = None;
    for (index, der) in crls.iter().enumerate() {
        let bad = |reason: String| TlsError::BadCrl { index, reason };
        let owned = OwnedCertRevocationList::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
        let (_, x) = x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
            .map_err(|e| bad(e.to_string()))?;
        for r in x.iter_revoked_certificates() {
            revoked.insert(normalise_serial(r.raw_serial()), ());
        }
        let this_update = SystemTime::from(x.last_update().to_datetime());
        newest = Some(newest.map_or(this_update, |n| n.max(this_update)));
        parsed.push(CertRevocationList::Owned(owned));
    }
    Ok((parsed, revoked, newest))
}

fn normalise_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    raw[start..].to_vec()
}

impl TrustBundle {
    /// A bundle trusting `roots` for identities of `trust_domains`.
    pub fn new(roots: Vec<CertificateDer<'static>>, trust_domains: Vec<String>) -> Result<Self, TlsError> {
        let anchors = anchors(&roots)?;
        Ok(Self {
            state: ArcSwap::from_pointee(TrustState {
                roots,
                anchors,
                crls: Arc::new(Vec::new()),
                revoked: HashMap::new(),
                crl_this_update: None,
                trust_domains,
            }),
        })
    }

    /// Replaces the roots (e.g. old + new root during a rotation, later only the new one).
    /// Applies to the next handshake.
    pub fn set_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        let anchors = anchors(&roots)?;
        self.update(|s| TrustState { roots: roots.clone(), anchors: anchors.clone(), ..s.clone_shallow() });
        tracing::info!(roots = roots.len(), "trust bundle updated");
        Ok(())
    }

    /// Replaces the CRLs. Applies to the next handshake.
    pub fn set_crls(&self, crls: Vec<CertificateRevocationListDer<'static>>) -> Result<(), TlsError> {
        let (parsed, revoked, this_update) = parse_crls(&crls)?;
        let parsed = Arc::new(parsed);
        let count = revoked.len();
        self.update(|s| TrustState {
            crls: parsed.clone(),
            revoked: revoked.clone(),
            crl_this_update: this_update,
            ..s.clone_shallow()
        });
        tracing::info!(crls = crls.len(), revoked = count, "CRLs updated");
        Ok(())
    }

    /// Replaces the accepted trust domains.
    pub fn set_trust_domains(&self, trust_domains: Vec<String>) {
        self.update(|s| TrustState { trust_domains: trust_domains.clone(), ..s.clone_shallow() });
    }

    fn update(&self, f: impl Fn(&TrustState) -> TrustState) {
        self.state.rcu(|s| Arc::new(f(s)));
    }

    /// The current roots.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.state.load().roots.clone()
    }

    /// The accepted trust domains.
    pub fn trust_domains(&self) -> Vec<String> {
        self.state.load().trust_domains.clone()
    }

    /// `thisUpdate` of the newest CRL, if any (for the CRL age metric).
    pub fn crl_this_update(&self) -> Option<SystemTime> {
        self.state.load().crl_this_update
    }

    /// Whether a certificate verified at a handshake still stands at `now`: not expired, and not
    /// on the CRLs as they are now. A connection outlives the moment its peer was verified; the
    /// chain was checked then, and this re-checks what changes with time, for the leaf.
    pub fn recheck(&self, leaf: &Validity, now: SystemTime) -> Result<(), VerifyError> {
        if now > leaf.not_after {
            return Err(VerifyError::Expired { not_after: rfc3339(leaf.not_after), now: rfc3339(now) });
        }
        if self.state.load().revoked.contains_key(&leaf.serial) {
            return Err(VerifyError::Revoked { serial: serial_hex(&leaf.serial) });
        }
        Ok(())
    }

    /// Number of revoked serials across all CRLs.
    pub fn revoked_count(&self) -> usize {
        self.state.load().revoked.len()
    }

    /// A bundle loaded from a PEM roots file (e.g. `root-cert.pem`, holding old and new roots
    /// during a rotation) and an optional CRL file (e.g. `ca-crl.pem`; absent is fine).
    pub fn from_files(
        roots_path: &Path,
        crl_path: Option<&Path>,
        trust_domains: Vec<String>,
    ) -> Result<Self, TlsError> {
        let roots = read_roots(roots_path)?;
        let bundle = Self::new(roots, trust_domains)
            .map_err(|e| TlsError::File { path: roots_path.to_owned(), reason: e.to_string() })?;
        bundle.reload_files(roots_path, crl_path)?;
        Ok(bundle)
    }

    /// Loads roots from a PEM file and, if given and present, a CRL file (PEM or DER).
    pub fn reload_files(&self, roots_path: &Path, crl_path: Option<&Path>) -> Result<(), TlsError> {
        let file_err = |path: &Path, reason: String| TlsError::File { path: path.to_owned(), reason };
        let roots = CertificateDer::pem_file_iter(roots_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file_err(roots_path, e.to_string()))?;
        self.set_roots(roots).map_err(|e| file_err(roots_path, e.to_string()))?;
        if let Some(p) = crl_path.filter(|p| p.exists()) {
            let bytes = std::fs::read(p).map_err(|e| file_err(p, e.to_string()))?;
            let crls: Vec<CertificateRevocationListDer<'static>> =
                match CertificateRevocationListDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>() {
                    Ok(v) if !v.is_empty() => v,
                    _ => vec![CertificateRevocationListDer::from(bytes)],
                };
            self.set_crls(crls).map_err(|e| file_err(p, e.to_string()))?;
        }
        Ok(())
    }

    /// Polls `roots_path` and `crl_path` every `interval` and reloads them when their modification
    /// time or size changes. A file that fails to load is logged and the previous state kept.
    pub fn spawn_file_watcher(
        self: Arc<Self>,
        roots_path: PathBuf,
        crl_path: Option<PathBuf>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        }
        // Taken now, not inside the task: a change made before the task first runs must count.
        let mut last = (stamp(&roots_path), crl_path.as_deref().and_then(stamp));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let now = (stamp(&roots_path), crl_path.as_deref().and_then(stamp));
                if now != last {
                    match self.reload_files(&roots_path, crl_path.as_deref()) {
                        Ok(()) => last = now,
                        Err(e) => tracing::warn!(error = %e, "keeping the previous trust bundle"),
                    }
                }
            }
        })
    }
}

fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })
}

impl TrustState {
    fn clone_shallow(&self) -> TrustState {
        TrustState {
            roots: self.roots.clone(),
            anchors: self.anchors.clone(),
            crls: self.crls.clone(),
            revoked: self.revoked.clone(),
            crl_this_update: self.crl_this_update,
            trust_domains: self.trust_domains.clone(),
        }
    }
}

/// What [`TrustBundle::recheck`] needs of a certificate, read from it once: its serial and the
/// end of its validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    serial: Vec<u8>,
    not_after: SystemTime,
}

impl Validity {
    /// The validity of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Validity, VerifyError> {
        Ok(Validity::of_parsed(&parse(cert)?))
    }

    fn of_parsed(x: &X509Certificate<'_>) -> Validity {
        Validity {
            serial: normalise_serial(x.raw_serial()),
            not_after: SystemTime::from(x.validity().not_after.to_datetime()),
        }
    }

    /// The serial, lower-case hex (as `warden certs` shows it).
    pub fn serial(&self) -> String {
        serial_hex(&self.serial)
    }
}

/// Extracts the single SPIFFE identity of a certificate.
pub fn spiffe_identity(cert: &CertificateDer<'_>) -> Result<Identity, VerifyError> {
    identity_of(&parse(cert)?)
}

/// The single SPIFFE identity of a certificate and its [`Validity`], from one parse (what a
/// connection keeps of its verified peer).
pub fn identity_and_validity(cert: &CertificateDer<'_>) -> Result<(Identity, Validity), VerifyError> {
    let x = parse(cert)?;
    Ok((identity_of(&x)?, Validity::of_parsed(&x)))
}

fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, VerifyError> {
    let (_, x) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| VerifyError::Malformed { reason: e.to_string() })?;
    Ok(x)
}

fn identity_of(x: &X509Certificate<'_>) -> Result<Identity, VerifyError> {
    let san = x.subject_alternative_name().map_err(|e| VerifyError::Malformed { reason: e.to_string() })?;
    let uris: Vec<&str> = san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [one] => Ok(one.parse()?),
        other => Err(VerifyError::SpiffeIdCount { found: other.len() }),
    }
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    conn.peer_certificates().and_then(|c| c.first()).and_then(|c| spiffe_identity(c).ok())
}

fn unix(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

/// SPIFFE-aware certificate verifier, usable on both sides of a connection.
pub struct SpiffeVerifier {
    bundle: Arc<TrustBundle>,
    clock: Arc<dyn Clock>,
    algs: WebPkiSupportedAlgorithms,
    expected: Option<Vec<Identity>>,
    client_auth_optional: bool,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier").field("bundle", &self.bundle).field("expected", &self.expected).finish()
    }
}

impl SpiffeVerifier {
    /// Accepts any identity of the bundle's trust domains.
    pub fn new(bundle: Arc<TrustBundle>, clock: Arc<dyn Clock>) -> Self {
        let algs = aws_lc_rs::default_provider().signature_verification_algorithms;
        Self { bundle, clock, algs, expected: None, client_auth_optional: false }
    }

    /// Additionally requires the peer to be one of `expected` (e.g. the destination workload's
    /// identity on an outbound connection).
    pub fn expecting(mut self, expected: Vec<Identity>) -> Self {
        self.expected = Some(expected);
        self
    }

    /// As a client-certificate verifier: let clients without a certificate complete the handshake
    /// (a certificate that is sent is still fully verified). Used by the CA port, where nodes may
    /// authenticate with a token instead.
    pub fn allow_anonymous_clients(mut self) -> Self {
        self.client_auth_optional = true;
        self
    }

    /// Verifies a peer chain for `usage` at the clock's current time; returns its identity.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: KeyUsage,
    ) -> Result<Identity, VerifyError> {
        let state = self.bundle.state.load();
        let now = self.clock.now();
        let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        let ee = EndEntityCert::try_from(end_entity).map_err(|e| VerifyError::Malformed { reason: e.to_string() })?;
        let crl_refs: Vec<&CertRevocationList<'_>> = state.crls.iter().collect();
        let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                .build()
        });
        let result = ee.verify_for_usage(self.algs.all, &state.anchors, intermediates, time, usage, revocation, None);
        if let Err(e) = result {
            return Err(match e {
                webpki::Error::CertExpired { time, not_after } => {
                    VerifyError::Expired { not_after: rfc3339(unix(not_after)), now: rfc3339(unix(time)) }
                }
                webpki::Error::CertNotValidYet { time, not_before } => {
                    VerifyError::NotYetValid { not_before: rfc3339(unix(not_before)), now: rfc3339(unix(time)) }
                }
                webpki::Error::CertRevoked => {
                    let serial = std::iter::once(end_entity)
                        .chain(intermediates.iter())
                        .filter_map(|c| {
                            X509Certificate::from_der(c.as_ref()).ok().map(|(_, x)| normalise_serial(x.raw_serial()))
                        })
                        .find(|s| state.revoked.contains_key(s))
                        .map(|s| serial_hex(&s))
                        .unwrap_or_else(|| "<not found in local CRL index>".to_owned());
                    VerifyError::Revoked { serial }
                }
                other => VerifyError::UntrustedChain { reason: other.to_string() },
            });
        }
        let identity = spiffe_identity(end_entity)?;
        if !state.trust_domains.iter().any(|td| td == identity.trust_domain()) {
            return Err(VerifyError::ForeignTrustDomain { identity, accepted: state.trust_domains.clone() });
        }
        if let Some(expected) = &self.expected
            && !expected.contains(&identity)
        {
            return Err(VerifyError::UnexpectedIdentity {
                identity,
                expected: expected.iter().map(ToString::to_string).collect(),
            });
        }
        Ok(identity)
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server is authenticated by its SPIFFE identity, not by the name dialled.
        self.verify(end_entity, intermediates, KeyUsage::server_auth()).map_err(|e| {
            tracing::debug!(error = %e, "server certificate refused");
            rustls::Error::from(e)
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: workloads hold exactly one certificate and always send it.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.client_auth_optional
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, KeyUsage::client_auth()).map_err(|e| {
            tracing::debug!(error = %e, "client certificate refused");
            rustls::Error::from(e)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A certificate that can be swapped atomically; resolvers read it on every handshake.
pub struct CertSlot {
    current: ArcSwapOption<SlotEntry>,
    clock: Arc<dyn Clock>,
}

struct SlotEntry {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.current.load();
        f.debug_struct("CertSlot").field("not_after", &cur.as_ref().map(|e| rfc3339(e.not_after))).finish()
    }
}

impl CertSlot {
    /// An empty slot.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { current: ArcSwapOption::empty(), clock }
    }

    /// Installs a certificate; handshakes already in progress or done keep the old one.
    pub fn store(&self, key: Arc<CertifiedKey>, not_after: SystemTime) {
        self.current.store(Some(Arc::new(SlotEntry { key, not_after })));
    }

    /// Removes the certificate.
    pub fn clear(&self) {
        self.current.store(None);
    }

    /// The certificate to present now: none once it has expired.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        let cur = self.current.load();
        let entry = cur.as_ref()?;
        (self.clock.now() <= entry.not_after).then(|| entry.key.clone())
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// Server config: TLS 1.3, mandatory client certificate verified by `verifier`, certificate from
/// `certs`.
///
/// Session resumption is disabled on both sides: a resumed session skips certificate
/// verification, which would let a revoked, expired or no-longer-trusted peer back in.
pub fn server_config(
    policy: CompliancePolicy,
    verifier: Arc<SpiffeVerifier>,
    certs: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, TlsError> {
    server_config_with(crypto_provider(policy), verifier, certs)
}

fn server_config_with(
    provider: Arc<CryptoProvider>,
    verifier: Arc<SpiffeVerifier>,
    certs: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client config: TLS 1.3, server verified by `verifier` (SPIFFE identity instead of DNS name),
/// client certificate from `certs`.
pub fn client_config(
    policy: CompliancePolicy,
    verifier: Arc<SpiffeVerifier>,
    certs: Arc<dyn ResolvesClientCert>,
) -> Result<ClientConfig, TlsError> {
    client_config_with(crypto_provider(policy), verifier, certs)
}

fn client_config_with(
    provider: Arc<CryptoProvider>,
    verifier: Arc<SpiffeVerifier>,
    certs: Arc<dyn ResolvesClientCert>,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        // "dangerous" only because rustls cannot know the verifier is sound: this one verifies the
        // chain, expiry, revocation and SPIFFE identity instead of a DNS name.
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certs);
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Builds a rustls [`CertifiedKey`] from a PEM chain (leaf first) and a PKCS#8 DER private key.
/// The trailing self-signed root, if any, is not sent to peers.
pub fn certified_key(chain_pem: &[String], key_pkcs8_der: Vec<u8>) -> Result<CertifiedKey, TlsError> {
    let mut chain = Vec::with_capacity(chain_pem.len());
    for (i, pem) in chain_pem.iter().enumerate() {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| TlsError::BadRoot { index: i, reason: format!("bad certificate PEM: {e}") })?;
        chain.push(der);
    }
    if chain.len() > 1
        && let Some(last) = chain.last()
        && X509Certificate::from_der(last.as_ref()).is_ok_and(|(_, x)| x.subject() == x.issuer())
    {
        chain.pop();
    }
    let key = aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(key_pkcs8_der.into()))?;
    let ck = CertifiedKey::new(chain, key);
    ck.keys_match()?;
    Ok(ck)
}

mod suites;
pub use suites::RecordCipher;

#[cfg(test)]
mod tests;
