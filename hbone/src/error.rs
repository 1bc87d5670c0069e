//! Errors: each says what failed, with whom, and under which identity.
//!
//! - [`ConnectError`]: the client could not open a tunnel (connect, handshake, refusal).
//! - [`AcceptError`]: the server could not set up an HBONE connection from a peer.
//! - [`Refusal`]: an [`Inbound`](crate::server::Inbound) handler declined a tunnel; it becomes the
//!   status code ztunnel uses for the same case.

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use warden_identity::Identity;

use crate::pool::Key;
use crate::protocol::{STATUS_BAD_REQUEST, STATUS_DENIED, STATUS_UPSTREAM_UNREACHABLE};

/// A boxed error from a caller-provided seam (TLS configuration sources, handlers).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Why the client could not open a tunnel. Cheap to clone: concurrent callers waiting on the same
/// connection attempt all receive its error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The TLS configuration source had nothing for the source identity.
    #[error("no TLS client configuration for {identity}: {source}")]
    TlsConfig {
        /// The source identity.
        identity: Identity,
        /// The source's error.
        source: Arc<BoxError>,
    },
    /// The TCP connection to the node failed.
    #[error("cannot connect to HBONE node {node}: {source}")]
    Connect {
        /// The node's HBONE address.
        node: SocketAddr,
        /// The socket error.
        source: Arc<io::Error>,
    },
    /// A stage of connection setup did not finish in time.
    #[error("{stage} with HBONE node {node} timed out after {after:?}")]
    Timeout {
        /// The node's HBONE address.
        node: SocketAddr,
        /// What was under way.
        stage: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The TLS handshake failed (on our side: e.g. the server's certificate was refused).
    #[error(
        "TLS handshake with {} as {}, expecting {}, failed: {source}", .key.node, .key.source, ids(&.key.expected)
    )]
    Handshake {
        /// The connection attempted: node, our identity, the server identities we accept.
        key: Box<Key>,
        /// The TLS error (it names the verification failure).
        source: Arc<io::Error>,
    },
    /// The server closed the connection before its HTTP/2 SETTINGS arrived: in TLS 1.3 the server
    /// verifies our certificate after our side of the handshake is done, so this is how a refused
    /// client certificate (expired, revoked, untrusted) shows on the client.
    #[error(
        "HBONE node {} closed the connection during setup (did it refuse our certificate for {}?): {source}",
        .key.node,
        .key.source
    )]
    SetupFailed {
        /// The connection attempted: node, our identity, the server identities we accept.
        key: Box<Key>,
        /// What the connection reported (often the server's TLS alert).
        source: Arc<io::Error>,
    },
    /// The server's certificate carried no SPIFFE identity.
    #[error("HBONE node {node} presented no SPIFFE identity")]
    NoServerIdentity {
        /// The node's HBONE address.
        node: SocketAddr,
    },
    /// The server authenticated as an identity we do not accept for this destination.
    #[error("HBONE node {} presented {presented}, expected one of {}", .key.node, ids(&.key.expected))]
    UnexpectedServerIdentity {
        /// The connection attempted: node, our identity, the server identities we accept.
        key: Box<Key>,
        /// The identity the server presented.
        presented: Identity,
    },
    /// A new connection accepted no stream (the server allows none, or sent GOAWAY at once).
    #[error("HBONE node {node} accepts no tunnel on a new connection")]
    NoStreams {
        /// The node's HBONE address.
        node: SocketAddr,
    },
    /// HTTP/2 failed on an established connection.
    #[error("HTTP/2 with HBONE node {node} failed: {source}")]
    Http2 {
        /// The node's HBONE address.
        node: SocketAddr,
        /// h2's error.
        source: Arc<h2::Error>,
    },
    /// The server answered the CONNECT with something other than 200.
    #[error("HBONE node {node} refused the tunnel to {authority} with {status}: {}", status_meaning(*.status))]
    Refused {
        /// The node's HBONE address.
        node: SocketAddr,
        /// The destination requested.
        authority: SocketAddr,
        /// The status the server returned.
        status: StatusCode,
    },
    /// The request could not be built (e.g. a header value with forbidden characters).
    #[error("invalid HBONE request: {reason}")]
    InvalidRequest {
        /// Why.
        reason: String,
    },
}

impl ConnectError {
    /// The status the server returned, if it refused the tunnel.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the destination's authorization policy denied the tunnel.
    pub fn is_denied(&self) -> bool {
        self.status() == Some(STATUS_DENIED)
    }
}

fn status_meaning(status: StatusCode) -> &'static str {
    match status {
        STATUS_DENIED => "denied by the destination's authorization policy",
        STATUS_UPSTREAM_UNREACHABLE => "the destination could not connect to the workload",
        STATUS_BAD_REQUEST => "the server found the request malformed",
        _ => "unexpected status",
    }
}

fn ids(ids: &[Identity]) -> String {
    if ids.is_empty() {
        return "any trusted identity".to_owned();
    }
    let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
    format!("[{}]", list.join(", "))
}

/// Why the server could not set up an HBONE connection from a peer. Reported to
/// [`ServerTls::handshake_failed`](crate::tls::ServerTls::handshake_failed) (ztunnel logs these as
/// early denials).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The caller had no certificate to present for the address the client dialled.
    #[error("no TLS server configuration for {local}: {source}")]
    TlsConfig {
        /// The local address the client dialled.
        local: SocketAddr,
        /// The caller's error.
        source: BoxError,
    },
    /// The TLS handshake failed (e.g. the client's certificate was refused: the error names why).
    #[error("TLS handshake from {remote} to {local} failed: {source}")]
    Handshake {
        /// The client's address.
        remote: SocketAddr,
        /// The local address the client dialled.
        local: SocketAddr,
        /// The TLS error.
        source: io::Error,
    },
    /// A stage of connection setup did not finish in time.
    #[error("{stage} from {remote} to {local} timed out after {after:?}")]
    Timeout {
        /// The client's address.
        remote: SocketAddr,
        /// The local address the client dialled.
        local: SocketAddr,
        /// What was under way.
        stage: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The client's certificate carried no SPIFFE identity.
    #[error("client {remote} presented no SPIFFE identity")]
    NoClientIdentity {
        /// The client's address.
        remote: SocketAddr,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake from {remote} failed: {source}")]
    Http2 {
        /// The client's address.
        remote: SocketAddr,
        /// h2's error.
        source: h2::Error,
    },
}

/// Why an [`Inbound`](crate::server::Inbound) handler declined a tunnel. The client sees only the
/// status code (as with ztunnel, the policy name is not disclosed to the peer); the server logs
/// the whole refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// An authorization policy denies the connection: 401.
    #[error("denied by authorization policy {policy}")]
    Denied {
        /// The policy that denied it (namespace/name), for logs.
        policy: String,
    },
    /// The workload could not be reached: 503.
    #[error("cannot connect to the workload: {reason}")]
    UpstreamUnreachable {
        /// Why (e.g. the connect error).
        reason: String,
    },
    /// The request is not acceptable (e.g. the authority is not this workload's address): 400.
    #[error("bad request: {reason}")]
    BadRequest {
        /// Why.
        reason: String,
    },
}

impl Refusal {
    /// A policy denial.
    pub fn denied(policy: impl Into<String>) -> Self {
        Refusal::Denied { policy: policy.into() }
    }

    /// The workload could not be reached.
    pub fn unreachable(reason: impl ToString) -> Self {
        Refusal::UpstreamUnreachable { reason: reason.to_string() }
    }

    /// A malformed or unacceptable request.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Refusal::BadRequest { reason: reason.into() }
    }

    /// The status code sent to the client (ztunnel's codes for the same cases).
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied { .. } => STATUS_DENIED,
            Refusal::UpstreamUnreachable { .. } => STATUS_UPSTREAM_UNREACHABLE,
            Refusal::BadRequest { .. } => STATUS_BAD_REQUEST,
        }
    }
}
