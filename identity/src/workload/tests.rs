use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::ca::{CaConfig, CertificateAuthority};
use crate::clock::{Clock, ManualClock};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::tls::{CompliancePolicy, TrustBundle};

/// A CA that can be switched off, counting requests.
#[derive(Debug)]
struct FlakyCa {
    inner: LocalCaClient,
    up: AtomicBool,
    calls: AtomicUsize,
}

impl CaClient for FlakyCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.up.load(Ordering::SeqCst) {
            return Box::pin(async { Err(CaClientError::Unavailable { reason: "connection refused (test)".into() }) });
        }
        self.inner.sign(identity, csr, ttl)
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    ca: Arc<FlakyCa>,
    mgr: SecretManager,
    registry: Registry,
}

fn harness(config: SecretManagerConfig) -> Harness {
    let clock = Arc::new(ManualClock::starting_now());
    let dir = tempfile::tempdir().unwrap();
    let authority =
        Arc::new(CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), clock.clone()).unwrap());
    let trust = Arc::new(TrustBundle::new(authority.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let ca =
        Arc::new(FlakyCa { inner: LocalCaClient(authority), up: AtomicBool::new(true), calls: AtomicUsize::new(0) });
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let mgr = SecretManager::new(ca.clone(), trust, clock.clone(), config, Some(metrics));
    Harness { _dir: dir, clock, ca, mgr, registry }
}

fn no_jitter() -> SecretManagerConfig {
    SecretManagerConfig { rotation_jitter: 0.0, ..SecretManagerConfig::default() }
}

fn web() -> Identity {
    Identity::spiffe("cluster.local", "default", "web").unwrap()
}

fn metrics_text(h: &Harness) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, &h.registry).unwrap();
    s
}

#[tokio::test]
async fn rotation_happens_at_half_of_the_lifetime() {
    let h = harness(no_jitter());
    let first = h.mgr.fetch(&web()).await.unwrap();
    let lifetime = first.not_after.duration_since(first.not_before).unwrap();
    assert_eq!(first.refresh_at, first.not_before + lifetime / 2);
    // Just before half-time: nothing happens.
    h.clock.set(first.refresh_at - Duration::from_secs(1));
    assert_eq!(h.mgr.rotate_due().await, RotationReport::default());
    assert_eq!(h.mgr.fetch(&web()).await.unwrap().serial, first.serial);
    // At half-time: rotated.
    h.clock.set(first.refresh_at);
    let report = h.mgr.rotate_due().await;
    assert_eq!(report.rotated, [web()]);
    let second = h.mgr.fetch(&web()).await.unwrap();
    assert_ne!(second.serial, first.serial);
    assert_eq!(
        h.mgr.cert_slot(&web()).get().unwrap().cert[0].as_ref(),
        rustls_pki_types::CertificateDer::from_pem_slice(second.chain_pem[0].as_bytes()).unwrap().as_ref()
    );
    assert_eq!(h.ca.calls.load(Ordering::SeqCst), 2);
    assert!(
        metrics_text(&h)
            .contains("warden_identity_cert_rotations_total{identity=\"spiffe://cluster.local/ns/default/sa/web\"} 2")
    );
}

#[tokio::test]
async fn rotation_jitter_only_advances_the_renewal_within_its_bound() {
    let h = harness(SecretManagerConfig { rotation_jitter: 0.1, ..SecretManagerConfig::default() });
    let mut seen = std::collections::HashSet::new();
    for sa in 0..8 {
        let id = Identity::spiffe("cluster.local", "default", format!("sa{sa}")).unwrap();
        let c = h.mgr.fetch(&id).await.unwrap();
        let lifetime = c.not_after.duration_since(c.not_before).unwrap();
        let half = c.not_before + lifetime / 2;
        assert!(c.refresh_at <= half && c.refresh_at >= half - lifetime.mul_f64(0.1), "{c:?}");
        seen.insert(c.refresh_at);
    }
    assert!(seen.len() > 1, "jitter spreads renewals");
}

#[tokio::test]
async fn ca_outage_keeps_the_old_certificate_and_replaces_it_once_the_ca_is_back() {
    let h = harness(no_jitter());
    let first = h.mgr.fetch(&web()).await.unwrap();
    let slot = h.mgr.cert_slot(&web());
    h.ca.up.store(false, Ordering::SeqCst);
    h.clock.set(first.refresh_at + Duration::from_secs(1));

    let report = h.mgr.rotate_due().await;
    assert_eq!(report.failed, [web()]);
    assert_eq!(h.mgr.fetch(&web()).await.unwrap().serial, first.serial, "old certificate kept while valid");
    assert!(slot.get().is_some(), "still presented in handshakes");
    let calls = h.ca.calls.load(Ordering::SeqCst);

    // Within the backoff nothing is attempted (fetch above also counted one failure).
    let status = h.mgr.snapshot().into_iter().next().unwrap();
    assert_eq!(status.failures, 2);
    assert!(status.last_error.unwrap().contains("connection refused"));
    assert_eq!(status.next_attempt.unwrap(), h.clock.now() + h.mgr.backoff(2));
    h.clock.advance(h.mgr.backoff(2) - Duration::from_millis(500));
    assert_eq!(h.mgr.rotate_due().await, RotationReport::default());
    assert_eq!(h.ca.calls.load(Ordering::SeqCst), calls);

    // CA back: replaced at the next attempt.
    h.ca.up.store(true, Ordering::SeqCst);
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.mgr.rotate_due().await.rotated, [web()]);
    let second = h.mgr.fetch(&web()).await.unwrap();
    assert_ne!(second.serial, first.serial);
    assert_eq!(h.mgr.snapshot()[0].failures, 0);
    assert!(metrics_text(&h).contains(
        "warden_identity_cert_rotation_failures_total{identity=\"spiffe://cluster.local/ns/default/sa/web\"} 2"
    ));
}

#[tokio::test]
async fn backoff_doubles_and_is_capped() {
    let h = harness(SecretManagerConfig {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
        ..no_jitter()
    });
    let got: Vec<u64> = (1..=9).map(|n| h.mgr.backoff(n).as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(h.mgr.backoff(u32::MAX), Duration::from_secs(60));
}

#[tokio::test]
async fn expired_certificate_is_withdrawn_when_the_ca_stays_down() {
    let h = harness(no_jitter());
    let first = h.mgr.fetch(&web()).await.unwrap();
    let slot = h.mgr.cert_slot(&web());
    h.ca.up.store(false, Ordering::SeqCst);
    h.clock.set(first.not_after + Duration::from_secs(1));
    assert!(slot.get().is_none(), "an expired certificate is never presented");
    let report = h.mgr.rotate_due().await;
    assert_eq!(report.expired, [web()]);
    assert!(h.mgr.fetch(&web()).await.is_err());
    assert!(!metrics_text(&h).contains("cert_expiration_timestamp_seconds{"));
}

#[tokio::test]
async fn certificate_for_another_identity_is_rejected() {
    #[derive(Debug)]
    struct WrongCa(LocalCaClient);
    impl CaClient for WrongCa {
        fn sign<'a>(
            &'a self,
            _id: &'a Identity,
            _csr: &'a str,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>> {
            Box::pin(async move {
                let other = Identity::spiffe("cluster.local", "default", "other").unwrap();
                let (_k, csr) = generate_key_and_csr(&other).unwrap();
                Ok(self.0.0.sign_csr(&csr, Some(ttl))?.chain_pem)
            })
        }
    }
    let clock = Arc::new(ManualClock::starting_now());
    let dir = tempfile::tempdir().unwrap();
    let authority =
        Arc::new(CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), clock.clone()).unwrap());
    let trust = Arc::new(TrustBundle::new(authority.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let mgr = SecretManager::new(Arc::new(WrongCa(LocalCaClient(authority))), trust, clock, no_jitter(), None);
    let err = mgr.fetch(&web()).await.unwrap_err();
    assert!(matches!(err, SecretError::BadCertificate { .. }), "{err}");
}

/// Rotation swaps the certificate for new handshakes while an established connection keeps
/// working on the old one.
#[tokio::test]
async fn rotation_never_drops_established_connections() {
    let h = harness(no_jitter());
    let server_id = web();
    let client_id = Identity::spiffe("cluster.local", "default", "client").unwrap();
    let first = h.mgr.fetch(&server_id).await.unwrap();
    h.mgr.fetch(&client_id).await.unwrap();
    let server_cfg = h.mgr.server_config(&server_id, CompliancePolicy::Default).unwrap();
    let client_cfg = h.mgr.client_config(&client_id, CompliancePolicy::Default, vec![server_id.clone()]).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tasks.push(tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 1];
                // Echo until the client closes.
                while tls.read_exact(&mut buf).await.is_ok() {
                    tls.write_all(&buf).await.unwrap();
                    tls.flush().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let connector = tokio_rustls::TlsConnector::from(client_cfg);
    let name = rustls_pki_types::ServerName::try_from("web").unwrap();
    let serial_of = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        crate::ca::serial_hex(x.raw_serial())
    };
    let mut old = connector.connect(name.clone(), tokio::net::TcpStream::connect(addr).await.unwrap()).await.unwrap();
    assert_eq!(serial_of(&old), first.serial);
    assert_eq!(echo(&mut old, 1).await, 1);

    h.clock.set(first.refresh_at);
    assert!(h.mgr.rotate_due().await.rotated.contains(&server_id));
    let second = h.mgr.fetch(&server_id).await.unwrap();
    assert_ne!(second.serial, first.serial);

    let mut new = connector.connect(name, tokio::net::TcpStream::connect(addr).await.unwrap()).await.unwrap();
    assert_eq!(serial_of(&new), second.serial, "new handshakes use the new certificate");
    assert_eq!(echo(&mut new, 2).await, 2);
    assert_eq!(echo(&mut old, 3).await, 3, "the established connection survives rotation");
    drop((old, new));
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
}

use rustls_pki_types::pem::PemObject;

#[tokio::test]
async fn background_rotation_loop_rotates_due_certificates() {
    let h = harness(no_jitter());
    let first = h.mgr.fetch(&web()).await.unwrap();
    let task = h.mgr.spawn_rotation();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.mgr.fetch(&web()).await.unwrap().serial, first.serial, "not due yet");
    h.clock.set(first.refresh_at);
    // Registering an identity wakes the loop (it would otherwise wake within 30 s).
    let other = Identity::spiffe("cluster.local", "default", "other").unwrap();
    h.mgr.cert_slot(&other);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = h.mgr.snapshot();
        let serial_web =
            status.iter().find(|s| s.identity == web()).and_then(|s| s.cert.as_ref().map(|c| c.serial.clone()));
        let other_ok = status.iter().any(|s| s.identity == other && s.cert.is_some());
        if serial_web.is_some_and(|s| s != first.serial) && other_ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rotation loop did not act: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, b: u8) -> u8 {
    tls.write_all(&[b]).await.unwrap();
    let mut buf = [0u8; 1];
    tls.read_exact(&mut buf).await.unwrap();
    buf[0]
}
