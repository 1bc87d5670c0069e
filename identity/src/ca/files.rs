//! The `cacerts` directory: writing a self-signed root, loading and validating a plug-in CA.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::CaError;
use crate::clock::rfc3339;

/// The signing (possibly intermediate) CA certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing key; written with mode [`KEY_FILE_MODE`].
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The trust bundle: one or more roots (several during a root rotation).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// `ca-cert.pem` followed by any intermediates up to the root.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Optional CRL signed by `ca-cert.pem`.
pub const CRL_FILE: &str = "ca-crl.pem";
/// Permissions of private key files.
pub const KEY_FILE_MODE: u32 = 0o600;

pub(super) struct Loaded {
    pub issuer: Issuer<'static, KeyPair>,
    pub ca_cert: CertificateDer<'static>,
    pub ca_not_after: SystemTime,
    pub chain_pem: Vec<String>,
    pub roots: Vec<CertificateDer<'static>>,
    pub crl: Option<CertificateRevocationListDer<'static>>,
    /// The trust domain the CA records ([`recorded_trust_domain`]).
    pub trust_domain: Option<String>,
}

pub(super) fn init_self_signed(dir: &Path, trust_domain: &str, now: SystemTime, ttl: Duration) -> Result<(), CaError> {
    crate::identity::validate_trust_domain(trust_domain)?;
    for f in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
        let p = dir.join(f);
        if p.exists() {
            return Err(CaError::AlreadyExists { path: p });
        }
    }
    fs::create_dir_all(dir).map_err(|source| CaError::Write { path: dir.to_owned(), source })?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = super::root_params(trust_domain, now, ttl).self_signed(&key)?;
    let pem = cert.pem();
    // All or nothing; the key is renamed into place first, so a crash between the renames never
    // leaves a certificate without its key.
    write_files(
        dir,
        &[
            (CA_KEY_FILE, key.serialize_pem().as_bytes(), KEY_FILE_MODE),
            (ROOT_CERT_FILE, pem.as_bytes(), 0o644),
            (CERT_CHAIN_FILE, pem.as_bytes(), 0o644),
            (CA_CERT_FILE, pem.as_bytes(), 0o644),
        ],
    )
    .map_err(|(path, source)| CaError::Write { path, source })?;
    tracing::info!(dir = %dir.display(), trust_domain, "generated self-signed root CA");
    Ok(())
}

/// Writes `contents` to `path` atomically with `mode` (see [`write_files`]).
pub(super) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) => (dir, name),
        _ => return Err(CaError::Write { path: path.to_owned(), source: io::ErrorKind::InvalidInput.into() }),
    };
    write_files(dir, &[(name, contents, mode)]).map_err(|(path, source)| CaError::Write { path, source })
}

/// Writes each `(file name, contents, mode)` into `dir`, all or nothing as far as the file system
/// allows: every file first goes to a new temporary file in `dir` (created exclusively, so never
/// through a symlink or into an existing file, with `mode`, synced); only once all are written
/// are they renamed over their names, in order. A name that is a directory is refused before
/// anything is written. On an error before the renames the temporary files are removed and `dir`
/// keeps its previous files. A rename replaces a symlink at the name, never its target. The error
/// names the file.
pub(crate) fn write_files(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), (PathBuf, io::Error)> {
    for (name, _, _) in files {
        let path = dir.join(name);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Err((path, io::Error::new(io::ErrorKind::IsADirectory, "it is a directory")));
        }
    }
    let mut written: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
    let result = files.iter().try_for_each(|(name, contents, mode)| {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(*mode)
            .open(&tmp)
            .map_err(|e| (path.clone(), e))?;
        written.push((tmp, path.clone()));
        // The umask may have narrowed `mode`: set it exactly, on the file just created.
        f.set_permissions(fs::Permissions::from_mode(*mode))
            .and_then(|()| f.write_all(contents))
            .and_then(|()| f.sync_all())
            .map_err(|e| (path, e))
    });
    let mut renamed = 0;
    let result = result.and_then(|()| {
        written.iter().try_for_each(|(tmp, path)| {
            fs::rename(tmp, path).map_err(|e| (path.clone(), e))?;
            renamed += 1;
            Ok(())
        })
    });
    for (tmp, _) in &written[renamed..] {
        let _ = fs::remove_file(tmp);
    }
    if result.is_ok() {
        // Make the renames durable (best effort: not every file system syncs a directory).
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    result
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read { path: path.to_owned(), source })
}

fn parse_err(path: &Path, reason: impl Into<String>) -> CaError {
    CaError::Parse { path: path.to_owned(), reason: reason.into() }
}

/// Every certificate of a PEM file, at least one.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(parse_err(path, "no CERTIFICATE block"));
    }
    for c in &certs {
        X509Certificate::from_der(c).map_err(|e| parse_err(path, format!("bad certificate: {e}")))?;
    }
    Ok(certs)
}

fn x509<'a>(path: &Path, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| parse_err(path, format!("bad certificate: {e}")))
}

fn check_validity(path: &Path, cert: &X509Certificate<'_>, now: SystemTime) -> Result<SystemTime, CaError> {
    let nb = SystemTime::from(cert.validity().not_before.to_datetime());
    let na = SystemTime::from(cert.validity().not_after.to_datetime());
    if now > na {
        return Err(CaError::Expired { path: path.to_owned(), not_after: rfc3339(na), now: rfc3339(now) });
    }
    if now < nb {
        return Err(CaError::NotYetValid { path: path.to_owned(), not_before: rfc3339(nb), now: rfc3339(now) });
    }
    Ok(na)
}

fn check_is_ca(path: &Path, cert: &X509Certificate<'_>) -> Result<(), CaError> {
    let bc = cert.basic_constraints().map_err(|e| parse_err(path, format!("bad basicConstraints: {e}")))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(CaError::NotACa { path: path.to_owned(), reason: "basicConstraints CA is not TRUE" });
    }
    if let Some(ku) = cert.key_usage().map_err(|e| parse_err(path, format!("bad keyUsage: {e}")))?
        && !ku.value.key_cert_sign()
    {
        return Err(CaError::NotACa { path: path.to_owned(), reason: "keyUsage lacks keyCertSign" });
    }
    Ok(())
}

pub(super) fn load(dir: &Path, now: SystemTime) -> Result<Loaded, CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let root_path = dir.join(ROOT_CERT_FILE);
    let chain_path = dir.join(CERT_CHAIN_FILE);
    let crl_path = dir.join(CRL_FILE);

    // ca-cert.pem: exactly the signing certificate, a CA, currently valid.
    let ca_certs = read_certs(&cert_path)?;
    let ca_cert = ca_certs[0].clone();
    let ca = x509(&cert_path, &ca_cert)?;
    check_is_ca(&cert_path, &ca)?;
    let ca_not_after = check_validity(&cert_path, &ca, now)?;
    let trust_domain = recorded_trust_domain(&ca);

    // ca-key.pem: must be the key of ca-cert.pem.
    let key_pem = read(&key_path)?;
    warn_if_key_readable(&key_path);
    let key = KeyPair::from_pem(&key_pem).map_err(|e| parse_err(&key_path, format!("bad private key: {e}")))?;
    if key.public_key_raw() != ca.public_key().subject_public_key.data.as_ref() {
        return Err(CaError::KeyMismatch { key_path, cert_path });
    }

    // root-cert.pem: the trust bundle; every root must be a valid CA. During a root rotation it
    // holds the old and the new root.
    let roots = read_certs(&root_path)?;
    for r in &roots {
        let rc = x509(&root_path, r)?;
        check_is_ca(&root_path, &rc)?;
        check_validity(&root_path, &rc, now)?;
    }

    // cert-chain.pem: ca-cert.pem, then intermediates, ending at (or under) a root.
    let mut chain = read_certs(&chain_path)?;
    if chain[0] != ca_cert {
        chain.insert(0, ca_cert.clone());
    }
    for pair in chain.windows(2) {
        let (child, parent) = (x509(&chain_path, &pair[0])?, x509(&chain_path, &pair[1])?);
        check_validity(&chain_path, &parent, now)?;
        child.verify_signature(Some(parent.public_key())).map_err(|_| CaError::ChainMismatch {
            path: chain_path.clone(),
            reason: format!("{} is not signed by {}", child.subject(), parent.subject()),
        })?;
    }
    let top_der = chain.last().cloned().unwrap_or_else(|| ca_cert.clone());
    let top = x509(&chain_path, &top_der)?;
    let anchored = roots.iter().any(|r| {
        *r == top_der || x509(&root_path, r).is_ok_and(|rc| top.verify_signature(Some(rc.public_key())).is_ok())
    });
    if !anchored {
        return Err(CaError::ChainMismatch {
            path: chain_path,
            reason: format!("the chain ends at {} which is not issued by any root in {ROOT_CERT_FILE}", top.subject()),
        });
    }
    let chain_pem: Vec<String> = chain.iter().map(pem_cert).collect();

    // ca-crl.pem (optional): must parse and be signed by ca-cert.pem.
    let crl = if crl_path.exists() {
        let text = read(&crl_path)?;
        let der = CertificateRevocationListDer::from_pem_slice(text.as_bytes())
            .map_err(|e| parse_err(&crl_path, format!("bad PEM: {e}")))?;
        let (_, parsed) =
            CertificateRevocationList::from_der(&der).map_err(|e| parse_err(&crl_path, format!("bad CRL: {e}")))?;
        parsed
            .verify_signature(ca.public_key())
            .map_err(|_| parse_err(&crl_path, format!("CRL is not signed by {CA_CERT_FILE}")))?;
        Some(der)
    } else {
        None
    };

    let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| parse_err(&cert_path, e.to_string()))?;
    tracing::info!(dir = %dir.display(), subject = %ca.subject(), roots = roots.len(), "loaded CA");
    Ok(Loaded { issuer, ca_cert, ca_not_after, chain_pem, roots, crl, trust_domain })
}

/// The trust domain `ca init` records in the root it generates: the `O=` of a self-signed
/// `CN=warden root CA` certificate. `None` for any other CA certificate (a plug-in CA's subject
/// is the enterprise's, not a trust domain).
pub(super) fn recorded_trust_domain(cert: &X509Certificate<'_>) -> Option<String> {
    let subject = cert.subject();
    fn one<'a>(mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>) -> Option<String> {
        match (it.next(), it.next()) {
            (Some(a), None) => a.as_str().ok().map(str::to_owned),
            _ => None,
        }
    }
    let self_signed = subject.as_raw() == cert.issuer().as_raw();
    if !self_signed || one(subject.iter_common_name()).as_deref() != Some(super::ROOT_COMMON_NAME) {
        return None;
    }
    one(subject.iter_organization()).filter(|td| crate::identity::validate_trust_domain(td).is_ok())
}

/// [`recorded_trust_domain`] of `dir`'s `ca-cert.pem`.
pub(super) fn read_recorded_trust_domain(dir: &Path) -> Result<Option<String>, CaError> {
    let path = dir.join(CA_CERT_FILE);
    let certs = read_certs(&path)?;
    Ok(recorded_trust_domain(&x509(&path, &certs[0])?))
}

fn warn_if_key_readable(path: &PathBuf) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "CA key file is readable by group or others; expected 0600");
    }
}

/// PEM encoding of a certificate.
pub fn pem_cert(der: &CertificateDer<'_>) -> String {
    pem_block("CERTIFICATE", der.as_ref())
}

pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(label, der), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}
