//! Certificate revocation: `warden ca revoke SERIAL` re-signs `ca-crl.pem` with one more entry.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber};
use rustls_pki_types::CertificateRevocationListDer;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::files::{CRL_FILE, pem_block, write_file};
use super::{CRL_VALIDITY, CaError, parse_serial, serial_hex};
use crate::clock::to_offset;

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationOutcome {
    /// The revoked serial, normalised lower-case hex.
    pub serial: String,
    /// The serial was already on the CRL (the CRL is re-signed anyway, refreshing thisUpdate).
    pub already_revoked: bool,
    /// The new CRL number.
    pub crl_number: u128,
    /// How many serials the CRL now lists.
    pub revoked_count: usize,
    /// The CRL file written.
    pub path: PathBuf,
}

pub(super) fn revoke(
    dir: &Path,
    issuer: &Issuer<'static, KeyPair>,
    current: Option<&CertificateRevocationListDer<'static>>,
    serial: &str,
    now: SystemTime,
) -> Result<(CertificateRevocationListDer<'static>, RevocationOutcome), CaError> {
    let path = dir.join(CRL_FILE);
    let serial_bytes = parse_serial(serial)?;
    let mut revoked = Vec::new();
    let mut crl_number: u128 = 0;
    if let Some(der) = current {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| CaError::Parse { path: path.clone(), reason: format!("bad CRL: {e}") })?;
        if let Some(n) = crl.crl_number() {
            let bytes = n.to_bytes_be();
            crl_number = bytes.iter().fold(0u128, |acc, b| acc.wrapping_shl(8) | u128::from(*b));
        }
        for r in crl.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.raw_serial()),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let already_revoked = revoked.iter().any(|r| normalise(r.serial_number.as_ref()) == serial_bytes);
    if !already_revoked {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial_bytes),
            revocation_time: to_offset(now),
            reason_code: None,
            invalidity_date: None,
        });
    }
    crl_number += 1;
    let params = CertificateRevocationListParams {
        this_update: to_offset(now),
        next_update: to_offset(now + CRL_VALIDITY),
        crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()[trim(&crl_number.to_be_bytes())..]),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(issuer)?;
    let der = crl.der().clone();
    write_file(&path, pem_block("X509 CRL", der.as_ref()).as_bytes(), 0o644)?;
    let revoked_count = params.revoked_certs.len();
    let serial = serial_hex(&serial_bytes);
    tracing::info!(serial, crl_number, revoked_count, path = %path.display(), "revoked certificate");
    Ok((der, RevocationOutcome { serial, already_revoked, crl_number, revoked_count, path }))
}

fn normalise(raw: &[u8]) -> Vec<u8> {
    raw[trim(raw)..].to_vec()
}

/// Index of the first significant byte (keeps one byte for zero).
fn trim(raw: &[u8]) -> usize {
    raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1))
}
