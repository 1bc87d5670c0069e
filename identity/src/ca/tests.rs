use std::fs;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::clock::ManualClock;
use crate::workload::generate_key_and_csr;

const DAY: Duration = Duration::from_secs(86_400);

fn id(ns: &str, sa: &str) -> Identity {
    Identity::spiffe("cluster.local", ns, sa).unwrap()
}

fn self_signed(clock: &Arc<ManualClock>) -> (tempfile::TempDir, CertificateAuthority) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), clock.clone()).unwrap();
    (dir, ca)
}

#[test]
fn self_signed_root_is_persisted_with_private_key_mode_0600_and_reloaded() {
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, ca) = self_signed(&clock);
    let mode = fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, KEY_FILE_MODE);
    let again = CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), clock.clone()).unwrap();
    assert_eq!(again.roots(), ca.roots(), "second start must reuse the persisted root");
    let err = CertificateAuthority::init_self_signed(dir.path(), "cluster.local", clock.as_ref()).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
}

#[test]
fn signs_a_spiffe_svid_from_a_csr() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_dir, ca) = self_signed(&clock);
    let (_key, csr) = generate_key_and_csr(&id("default", "web")).unwrap();
    let issued = ca.sign_csr(&csr, None).unwrap();
    assert_eq!(issued.identity, id("default", "web"));
    assert_eq!(issued.chain_pem.len(), 2, "leaf + root");
    assert_eq!(issued.not_after.duration_since(clock.now()).unwrap(), DEFAULT_WORKLOAD_CERT_TTL);

    let leaf = CertificateDer::from_pem_slice(issued.chain_pem[0].as_bytes()).unwrap();
    let (_, x) = X509Certificate::from_der(&leaf).unwrap();
    assert_eq!(serial_hex(x.raw_serial()), issued.serial);
    assert!(!x.is_ca());
    let san = x.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://cluster.local/ns/default/sa/web"]);
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let (_, root) = X509Certificate::from_der(&ca.roots()[0]).unwrap();
    x.verify_signature(Some(root.public_key())).unwrap();
}

#[test]
fn ttl_is_clamped_to_the_maximum() {
    let clock = Arc::new(ManualClock::starting_now());
    let dir = tempfile::tempdir().unwrap();
    let config = CaConfig { max_ttl: 2 * DAY, ..CaConfig::default() };
    let ca = CertificateAuthority::load_or_init(dir.path(), config, clock.clone()).unwrap();
    let (_key, csr) = generate_key_and_csr(&id("a", "b")).unwrap();
    let issued = ca.sign_csr(&csr, Some(30 * DAY)).unwrap();
    assert_eq!(issued.not_after.duration_since(clock.now()).unwrap(), 2 * DAY);
    let issued = ca.sign_csr(&csr, Some(Duration::from_secs(3600))).unwrap();
    assert_eq!(issued.not_after.duration_since(clock.now()).unwrap(), Duration::from_secs(3600));
}

#[test]
fn bad_csrs_are_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_dir, ca) = self_signed(&clock);
    assert!(matches!(ca.sign_csr("not a csr", None), Err(CaError::InvalidCsr { .. })));
    // A CSR whose signature does not match its content.
    let (_key, csr) = generate_key_and_csr(&id("a", "b")).unwrap();
    let mut der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap().as_ref().to_vec();
    let last = der.len() - 3;
    der[last] ^= 0xff;
    let tampered = super::files::pem_block("CERTIFICATE REQUEST", &der);
    assert!(matches!(ca.sign_csr(&tampered, None), Err(CaError::InvalidCsr { .. })));
    // A CSR for another trust domain.
    let foreign = Identity::spiffe("evil.example", "a", "b").unwrap();
    let (_key, csr) = generate_key_and_csr(&foreign).unwrap();
    assert!(matches!(ca.sign_csr(&csr, None), Err(CaError::ForeignTrustDomain { .. })));
    // A CSR with a DNS name instead of a SPIFFE ID.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::new(vec!["example.com".to_owned()]).unwrap().serialize_request(&key).unwrap();
    assert!(matches!(ca.sign_csr(&csr.pem().unwrap(), None), Err(CaError::CsrIdentity { .. })));
}

/// Builds an enterprise root and an intermediate under it, written in the `cacerts` layout.
fn plugin_dir(clock: &ManualClock) -> (tempfile::TempDir, KeyPair, CertificateDer<'static>) {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = root_params("enterprise", clock.now(), 3650 * DAY);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int_params = root_params_for_intermediate(clock);
    int_params.distinguished_name.push(DnType::CommonName, "cluster intermediate");
    let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let p = dir.path();
    fs::write(p.join(CA_CERT_FILE), int.pem()).unwrap();
    fs::write(p.join(CA_KEY_FILE), int_key.serialize_pem()).unwrap();
    fs::write(p.join(ROOT_CERT_FILE), root.pem()).unwrap();
    fs::write(p.join(CERT_CHAIN_FILE), format!("{}{}", int.pem(), root.pem())).unwrap();
    (dir, int_key, root.der().clone())
}

fn root_params_for_intermediate(clock: &ManualClock) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.not_before = to_offset(clock.now() - DAY);
    p.not_after = to_offset(clock.now() + 365 * DAY);
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.serial_number = Some(random_serial());
    p
}

#[test]
fn plugin_intermediate_ca_signs_chains_to_the_enterprise_root() {
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, _k, root) = plugin_dir(&clock);
    let ca = CertificateAuthority::load(dir.path(), CaConfig::default(), clock.clone()).unwrap();
    assert_eq!(ca.roots(), [root]);
    let (_key, csr) = generate_key_and_csr(&id("a", "b")).unwrap();
    let issued = ca.sign_csr(&csr, None).unwrap();
    assert_eq!(issued.chain_pem.len(), 3, "leaf, intermediate, root");
}

fn load_err(dir: &Path, clock: Arc<ManualClock>) -> CaError {
    CertificateAuthority::load(dir, CaConfig::default(), clock).expect_err("a broken CA must not load")
}

#[test]
fn missing_or_unreadable_files_are_named() {
    let clock = Arc::new(ManualClock::starting_now());
    for file in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
        let (dir, _k, _r) = plugin_dir(&clock);
        fs::remove_file(dir.path().join(file)).unwrap();
        // A directory in place of the file: unreadable even for root.
        fs::create_dir(dir.path().join(file)).unwrap();
        let err = load_err(dir.path(), clock.clone());
        assert!(matches!(err, CaError::Read { .. }), "{file}: {err}");
        assert!(err.to_string().contains(file), "error must name {file}: {err}");
    }
    for file in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE, CRL_FILE] {
        let (dir, _k, _r) = plugin_dir(&clock);
        fs::write(dir.path().join(file), "-----BEGIN GARBAGE-----\nnope\n").unwrap();
        let err = load_err(dir.path(), clock.clone());
        assert!(err.to_string().contains(file), "error must name {file}: {err}");
    }
}

#[test]
fn key_not_matching_the_certificate_is_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, _k, _r) = plugin_dir(&clock);
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    fs::write(dir.path().join(CA_KEY_FILE), other.serialize_pem()).unwrap();
    let err = load_err(dir.path(), clock);
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains(CA_KEY_FILE) && err.to_string().contains(CA_CERT_FILE), "{err}");
}

#[test]
fn chain_from_another_ca_is_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, _k, _r) = plugin_dir(&clock);
    let (other, _k2, _r2) = plugin_dir(&clock);
    fs::copy(other.path().join(ROOT_CERT_FILE), dir.path().join(ROOT_CERT_FILE)).unwrap();
    let err = load_err(dir.path(), clock.clone());
    assert!(matches!(err, CaError::ChainMismatch { .. }), "{err}");
    assert!(err.to_string().contains(CERT_CHAIN_FILE), "{err}");

    let (dir, _k, _r) = plugin_dir(&clock);
    let other_chain = fs::read_to_string(other.path().join(CERT_CHAIN_FILE)).unwrap();
    let mine = fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
    // cert-chain = my intermediate followed by the *other* root: the link is broken.
    let other_root = other_chain.split_inclusive("-----END CERTIFICATE-----\n").nth(1).unwrap();
    fs::write(dir.path().join(CERT_CHAIN_FILE), format!("{mine}{other_root}")).unwrap();
    let err = load_err(dir.path(), clock);
    assert!(matches!(err, CaError::ChainMismatch { .. }), "{err}");
}

#[test]
fn expired_ca_is_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, _ca) = self_signed(&clock);
    clock.advance(DEFAULT_SELF_SIGNED_ROOT_TTL + DAY);
    let err = load_err(dir.path(), clock);
    assert!(matches!(err, CaError::Expired { .. }), "{err}");
    assert!(err.to_string().contains(CA_CERT_FILE), "{err}");
}

#[test]
fn leaf_never_outlives_the_signing_certificate() {
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, _k, _r) = plugin_dir(&clock);
    let ca = CertificateAuthority::load(dir.path(), CaConfig::default(), clock.clone()).unwrap();
    clock.advance(365 * DAY - Duration::from_secs(3600));
    let (_key, csr) = generate_key_and_csr(&id("a", "b")).unwrap();
    let issued = ca.sign_csr(&csr, None).unwrap();
    assert_eq!(issued.not_after, ca.ca_not_after());
}

#[test]
fn revoke_writes_a_crl_that_reloads() {
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, ca) = self_signed(&clock);
    let (_key, csr) = generate_key_and_csr(&id("a", "b")).unwrap();
    let issued = ca.sign_csr(&csr, None).unwrap();
    let out = ca.revoke(&issued.serial).unwrap();
    assert_eq!(out.serial, issued.serial);
    assert!(!out.already_revoked);
    assert_eq!((out.crl_number, out.revoked_count), (1, 1));
    let out2 = ca.revoke(&format!("0x{}", issued.serial.to_uppercase())).unwrap();
    assert!(out2.already_revoked);
    assert_eq!((out2.crl_number, out2.revoked_count), (2, 1));
    let reloaded = CertificateAuthority::load(dir.path(), CaConfig::default(), clock).unwrap();
    let der = reloaded.crl().unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let serials: Vec<_> = crl.iter_revoked_certificates().map(|r| serial_hex(r.raw_serial())).collect();
    assert_eq!(serials, [issued.serial]);
    assert!(matches!(ca.revoke("xyz"), Err(CaError::InvalidSerial { .. })));
}

#[test]
fn serial_parsing_normalises() {
    assert_eq!(parse_serial("0A:0b").unwrap(), vec![0x0a, 0x0b]);
    assert_eq!(parse_serial("0x00ab").unwrap(), vec![0xab]);
    assert_eq!(parse_serial("abc").unwrap(), vec![0x0a, 0xbc]);
    assert!(parse_serial("").is_err());
    assert_eq!(serial_hex(&[0, 0, 0x1f]), "1f");
}

#[test]
fn serials_rfc_5280_forbids_are_refused() {
    let reason = |s: &str| match parse_serial(s) {
        Err(CaError::InvalidSerial { reason, .. }) => reason,
        other => panic!("{s}: {other:?}"),
    };
    for zero in ["0", "00", "0x0000", "00:00:00"] {
        assert!(reason(zero).contains("zero"), "{zero}");
    }
    // 20 octets at most, counting the zero octet DER prepends when the first bit is set.
    assert_eq!(parse_serial(&"7f".repeat(20)).unwrap().len(), 20);
    assert_eq!(parse_serial(&format!("0000{}", "7f".repeat(20))).unwrap().len(), 20, "leading zeros are dropped");
    assert_eq!(parse_serial(&"ff".repeat(19)).unwrap().len(), 19);
    for long in ["ff".repeat(20), "7f".repeat(21), "ff".repeat(25)] {
        assert!(reason(&long).contains("20 octets"), "{long}");
    }
    assert!(reason("xyz").contains("hexadecimal"));
    let clock = Arc::new(ManualClock::starting_now());
    let (dir, ca) = self_signed(&clock);
    assert!(matches!(ca.revoke("00"), Err(CaError::InvalidSerial { .. })));
    assert!(!dir.path().join(CRL_FILE).exists());
}

#[test]
fn the_trust_domain_comes_from_the_root_ca_init_generated() {
    let clock = Arc::new(ManualClock::starting_now());
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::init_self_signed(dir.path(), "example.org", clock.as_ref()).unwrap();
    assert_eq!(CertificateAuthority::recorded_trust_domain(dir.path()).unwrap().as_deref(), Some("example.org"));
    let err = CertificateAuthority::load(dir.path(), CaConfig::default(), clock.clone()).unwrap_err();
    assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("\"example.org\"") && text.contains("\"cluster.local\"") && text.contains(CA_CERT_FILE));
    let config = CaConfig { trust_domain: "example.org".into(), ..CaConfig::default() };
    let ca = CertificateAuthority::load_or_init(dir.path(), config, clock.clone()).unwrap();
    let (_key, csr) = generate_key_and_csr(&id("a", "b")).unwrap();
    assert!(matches!(ca.sign_csr(&csr, None), Err(CaError::ForeignTrustDomain { .. })));

    // A plug-in CA records none: its subject is the enterprise's.
    let (plugin, _k, _r) = plugin_dir(&clock);
    assert_eq!(CertificateAuthority::recorded_trust_domain(plugin.path()).unwrap(), None);
    let config = CaConfig { trust_domain: "example.org".into(), ..CaConfig::default() };
    CertificateAuthority::load(plugin.path(), config, clock).unwrap();
}

#[test]
fn ca_files_are_never_written_through_a_symlink() {
    let clock = Arc::new(ManualClock::starting_now());
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    fs::write(&victim, "victim\n").unwrap();
    // The names the previous writer used for its temporary files.
    for tmp in ["ca-key.tmp", "root-cert.tmp", "cert-chain.tmp", "ca-cert.tmp", "ca-crl.tmp"] {
        std::os::unix::fs::symlink(&victim, dir.path().join(tmp)).unwrap();
    }
    let ca = CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), clock.clone()).unwrap();
    ca.revoke("1234").unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "victim\n");
    for f in [CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE, CA_CERT_FILE, CRL_FILE] {
        assert!(fs::symlink_metadata(dir.path().join(f)).unwrap().file_type().is_file(), "{f}");
    }
    CertificateAuthority::load(dir.path(), CaConfig::default(), clock).unwrap();
    let stray = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'));
    assert_eq!(stray.count(), 0, "no temporary file is left");
}

use rustls_pki_types::pem::PemObject;
use std::os::unix::fs::PermissionsExt;
use x509_parser::revocation_list::CertificateRevocationList;
