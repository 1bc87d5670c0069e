//! Key generation and CSRs. Private keys are generated where they are used (the node agent) and
//! never leave it; the CA only sees the CSR.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use crate::identity::Identity;

/// Generates an ECDSA P-256 key and a PEM CSR requesting `identity` (URI SAN only).
pub fn generate_key_and_csr(identity: &Identity) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}
