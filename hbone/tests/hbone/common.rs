//! Test fixtures: a CA, TLS sources for both sides, upstream servers and a recording handler. All
//! sockets are on 127.0.0.1.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warden_hbone::{
    AcceptError, BoxError, ClientTls, HboneServer, Inbound, InboundRequest, Key, Peer, Pool, PoolOptions, Progress,
    Refusal, ServerOptions, ServerTls, TransferError, TransferStats,
};
use warden_identity::ca::{CaConfig, CertificateAuthority};
use warden_identity::tls::{CertSlot, CompliancePolicy, SpiffeVerifier, TrustBundle, VerifyError, certified_key};
use warden_identity::workload::generate_key_and_csr;
use warden_identity::{Clock, Identity, ManualClock};

pub const TD: &str = "cluster.local";
pub const DAY: Duration = Duration::from_secs(86400);

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn id(sa: &str) -> Identity {
    Identity::spiffe(TD, "default", sa).expect("valid identity")
}

/// A certificate issued for a test.
#[derive(Clone)]
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub serial: String,
    pub not_after: std::time::SystemTime,
}

/// A CA with its own clock and trust bundle.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
    pub clock: Arc<ManualClock>,
}

impl Pki {
    pub fn new() -> Self {
        let clock = Arc::new(ManualClock::starting_now());
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), clock.clone()).expect("CA");
        Pki { dir, ca, clock }
    }

    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Issued {
        let (key, csr) = generate_key_and_csr(identity).expect("key");
        let cert = self.ca.sign_csr(&csr, Some(ttl)).expect("signed");
        let key = Arc::new(certified_key(&cert.chain_pem, key.serialize_der()).expect("certified key"));
        Issued { key, serial: cert.serial, not_after: cert.not_after }
    }

    /// A certificate for `identity` as PEM files in `dir` (for peers outside this process):
    /// the chain and the PKCS #8 key.
    pub fn issue_pem(&self, identity: &Identity, dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (key, csr) = generate_key_and_csr(identity).expect("key");
        let cert = self.ca.sign_csr(&csr, Some(DAY)).expect("signed");
        let name = identity.to_string().replace(['/', ':'], "_");
        let (cert_file, key_file) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_file, cert.chain_pem.concat()).expect("write the chain");
        std::fs::write(&key_file, key.serialize_pem()).expect("write the key");
        (cert_file, key_file)
    }

    /// The CA's trust bundle as a PEM file.
    pub fn roots_pem(&self) -> std::path::PathBuf {
        self.dir.path().join(warden_identity::ca::ROOT_CERT_FILE)
    }

    /// A fresh trust bundle trusting this CA.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        Arc::new(TrustBundle::new(self.ca.roots().to_vec(), vec![TD.to_owned()]).expect("bundle"))
    }
}

/// A certificate slot holding `issued`, on `clock`.
pub fn slot(clock: Arc<dyn Clock>, issued: &Issued) -> Arc<CertSlot> {
    let s = Arc::new(CertSlot::new(clock));
    s.store(issued.key.clone(), issued.not_after);
    s
}

/// One server configuration for every connection; records what happened.
pub struct TestServerTls {
    config: Arc<ServerConfig>,
    bundle: Arc<TrustBundle>,
    clock: Arc<dyn Clock>,
    pub handshakes: AtomicUsize,
    pub failures: Mutex<Vec<String>>,
}

impl TestServerTls {
    pub fn new(bundle: Arc<TrustBundle>, clock: Arc<dyn Clock>, cert: Arc<CertSlot>) -> Arc<Self> {
        let verifier = Arc::new(SpiffeVerifier::new(bundle.clone(), clock.clone()));
        let config = warden_identity::tls::server_config(CompliancePolicy::Default, verifier, cert).expect("config");
        Arc::new(Self {
            config: Arc::new(config),
            bundle,
            clock,
            handshakes: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
        })
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

impl ServerTls for TestServerTls {
    async fn config(&self, _local: SocketAddr) -> Result<Arc<ServerConfig>, BoxError> {
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        Ok(self.config.clone())
    }

    fn handshake_failed(&self, error: &AcceptError) {
        self.failures.lock().unwrap().push(error.to_string());
    }

    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError> {
        self.bundle.recheck(&peer.validity, self.clock.now())
    }
}

/// Client configurations from per-identity certificate slots.
pub struct TestClientTls {
    bundle: Arc<TrustBundle>,
    clock: Arc<dyn Clock>,
    certs: Mutex<HashMap<Identity, Arc<CertSlot>>>,
    /// When false, the verifier accepts any trusted server identity (a careless configuration
    /// source), leaving the check to the pool.
    pub verify_expected: bool,
    /// Configurations handed out (one per connection attempt).
    pub configs: AtomicUsize,
}

impl TestClientTls {
    pub fn new(bundle: Arc<TrustBundle>, clock: Arc<dyn Clock>) -> Self {
        Self { bundle, clock, certs: Mutex::new(HashMap::new()), verify_expected: true, configs: AtomicUsize::new(0) }
    }

    pub fn with(self, identity: Identity, cert: Arc<CertSlot>) -> Self {
        self.certs.lock().unwrap().insert(identity, cert);
        self
    }
}

impl ClientTls for TestClientTls {
    async fn config(&self, source: &Identity, expected: &[Identity]) -> Result<Arc<ClientConfig>, BoxError> {
        self.configs.fetch_add(1, Ordering::SeqCst);
        let cert =
            self.certs.lock().unwrap().get(source).cloned().ok_or_else(|| format!("no certificate for {source}"))?;
        let mut verifier = SpiffeVerifier::new(self.bundle.clone(), self.clock.clone());
        if self.verify_expected && !expected.is_empty() {
            verifier = verifier.expecting(expected.to_vec());
        }
        let config = warden_identity::tls::client_config(CompliancePolicy::Default, Arc::new(verifier), cert)?;
        Ok(Arc::new(config))
    }

    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError> {
        self.bundle.recheck(&peer.validity, self.clock.now())
    }
}

/// What the handler does with the next requests.
#[derive(Clone, Default)]
pub enum Decision {
    /// Connect to the requested destination.
    #[default]
    Connect,
    /// Refuse.
    Refuse(Refusal),
}

/// A handler that connects to the requested destination and records everything.
#[derive(Default)]
pub struct Recorder {
    pub decision: Mutex<Decision>,
    pub requests: Mutex<Vec<InboundRequest>>,
    pub closed: Mutex<Vec<Result<TransferStats, String>>>,
}

impl Recorder {
    pub fn requests(&self) -> Vec<InboundRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `n` tunnels have been reported closed; returns the reports.
    pub async fn wait_closed(&self, n: usize) -> Vec<Result<TransferStats, String>> {
        eventually(|| {
            let closed = self.closed.lock().unwrap();
            (closed.len() >= n).then(|| closed.clone())
        })
        .await
    }
}

impl Inbound for Recorder {
    async fn open(&self, request: &InboundRequest, _progress: Arc<Progress>) -> Result<TcpStream, Refusal> {
        self.requests.lock().unwrap().push(request.clone());
        let decision = self.decision.lock().unwrap().clone();
        match decision {
            Decision::Refuse(refusal) => Err(refusal),
            Decision::Connect => TcpStream::connect(request.destination).await.map_err(Refusal::unreachable),
        }
    }

    fn closed(&self, _request: &InboundRequest, result: &Result<TransferStats, TransferError>) {
        let report = result.as_ref().map(|s| *s).map_err(ToString::to_string);
        self.closed.lock().unwrap().push(report);
    }
}

/// A running HBONE server.
pub struct Server {
    pub addr: SocketAddr,
    pub tls: Arc<TestServerTls>,
    pub inbound: Arc<Recorder>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

impl Server {
    pub async fn start(tls: Arc<TestServerTls>, options: ServerOptions) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, tls, options)
    }

    pub fn start_on(listener: TcpListener, tls: Arc<TestServerTls>, options: ServerOptions) -> Server {
        let addr = listener.local_addr().expect("addr");
        let inbound = Arc::new(Recorder::default());
        let server = HboneServer::new(listener, tls.clone(), inbound.clone(), options);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.serve_until(async move {
            let _ = stopped.await;
        }));
        Server { addr, tls, inbound, stop: Some(stop), task }
    }

    /// Starts the graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server and a client of the same CA: the client is `client`, the server `server`.
pub struct Setup {
    pub pki: Pki,
    pub server: Server,
    pub client_tls: Arc<TestClientTls>,
    pub pool: Pool<Arc<TestClientTls>>,
    pub key: Key,
}

pub const CLIENT: &str = "client";
pub const SERVER: &str = "server";

impl Setup {
    pub async fn new(server_options: ServerOptions, pool_options: PoolOptions) -> Setup {
        init_tracing();
        let pki = Pki::new();
        let clock: Arc<dyn Clock> = pki.clock.clone();
        let server_cert = pki.issue(&id(SERVER), DAY);
        let client_cert = pki.issue(&id(CLIENT), DAY);
        let tls = TestServerTls::new(pki.bundle(), clock.clone(), slot(clock.clone(), &server_cert));
        let server = Server::start(tls, server_options).await;
        let client_tls =
            Arc::new(TestClientTls::new(pki.bundle(), clock.clone()).with(id(CLIENT), slot(clock, &client_cert)));
        let pool = Pool::new(client_tls.clone(), pool_options);
        let key = Key::new(id(CLIENT), server.addr, vec![id(SERVER)]);
        Setup { pki, server, client_tls, pool, key }
    }

    pub async fn default() -> Setup {
        Self::new(ServerOptions::default(), PoolOptions::default()).await
    }
}

/// An upstream that echoes each connection until EOF, then closes its write side.
pub async fn echo_server() -> SocketAddr {
    serve_upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// An upstream accepting connections and running `handle` on each.
pub async fn serve_upstream<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(handle(s));
        }
    });
    addr
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 9) as u8).wrapping_add(seed)).collect()
}

/// Polls `f` every 10 ms for up to 10 s.
pub async fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..1000 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 10 s");
}

/// Writes `data`, half-closes, and reads everything back, concurrently.
pub async fn round_trip<S>(stream: S, data: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let read = async {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.expect("read");
        out
    };
    let ((), out) = tokio::join!(write, read);
    out
}
