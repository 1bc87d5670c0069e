//! Certificate authority: a self-signed root generated on first start, or an Istio `cacerts`
//! plug-in directory (intermediate under an enterprise root); CSR signing into SPIFFE SVIDs; CRL.
//!
//! Both modes use the same on-disk layout (Istio's): `ca-cert.pem`, `ca-key.pem` (0600),
//! `root-cert.pem`, `cert-chain.pem`, optional `ca-crl.pem`. A self-signed CA is simply a directory
//! where all three certificates are the same root. Loading validates everything up front and
//! names the offending file, so an agent never starts with a broken CA.

mod crl;
mod files;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::clock::{Clock, to_offset};
use crate::identity::{DEFAULT_TRUST_DOMAIN, Identity, IdentityError};

pub use crl::RevocationOutcome;
pub(crate) use files::write_files;
pub use files::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CRL_FILE, KEY_FILE_MODE, ROOT_CERT_FILE, pem_cert};

/// Default lifetime of a workload certificate (Istio's `DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate the CA signs; longer requests are clamped (Istio's
/// `MAX_WORKLOAD_CERT_TTL`).
pub const DEFAULT_MAX_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of a generated self-signed root (Istio's `CITADEL_SELF_SIGNED_CA_CERT_TTL`).
pub const DEFAULT_SELF_SIGNED_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Workload certificates are back-dated by this much to tolerate clock skew between nodes.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
/// How long a CRL written by `revoke` is declared valid (`nextUpdate - thisUpdate`).
pub const CRL_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// `CN=` of the root `init_self_signed` generates (its `O=` is the trust domain).
pub const ROOT_COMMON_NAME: &str = "warden root CA";
/// Length of generated certificate serial numbers in bytes (RFC 5280 allows up to 20).
pub const SERIAL_LEN: usize = 16;

/// Errors of the certificate authority. File errors always name the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file could not be written.
    #[error("cannot write CA file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file is not valid PEM of the expected kind.
    #[error("CA file {path} is invalid: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key does not belong to the CA certificate.
    #[error("CA key {key_path} does not match the public key of the CA certificate {cert_path}")]
    KeyMismatch {
        /// The key file.
        key_path: PathBuf,
        /// The certificate file.
        cert_path: PathBuf,
    },
    /// The CA certificate is not a CA (basicConstraints CA:FALSE or missing keyCertSign).
    #[error("CA certificate {path} cannot sign certificates: {reason}")]
    NotACa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A CA certificate has expired.
    #[error("CA certificate in {path} expired at {not_after} (now {now})")]
    Expired {
        /// The file.
        path: PathBuf,
        /// Its notAfter (RFC 3339).
        not_after: String,
        /// The current time (RFC 3339).
        now: String,
    },
    /// A CA certificate is not valid yet.
    #[error("CA certificate in {path} is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Its notBefore (RFC 3339).
        not_before: String,
        /// The current time (RFC 3339).
        now: String,
    },
    /// The certificate chain does not link `ca-cert.pem` to `root-cert.pem`.
    #[error("certificate chain in {path} is broken: {reason}")]
    ChainMismatch {
        /// The file.
        path: PathBuf,
        /// Which link failed.
        reason: String,
    },
    /// `ca init` would overwrite an existing CA.
    #[error("a CA already exists in {path}; refusing to overwrite it")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The CSR cannot be parsed or its signature is invalid.
    #[error("invalid CSR: {reason}")]
    InvalidCsr {
        /// What is wrong with it.
        reason: String,
    },
    /// The CSR does not request exactly one valid SPIFFE identity.
    #[error("invalid CSR identity: {reason}")]
    CsrIdentity {
        /// What is wrong with it.
        reason: String,
    },
    /// The CSR requests an identity in another trust domain.
    #[error("CSR requests {identity}, outside this CA's trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The requested identity.
        identity: Identity,
        /// This CA's trust domain.
        trust_domain: String,
    },
    /// The trust domain given to the CA is not the one its root records.
    #[error(
        "the CA in {path} is the root of trust domain {recorded:?} (its subject O=), not of {configured:?} \
         (--trust-domain)"
    )]
    TrustDomainMismatch {
        /// The signing certificate (`ca-cert.pem`).
        path: PathBuf,
        /// The trust domain the CA records.
        recorded: String,
        /// The trust domain given.
        configured: String,
    },
    /// The trust domain given to the CA is invalid.
    #[error(transparent)]
    TrustDomain(#[from] IdentityError),
    /// The serial number passed to `revoke` is not hexadecimal, or not a serial RFC 5280 allows
    /// (zero, or longer than 20 octets).
    #[error("invalid serial number {serial:?}: {reason}")]
    InvalidSerial {
        /// The input.
        serial: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Generating or signing failed inside rcgen.
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// CA settings.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// Trust domain of the identities this CA signs.
    pub trust_domain: String,
    /// TTL used when a request does not ask for one.
    pub default_ttl: Duration,
    /// Longest TTL the CA signs.
    pub max_ttl: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            default_ttl: DEFAULT_WORKLOAD_CERT_TTL,
            max_ttl: DEFAULT_MAX_WORKLOAD_CERT_TTL,
        }
    }
}

/// A parsed, signature-checked CSR requesting one SPIFFE identity.
#[derive(Debug)]
pub struct ParsedCsr {
    /// The identity named by the CSR's URI SAN.
    pub identity: Identity,
    params: CertificateSigningRequestParams,
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// Identity in the URI SAN.
    pub identity: Identity,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// PEM chain: the leaf first, then `cert-chain.pem` (intermediates and root).
    pub chain_pem: Vec<String>,
}

/// The certificate authority.
pub struct CertificateAuthority {
    config: CaConfig,
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_cert: CertificateDer<'static>,
    ca_not_after: SystemTime,
    chain_pem: Vec<String>,
    roots: Vec<CertificateDer<'static>>,
    crl: RwLock<Option<CertificateRevocationListDer<'static>>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.config.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a self-signed root (ECDSA P-256) in `dir` in the `cacerts` layout.
    /// Refuses to overwrite an existing CA.
    pub fn init_self_signed(dir: &Path, trust_domain: &str, clock: &dyn Clock) -> Result<(), CaError> {
        files::init_self_signed(dir, trust_domain, clock.now(), DEFAULT_SELF_SIGNED_ROOT_TTL)
    }

    /// Loads and validates the CA in `dir`.
    pub fn load(dir: &Path, config: CaConfig, clock: Arc<dyn Clock>) -> Result<Self, CaError> {
        crate::identity::validate_trust_domain(&config.trust_domain)?;
        let loaded = files::load(dir, clock.now())?;
        if let Some(recorded) = loaded.trust_domain
            && recorded != config.trust_domain
        {
            return Err(CaError::TrustDomainMismatch {
                path: dir.join(CA_CERT_FILE),
                recorded,
                configured: config.trust_domain,
            });
        }
        Ok(Self {
            config,
            dir: dir.to_owned(),
            issuer: loaded.issuer,
            ca_cert: loaded.ca_cert,
            ca_not_after: loaded.ca_not_after,
            chain_pem: loaded.chain_pem,
            roots: loaded.roots,
            crl: RwLock::new(loaded.crl),
            clock,
        })
    }

    /// The trust domain the CA in `dir` records: the `O=` of a root generated by
    /// [`CertificateAuthority::init_self_signed`]; `None` for a plug-in CA. [`CertificateAuthority::load`]
    /// refuses a configured trust domain that differs from it.
    pub fn recorded_trust_domain(dir: &Path) -> Result<Option<String>, CaError> {
        files::read_recorded_trust_domain(dir)
    }

    /// Loads the CA in `dir`, first generating a self-signed root there if the directory has no
    /// `ca-cert.pem` (mode (a)); a plug-in directory is loaded as it is (mode (b)).
    pub fn load_or_init(dir: &Path, config: CaConfig, clock: Arc<dyn Clock>) -> Result<Self, CaError> {
        if !dir.join(CA_CERT_FILE).exists() {
            Self::init_self_signed(dir, &config.trust_domain, clock.as_ref())?;
        }
        Self::load(dir, config, clock)
    }

    /// The CA's configuration.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The directory the CA was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust bundle: every certificate of `root-cert.pem`.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The signing certificate (`ca-cert.pem`).
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// When the signing certificate expires.
    pub fn ca_not_after(&self) -> SystemTime {
        self.ca_not_after
    }

    /// The current CRL, if any.
    pub fn crl(&self) -> Option<CertificateRevocationListDer<'static>> {
        self.crl.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Parses a PEM CSR, checks its signature and extracts the one SPIFFE identity it requests.
    pub fn parse_csr(&self, csr_pem: &str) -> Result<ParsedCsr, CaError> {
        let params = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::InvalidCsr { reason: e.to_string() })?;
        let mut uris = params.params.subject_alt_names.iter().filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        });
        let uri = uris.next().ok_or_else(|| CaError::CsrIdentity { reason: "no URI SAN".into() })?;
        if uris.next().is_some() {
            return Err(CaError::CsrIdentity { reason: "more than one URI SAN".into() });
        }
        let identity: Identity =
            uri.parse().map_err(|e: IdentityError| CaError::CsrIdentity { reason: e.to_string() })?;
        if identity.trust_domain() != self.config.trust_domain {
            return Err(CaError::ForeignTrustDomain { identity, trust_domain: self.config.trust_domain.clone() });
        }
        Ok(ParsedCsr { identity, params })
    }

    /// Signs a parsed CSR. Only the public key and the identity are taken from the request; every
    /// other field is set by the CA. `ttl` is clamped to the configured maximum.
    pub fn sign(&self, csr: &ParsedCsr, ttl: Option<Duration>) -> Result<IssuedCert, CaError> {
        let now = self.clock.now();
        let ttl = ttl.filter(|t| !t.is_zero()).unwrap_or(self.config.default_ttl).min(self.config.max_ttl);
        let not_before = now - CLOCK_SKEW_ALLOWANCE;
        // Never outlive the signing certificate.
        let not_after = (now + ttl).min(self.ca_not_after);
        let serial = random_serial();
        let params = workload_params(&csr.identity, not_before, not_after, serial.clone())?;
        let cert = params.signed_by(&csr.params.public_key, &self.issuer)?;
        let mut chain_pem = Vec::with_capacity(1 + self.chain_pem.len());
        chain_pem.push(cert.pem());
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(IssuedCert {
            identity: csr.identity.clone(),
            serial: serial_hex(serial.as_ref()),
            not_before: truncate_secs(not_before),
            not_after: truncate_secs(not_after),
            chain_pem,
        })
    }

    /// Parses and signs a PEM CSR in one step.
    pub fn sign_csr(&self, csr_pem: &str, ttl: Option<Duration>) -> Result<IssuedCert, CaError> {
        let csr = self.parse_csr(csr_pem)?;
        self.sign(&csr, ttl)
    }

    /// Adds `serial` (hex) to the CRL, re-signs it and writes `ca-crl.pem` atomically. Agents
    /// watching the file pick the new CRL up without restart.
    pub fn revoke(&self, serial: &str) -> Result<RevocationOutcome, CaError> {
        let mut guard = self.crl.write().unwrap_or_else(|e| e.into_inner());
        let (der, outcome) = crl::revoke(&self.dir, &self.issuer, guard.as_ref(), serial, self.clock.now())?;
        *guard = Some(der);
        Ok(outcome)
    }
}

/// Certificate parameters of a workload SVID (Istio's shape: empty subject, URI SAN, both TLS
/// usages, not a CA).
fn workload_params(
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: SerialNumber,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.not_before = to_offset(not_before);
    params.not_after = to_offset(not_after);
    params.serial_number = Some(serial);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Parameters of a self-signed root.
pub(crate) fn root_params(trust_domain: &str, not_before: SystemTime, ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, ROOT_COMMON_NAME);
    params.distinguished_name = dn;
    params.not_before = to_offset(not_before);
    params.not_after = to_offset(not_before + ttl);
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// A random positive serial of [`SERIAL_LEN`] bytes.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; SERIAL_LEN] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte, so the hex form is stable
    SerialNumber::from_slice(&bytes)
}

/// Lower-case hex of a serial, without leading zero bytes (the form `warden certs` shows and
/// `warden ca revoke` takes).
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Longest serial number RFC 5280 allows, in octets of its DER encoding.
pub const MAX_SERIAL_OCTETS: usize = 20;

/// Parses a serial written as hex, with optional `0x` prefix and `:` separators. Refuses what
/// cannot be a certificate's serial under RFC 5280: zero, or more than 20 octets (counting the
/// leading zero octet DER needs when the first bit is set).
pub fn parse_serial(s: &str) -> Result<Vec<u8>, CaError> {
    let bad = |reason| CaError::InvalidSerial { serial: s.to_owned(), reason };
    let hex = || bad("expected hexadecimal, as `warden certs` shows it");
    let clean: String = s.trim().trim_start_matches("0x").chars().filter(|c| *c != ':').collect();
    if clean.is_empty() || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(hex());
    }
    let clean = if clean.len() % 2 == 1 { format!("0{clean}") } else { clean };
    let bytes: Vec<u8> = (0..clean.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&clean[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| hex())?;
    let Some(start) = bytes.iter().position(|b| *b != 0) else {
        return Err(bad("it is zero; RFC 5280 serial numbers are positive"));
    };
    let bytes = &bytes[start..];
    if bytes.len() + usize::from(bytes[0] & 0x80 != 0) > MAX_SERIAL_OCTETS {
        return Err(bad("it is longer than the 20 octets RFC 5280 allows"));
    }
    Ok(bytes.to_vec())
}

fn truncate_secs(t: SystemTime) -> SystemTime {
    let secs = crate::clock::unix_secs(t);
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

#[cfg(test)]
mod tests;
