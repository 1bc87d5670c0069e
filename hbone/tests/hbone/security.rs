//! Certificates: what each side refuses, and rotation under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpListener;
use warden_hbone::protocol::DEFAULT_RECHECK_INTERVAL;
use warden_hbone::{
    BoxError, ConnectError, ConnectRequest, HboneServer, Key, Peer, Pool, PoolOptions, SecretManagerTls, ServerOptions,
    ServerTls, Tunnel,
};
use warden_identity::ca::{CaConfig, CertificateAuthority};
use warden_identity::tls::{CompliancePolicy, TrustBundle, VerifyError};
use warden_identity::workload::{LocalCaClient, SecretManager, SecretManagerConfig};
use warden_identity::{Clock, Identity, ManualClock};

use crate::common::*;

/// A server of `pki` presenting `server`, verifying clients at `server_clock`.
async fn server_of(pki: &Pki, server_clock: Arc<dyn Clock>) -> Server {
    init_tracing();
    let cert = pki.issue(&id(SERVER), DAY);
    let tls = TestServerTls::new(pki.bundle(), server_clock.clone(), slot(server_clock, &cert));
    Server::start(tls, ServerOptions::default()).await
}

/// A pool presenting `client_cert` as `client`, verifying servers with `bundle`.
fn pool_with(pki: &Pki, bundle: Arc<TrustBundle>, client_cert: &Issued) -> Pool<Arc<TestClientTls>> {
    let clock: Arc<dyn Clock> = pki.clock.clone();
    let tls = TestClientTls::new(bundle, clock.clone()).with(id(CLIENT), slot(clock, client_cert));
    Pool::new(Arc::new(tls), PoolOptions::default())
}

/// Connects and expects the server to refuse our certificate for `reason`.
async fn assert_client_refused(server: &Server, pool: &Pool<Arc<TestClientTls>>, reason: &str) {
    let key = Key::new(id(CLIENT), server.addr, vec![id(SERVER)]);
    let err = pool.connect(&key, ConnectRequest::new(server.addr)).await.unwrap_err();
    assert!(matches!(err, ConnectError::SetupFailed { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&server.addr.to_string()) && text.contains("refuse our certificate"), "{text}");
    let failures = eventually(|| Some(server.tls.failures()).filter(|f| !f.is_empty())).await;
    assert!(failures[0].contains(reason), "{failures:?}");
    assert!(server.inbound.requests().is_empty());
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let server = server_of(&pki, pki.clock.clone()).await;
    let other = Pki::new();
    let pool = pool_with(&pki, pki.bundle(), &other.issue(&id(CLIENT), DAY));
    assert_client_refused(&server, &pool, "does not chain to the trust bundle").await;
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let pki = Pki::new();
    // The client still believes its one-hour certificate is valid; the server's clock is two hours on.
    let server_clock = Arc::new(ManualClock::new(pki.clock.now() + Duration::from_secs(2 * 3600)));
    let server = server_of(&pki, server_clock).await;
    let pool = pool_with(&pki, pki.bundle(), &pki.issue(&id(CLIENT), Duration::from_secs(3600)));
    assert_client_refused(&server, &pool, "expired").await;
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused() {
    let pki = Pki::new();
    let server_bundle = pki.bundle();
    let cert = pki.issue(&id(SERVER), DAY);
    let clock: Arc<dyn Clock> = pki.clock.clone();
    let tls = TestServerTls::new(server_bundle.clone(), clock.clone(), slot(clock, &cert));
    let server = Server::start(tls, ServerOptions::default()).await;
    let client_cert = pki.issue(&id(CLIENT), DAY);
    let key = Key::new(id(CLIENT), server.addr, vec![id(SERVER)]);
    let echo = echo_server().await;

    let before = pool_with(&pki, pki.bundle(), &client_cert);
    let tunnel = before.connect(&key, ConnectRequest::new(echo)).await.expect("valid before revocation");
    assert_eq!(round_trip(tunnel, b"ok").await, b"ok");

    pki.ca.revoke(&client_cert.serial).unwrap();
    server_bundle.set_crls(vec![pki.ca.crl().unwrap()]).unwrap();
    // A new connection (a new pool, so nothing is reused) is refused, naming the serial.
    let after = pool_with(&pki, pki.bundle(), &client_cert);
    let err = after.connect(&key, ConnectRequest::new(echo)).await.unwrap_err();
    assert!(matches!(err, ConnectError::SetupFailed { .. }), "{err}");
    let failures = eventually(|| Some(server.tls.failures()).filter(|f| !f.is_empty())).await;
    assert!(failures[0].contains(&format!("serial {} is revoked", client_cert.serial)), "{failures:?}");
}

/// One echo exchange on an open tunnel, which stays open.
async fn echo_once(tunnel: &mut Tunnel, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tunnel.write_all(data).await?;
    tunnel.flush().await?;
    let mut back = vec![0; data.len()];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no echo within 5 s"))??;
    Ok(back)
}

/// A server of `pki` (bundle `server_bundle`, the CA's clock, re-checking open connections every
/// `recheck`), an echo upstream, and a pool presenting `client_cert`.
async fn recheck_setup(
    pki: &Pki,
    server_bundle: Arc<TrustBundle>,
    client_cert: &Issued,
    recheck: Duration,
) -> (Server, SocketAddr, Pool<Arc<TestClientTls>>, Key) {
    init_tracing();
    let clock: Arc<dyn Clock> = pki.clock.clone();
    let cert = pki.issue(&id(SERVER), DAY);
    let tls = TestServerTls::new(server_bundle, clock.clone(), slot(clock, &cert));
    let options = ServerOptions { recheck_interval: recheck, ..ServerOptions::default() };
    let server = Server::start(tls, options).await;
    let pool = pool_with(pki, pki.bundle(), client_cert);
    let key = Key::new(id(CLIENT), server.addr, vec![id(SERVER)]);
    (server, echo_server().await, pool, key)
}

#[tokio::test]
async fn a_client_certificate_that_expires_on_an_open_connection_gets_no_new_tunnels_there() {
    let pki = Pki::new();
    let client_cert = pki.issue(&id(CLIENT), Duration::from_secs(3600));
    // Only the check before each stream acts here: the periodic one waits an hour.
    let (server, echo, pool, key) = recheck_setup(&pki, pki.bundle(), &client_cert, Duration::from_secs(3600)).await;
    let mut open = pool.connect(&key, ConnectRequest::new(echo)).await.expect("valid now");
    assert_eq!(echo_once(&mut open, b"before").await.unwrap(), b"before");

    // Two hours on: the connection is still up, its client certificate has expired. The pool
    // (whose server certificate is still valid) asks for a tunnel on it; the server refuses it.
    pki.clock.advance(Duration::from_secs(2 * 3600));
    let err = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap_err();
    assert!(err.is_denied(), "{err}");
    assert_eq!(server.inbound.requests().len(), 1, "the handler never saw the refused request");
    // The tunnel opened before the expiry carries on, as TLS would (it was authorized then).
    assert_eq!(echo_once(&mut open, b"after").await.unwrap(), b"after");
    // The connection got GOAWAY: the next tunnel needs a new one, whose handshake fails (the
    // client's slot no longer presents its expired certificate).
    let err = eventually_err(&pool, &key, echo).await;
    assert!(matches!(err, ConnectError::SetupFailed { .. }), "{err}");
    let failures = eventually(|| Some(server.tls.failures()).filter(|f| !f.is_empty())).await;
    assert!(failures[0].contains("peer sent no certificates"), "{failures:?}");
    assert_eq!(server.tls.handshakes.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Connects until the attempt fails with something other than a refused stream.
async fn eventually_err(pool: &Pool<Arc<TestClientTls>>, key: &Key, dst: SocketAddr) -> ConnectError {
    for _ in 0..100 {
        match pool.connect(key, ConnectRequest::new(dst)).await {
            Err(e) if !e.is_denied() => return e,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("every connection attempt was a refused stream or succeeded");
}

#[tokio::test]
async fn a_client_certificate_revoked_on_an_open_connection_ends_it_and_its_tunnels() {
    let pki = Pki::new();
    let client_cert = pki.issue(&id(CLIENT), DAY);
    let server_bundle = pki.bundle();
    let (server, echo, pool, key) =
        recheck_setup(&pki, server_bundle.clone(), &client_cert, Duration::from_millis(50)).await;
    let mut open = pool.connect(&key, ConnectRequest::new(echo)).await.expect("valid now");
    assert_eq!(echo_once(&mut open, b"before").await.unwrap(), b"before");

    pki.ca.revoke(&client_cert.serial).unwrap();
    server_bundle.set_crls(vec![pki.ca.crl().unwrap()]).unwrap();
    // Within a few re-check intervals the open tunnel ends.
    assert!(ends_soon(&mut open).await, "the tunnel of a revoked client kept relaying");
    // And no new tunnel gets through: not on that connection (gone), not on a new one.
    let err = eventually_err(&pool, &key, echo).await;
    assert!(matches!(err, ConnectError::SetupFailed { .. }), "{err}");
    let failures = eventually(|| Some(server.tls.failures()).filter(|f| !f.is_empty())).await;
    assert!(failures[0].contains(&format!("serial {} is revoked", client_cert.serial)), "{failures:?}");
}

/// Whether an open tunnel stops relaying within 2.5 s (its next exchange fails: reset or EOF).
async fn ends_soon(open: &mut Tunnel) -> bool {
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if echo_once(open, b"x").await.is_err() {
            return true;
        }
    }
    false
}

/// A server presenting a certificate of `server_ttl` and a pool verifying servers with
/// `client_bundle`, re-checking its open connections every `recheck`, with one tunnel open through
/// them to an echo upstream. Returns the server, its certificate, the echo address, the pool, its
/// key and the open tunnel.
async fn open_tunnel_to_server(
    pki: &Pki,
    server_ttl: Duration,
    client_bundle: Arc<TrustBundle>,
    recheck: Duration,
) -> (Server, Issued, SocketAddr, Pool<Arc<TestClientTls>>, Key, Tunnel) {
    init_tracing();
    let clock: Arc<dyn Clock> = pki.clock.clone();
    let server_cert = pki.issue(&id(SERVER), server_ttl);
    let tls = TestServerTls::new(pki.bundle(), clock.clone(), slot(clock.clone(), &server_cert));
    let server = Server::start(tls, ServerOptions::default()).await;
    let client_tls =
        TestClientTls::new(client_bundle, clock.clone()).with(id(CLIENT), slot(clock, &pki.issue(&id(CLIENT), DAY)));
    let pool = Pool::new(Arc::new(client_tls), PoolOptions { recheck_interval: recheck, ..PoolOptions::default() });
    let key = Key::new(id(CLIENT), server.addr, vec![id(SERVER)]);
    let echo = echo_server().await;
    let mut open = pool.connect(&key, ConnectRequest::new(echo)).await.expect("valid now");
    assert_eq!(echo_once(&mut open, b"before").await.unwrap(), b"before");
    (server, server_cert, echo, pool, key, open)
}

#[tokio::test]
async fn a_pooled_connection_whose_server_certificate_expired_takes_no_new_tunnels() {
    let pki = Pki::new();
    // The server's certificate lasts an hour; the client's a day.
    let (server, _, echo, pool, key, _open) =
        open_tunnel_to_server(&pki, Duration::from_secs(3600), pki.bundle(), DEFAULT_RECHECK_INTERVAL).await;

    pki.clock.advance(Duration::from_secs(2 * 3600));
    // The pool retires the connection instead of reusing it, and dials a new one, whose handshake
    // fails (the server's slot no longer presents its expired certificate).
    let err = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    assert_eq!(server.tls.handshakes.load(std::sync::atomic::Ordering::SeqCst), 2, "a second handshake");
    assert_eq!(server.inbound.requests().len(), 1, "no tunnel on the old connection");
}

#[tokio::test]
async fn a_server_certificate_revoked_on_an_open_connection_ends_it_and_its_tunnels() {
    let pki = Pki::new();
    let client_bundle = pki.bundle();
    let (_server, server_cert, echo, pool, key, mut open) =
        open_tunnel_to_server(&pki, DAY, client_bundle.clone(), Duration::from_millis(50)).await;

    pki.ca.revoke(&server_cert.serial).unwrap();
    client_bundle.set_crls(vec![pki.ca.crl().unwrap()]).unwrap();
    assert!(ends_soon(&mut open).await, "the tunnel to a revoked server kept relaying");
    // A new connection's handshake refuses the revoked server certificate.
    let err = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains(&format!("serial {} is revoked", server_cert.serial)), "{err}");
}

#[tokio::test]
async fn a_server_outside_the_expected_identities_is_refused() {
    let pki = Pki::new();
    let server = server_of(&pki, pki.clock.clone()).await;
    let client_cert = pki.issue(&id(CLIENT), DAY);
    let key = Key::new(id(CLIENT), server.addr, vec![id("payment-processor")]);

    // The configuration's verifier refuses it during the handshake.
    let pool = pool_with(&pki, pki.bundle(), &client_cert);
    let err = pool.connect(&key, ConnectRequest::new(server.addr)).await.unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("is not one of the expected") && text.contains("payment-processor"), "{text}");

    // A configuration source that ignores `expected` is caught by the pool's own check.
    let clock: Arc<dyn Clock> = pki.clock.clone();
    let mut careless = TestClientTls::new(pki.bundle(), clock.clone()).with(id(CLIENT), slot(clock, &client_cert));
    careless.verify_expected = false;
    let pool = Pool::new(Arc::new(careless), PoolOptions::default());
    let err = pool.connect(&key, ConnectRequest::new(server.addr)).await.unwrap_err();
    match &err {
        ConnectError::UnexpectedServerIdentity { presented, key: attempted } => {
            assert_eq!(presented, &id(SERVER));
            assert_eq!(**attempted, key);
        }
        other => panic!("{other}"),
    }
    assert!(server.inbound.requests().is_empty());
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let server = server_of(&pki, pki.clock.clone()).await;
    let other = Pki::new();
    // The client trusts only the other CA.
    let pool = pool_with(&pki, other.bundle(), &pki.issue(&id(CLIENT), DAY));
    let key = Key::new(id(CLIENT), server.addr, vec![id(SERVER)]);
    let err = pool.connect(&key, ConnectRequest::new(server.addr)).await.unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("does not chain to the trust bundle"), "{err}");
}

/// A node agent's server TLS: every local address belongs to one workload.
struct NodeTls {
    tls: SecretManagerTls,
    workload: Identity,
}

impl ServerTls for NodeTls {
    async fn config(&self, _local: SocketAddr) -> Result<Arc<ServerConfig>, BoxError> {
        self.tls.server_config(&self.workload).await
    }

    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError> {
        self.tls.recheck(peer)
    }
}

/// A CA on a manual clock, a secret manager that rotates on demand, and an HBONE server (as
/// `SERVER`, recording what it accepts) using that manager's certificates.
struct Rotating {
    clock: Arc<ManualClock>,
    manager: SecretManager,
    tls: SecretManagerTls,
    inbound: Arc<Recorder>,
    addr: SocketAddr,
    _ca_dir: tempfile::TempDir,
}

impl Rotating {
    async fn start() -> Rotating {
        init_tracing();
        let clock = Arc::new(ManualClock::starting_now());
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), clock.clone()).unwrap());
        let trust = Arc::new(TrustBundle::new(ca.roots().to_vec(), vec![TD.to_owned()]).unwrap());
        let config = SecretManagerConfig { rotation_jitter: 0.0, ..SecretManagerConfig::default() };
        let manager = SecretManager::new(Arc::new(LocalCaClient(ca)), trust, clock.clone(), config, None);
        let tls = SecretManagerTls::new(manager.clone(), CompliancePolicy::Default);

        let inbound = Arc::new(Recorder::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let node = NodeTls { tls: tls.clone(), workload: id(SERVER) };
        tokio::spawn(HboneServer::new(listener, node, inbound.clone(), ServerOptions::default()).run());
        Rotating { clock, manager, tls, inbound, addr, _ca_dir: dir }
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_during_a_long_transfer_keeps_it_and_new_connections_present_the_new_certificate() {
    let Rotating { clock, manager, tls, inbound, addr, _ca_dir } = Rotating::start().await;

    let options = PoolOptions { idle_timeout: Duration::from_millis(200), ..PoolOptions::default() };
    let pool = Pool::new(tls, options);
    let key = Key::new(id(CLIENT), addr, vec![id(SERVER)]);
    let echo = echo_server().await;

    let tunnel = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
    let first = manager.fetch(&id(CLIENT)).await.unwrap();

    // 48 MiB echoed; the certificate rotates once the first quarter is back.
    const TOTAL: usize = 48 * 1024 * 1024;
    let data = Arc::new(pattern(TOTAL, 9));
    let (mut r, mut w) = tokio::io::split(tunnel);
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in data.chunks(1024 * 1024) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        })
    };
    let mut back = Vec::with_capacity(TOTAL);
    let mut buf = vec![0u8; 256 * 1024];
    let mut rotated = false;
    loop {
        use tokio::io::AsyncReadExt;
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
        if !rotated && back.len() >= TOTAL / 4 {
            clock.set(first.refresh_at);
            let report = manager.rotate_due().await;
            assert!(report.rotated.contains(&id(CLIENT)), "{report:?}");
            rotated = true;
        }
    }
    writer.await.unwrap();
    drop(r);
    assert!(rotated);
    assert!(back == *data, "echoed {} of {} bytes intact", back.len(), TOTAL);
    let second = manager.fetch(&id(CLIENT)).await.unwrap();
    assert_ne!(second.serial, first.serial);

    // The pooled connection closes when idle; the next one handshakes with the new certificate.
    eventually(|| (pool.stats().connections == 0).then_some(())).await;
    let tunnel = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(round_trip(tunnel, b"after rotation").await, b"after rotation");
    let seen: Vec<CertificateDer<'static>> =
        inbound.requests().iter().map(|r| r.connection.peer.certificate.clone()).collect();
    assert_eq!(seen, [der(&first.chain_pem[0]), der(&second.chain_pem[0])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_presented_from_the_next_tunnel_on_while_open_tunnels_keep_going() {
    let Rotating { clock, manager, tls, inbound, addr, _ca_dir } = Rotating::start().await;

    // The default idle timeout (minutes): nothing here waits for a connection to go idle.
    let pool = Pool::new(tls, PoolOptions::default());
    let key = Key::new(id(CLIENT), addr, vec![id(SERVER)]);
    let echo = echo_server().await;

    let held = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
    let old_connection = held.connection_id();
    let first = manager.fetch(&id(CLIENT)).await.unwrap();
    clock.set(first.refresh_at);
    assert!(manager.rotate_due().await.rotated.contains(&id(CLIENT)));
    let second = manager.fetch(&id(CLIENT)).await.unwrap();
    assert_ne!(second.serial, first.serial);

    // The next tunnel does not ride the connection opened under the old certificate.
    let next = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
    assert_ne!(next.connection_id(), old_connection, "a new tunnel went over the pre-rotation connection");
    let seen: Vec<CertificateDer<'static>> =
        inbound.requests().iter().map(|r| r.connection.peer.certificate.clone()).collect();
    assert_eq!(seen, [der(&first.chain_pem[0]), der(&second.chain_pem[0])]);
    let new_connection = next.connection_id();
    assert_eq!(round_trip(next, b"new certificate").await, b"new certificate");
    // Only the new connection takes tunnels now...
    assert_eq!(pool.stats().connections, 1);
    let third = pool.connect(&key, ConnectRequest::new(echo)).await.unwrap();
    assert_eq!(third.connection_id(), new_connection);
    assert_eq!(round_trip(third, b"pooled").await, b"pooled");
    // ...and the tunnel opened before the rotation keeps working on the old one.
    assert_eq!(round_trip(held, b"old tunnel").await, b"old tunnel");
    assert_eq!(inbound.requests().len(), 3);
}
