//! Istio's CA API, `istio.v1.auth.IstioCertificateService/CreateCertificate`, served with tonic.
//!
//! Every request is (1) authenticated: the [`Authenticator`] maps the caller to a node name (a
//! token file, node certificates when served over mTLS, or, in a cluster, the node agent's
//! Kubernetes service-account token, implemented by the agent crate),
//! (2) rate-limited per node, (3) parsed: the CSR must carry exactly one SPIFFE ID of this trust
//! domain and, if sent, match the `ImpersonatedIdentity` metadata, (4) authorised: the node may
//! only obtain identities of workloads scheduled on it ([`NodeWorkloads`], implemented by the
//! agent from its pod view), then (5) signed and logged. Refusals use distinct gRPC codes with a
//! message that says why.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
/// The request metadata an [`Authenticator`] reads (re-exported for implementors).
pub use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::ca::{CaError, CertificateAuthority};
use crate::clock::{Clock, rfc3339};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::proto::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::tls::{CompliancePolicy, SpiffeVerifier, TrustBundle};
use crate::workload::{BoxFuture, IMPERSONATED_IDENTITY_KEY, LocalCaClient, SecretManager, SecretManagerConfig};

/// Address `warden ca serve` listens on by default (istiod serves its CA on 15012).
pub const DEFAULT_CA_LISTEN_ADDR: &str = "127.0.0.1:15012";
/// Sustained certificate requests per second allowed per node.
pub const DEFAULT_RATE_LIMIT_PER_SECOND: f64 = 10.0;
/// Burst of certificate requests allowed per node (a node starting many pods at once).
pub const DEFAULT_RATE_LIMIT_BURST: u32 = 100;
/// Namespace of the CA's own serving identity.
pub const CA_NAMESPACE: &str = "warden-system";
/// Service account of the CA's own serving identity.
pub const CA_SERVICE_ACCOUNT: &str = "warden-ca";

/// The SPIFFE identity the CA serves its gRPC port with (clients pin it).
pub fn ca_server_identity(trust_domain: &str) -> Result<Identity, crate::identity::IdentityError> {
    Identity::spiffe(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
}

/// Time allowed for a TLS handshake on the CA port.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the CA server and its inputs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A configuration file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A configuration file has an invalid line.
    #[error("{path}:{line}: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Binding or serving failed.
    #[error("CA server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The CA's serving certificate could not be obtained.
    #[error("CA serving certificate: {0}")]
    Secret(Box<crate::workload::SecretError>),
    /// The CA's TLS configuration could not be built.
    #[error("CA TLS configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The CA's trust domain is invalid.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl From<crate::workload::SecretError> for ServerError {
    fn from(e: crate::workload::SecretError) -> Self {
        ServerError::Secret(Box::new(e))
    }
}

/// Why a caller was not authenticated.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credentials were sent.
    #[error("no credentials: send `authorization: Bearer <token>` or a node certificate")]
    Missing,
    /// The credentials were not accepted.
    #[error("credentials not accepted")]
    Invalid,
    /// The credentials could not be checked now (the service that checks them did not answer);
    /// worth retrying.
    #[error("credentials cannot be checked now: {0}")]
    Unavailable(String),
}

/// Maps a caller to the node it runs on.
pub trait Authenticator: Send + Sync + fmt::Debug {
    /// `peer_certs` is the verified client chain when the server runs with mTLS.
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
        peer_certs: Option<&'a [CertificateDer<'static>]>,
    ) -> BoxFuture<'a, Result<String, AuthError>>;
}

/// Why [`NodeWorkloads`] could not answer (its source did not); worth retrying.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot tell which workloads run on the node: {0}")]
pub struct LookupError(pub String);

/// The "workloads on this node" source: a file ([`StaticNodeWorkloads`]) or, in a cluster, the
/// pods the API server schedules on the node (implemented by the agent crate).
pub trait NodeWorkloads: Send + Sync + fmt::Debug {
    /// Whether a workload running as `identity` is scheduled on `node`.
    fn is_on_node<'a>(&'a self, node: &'a str, identity: &'a Identity) -> BoxFuture<'a, Result<bool, LookupError>>;
}

fn read_lines(path: &Path) -> Result<Vec<(usize, Vec<String>)>, ServerError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::Read { path: path.to_owned(), source })?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            (i + 1, l.split('#').next().unwrap_or("").split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        })
        .filter(|(_, f)| !f.is_empty())
        .collect())
}

/// Bearer tokens from a file: one `<token> <node-name>` per line, `#` comments.
pub struct TokenFileAuthenticator {
    tokens: RwLock<Vec<(Vec<u8>, String)>>,
    path: PathBuf,
}

impl fmt::Debug for TokenFileAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.tokens.read().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("TokenFileAuthenticator").field("path", &self.path).field("tokens", &n).finish()
    }
}

impl TokenFileAuthenticator {
    /// Loads the token file.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let tokens = Self::parse(path)?;
        Ok(Self { tokens: RwLock::new(tokens), path: path.to_owned() })
    }

    fn parse(path: &Path) -> Result<Vec<(Vec<u8>, String)>, ServerError> {
        read_lines(path)?
            .into_iter()
            .map(|(line, f)| match f.as_slice() {
                [token, node] => Ok((token.as_bytes().to_vec(), node.clone())),
                _ => Err(ServerError::Syntax {
                    path: path.to_owned(),
                    line,
                    reason: "expected `<token> <node-name>`".into(),
                }),
            })
            .collect()
    }

    /// Re-reads the file (token rotation); on error the old tokens stay.
    pub fn reload(&self) -> Result<(), ServerError> {
        let tokens = Self::parse(&self.path)?;
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens;
        Ok(())
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request (`authorization: Bearer <token>`).
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let header = metadata.get("authorization").ok_or(AuthError::Missing)?;
    header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(AuthError::Missing)
}

impl TokenFileAuthenticator {
    fn check(&self, metadata: &MetadataMap) -> Result<String, AuthError> {
        let token = bearer_token(metadata)?.as_bytes();
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let mut found = None;
        for (t, node) in tokens.iter() {
            if constant_time_eq(t, token) {
                found = Some(node.clone());
            }
        }
        found.ok_or(AuthError::Invalid)
    }
}

impl Authenticator for TokenFileAuthenticator {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
        _peer: Option<&'a [CertificateDer<'static>]>,
    ) -> BoxFuture<'a, Result<String, AuthError>> {
        Box::pin(std::future::ready(self.check(metadata)))
    }
}

/// Node certificates: a client certificate (already verified by the CA port's TLS layer against
/// the trust bundle, expiry and CRL) whose SPIFFE identity is listed in a file of
/// `<spiffe-id> <node-name>` lines. Node certificates are ordinary SVIDs, e.g. issued with
/// `warden ca issue --spiffe spiffe://cluster.local/ns/warden-system/sa/node-a`.
#[derive(Debug, Clone, Default)]
pub struct NodeCertAuthenticator {
    nodes: HashMap<Identity, String>,
}

impl NodeCertAuthenticator {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares that a certificate for `identity` authenticates `node`.
    pub fn insert(&mut self, identity: Identity, node: impl Into<String>) {
        self.nodes.insert(identity, node.into());
    }

    /// Loads the `<spiffe-id> <node-name>` file.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let mut me = Self::new();
        for (line, f) in read_lines(path)? {
            let syntax = |reason: String| ServerError::Syntax { path: path.to_owned(), line, reason };
            match f.as_slice() {
                [id, node] => me.insert(id.parse().map_err(|e| syntax(format!("{e}")))?, node.clone()),
                _ => return Err(syntax("expected `<spiffe-id> <node-name>`".into())),
            }
        }
        Ok(me)
    }
}

impl NodeCertAuthenticator {
    fn check(&self, peer_certs: Option<&[CertificateDer<'static>]>) -> Result<String, AuthError> {
        let leaf = peer_certs.and_then(|c| c.first()).ok_or(AuthError::Missing)?;
        let identity = crate::tls::spiffe_identity(leaf).map_err(|_| AuthError::Invalid)?;
        self.nodes.get(&identity).cloned().ok_or(AuthError::Invalid)
    }
}

impl Authenticator for NodeCertAuthenticator {
    fn authenticate<'a>(
        &'a self,
        _metadata: &'a MetadataMap,
        peer_certs: Option<&'a [CertificateDer<'static>]>,
    ) -> BoxFuture<'a, Result<String, AuthError>> {
        Box::pin(std::future::ready(self.check(peer_certs)))
    }
}

/// Tries several authenticators in order; the first that accepts the caller wins.
#[derive(Debug, Clone)]
pub struct AnyAuthenticator(pub Vec<Arc<dyn Authenticator>>);

impl Authenticator for AnyAuthenticator {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
        peer_certs: Option<&'a [CertificateDer<'static>]>,
    ) -> BoxFuture<'a, Result<String, AuthError>> {
        Box::pin(async move {
            let mut err = AuthError::Missing;
            for a in &self.0 {
                match a.authenticate(metadata, peer_certs).await {
                    Ok(node) => return Ok(node),
                    // Credentials that could not be checked, then credentials that were sent but
                    // refused, are the more useful reports.
                    Err(e @ AuthError::Unavailable(_)) => err = e,
                    Err(AuthError::Invalid) if !matches!(err, AuthError::Unavailable(_)) => err = AuthError::Invalid,
                    Err(_) => {}
                }
            }
            Err(err)
        })
    }
}

/// A fixed node -> identities table; the lab's file form is one `<node-name> <spiffe-id>` per line.
#[derive(Debug, Default, Clone)]
pub struct StaticNodeWorkloads {
    map: HashMap<String, HashSet<Identity>>,
}

impl StaticNodeWorkloads {
    /// An empty table (every request is refused).
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares that `identity` runs on `node`.
    pub fn insert(&mut self, node: impl Into<String>, identity: Identity) {
        self.map.entry(node.into()).or_default().insert(identity);
    }

    /// Loads the lab file.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let mut me = Self::new();
        for (line, f) in read_lines(path)? {
            let syntax = |reason: String| ServerError::Syntax { path: path.to_owned(), line, reason };
            match f.as_slice() {
                [node, id] => me.insert(node.clone(), id.parse().map_err(|e| syntax(format!("{e}")))?),
                _ => return Err(syntax("expected `<node-name> <spiffe-id>`".into())),
            }
        }
        Ok(me)
    }
}

impl StaticNodeWorkloads {
    /// Whether the table lists `identity` on `node`.
    pub fn lists(&self, node: &str, identity: &Identity) -> bool {
        self.map.get(node).is_some_and(|ids| ids.contains(identity))
    }
}

impl NodeWorkloads for StaticNodeWorkloads {
    fn is_on_node<'a>(&'a self, node: &'a str, identity: &'a Identity) -> BoxFuture<'a, Result<bool, LookupError>> {
        Box::pin(std::future::ready(Ok(self.lists(node, identity))))
    }
}

/// Per-node token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    clock: Arc<dyn Clock>,
    buckets: Mutex<HashMap<String, (f64, SystemTime)>>,
}

impl RateLimiter {
    /// `per_second` sustained, `burst` at once.
    pub fn new(per_second: f64, burst: u32, clock: Arc<dyn Clock>) -> Self {
        Self { per_second, burst: f64::from(burst), clock, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `key`; false when the bucket is empty.
    pub fn try_acquire(&self, key: &str) -> bool {
        let now = self.clock.now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        let elapsed = now.duration_since(*last).unwrap_or(Duration::ZERO).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The CA gRPC service.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    workloads: Arc<dyn NodeWorkloads>,
    limiter: RateLimiter,
    metrics: Option<Metrics>,
}

impl fmt::Debug for CaService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaService").field("ca", &self.ca).field("auth", &self.auth).finish_non_exhaustive()
    }
}

impl CaService {
    /// A service with the default rate limit.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        workloads: Arc<dyn NodeWorkloads>,
        clock: Arc<dyn Clock>,
        metrics: Option<Metrics>,
    ) -> Self {
        let limiter = RateLimiter::new(DEFAULT_RATE_LIMIT_PER_SECOND, DEFAULT_RATE_LIMIT_BURST, clock);
        Self { ca, auth, workloads, limiter, metrics }
    }

    /// Replaces the rate limiter.
    pub fn with_rate_limit(mut self, per_second: f64, burst: u32, clock: Arc<dyn Clock>) -> Self {
        self.limiter = RateLimiter::new(per_second, burst, clock);
        self
    }

    /// The tonic service, ready for `Server::add_service`.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    async fn handle(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<(String, IstioCertificateResponse), (&'static str, Status)> {
        let peer_certs = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        let node = self.auth.authenticate(req.metadata(), peer_certs.as_deref().map(Vec::as_slice)).await.map_err(
            |e| match e {
                AuthError::Unavailable(_) => ("unavailable", Status::unavailable(format!("authentication: {e}"))),
                e => ("unauthenticated", Status::unauthenticated(format!("authentication failed: {e}"))),
            },
        )?;
        if !self.limiter.try_acquire(&node) {
            return Err((
                "rate_limited",
                Status::resource_exhausted(format!("rate limit exceeded for node {node:?}; retry later")),
            ));
        }
        let body = req.get_ref();
        let csr = self.ca.parse_csr(&body.csr).map_err(|e| match e {
            CaError::ForeignTrustDomain { .. } => ("denied", Status::permission_denied(e.to_string())),
            other => ("invalid", Status::invalid_argument(other.to_string())),
        })?;
        if let Some(impersonated) = impersonated_identity(body)
            && impersonated != csr.identity.to_string()
        {
            return Err((
                "invalid",
                Status::invalid_argument(format!(
                    "CSR requests {} but {IMPERSONATED_IDENTITY_KEY} is {impersonated:?}",
                    csr.identity
                )),
            ));
        }
        let on_node = self
            .workloads
            .is_on_node(&node, &csr.identity)
            .await
            .map_err(|e| ("unavailable", Status::unavailable(e.to_string())))?;
        if !on_node {
            return Err((
                "denied",
                Status::permission_denied(format!(
                    "node {node:?} may not obtain {}: no workload with that identity is scheduled on it",
                    csr.identity
                )),
            ));
        }
        if body.validity_duration < 0 {
            return Err(("invalid", Status::invalid_argument("validity_duration must not be negative")));
        }
        let ttl = u64::try_from(body.validity_duration).ok().filter(|s| *s > 0).map(Duration::from_secs);
        let issued =
            self.ca.sign(&csr, ttl).map_err(|e| ("error", Status::internal(format!("signing failed: {e}"))))?;
        tracing::info!(node, identity = %issued.identity, serial = %issued.serial,
            not_after = %rfc3339(issued.not_after), "issued workload certificate");
        Ok((node, IstioCertificateResponse { cert_chain: issued.chain_pem }))
    }
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Option<String> {
    let v = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY_KEY)?;
    match &v.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
        _ => Some(String::new()),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let start = Instant::now();
        let remote = request.remote_addr();
        let result = self.handle(request).await;
        let (label, out) = match result {
            Ok((_node, resp)) => ("issued", Ok(Response::new(resp))),
            Err((label, status)) => {
                tracing::warn!(remote = ?remote, code = ?status.code(), message = status.message(), "certificate request refused");
                (label, Err(status))
            }
        };
        if let Some(m) = &self.metrics {
            m.issuance(label, start.elapsed());
        }
        out
    }
}

/// TLS for the CA port: the CA issues itself an SVID ([`ca_server_identity`]) through a
/// [`SecretManager`] over the in-process CA, so the serving certificate rotates like any
/// workload's (spawn [`SecretManager::spawn_rotation`] on the returned manager). Client
/// certificates are optional (token-authenticated nodes have none) and verified when sent.
pub async fn ca_serving_tls(
    ca: &Arc<CertificateAuthority>,
    clock: Arc<dyn Clock>,
    policy: CompliancePolicy,
) -> Result<(Arc<ServerConfig>, SecretManager), ServerError> {
    let td = ca.config().trust_domain.clone();
    let id = ca_server_identity(&td)?;
    let trust = Arc::new(TrustBundle::new(ca.roots().to_vec(), vec![td])?);
    if let Some(crl) = ca.crl() {
        trust.set_crls(vec![crl])?;
    }
    let mgr = SecretManager::new(
        Arc::new(LocalCaClient(ca.clone())),
        trust.clone(),
        clock.clone(),
        SecretManagerConfig::default(),
        None,
    );
    mgr.fetch(&id).await?;
    let verifier = SpiffeVerifier::new(trust, clock).allow_anonymous_clients();
    let config = crate::tls::server_config(policy, Arc::new(verifier), mgr.cert_slot(&id))?;
    Ok((Arc::new(config), mgr))
}

/// Serves `service` on `listener` until `shutdown` resolves. With `tls` the port speaks TLS 1.3
/// (client certificates are verified by the config's verifier and handed to the authenticator);
/// without, plaintext h2c (only for loopback labs: bearer tokens travel in the clear).
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: CaService,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let router = tonic::transport::Server::builder().add_service(service.into_server());
    match tls {
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
        Some(config) => {
            let mut config = (*config).clone();
            if config.alpn_protocols.is_empty() {
                config.alpn_protocols = vec![b"h2".to_vec()];
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let (tx, rx) = tokio::sync::mpsc::channel::<
                Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
            >(64);
            let accept_loop = tokio::spawn(async move {
                loop {
                    let Ok((tcp, peer)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(tls)).await;
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, error = %e, "TLS handshake on the CA port failed")
                            }
                            Err(_) => {
                                tracing::warn!(%peer, "TLS handshake on the CA port timed out")
                            }
                        }
                    });
                }
            });
            let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
            let result = router.serve_with_incoming_shutdown(incoming, shutdown).await;
            accept_loop.abort();
            result?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn rate_limiter_allows_a_burst_then_the_sustained_rate() {
        let clock = Arc::new(ManualClock::starting_now());
        let rl = RateLimiter::new(2.0, 3, clock.clone());
        assert!((0..3).all(|_| rl.try_acquire("n1")));
        assert!(!rl.try_acquire("n1"));
        assert!(rl.try_acquire("n2"), "buckets are per node");
        clock.advance(Duration::from_millis(500));
        assert!(rl.try_acquire("n1"));
        assert!(!rl.try_acquire("n1"));
        clock.advance(Duration::from_secs(60));
        assert!((0..3).all(|_| rl.try_acquire("n1")), "refill is capped at the burst");
        assert!(!rl.try_acquire("n1"));
    }

    #[test]
    fn token_file_maps_tokens_to_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, "# lab tokens\ns3cret-a node-a\ns3cret-b node-b # second\n").unwrap();
        let auth = TokenFileAuthenticator::from_file(&p).unwrap();
        let mut md = MetadataMap::new();
        assert!(matches!(auth.check(&md), Err(AuthError::Missing)));
        md.insert("authorization", "Bearer s3cret-b".parse().unwrap());
        assert_eq!(auth.check(&md).unwrap(), "node-b");
        md.insert("authorization", "Bearer s3cret-c".parse().unwrap());
        assert!(matches!(auth.check(&md), Err(AuthError::Invalid)));
        std::fs::write(&p, "s3cret-c node-c\n").unwrap();
        auth.reload().unwrap();
        assert_eq!(auth.check(&md).unwrap(), "node-c");
        std::fs::write(&p, "lonely\n").unwrap();
        let err = auth.reload().unwrap_err();
        assert!(err.to_string().contains(":1:"), "{err}");
    }

    #[derive(Debug)]
    struct Fixed(AuthError);

    impl Authenticator for Fixed {
        fn authenticate<'a>(
            &'a self,
            _metadata: &'a MetadataMap,
            _peer: Option<&'a [CertificateDer<'static>]>,
        ) -> BoxFuture<'a, Result<String, AuthError>> {
            Box::pin(std::future::ready(Err(self.0.clone())))
        }
    }

    #[tokio::test]
    async fn any_authenticator_reports_an_unchecked_credential_before_a_refused_one() {
        let md = MetadataMap::new();
        let any = |v: Vec<AuthError>| AnyAuthenticator(v.into_iter().map(|e| Arc::new(Fixed(e)) as _).collect());
        let down = AuthError::Unavailable("API server down".into());
        for order in [vec![down.clone(), AuthError::Invalid], vec![AuthError::Invalid, down.clone()]] {
            let e = any(order).authenticate(&md, None).await.unwrap_err();
            assert!(matches!(e, AuthError::Unavailable(_)), "{e}");
        }
        let e = any(vec![AuthError::Missing, AuthError::Invalid]).authenticate(&md, None).await.unwrap_err();
        assert!(matches!(e, AuthError::Invalid), "{e}");
    }

    #[test]
    fn node_workloads_file_parses() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("workloads");
        std::fs::write(&p, "node-a spiffe://cluster.local/ns/default/sa/web\n").unwrap();
        let w = StaticNodeWorkloads::from_file(&p).unwrap();
        let web: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert!(w.lists("node-a", &web));
        assert!(!w.lists("node-b", &web));
        std::fs::write(&p, "node-a spiffe://cluster.local/ns/default\n").unwrap();
        assert!(StaticNodeWorkloads::from_file(&p).is_err());
    }
}
