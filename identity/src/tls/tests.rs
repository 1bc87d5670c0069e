use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{ClientConnection, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::ca::{CaConfig, CertificateAuthority};
use crate::clock::ManualClock;
use crate::workload::generate_key_and_csr;

const TD: &str = "cluster.local";

struct Pki {
    _dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

impl Pki {
    fn new(clock: &Arc<ManualClock>, trust_domain: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = CaConfig { trust_domain: trust_domain.to_owned(), ..CaConfig::default() };
        let ca = CertificateAuthority::load_or_init(dir.path(), config, clock.clone()).unwrap();
        Pki { _dir: dir, ca }
    }

    fn issue(&self, ns: &str, sa: &str, ttl: Duration) -> (Arc<CertifiedKey>, String) {
        let id = Identity::spiffe(self.ca.config().trust_domain.clone(), ns, sa).unwrap();
        let (key, csr) = generate_key_and_csr(&id).unwrap();
        let issued = self.ca.sign_csr(&csr, Some(ttl)).unwrap();
        (Arc::new(certified_key(&issued.chain_pem, key.serialize_der()).unwrap()), issued.serial)
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        Arc::new(TrustBundle::new(self.ca.roots().to_vec(), vec![TD.to_owned()]).unwrap())
    }
}

fn slot(clock: &Arc<ManualClock>, key: Arc<CertifiedKey>) -> Arc<CertSlot> {
    let s = Arc::new(CertSlot::new(clock.clone()));
    s.store(key, clock.now() + Duration::from_secs(365 * 86400));
    s
}

struct Side {
    bundle: Arc<TrustBundle>,
    cert: Arc<CertSlot>,
}

fn configs(
    clock: &Arc<ManualClock>,
    policy: CompliancePolicy,
    client: &Side,
    server: &Side,
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let cv = Arc::new(SpiffeVerifier::new(client.bundle.clone(), clock.clone()));
    let sv = Arc::new(SpiffeVerifier::new(server.bundle.clone(), clock.clone()));
    (
        Arc::new(client_config(policy, cv, client.cert.clone()).unwrap()),
        Arc::new(server_config(policy, sv, server.cert.clone()).unwrap()),
    )
}

/// Runs a handshake in memory; returns the connections or (client error, server error).
fn handshake(c: Arc<ClientConfig>, s: Arc<ServerConfig>) -> Result<(ClientConnection, ServerConnection), String> {
    let mut client = ClientConnection::new(c, ServerName::try_from("workload").unwrap()).unwrap();
    let mut server = ServerConnection::new(s).unwrap();
    for _ in 0..20 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
        }
        if let Err(e) = server.process_new_packets() {
            // Deliver the server's alert so both sides' views are visible.
            let mut out = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut out).unwrap();
            }
            let mut rd = &out[..];
            let _ = client.read_tls(&mut rd);
            let ce = client.process_new_packets().err();
            return Err(format!("server: {e}; client: {ce:?}"));
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
        }
        if let Err(e) = client.process_new_packets() {
            return Err(format!("client: {e}"));
        }
        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
            return Ok((client, server));
        }
    }
    Err("handshake did not finish".into())
}

fn setup(clock: &Arc<ManualClock>) -> (Pki, Side, Side) {
    let pki = Pki::new(clock, TD);
    let (ck, _) = pki.issue("default", "client", Duration::from_secs(86400));
    let (sk, _) = pki.issue("default", "server", Duration::from_secs(86400));
    let client = Side { bundle: pki.bundle(), cert: slot(clock, ck) };
    let server = Side { bundle: pki.bundle(), cert: slot(clock, sk) };
    (pki, client, server)
}

#[test]
fn mtls_handshake_verifies_both_identities() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_pki, client, server) = setup(&clock);
    let (c, s) = configs(&clock, CompliancePolicy::Default, &client, &server);
    let (c, s) = handshake(c, s).unwrap();
    assert_eq!(peer_identity(&c).unwrap().to_string(), "spiffe://cluster.local/ns/default/sa/server");
    assert_eq!(peer_identity(&s).unwrap().to_string(), "spiffe://cluster.local/ns/default/sa/client");
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let suite = c.negotiated_cipher_suite().unwrap().suite();
    assert!(matches!(
        suite,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    ));
}

#[test]
fn expired_certificate_is_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let pki = Pki::new(&clock, TD);
    let (ck, _) = pki.issue("default", "client", Duration::from_secs(3600));
    let verifier = SpiffeVerifier::new(pki.bundle(), clock.clone());
    let leaf = &ck.cert[0];
    assert!(verifier.verify(leaf, &[], KeyUsage::client_auth()).is_ok());
    clock.advance(Duration::from_secs(2 * 3600));
    let err = verifier.verify(leaf, &[], KeyUsage::client_auth()).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");

    // Over a handshake: a client holding the expired certificate (forced into the slot) is refused.
    let (sk, _) = pki.issue("default", "server", Duration::from_secs(86400));
    let client = Side { bundle: pki.bundle(), cert: slot(&clock, ck) };
    let server = Side { bundle: pki.bundle(), cert: slot(&clock, sk) };
    let (c, s) = configs(&clock, CompliancePolicy::Default, &client, &server);
    let err = handshake(c, s).unwrap_err();
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_pki, client, server) = setup(&clock);
    let other = Pki::new(&clock, TD);
    let (foreign, _) = other.issue("default", "client", Duration::from_secs(86400));
    let client = Side { bundle: client.bundle, cert: slot(&clock, foreign) };
    let (c, s) = configs(&clock, CompliancePolicy::Default, &client, &server);
    let err = handshake(c, s).unwrap_err();
    assert!(err.contains("does not chain to the trust bundle"), "{err}");
}

#[test]
fn certificate_from_another_trust_domain_is_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_pki, client, server) = setup(&clock);
    let other = Pki::new(&clock, "evil.example");
    let (foreign, _) = other.issue("default", "client", Duration::from_secs(86400));
    // Even with the other CA's root trusted, its trust domain is not accepted.
    let mut roots = server.bundle.roots();
    roots.extend(other.ca.roots().iter().cloned());
    server.bundle.set_roots(roots).unwrap();
    let client = Side { bundle: client.bundle, cert: slot(&clock, foreign) };
    let (c, s) = configs(&clock, CompliancePolicy::Default, &client, &server);
    let err = handshake(c, s).unwrap_err();
    assert!(err.contains("outside the accepted trust domains"), "{err}");
}

#[test]
fn revoked_certificate_is_refused_after_the_crl_update_naming_the_serial() {
    let clock = Arc::new(ManualClock::starting_now());
    let pki = Pki::new(&clock, TD);
    let (ck, serial) = pki.issue("default", "client", Duration::from_secs(86400));
    let (sk, _) = pki.issue("default", "server", Duration::from_secs(86400));
    let client = Side { bundle: pki.bundle(), cert: slot(&clock, ck) };
    let server = Side { bundle: pki.bundle(), cert: slot(&clock, sk) };
    let (c, s) = configs(&clock, CompliancePolicy::Default, &client, &server);
    handshake(c.clone(), s.clone()).expect("valid before revocation");

    pki.ca.revoke(&serial).unwrap();
    // Not yet distributed: still accepted.
    handshake(c.clone(), s.clone()).expect("CRL not yet applied");
    server.bundle.set_crls(vec![pki.ca.crl().unwrap()]).unwrap();
    // The same configs (no restart) now refuse it.
    let err = handshake(c, s).unwrap_err();
    assert!(err.contains(&format!("serial {serial} is revoked")), "{err}");
}

#[test]
fn crl_file_reload_applies_without_restart() {
    let clock = Arc::new(ManualClock::starting_now());
    let pki = Pki::new(&clock, TD);
    let (ck, serial) = pki.issue("default", "client", Duration::from_secs(86400));
    let bundle = pki.bundle();
    let verifier = SpiffeVerifier::new(bundle.clone(), clock.clone());
    let root_path = pki.ca.dir().join(crate::ca::ROOT_CERT_FILE);
    let crl_path = pki.ca.dir().join(crate::ca::CRL_FILE);
    bundle.reload_files(&root_path, Some(&crl_path)).unwrap();
    assert!(verifier.verify(&ck.cert[0], &[], KeyUsage::client_auth()).is_ok());
    pki.ca.revoke(&serial).unwrap();
    bundle.reload_files(&root_path, Some(&crl_path)).unwrap();
    assert_eq!(bundle.revoked_count(), 1);
    let err = verifier.verify(&ck.cert[0], &[], KeyUsage::client_auth()).unwrap_err();
    assert!(matches!(&err, VerifyError::Revoked { serial: s } if *s == serial), "{err}");
}

fn leaf_with_sans(clock: &ManualClock, sans: Vec<SanType>) -> (CertificateDer<'static>, CertificateDer<'static>) {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = crate::ca::root_params(TD, clock.now() - Duration::from_secs(60), Duration::from_secs(86400));
    let root = root_params.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root_params, root_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.not_before = crate::clock::to_offset(clock.now() - Duration::from_secs(60));
    p.not_after = crate::clock::to_offset(clock.now() + Duration::from_secs(3600));
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = p.signed_by(&key, &issuer).unwrap();
    (leaf.der().clone(), root.der().clone())
}

#[test]
#[allow(clippy::type_complexity)] // a table of (input, expected-error predicate)
fn malformed_spiffe_ids_in_certificates_are_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let cases: Vec<(Vec<SanType>, fn(&VerifyError) -> bool)> = vec![
        (vec![uri("spiffe://cluster.local/ns/a")], |e| matches!(e, VerifyError::MalformedSpiffeId(_))),
        (vec![uri("spiffe://cluster.local/ns/a/sa/b/c")], |e| matches!(e, VerifyError::MalformedSpiffeId(_))),
        (vec![uri("https://cluster.local/ns/a/sa/b")], |e| matches!(e, VerifyError::MalformedSpiffeId(_))),
        (vec![SanType::DnsName("a.example".try_into().unwrap())], |e| {
            matches!(e, VerifyError::SpiffeIdCount { found: 0 })
        }),
        (vec![uri("spiffe://cluster.local/ns/a/sa/b"), uri("spiffe://cluster.local/ns/a/sa/c")], |e| {
            matches!(e, VerifyError::SpiffeIdCount { found: 2 })
        }),
    ];
    for (sans, want) in cases {
        let desc = format!("{sans:?}");
        let (leaf, root) = leaf_with_sans(&clock, sans);
        let bundle = Arc::new(TrustBundle::new(vec![root], vec![TD.to_owned()]).unwrap());
        let err = SpiffeVerifier::new(bundle, clock.clone()).verify(&leaf, &[], KeyUsage::client_auth()).unwrap_err();
        assert!(want(&err), "{desc}: {err}");
    }
    // Control: the same construction with a well-formed ID passes.
    let (leaf, root) = leaf_with_sans(&clock, vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
    let bundle = Arc::new(TrustBundle::new(vec![root], vec![TD.to_owned()]).unwrap());
    SpiffeVerifier::new(bundle, clock.clone()).verify(&leaf, &[], KeyUsage::client_auth()).unwrap();
}

#[test]
fn unexpected_server_identity_is_refused() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_pki, client, server) = setup(&clock);
    let want = Identity::spiffe(TD, "default", "somebody-else").unwrap();
    let cv = Arc::new(SpiffeVerifier::new(client.bundle.clone(), clock.clone()).expecting(vec![want]));
    let sv = Arc::new(SpiffeVerifier::new(server.bundle.clone(), clock.clone()));
    let c = Arc::new(client_config(CompliancePolicy::Default, cv, client.cert.clone()).unwrap());
    let s = Arc::new(server_config(CompliancePolicy::Default, sv, server.cert.clone()).unwrap());
    let err = handshake(c, s).unwrap_err();
    assert!(err.contains("is not one of the expected"), "{err}");
}

#[test]
fn root_rotation_trusts_old_and_new_roots_during_overlap() {
    let clock = Arc::new(ManualClock::starting_now());
    let old = Pki::new(&clock, TD);
    let new = Pki::new(&clock, TD);
    let (old_leaf, _) = old.issue("a", "b", Duration::from_secs(86400));
    let (new_leaf, _) = new.issue("a", "b", Duration::from_secs(86400));
    let bundle = old.bundle();
    let v = SpiffeVerifier::new(bundle.clone(), clock.clone());
    let check = |k: &Arc<CertifiedKey>| v.verify(&k.cert[0], &k.cert[1..], KeyUsage::client_auth());
    assert!(check(&old_leaf).is_ok());
    assert!(check(&new_leaf).is_err());
    bundle.set_roots([old.ca.roots(), new.ca.roots()].concat()).unwrap();
    assert!(check(&old_leaf).is_ok() && check(&new_leaf).is_ok(), "overlap trusts both");
    bundle.set_roots(new.ca.roots().to_vec()).unwrap();
    assert!(check(&old_leaf).is_err() && check(&new_leaf).is_ok(), "after rotation only the new root");
}

#[test]
fn compliance_policy_parses() {
    assert_eq!("pqc".parse::<CompliancePolicy>().unwrap(), CompliancePolicy::Pqc);
    assert_eq!("".parse::<CompliancePolicy>().unwrap(), CompliancePolicy::Default);
    assert!("fips".parse::<CompliancePolicy>().is_err());
    let pqc = crypto_provider(CompliancePolicy::Pqc);
    assert_eq!(pqc.kx_groups.len(), 1);
    assert_eq!(pqc.kx_groups[0].name(), rustls::NamedGroup::X25519MLKEM768);
}

/// Serves one TLS connection on 127.0.0.1 and echoes a line; returns the server's handshake
/// result (negotiated group) through the join handle.
async fn tcp_pair(
    c: Arc<ClientConfig>,
    s: Arc<ServerConfig>,
) -> (Result<rustls::NamedGroup, String>, Result<rustls::NamedGroup, String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(s).accept(tcp).await.map_err(|e| e.to_string())?;
        let group = tls.get_ref().1.negotiated_key_exchange_group().unwrap().name();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(group)
    });
    let client = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(c)
            .connect(ServerName::try_from("workload").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let group = tls.get_ref().1.negotiated_key_exchange_group().unwrap().name();
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok::<_, String>(group)
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    (client, server)
}

/// Nodes may differ in CPU, so one agent's records may be sealed by aws-lc and its peer's by
/// ring: every pairing handshakes, agrees on AES-256-GCM and carries records both ways intact.
#[test]
fn records_sealed_by_either_library_are_opened_by_the_other() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_pki, client, server) = setup(&clock);
    let verifier = |side: &Side| Arc::new(SpiffeVerifier::new(side.bundle.clone(), clock.clone()));
    let both = [RecordCipher::AwsLc, RecordCipher::Ring];
    for (c_lib, s_lib) in both.iter().flat_map(|c| both.iter().map(move |s| (*c, *s))) {
        let c =
            client_config_with(provider_with(CompliancePolicy::Default, c_lib), verifier(&client), client.cert.clone());
        let s =
            server_config_with(provider_with(CompliancePolicy::Default, s_lib), verifier(&server), server.cert.clone());
        let (mut c, mut s) = handshake(Arc::new(c.unwrap()), Arc::new(s.unwrap())).unwrap();
        assert_eq!(c.negotiated_cipher_suite().unwrap().suite(), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        // More than one record each way, so the sequence numbers (the nonces) advance too.
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        send(&mut *c, &mut *s, &data, (c_lib, s_lib));
        send(&mut *s, &mut *c, &data, (c_lib, s_lib));
    }
}

/// Writes `data` on `from`, moves the records to `to`, and checks `to` reads it back.
fn send<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
    data: &[u8],
    libs: (RecordCipher, RecordCipher),
) {
    use std::io::{Read as _, Write as _};
    from.writer().write_all(data).unwrap();
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut rd = &wire[..];
    let mut got = Vec::new();
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap_or_else(|e| panic!("{libs:?}: {e}"));
        let mut chunk = vec![0; data.len()];
        while let Ok(n) = to.reader().read(&mut chunk) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
    }
    assert!(got == data, "{libs:?}: {} bytes read back, not the {} written", got.len(), data.len());
}

#[tokio::test]
async fn pqc_mode_negotiates_x25519mlkem768_on_a_live_connection() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_pki, client, server) = setup(&clock);
    let (c, s) = configs(&clock, CompliancePolicy::Pqc, &client, &server);
    let (cg, sg) = tcp_pair(c, s).await;
    assert_eq!(cg.unwrap(), rustls::NamedGroup::X25519MLKEM768);
    assert_eq!(sg.unwrap(), rustls::NamedGroup::X25519MLKEM768);
}

fn classical_only_client(clock: &Arc<ManualClock>, side: &Side) -> Arc<ClientConfig> {
    let mut provider = (*crypto_provider(CompliancePolicy::Default)).clone();
    provider.kx_groups = vec![aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1];
    let verifier = Arc::new(SpiffeVerifier::new(side.bundle.clone(), clock.clone()));
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(side.cert.clone()),
    )
}

#[tokio::test]
async fn pqc_mode_refuses_a_classical_only_peer() {
    let clock = Arc::new(ManualClock::starting_now());
    let (_pki, client, server) = setup(&clock);
    // Control: the classical-only client works against a default-policy server, with X25519.
    let (_c, s_default) = configs(&clock, CompliancePolicy::Default, &client, &server);
    let (cg, _) = tcp_pair(classical_only_client(&clock, &client), s_default).await;
    assert_eq!(cg.unwrap(), rustls::NamedGroup::X25519);
    // Against a PQC server it fails.
    let (_c, s_pqc) = configs(&clock, CompliancePolicy::Pqc, &client, &server);
    let (cg, sg) = tcp_pair(classical_only_client(&clock, &client), s_pqc).await;
    let (ce, se) = (cg.unwrap_err(), sg.unwrap_err());
    assert!(
        se.contains("NoKxGroupsInCommon")
            || se.contains("no key exchange groups in common")
            || se.to_lowercase().contains("kx"),
        "server: {se}"
    );
    assert!(ce.to_lowercase().contains("handshake"), "client: {ce}");
}

#[tokio::test]
async fn file_watcher_applies_root_rotation_and_crl_without_restart() {
    let clock = Arc::new(ManualClock::starting_now());
    let old = Pki::new(&clock, TD);
    let new = Pki::new(&clock, TD);
    let (new_leaf, _) = new.issue("a", "b", Duration::from_secs(86400));
    let (old_leaf, old_serial) = old.issue("a", "c", Duration::from_secs(86400));
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("root-cert.pem");
    let crl = dir.path().join("ca-crl.pem");
    std::fs::write(&roots, crate::ca::pem_cert(&old.ca.roots()[0])).unwrap();
    let bundle = Arc::new(TrustBundle::from_files(&roots, Some(&crl), vec![TD.into()]).unwrap());
    let v = SpiffeVerifier::new(bundle.clone(), clock.clone());
    assert!(v.verify(&new_leaf.cert[0], &[], KeyUsage::client_auth()).is_err());
    let watcher = bundle.clone().spawn_file_watcher(roots.clone(), Some(crl.clone()), Duration::from_millis(20));

    // Overlap: old and new roots in one file.
    let both = format!("{}{}", crate::ca::pem_cert(&old.ca.roots()[0]), crate::ca::pem_cert(&new.ca.roots()[0]));
    std::fs::write(&roots, both).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while v.verify(&new_leaf.cert[0], &[], KeyUsage::client_auth()).is_err() {
        assert!(std::time::Instant::now() < deadline, "new root never picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(v.verify(&old_leaf.cert[0], &[], KeyUsage::client_auth()).is_ok(), "old root still trusted");

    // A broken file is ignored and the previous bundle kept.
    std::fs::write(&roots, "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bundle.roots().len(), 2);

    // The CRL of the old CA appears: the old leaf is refused.
    let both = format!("{}{}", crate::ca::pem_cert(&old.ca.roots()[0]), crate::ca::pem_cert(&new.ca.roots()[0]));
    std::fs::write(&roots, both).unwrap();
    old.ca.revoke(&old_serial).unwrap();
    std::fs::copy(old.ca.dir().join(crate::ca::CRL_FILE), &crl).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match v.verify(&old_leaf.cert[0], &[], KeyUsage::client_auth()) {
            Err(VerifyError::Revoked { serial }) => {
                assert_eq!(serial, old_serial);
                break;
            }
            _ => assert!(std::time::Instant::now() < deadline, "CRL never picked up"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
}

#[test]
fn intermediate_ca_chain_verifies_to_the_enterprise_root_and_its_crl_applies() {
    use crate::ca::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE};
    let clock = Arc::new(ManualClock::starting_now());
    // Enterprise root and a cluster intermediate in the cacerts layout.
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params =
        crate::ca::root_params("enterprise", clock.now() - Duration::from_secs(60), Duration::from_secs(86400 * 365));
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int_params =
        crate::ca::root_params("cluster", clock.now() - Duration::from_secs(60), Duration::from_secs(86400 * 30));
    int_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CA_CERT_FILE), int.pem()).unwrap();
    std::fs::write(dir.path().join(CA_KEY_FILE), int_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join(ROOT_CERT_FILE), root.pem()).unwrap();
    std::fs::write(dir.path().join(CERT_CHAIN_FILE), format!("{}{}", int.pem(), root.pem())).unwrap();
    let pki =
        Pki { ca: CertificateAuthority::load(dir.path(), CaConfig::default(), clock.clone()).unwrap(), _dir: dir };

    let (ck, serial) = pki.issue("default", "client", Duration::from_secs(86400));
    let (sk, _) = pki.issue("default", "server", Duration::from_secs(86400));
    assert_eq!(ck.cert.len(), 2, "leaf and intermediate are sent, the root is not");
    let client = Side { bundle: pki.bundle(), cert: slot(&clock, ck) };
    let server = Side { bundle: pki.bundle(), cert: slot(&clock, sk) };
    let (c, s) = configs(&clock, CompliancePolicy::Default, &client, &server);
    let (conn, _) = handshake(c.clone(), s.clone()).unwrap();
    assert_eq!(peer_identity(&conn).unwrap().to_string(), "spiffe://cluster.local/ns/default/sa/server");

    pki.ca.revoke(&serial).unwrap();
    server.bundle.set_crls(vec![pki.ca.crl().unwrap()]).unwrap();
    let err = handshake(c, s).unwrap_err();
    assert!(err.contains(&format!("serial {serial} is revoked")), "{err}");
}

#[test]
fn recheck_sees_expiry_and_revocation_after_the_handshake() {
    let clock = Arc::new(ManualClock::starting_now());
    let pki = Pki::new(&clock, TD);
    let (ck, serial) = pki.issue("default", "client", Duration::from_secs(3600));
    let bundle = pki.bundle();
    let validity = Validity::of(&ck.cert[0]).unwrap();
    assert_eq!(validity.serial(), serial);
    assert!(bundle.recheck(&validity, clock.now()).is_ok());
    // What a connection keeps of its peer, from one parse: the same identity and validity.
    let (identity, kept) = identity_and_validity(&ck.cert[0]).unwrap();
    assert_eq!(identity, spiffe_identity(&ck.cert[0]).unwrap());
    assert_eq!(identity.to_string(), "spiffe://cluster.local/ns/default/sa/client");
    assert_eq!(kept, validity);

    // Expiry: the same certificate, an hour and a second later.
    let later = clock.now() + Duration::from_secs(3601);
    let err = bundle.recheck(&validity, later).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");

    // Revocation: the bundle's CRLs as they are now, not as they were at the handshake.
    let root_path = pki.ca.dir().join(crate::ca::ROOT_CERT_FILE);
    let crl_path = pki.ca.dir().join(crate::ca::CRL_FILE);
    pki.ca.revoke(&serial).unwrap();
    bundle.reload_files(&root_path, Some(&crl_path)).unwrap();
    let err = bundle.recheck(&validity, clock.now()).unwrap_err();
    assert!(matches!(&err, VerifyError::Revoked { serial: s } if *s == serial), "{err}");
}
