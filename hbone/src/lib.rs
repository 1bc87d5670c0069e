//! HBONE tunnels, as Istio's ztunnel speaks them.
//!
//! HBONE ("HTTP-Based Overlay Network Environment") carries a workload's TCP connection to its
//! destination inside an HTTP/2 `CONNECT` stream, over mutual TLS 1.3 to port 15008 of the
//! destination (its node agent, or the pod itself). Both ends authenticate with SPIFFE workload
//! certificates: the client presents the *source* workload's certificate, the server the
//! *destination* workload's, so each side knows exactly which workload it talks to.
//!
//! # The protocol
//!
//! ```text
//!  source node                                              destination node
//!  app --TCP--> [Pool] ==== mTLS 1.3, ALPN h2, :15008 ====> [HboneServer] --TCP--> workload
//!                  HEADERS  :method CONNECT
//!                           :authority <original dst ip:port>
//!                           forwarded: for="<original src ip:port>"[;host=<service>]
//!                           baggage: k8s.cluster.name=...,...    traceparent: 00-<trace>-<span>-00
//!                  <------  :status 200 | 401 denied | 503 upstream unreachable | 400 malformed
//!                  DATA <-> DATA ...   END_STREAM = TCP half-close (FIN), each direction on its own
//! ```
//!
//! - One TLS connection multiplexes many tunnels; a client opens another when the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` (or its own cap) is reached.
//! - The status codes are ztunnel's: 401 when authorization policy denies, 503 when the
//!   destination cannot connect to the workload, 400 for a request that is not CONNECT or whose
//!   authority is not `ip:port`.
//! - HTTP/2 settings are ztunnel's defaults: 4 MiB stream windows, 16 MiB connection windows,
//!   1 MiB frames; keepalive PINGs every 10 s, 20 s to answer. Large windows are what give a
//!   tunnel throughput close to plain TCP.
//! - Session resumption is off on both sides (a resumed session would skip the expiry and
//!   revocation checks of the identity crate's verifier).
//! - A connection outlives its handshake, so each side checks its peer's certificate again
//!   ([`ServerTls::recheck`], [`ClientTls::recheck`]): the server before every stream and every
//!   second (expired: 401 and GOAWAY; revoked: the connection ends with its streams), the pool
//!   before it reuses a connection (expired: retired) and every second (revoked: the connection
//!   ends with its tunnels).
//!
//! # Modules, one concern each
//!
//! - [`protocol`]: port, ALPN, header names, status codes, settings; `forwarded` and
//!   `traceparent`.
//! - [`tls`]: the seams through which the caller provides TLS configurations ([`ServerTls`],
//!   [`ClientTls`]; [`SecretManagerTls`] implements them with the identity crate), ALPN, the peer.
//! - [`server`]: [`HboneServer`] and the [`Inbound`] handler trait.
//! - [`pool`]: [`Pool`], [`Key`], [`ConnectRequest`], [`Tunnel`]: the client side.
//! - `client`: one pooled connection: dialling it and the task that drives it.
//! - `stream`: a CONNECT stream as bytes, with flow control tied to consumption.
//! - [`copy`]: the relay between a tunnel and a socket, half-close and byte counts.
//! - [`error`]: what failed, with whom, under which identity.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(
//! #     manager: warden_identity::workload::SecretManager,
//! #     source: warden_identity::Identity,
//! #     destination: warden_identity::Identity,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use warden_hbone::{ConnectRequest, Key, Pool, PoolOptions, SecretManagerTls};
//! use warden_identity::tls::CompliancePolicy;
//!
//! let pool = Pool::new(SecretManagerTls::new(manager, CompliancePolicy::Default), PoolOptions::default());
//! let key = Key::new(source, "10.0.2.15:15008".parse()?, vec![destination]);
//! let app = tokio::net::TcpStream::connect("127.0.0.1:9000").await?; // stands for the captured socket
//! let tunnel = pool
//!     .connect(&key, ConnectRequest::new("10.0.2.15:8080".parse()?).forwarded_for(app.peer_addr()?))
//!     .await?;
//! let stats = tunnel.relay(app, &warden_hbone::Progress::default()).await?;
//! tracing::info!(sent = stats.sent, received = stats.received, "tunnel done");
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod client;
pub mod copy;
pub mod error;
pub mod pool;
pub mod protocol;
pub mod server;
mod stream;
pub mod tls;
mod wire;

pub use copy::{ChunkReader, Progress, TransferError, TransferStats};
pub use error::{AcceptError, BoxError, ConnectError, Refusal};
pub use pool::{ConnectRequest, Key, Pool, PoolOptions, PoolStats, Tunnel};
pub use protocol::{FlowControl, Forwarded, HBONE_PORT, TraceParent};
pub use server::{HboneServer, Inbound, InboundRequest, PeerConnection, ServerOptions};
pub use tls::{ClientTls, Peer, SecretManagerTls, ServerTls};
