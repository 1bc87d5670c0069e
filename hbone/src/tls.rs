//! TLS for HBONE: where configurations come from, ALPN, and the peer's identity.
//!
//! The caller owns certificates. Two seams let it plug them in:
//! - [`ServerTls`]: the server configuration for an accepted connection, chosen by the local address
//!   the client dialled. A node serves many workloads on 15008, and each connection must present
//!   the *destination workload's* certificate, as ztunnel does.
//! - [`ClientTls`]: the client configuration for a source identity: the connection presents the
//!   *source workload's* certificate and accepts only the expected server identities.
//!
//! [`SecretManagerTls`] implements both on top of the identity crate's
//! [`SecretManager`], which rotates certificates without rebuilding anything.
//!
//! Whatever the configuration says, HBONE offers and accepts exactly one ALPN protocol, `h2`: this
//! module sets it on a copy when needed. Session resumption stays disabled (the identity crate's
//! configs do so on purpose: a resumed session would skip expiry and revocation checks).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};
use warden_identity::Identity;
use warden_identity::tls::{CompliancePolicy, Validity, VerifyError, identity_and_validity};
use warden_identity::workload::SecretManager;

use crate::error::{AcceptError, BoxError};
use crate::protocol::ALPN_H2;

/// The source of server TLS configurations, consulted for every accepted connection.
pub trait ServerTls: Send + Sync + 'static {
    /// The configuration presenting the certificate of the workload whose address the client
    /// dialled (`local`). It must require and verify client certificates (the identity crate's
    /// `server_config` does). ALPN is set to `h2` by the server whatever this returns.
    fn config(&self, local: SocketAddr) -> impl Future<Output = Result<Arc<ServerConfig>, BoxError>> + Send;

    /// Called when a connection fails before any stream (no configuration, TLS handshake failure,
    /// missing identity, HTTP/2 handshake). The server already logs it; this is for metrics.
    fn handshake_failed(&self, error: &AcceptError) {
        let _ = error;
    }

    /// Whether the client's certificate, verified at the connection's handshake, still stands
    /// now: not expired, not revoked since. Asked before every new stream and every
    /// `recheck_interval`: a connection whose client certificate expired takes no new streams
    /// (GOAWAY; the open ones finish), one whose certificate was revoked ends with its streams.
    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError>;
}

/// The source of client TLS configurations, consulted once per new pooled connection.
pub trait ClientTls: Send + Sync + 'static {
    /// The configuration presenting `source`'s certificate and accepting only a server that
    /// authenticates as one of `expected` (empty: any identity of the trusted trust domains).
    /// The pool checks the server identity against `expected` again after the handshake.
    fn config(
        &self,
        source: &Identity,
        expected: &[Identity],
    ) -> impl Future<Output = Result<Arc<ClientConfig>, BoxError>> + Send;

    /// What identifies the certificate `source` presents now (its serial), if known. A pooled
    /// connection that was opened under another one takes no new tunnels: a rotated, replaced or
    /// revoked certificate stops being presented with the next tunnel, not when the connection
    /// happens to go idle. `None` (the default) never retires a connection.
    fn certificate(&self, _source: &Identity) -> Option<String> {
        None
    }

    /// Whether the server's certificate, verified at the connection's handshake, still stands
    /// now (not expired, not revoked since). Asked before a pooled connection takes a tunnel and
    /// every `recheck_interval`: a connection whose server certificate lapsed takes no new
    /// tunnels, and one whose certificate was revoked ends with its tunnels.
    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError>;
}

/// Both seams on top of a [`SecretManager`]: certificates are fetched (issued if needed) on first
/// use and rotated by the manager; a rotation applies to the next handshake.
#[derive(Debug, Clone)]
pub struct SecretManagerTls {
    manager: SecretManager,
    policy: CompliancePolicy,
}

impl SecretManagerTls {
    /// Configurations from `manager` under the key-exchange `policy`.
    pub fn new(manager: SecretManager, policy: CompliancePolicy) -> Self {
        Self { manager, policy }
    }

    /// The server configuration presenting `id`'s certificate. A [`ServerTls`] implementation maps
    /// the dialled address to the local workload's identity and calls this.
    pub async fn server_config(&self, id: &Identity) -> Result<Arc<ServerConfig>, BoxError> {
        self.manager.fetch(id).await?;
        Ok(server_alpn(self.manager.server_config(id, self.policy)?))
    }

    /// [`ServerTls::recheck`] and [`ClientTls::recheck`]: `peer`'s certificate against the
    /// manager's trust bundle (its CRLs as they are now), at the manager's clock.
    pub fn recheck(&self, peer: &Peer) -> Result<(), VerifyError> {
        self.manager.trust_bundle().recheck(&peer.validity, self.manager.clock().now())
    }
}

impl ClientTls for SecretManagerTls {
    async fn config(&self, source: &Identity, expected: &[Identity]) -> Result<Arc<ClientConfig>, BoxError> {
        self.manager.fetch(source).await?;
        Ok(client_alpn(self.manager.client_config(source, self.policy, expected.to_vec())?))
    }

    fn certificate(&self, source: &Identity) -> Option<String> {
        self.manager.current_serial(source)
    }

    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError> {
        SecretManagerTls::recheck(self, peer)
    }
}

fn is_h2_only(alpn: &[Vec<u8>]) -> bool {
    matches!(alpn, [only] if only == ALPN_H2)
}

/// `config` offering exactly ALPN `h2` (a copy only if it does not already).
pub fn server_alpn(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    if is_h2_only(&config.alpn_protocols) {
        return config;
    }
    let mut copy = (*config).clone();
    copy.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(copy)
}

/// `config` offering exactly ALPN `h2` (a copy only if it does not already).
pub fn client_alpn(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if is_h2_only(&config.alpn_protocols) {
        return config;
    }
    let mut copy = (*config).clone();
    copy.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(copy)
}

/// The verified peer of an established TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its SPIFFE identity.
    pub identity: Identity,
    /// Its leaf certificate (e.g. to log the serial).
    pub certificate: CertificateDer<'static>,
    /// What re-checking that certificate later needs (see [`ServerTls::recheck`]).
    pub validity: Validity,
}

impl Peer {
    /// The peer of `conn`, if it presented a certificate with a SPIFFE identity. The certificate was
    /// verified during the handshake; this only reads it.
    pub(crate) fn of(conn: &rustls::CommonState) -> Option<Peer> {
        let leaf = conn.peer_certificates()?.first()?;
        let (identity, validity) = identity_and_validity(leaf).ok()?;
        Some(Peer { identity, certificate: leaf.clone().into_owned(), validity })
    }
}

impl<T: ServerTls> ServerTls for Arc<T> {
    fn config(&self, local: SocketAddr) -> impl Future<Output = Result<Arc<ServerConfig>, BoxError>> + Send {
        (**self).config(local)
    }

    fn handshake_failed(&self, error: &AcceptError) {
        (**self).handshake_failed(error);
    }

    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError> {
        (**self).recheck(peer)
    }
}

impl<T: ClientTls> ClientTls for Arc<T> {
    fn config(
        &self,
        source: &Identity,
        expected: &[Identity],
    ) -> impl Future<Output = Result<Arc<ClientConfig>, BoxError>> + Send {
        (**self).config(source, expected)
    }

    fn certificate(&self, source: &Identity) -> Option<String> {
        (**self).certificate(source)
    }

    fn recheck(&self, peer: &Peer) -> Result<(), VerifyError> {
        (**self).recheck(peer)
    }
}
