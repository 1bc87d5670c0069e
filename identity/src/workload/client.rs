//! CA clients: the seam that lets rotation be tested without a network.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::ca::{CaError, CertificateAuthority};
use crate::identity::Identity;
use crate::proto::IstioCertificateRequest;
use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::tls::SpiffeVerifier;

/// A boxed, sendable future (the trait must stay object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// SNI sent to the CA; the CA is verified by SPIFFE identity, not by this name.
pub const CA_TLS_SERVER_NAME: &str = "warden-ca";

/// Metadata key naming the workload a node agent requests a certificate for (as ztunnel sends it).
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";

/// Why a CA did not return a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaClientError {
    /// The CA could not be reached or failed internally; worth retrying.
    #[error("CA unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The CA refused the request.
    #[error("CA refused the request ({code}): {message}")]
    Rejected {
        /// gRPC status code name.
        code: String,
        /// The CA's message.
        message: String,
    },
    /// The in-process CA failed.
    #[error(transparent)]
    Local(#[from] CaError),
    /// The CA answered with an empty chain.
    #[error("CA returned an empty certificate chain")]
    EmptyChain,
}

/// Something that signs CSRs. `identity` is the workload the CSR is for (sent as
/// `ImpersonatedIdentity` by network clients).
pub trait CaClient: Send + Sync + fmt::Debug {
    /// Returns the PEM chain, leaf first.
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>>;
}

/// The CA in the same process (single-node labs, `warden ca issue`, tests).
#[derive(Debug, Clone)]
pub struct LocalCaClient(pub Arc<CertificateAuthority>);

impl CaClient for LocalCaClient {
    fn sign<'a>(
        &'a self,
        _identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>> {
        Box::pin(async move { Ok(self.0.sign_csr(csr_pem, Some(ttl))?.chain_pem) })
    }
}

/// Istio's `IstioCertificateService` over gRPC, authenticated by a bearer token.
#[derive(Clone)]
pub struct GrpcCaClient {
    client: IstioCertificateServiceClient<tonic::transport::Channel>,
    token: Option<String>,
    /// Read before every request when set (a Kubernetes projected token, which the kubelet
    /// replaces before it expires); takes the place of `token`.
    token_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for GrpcCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcCaClient")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl GrpcCaClient {
    /// A client for `endpoint` (e.g. `http://127.0.0.1:15012`); connects lazily, so a CA that is
    /// down at start is retried by the rotation loop instead of failing the agent.
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self, CaClientError> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| CaClientError::Unavailable { reason: format!("bad CA endpoint {endpoint:?}: {e}") })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        Ok(Self { client: IstioCertificateServiceClient::new(channel), token, token_file: None })
    }

    /// Send the token in `path`, read again before every request (a Kubernetes projected
    /// service-account token is rotated by the kubelet), instead of a fixed token.
    pub fn with_token_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self.token = None;
        self
    }

    /// The token for the next request.
    fn current_token(&self) -> Result<Option<String>, CaClientError> {
        match &self.token_file {
            Some(path) => std::fs::read_to_string(path).map(|t| Some(t.trim().to_owned())).map_err(|e| {
                CaClientError::Unavailable { reason: format!("reading the CA token file {}: {e}", path.display()) }
            }),
            None => Ok(self.token.clone()),
        }
    }

    /// A client speaking TLS to the CA; the CA's certificate is checked by `verifier` (build it
    /// with [`SpiffeVerifier::expecting`] and the CA's serving identity,
    /// [`crate::server::ca_server_identity`]).
    pub fn new_tls(
        endpoint: &str,
        token: Option<String>,
        verifier: Arc<SpiffeVerifier>,
    ) -> Result<Self, CaClientError> {
        Self::new_mtls(endpoint, token, None, verifier)
    }

    /// Like [`new_tls`](Self::new_tls), presenting a node certificate (`(cert chain PEM,
    /// private key PEM)`) for [`crate::server::NodeCertAuthenticator`].
    pub fn new_mtls(
        endpoint: &str,
        token: Option<String>,
        node_cert: Option<(String, String)>,
        verifier: Arc<SpiffeVerifier>,
    ) -> Result<Self, CaClientError> {
        let bad = |e: tonic::transport::Error| CaClientError::Unavailable {
            reason: format!("bad CA endpoint {endpoint:?}: {e}"),
        };
        let mut tls = tonic::transport::ClientTlsConfig::new().domain_name(CA_TLS_SERVER_NAME);
        if let Some((chain, key)) = node_cert {
            tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(bad)?
            .tls_config_with_verifier(tls, verifier)
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        Ok(Self { client: IstioCertificateServiceClient::new(channel), token, token_file: None })
    }
}

impl CaClient for GrpcCaClient {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>> {
        Box::pin(async move {
            let metadata = prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY_KEY.to_owned(),
                    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(identity.to_string())) },
                )]
                .into_iter()
                .collect(),
            };
            let mut req = tonic::Request::new(IstioCertificateRequest {
                csr: csr_pem.to_owned(),
                validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                metadata: Some(metadata),
            });
            if let Some(token) = &self.current_token()? {
                let value = format!("Bearer {token}")
                    .parse()
                    .map_err(|_| CaClientError::Unavailable { reason: "token is not a valid header value".into() })?;
                req.metadata_mut().insert("authorization", value);
            }
            let resp = self.client.clone().create_certificate(req).await.map_err(|s| match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Internal => {
                    CaClientError::Unavailable { reason: format!("{}: {}", s.code(), s.message()) }
                }
                code => CaClientError::Rejected { code: format!("{code:?}"), message: s.message().to_owned() },
            })?;
            let chain = resp.into_inner().cert_chain;
            if chain.is_empty() {
                return Err(CaClientError::EmptyChain);
            }
            Ok(chain)
        })
    }
}
