//! The CA over gRPC with a real tonic client generated from Istio's protobuf definitions
//! (`istio.v1.auth.IstioCertificateService`), on 127.0.0.1 only.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::Code;
use warden_identity::Identity;
use warden_identity::ca::{CaConfig, CertificateAuthority};
use warden_identity::clock::{Clock, SystemClock};
use warden_identity::metrics::Metrics;
use warden_identity::proto::IstioCertificateRequest;
use warden_identity::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use warden_identity::server::{self, CaService, StaticNodeWorkloads, TokenFileAuthenticator};
use warden_identity::tls::{self, CompliancePolicy, SpiffeVerifier, TrustBundle};
use warden_identity::workload::{self, GrpcCaClient, SecretManager, SecretManagerConfig};

struct Lab {
    _dir: tempfile::TempDir,
    ca: Arc<CertificateAuthority>,
    addr: std::net::SocketAddr,
    registry: Registry,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

fn web() -> Identity {
    Identity::spiffe("cluster.local", "default", "web").unwrap()
}
fn db() -> Identity {
    Identity::spiffe("cluster.local", "data", "db").unwrap()
}

async fn lab(tls: bool, burst: u32) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ca = Arc::new(
        CertificateAuthority::load_or_init(&dir.path().join("ca"), CaConfig::default(), clock.clone()).unwrap(),
    );
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "token-a node-a\ntoken-b node-b\n").unwrap();
    let mut workloads = StaticNodeWorkloads::new();
    workloads.insert("node-a", web());
    workloads.insert("node-b", db());
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let service = CaService::new(
        ca.clone(),
        Arc::new(TokenFileAuthenticator::from_file(&tokens).unwrap()),
        Arc::new(workloads),
        clock.clone(),
        Some(metrics),
    )
    .with_rate_limit(0.001, burst, clock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls_config = if tls {
        let (cfg, mgr) = server::ca_serving_tls(&ca, clock.clone(), CompliancePolicy::Default).await.unwrap();
        mgr.spawn_rotation();
        Some(cfg)
    } else {
        None
    };
    let (stop, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        server::serve(listener, service, tls_config, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Lab { _dir: dir, ca, addr, registry, stop: Some(stop), task }
}

fn request(csr: String, token: Option<&str>) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 3600, metadata: None });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

async fn client(lab: &Lab) -> IstioCertificateServiceClient<tonic::transport::Channel> {
    IstioCertificateServiceClient::connect(format!("http://{}", lab.addr)).await.unwrap()
}

#[tokio::test]
async fn valid_request_is_served_with_a_chain_that_verifies() {
    let lab = lab(false, 100).await;
    let mut c = client(&lab).await;
    let (_key, csr) = workload::generate_key_and_csr(&web()).unwrap();
    let resp = c.create_certificate(request(csr, Some("token-a"))).await.unwrap().into_inner();
    assert_eq!(resp.cert_chain.len(), 2, "leaf and root");
    let leaf = CertificateDer::from_pem_slice(resp.cert_chain[0].as_bytes()).unwrap();
    assert_eq!(tls::spiffe_identity(&leaf).unwrap(), web());
    let bundle = Arc::new(TrustBundle::new(lab.ca.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let v = SpiffeVerifier::new(bundle, Arc::new(SystemClock));
    assert_eq!(v.verify(&leaf, &[], webpki_client_auth()).unwrap(), web());
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let lifetime = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600 + 60, "requested validity plus the clock-skew back-dating");

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &lab.registry).unwrap();
    assert!(text.contains("warden_identity_ca_issuances_total{result=\"issued\"} 1"), "{text}");
}

fn webpki_client_auth() -> tls::KeyUsage {
    tls::KeyUsage::client_auth()
}

#[tokio::test]
async fn wrong_node_is_refused() {
    let lab = lab(false, 100).await;
    let mut c = client(&lab).await;
    // node-a asks for db, which runs on node-b.
    let (_key, csr) = workload::generate_key_and_csr(&db()).unwrap();
    let status = c.create_certificate(request(csr, Some("token-a"))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("node \"node-a\" may not obtain spiffe://cluster.local/ns/data/sa/db"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn bad_csr_is_refused_with_a_clear_status() {
    let lab = lab(false, 100).await;
    let mut c = client(&lab).await;
    let status = c
        .create_certificate(request(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            Some("token-a"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("invalid CSR"), "{}", status.message());

    // A well-formed CSR without a SPIFFE ID.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec!["web.example".to_owned()]).unwrap().serialize_request(&key).unwrap();
    let status = c.create_certificate(request(csr.pem().unwrap(), Some("token-a"))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("no URI SAN"), "{}", status.message());

    // Another trust domain.
    let (_k, csr) =
        workload::generate_key_and_csr(&Identity::spiffe("evil.example", "default", "web").unwrap()).unwrap();
    let status = c.create_certificate(request(csr, Some("token-a"))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn unauthenticated_and_mismatched_impersonation_are_refused() {
    let lab = lab(false, 100).await;
    let mut c = client(&lab).await;
    let (_key, csr) = workload::generate_key_and_csr(&web()).unwrap();
    let status = c.create_certificate(request(csr.clone(), None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = c.create_certificate(request(csr.clone(), Some("wrong"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let mut req = request(csr, Some("token-a"));
    req.get_mut().metadata = Some(prost_types::Struct {
        fields: [(
            workload::IMPERSONATED_IDENTITY_KEY.to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(db().to_string())) },
        )]
        .into_iter()
        .collect(),
    });
    let status = c.create_certificate(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ImpersonatedIdentity"), "{}", status.message());
}

#[tokio::test]
async fn requests_beyond_the_rate_limit_are_refused() {
    let lab = lab(false, 2).await;
    let mut c = client(&lab).await;
    let (_key, csr) = workload::generate_key_and_csr(&web()).unwrap();
    for _ in 0..2 {
        c.create_certificate(request(csr.clone(), Some("token-a"))).await.unwrap();
    }
    let status = c.create_certificate(request(csr.clone(), Some("token-a"))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Another node has its own bucket.
    let (_key, csr) = workload::generate_key_and_csr(&db()).unwrap();
    c.create_certificate(request(csr, Some("token-b"))).await.unwrap();
}

#[tokio::test]
async fn node_agent_secret_manager_obtains_certificates_over_tls() {
    let lab = lab(true, 100).await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let bundle = Arc::new(TrustBundle::new(lab.ca.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let ca_id = server::ca_server_identity("cluster.local").unwrap();
    let verifier = Arc::new(SpiffeVerifier::new(bundle.clone(), clock.clone()).expecting(vec![ca_id]));
    let ca_client = GrpcCaClient::new_tls(&format!("https://{}", lab.addr), Some("token-a".into()), verifier).unwrap();
    let mgr =
        SecretManager::new(Arc::new(ca_client), bundle.clone(), clock.clone(), SecretManagerConfig::default(), None);
    let cert = mgr.fetch(&web()).await.unwrap();
    assert_eq!(cert.identity, web());
    assert!(mgr.cert_slot(&web()).get().is_some());
    // Not scheduled on node-a: refused, reported as a CA rejection.
    let err = mgr.fetch(&db()).await.unwrap_err();
    assert!(err.to_string().contains("PermissionDenied"), "{err}");

    // A CA pinned to the wrong identity is refused at the TLS layer.
    let wrong = Arc::new(SpiffeVerifier::new(bundle.clone(), clock.clone()).expecting(vec![web()]));
    let ca_client = GrpcCaClient::new_tls(&format!("https://{}", lab.addr), Some("token-a".into()), wrong).unwrap();
    let mgr = SecretManager::new(Arc::new(ca_client), bundle, clock, SecretManagerConfig::default(), None);
    let err = tokio::time::timeout(Duration::from_secs(20), mgr.fetch(&web())).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("CA unavailable"), "{err}");
}

#[tokio::test]
async fn node_certificate_authenticates_the_requester() {
    // A CA port accepting node certificates or tokens.
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ca = Arc::new(
        CertificateAuthority::load_or_init(&dir.path().join("ca"), CaConfig::default(), clock.clone()).unwrap(),
    );
    let node_a_id = Identity::spiffe("cluster.local", "warden-system", "node-a").unwrap();
    let stranger_id = Identity::spiffe("cluster.local", "warden-system", "stranger").unwrap();
    let mut nodes = server::NodeCertAuthenticator::new();
    nodes.insert(node_a_id.clone(), "node-a");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "token-b node-b\n").unwrap();
    let auth =
        server::AnyAuthenticator(vec![Arc::new(nodes), Arc::new(TokenFileAuthenticator::from_file(&tokens).unwrap())]);
    let mut workloads = StaticNodeWorkloads::new();
    workloads.insert("node-a", web());
    workloads.insert("node-b", db());
    let service = CaService::new(ca.clone(), Arc::new(auth), Arc::new(workloads), clock.clone(), None);
    let (cfg, mgr) = server::ca_serving_tls(&ca, clock.clone(), CompliancePolicy::Default).await.unwrap();
    mgr.spawn_rotation();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, service, Some(cfg), async {
        let _ = rx.await;
    }));

    let bundle = Arc::new(TrustBundle::new(ca.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let ca_id = server::ca_server_identity("cluster.local").unwrap();
    let node_cert = |id: &Identity| {
        let (key, csr) = workload::generate_key_and_csr(id).unwrap();
        (ca.sign_csr(&csr, None).unwrap().chain_pem.concat(), key.serialize_pem())
    };
    let manager_with = |cert: Option<(String, String)>, token: Option<String>| {
        let verifier = Arc::new(SpiffeVerifier::new(bundle.clone(), clock.clone()).expecting(vec![ca_id.clone()]));
        let client = GrpcCaClient::new_mtls(&format!("https://{addr}"), token, cert, verifier).unwrap();
        SecretManager::new(Arc::new(client), bundle.clone(), clock.clone(), SecretManagerConfig::default(), None)
    };

    // node-a by certificate, no token: may obtain web (on node-a), not db (on node-b).
    let m = manager_with(Some(node_cert(&node_a_id)), None);
    assert_eq!(m.fetch(&web()).await.unwrap().identity, web());
    let err = m.fetch(&db()).await.unwrap_err();
    assert!(err.to_string().contains("node \"node-a\" may not obtain"), "{err}");
    // A valid mesh certificate that is not a registered node certificate authenticates nobody.
    let m = manager_with(Some(node_cert(&stranger_id)), None);
    let err = m.fetch(&web()).await.unwrap_err();
    assert!(err.to_string().contains("Unauthenticated") && err.to_string().contains("not accepted"), "{err}");
    // Tokens still work on the same port.
    let m = manager_with(None, Some("token-b".into()));
    assert_eq!(m.fetch(&db()).await.unwrap().identity, db());

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn plaintext_client_and_an_unreachable_ca() {
    let lab = lab(false, 100).await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let bundle = Arc::new(TrustBundle::new(lab.ca.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let ca_client = GrpcCaClient::new(&format!("http://{}", lab.addr), Some("token-a".into())).unwrap();
    let mgr =
        SecretManager::new(Arc::new(ca_client), bundle.clone(), clock.clone(), SecretManagerConfig::default(), None);
    assert_eq!(mgr.fetch(&web()).await.unwrap().identity, web());

    // Nothing listens on this port: the error is "unavailable" (retried with backoff), not a refusal.
    let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let ca_client = GrpcCaClient::new(&format!("http://{free}"), Some("token-a".into())).unwrap();
    let mgr = SecretManager::new(Arc::new(ca_client), bundle, clock, SecretManagerConfig::default(), None);
    let err = mgr.fetch(&web()).await.unwrap_err();
    assert!(err.to_string().contains("CA unavailable"), "{err}");
    let status = &mgr.snapshot()[0];
    assert_eq!(status.failures, 1);
    assert!(status.next_attempt.is_some());
}
