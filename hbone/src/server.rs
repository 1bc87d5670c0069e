//! The HBONE server: accepts mTLS HTTP/2 connections on 15008 and turns each CONNECT stream into a
//! relay to the upstream the caller's [`Inbound`] handler opens.
//!
//! Per accepted TCP connection:
//! 1. TCP_NODELAY; the TLS configuration is chosen by [`ServerTls::config`] from the local address
//!    the client dialled (the destination workload's certificate).
//! 2. TLS 1.3 handshake (bounded by `handshake_timeout`); the client's certificate is verified by the
//!    configuration's verifier and its SPIFFE identity becomes the connection's peer.
//! 3. HTTP/2 with ztunnel's settings; keepalive PINGs tear down a connection whose peer vanished.
//!
//! Per stream: a request that is not CONNECT, or whose authority is not `ip:port`, is answered 400
//! without consulting the handler. Otherwise [`Inbound::open`] decides: a [`Refusal`] becomes its
//! status code, an upstream gets 200 and the relay (see [`crate::copy`]), whose byte counts are
//! reported to [`Inbound::closed`].
//!
//! The client's certificate is checked again before every stream and every `recheck_interval`
//! ([`ServerTls::recheck`]), since a connection outlives the handshake that verified it: once the
//! certificate has expired, new streams are refused (401) and the connection gets GOAWAY, while
//! the streams already open finish; once it is revoked, the connection and all its streams end
//! (GOAWAY `INADEQUATE_SECURITY`).
//!
//! Shutdown ([`HboneServer::serve_until`]): stop accepting, send GOAWAY on every connection so
//! clients open new tunnels elsewhere, let open streams finish for `drain_timeout`, then drop them.

use std::future::{Future, pending, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::wire::{Wire, batch_writes};
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};
use warden_identity::Identity;
use warden_identity::tls::VerifyError;

use crate::copy::{Progress, TransferError, TransferStats, relay};
use crate::error::{AcceptError, Refusal};
use crate::protocol::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT, DEFAULT_RECHECK_INTERVAL,
    DEFAULT_SERVER_MAX_CONCURRENT_STREAMS, FORWARDED, FlowControl, Forwarded, SERVER_MAX_HEADER_LIST_SIZE,
    SERVER_MAX_SEND_BUFFER, STATUS_BAD_REQUEST, STATUS_DENIED, STATUS_OK, TRACEPARENT,
};
use crate::stream::{H2Stream, keepalive};
use crate::tls::{Peer, ServerTls, server_alpn};

/// How long open streams may run after shutdown starts (ztunnel's default termination deadline).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Server settings; every default is a named constant.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// HTTP/2 windows and frame size.
    pub flow: FlowControl,
    /// Concurrent streams a client may open on one connection.
    pub max_concurrent_streams: u32,
    /// Bound on the TLS and HTTP/2 handshakes.
    pub handshake_timeout: Duration,
    /// How long open streams may run after shutdown starts.
    pub drain_timeout: Duration,
    /// Keepalive PING interval.
    pub ping_interval: Duration,
    /// An unanswered PING closes the connection after this long.
    pub ping_timeout: Duration,
    /// How often the client's certificate is checked again between streams.
    pub recheck_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            flow: FlowControl::default(),
            max_concurrent_streams: DEFAULT_SERVER_MAX_CONCURRENT_STREAMS,
            handshake_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            recheck_interval: DEFAULT_RECHECK_INTERVAL,
        }
    }
}

/// An authenticated HBONE connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConnection {
    /// The client, authenticated by its certificate.
    pub peer: Peer,
    /// The client's address (its node, or its pod when it tunnels from inside the pod).
    pub remote: SocketAddr,
    /// The local address the client dialled (it chose the certificate presented).
    pub local: SocketAddr,
}

/// A CONNECT request that passed the protocol checks, for the [`Inbound`] handler to decide.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The connection it arrived on.
    pub connection: Arc<PeerConnection>,
    /// The destination the client asked for (`:authority`).
    pub destination: SocketAddr,
    /// The parsed `forwarded` header (empty if absent or unparseable).
    pub forwarded: Forwarded,
    /// All request headers, e.g. `baggage` and `traceparent`.
    pub headers: HeaderMap,
}

impl InboundRequest {
    /// The client's authenticated identity.
    pub fn peer_identity(&self) -> &Identity {
        &self.connection.peer.identity
    }

    /// A header as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the requested destination is the address the client dialled. ztunnel refuses other
    /// destinations (400) unless the local workload is a waypoint: otherwise a client could dial
    /// one workload's address, obtain its certificate and reach another workload.
    pub fn destination_is_local(&self) -> bool {
        self.destination.ip() == self.connection.local.ip()
    }
}

/// The caller's decision for each tunnel, and its record of how it ended.
pub trait Inbound: Send + Sync + 'static {
    /// Authorizes the request and opens the upstream, or refuses. The client receives 200 only once
    /// this returns an upstream. `progress` will count the tunnel's bytes while it runs
    /// (`received`: from the tunnel to the upstream), for live metrics.
    fn open(
        &self,
        request: &InboundRequest,
        progress: Arc<Progress>,
    ) -> impl Future<Output = Result<TcpStream, Refusal>> + Send;

    /// Called once an accepted tunnel is over (both directions done, or failed), with its byte
    /// counts, e.g. for metrics and access logs.
    fn closed(&self, request: &InboundRequest, result: &Result<TransferStats, TransferError>) {
        let _ = (request, result);
    }
}

impl<T: Inbound> Inbound for Arc<T> {
    fn open(
        &self,
        request: &InboundRequest,
        progress: Arc<Progress>,
    ) -> impl Future<Output = Result<TcpStream, Refusal>> + Send {
        (**self).open(request, progress)
    }

    fn closed(&self, request: &InboundRequest, result: &Result<TransferStats, TransferError>) {
        (**self).closed(request, result);
    }
}

struct Shared<T, I> {
    tls: T,
    inbound: I,
    options: ServerOptions,
}

/// The HBONE server. The caller binds the listener (15008 in production).
pub struct HboneServer<T, I> {
    listener: TcpListener,
    shared: Arc<Shared<T, I>>,
}

impl<T: ServerTls, I: Inbound> HboneServer<T, I> {
    /// A server accepting on `listener`, choosing certificates with `tls` and tunnels with `inbound`.
    pub fn new(listener: TcpListener, tls: T, inbound: I, options: ServerOptions) -> Self {
        Self { listener, shared: Arc::new(Shared { tls, inbound, options }) }
    }

    /// The address the server accepts on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        self.serve_until(pending()).await;
    }

    /// Serves until `shutdown` completes, then drains: no new connections, GOAWAY on the open ones,
    /// open streams get `drain_timeout` to finish before they are dropped.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()>) {
        let HboneServer { listener, shared } = self;
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        let span = info_span!("hbone_in", %remote);
                        connections.spawn(serve_connection(shared.clone(), tcp, remote, drain_rx.clone()).instrument(span));
                    }
                    Err(e) => {
                        warn!(error = %e, "accepting an HBONE connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => report_panic(done, "connection"),
            }
        }
        drop(listener);
        let open = connections.len();
        info!(connections = open, drain_timeout = ?shared.options.drain_timeout, "HBONE server draining");
        // Receivers may all be gone already; that is fine.
        let _ = drain_tx.send(true);
        let drained = timeout(shared.options.drain_timeout, async {
            while let Some(done) = connections.join_next().await {
                report_panic(done, "connection");
            }
        })
        .await;
        if drained.is_err() {
            warn!(connections = connections.len(), "drain timeout reached; closing the remaining HBONE connections");
            connections.shutdown().await;
        }
        info!("HBONE server stopped");
    }
}

fn report_panic(done: Result<(), tokio::task::JoinError>, what: &str) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "BUG: HBONE {what} task panicked");
    }
}

async fn serve_connection<T: ServerTls, I: Inbound>(
    shared: Arc<Shared<T, I>>,
    tcp: TcpStream,
    remote: SocketAddr,
    drain: watch::Receiver<bool>,
) {
    match accept(&shared, tcp, remote).await {
        Ok((conn, peer)) => {
            let span = info_span!("conn", peer = %peer.peer.identity, local = %peer.local);
            run_connection(shared, conn, Arc::new(peer), drain).instrument(span).await;
        }
        Err(e) => {
            info!(error = %e, "HBONE connection refused");
            shared.tls.handshake_failed(&e);
        }
    }
}

type ServerConnection = h2::server::Connection<TlsStream<Wire>, Bytes>;

/// TLS and HTTP/2 handshakes.
async fn accept<T, I>(
    shared: &Shared<T, I>,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Result<(ServerConnection, PeerConnection), AcceptError>
where
    T: ServerTls,
{
    let options = &shared.options;
    let local = tcp.local_addr().map_err(|source| AcceptError::Handshake { remote, local: remote, source })?;
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let config = shared.tls.config(local).await.map_err(|source| AcceptError::TlsConfig { local, source })?;
    let mut tls = timeout(options.handshake_timeout, TlsAcceptor::from(server_alpn(config)).accept(Wire::new(tcp)))
        .await
        .map_err(|_| AcceptError::Timeout { remote, local, stage: "TLS handshake", after: options.handshake_timeout })?
        .map_err(|source| AcceptError::Handshake { remote, local, source })?;
    batch_writes(tls.get_mut().1);
    let peer = Peer::of(tls.get_ref().1).ok_or(AcceptError::NoClientIdentity { remote })?;
    debug!(peer = %peer.identity, "TLS handshake done");

    let flow = &options.flow;
    let conn = h2::server::Builder::new()
        .initial_window_size(flow.stream_window)
        .initial_connection_window_size(flow.connection_window)
        .max_frame_size(flow.max_frame_size)
        .max_concurrent_streams(options.max_concurrent_streams)
        .max_header_list_size(SERVER_MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(SERVER_MAX_SEND_BUFFER)
        // As ztunnel: peers send large frames, and the windows bound what they can send.
        .data_frame_budget(usize::MAX)
        .handshake(tls);
    let conn = timeout(options.handshake_timeout, conn)
        .await
        .map_err(|_| AcceptError::Timeout {
            remote,
            local,
            stage: "HTTP/2 handshake",
            after: options.handshake_timeout,
        })?
        .map_err(|source| AcceptError::Http2 { remote, source })?;
    Ok((conn, PeerConnection { peer, remote, local }))
}

/// Accepts streams until the connection ends, GOAWAY on drain, keepalive.
async fn run_connection<T: ServerTls, I: Inbound>(
    shared: Arc<Shared<T, I>>,
    mut conn: ServerConnection,
    peer: Arc<PeerConnection>,
    mut drain: watch::Receiver<bool>,
) {
    let options = &shared.options;
    let mut streams = JoinSet::new();
    let keepalive = keepalive(conn.ping_pong(), options.ping_interval, options.ping_timeout);
    tokio::pin!(keepalive);
    let mut recheck = tokio::time::interval(options.recheck_interval);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, mut respond))) => {
                    if let Err(e) = shared.tls.recheck(&peer.peer) {
                        info!(error = %e, "tunnel refused: the client certificate no longer stands");
                        if let Err(e) = respond.send_response(status_response(STATUS_DENIED), true) {
                            debug!(error = %e, "cannot send the refusal");
                        }
                        if lapsed(&mut conn, &mut draining, e) {
                            end_now(&mut conn, &mut streams, options.ping_timeout).await;
                            break;
                        }
                        continue;
                    }
                    streams.spawn(serve_stream(shared.clone(), peer.clone(), request, respond).in_current_span());
                }
                Some(Err(e)) => {
                    debug!(error = %e, "HBONE connection ended with an error");
                    break;
                }
                None => {
                    debug!("HBONE connection closed");
                    break;
                }
            },
            Some(done) = streams.join_next(), if !streams.is_empty() => report_panic(done, "stream"),
            _ = recheck.tick() => {
                if let Err(e) = shared.tls.recheck(&peer.peer)
                    && lapsed(&mut conn, &mut draining, e)
                {
                    end_now(&mut conn, &mut streams, options.ping_timeout).await;
                    break;
                }
            }
            _ = drain.changed(), if !draining => {
                debug!("draining: GOAWAY");
                draining = true;
                conn.graceful_shutdown();
            }
            failure = &mut keepalive => {
                debug!(%failure, "peer unresponsive; closing the HBONE connection");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                let _ = timeout(options.ping_timeout, poll_fn(|cx| conn.poll_closed(cx))).await;
                break;
            }
        }
    }
    // The connection is gone: streams can only deliver what they already hold.
    drop(conn);
    if timeout(options.drain_timeout, async {
        while let Some(done) = streams.join_next().await {
            report_panic(done, "stream");
        }
    })
    .await
    .is_err()
    {
        streams.shutdown().await;
    }
}

/// What a client certificate that no longer stands does to its connection: an expired one gets
/// GOAWAY (no new streams; the open ones finish), a revoked one ends the connection now
/// (`true`: the caller drops its streams).
fn lapsed(conn: &mut ServerConnection, draining: &mut bool, e: VerifyError) -> bool {
    if matches!(e, VerifyError::Revoked { .. }) {
        warn!(error = %e, "client certificate revoked; closing the HBONE connection and its streams");
        conn.abrupt_shutdown(h2::Reason::INADEQUATE_SECURITY);
        return true;
    }
    if !*draining {
        info!(error = %e, "client certificate no longer valid; GOAWAY, open streams finish");
        *draining = true;
        conn.graceful_shutdown();
    }
    false
}

/// Drops every stream of a connection that has sent GOAWAY, and lets the GOAWAY reach the client
/// (for up to `wait`) before the connection goes.
async fn end_now(conn: &mut ServerConnection, streams: &mut JoinSet<()>, wait: Duration) {
    streams.abort_all();
    let _ = timeout(wait, poll_fn(|cx| conn.poll_closed(cx))).await;
}

/// The destination of a well-formed HBONE request.
fn destination(parts: &http::request::Parts) -> Result<SocketAddr, String> {
    if parts.method != Method::CONNECT {
        return Err(format!("method {} is not CONNECT", parts.method));
    }
    let authority = parts.uri.authority().ok_or("no :authority")?;
    match authority.as_str().parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        _ => Err(format!("authority {:?} is not ip:port", authority.as_str())),
    }
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

async fn serve_stream<T, I: Inbound>(
    shared: Arc<Shared<T, I>>,
    connection: Arc<PeerConnection>,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (parts, body) = request.into_parts();
    let destination = match destination(&parts) {
        Ok(d) => d,
        Err(reason) => {
            info!(%reason, method = %parts.method, uri = %parts.uri, "malformed HBONE request refused");
            if let Err(e) = respond.send_response(status_response(STATUS_BAD_REQUEST), true) {
                debug!(error = %e, "cannot send the refusal");
            }
            return;
        }
    };
    let forwarded = parts.headers.get(FORWARDED).and_then(|v| v.to_str().ok()).map(Forwarded::parse);
    let request =
        InboundRequest { connection, destination, forwarded: forwarded.unwrap_or_default(), headers: parts.headers };
    // A debug span: at info level no span exists per tunnel (a registry slot held and its fields
    // formatted for each, and an enter and exit at every poll of the relay), and the info events
    // below name the tunnel themselves.
    let span = debug_span!(
        "tunnel",
        dst = %destination,
        src = ?request.forwarded.for_addr(),
        trace = request.header(TRACEPARENT).unwrap_or("")
    );
    let (dst, src) = (destination, request.forwarded.for_addr());
    async {
        let progress = Arc::new(Progress::default());
        let upstream = match shared.inbound.open(&request, progress.clone()).await {
            Ok(upstream) => upstream,
            Err(refusal) => {
                info!(%dst, ?src, %refusal, status = refusal.status().as_u16(), "tunnel refused");
                if let Err(e) = respond.send_response(status_response(refusal.status()), true) {
                    debug!(error = %e, "cannot send the refusal");
                }
                return;
            }
        };
        let send = match respond.send_response(status_response(STATUS_OK), false) {
            Ok(send) => send,
            Err(e) => {
                debug!(error = %e, "client went away before the response");
                return;
            }
        };
        debug!("tunnel open");
        let (reader, writer) = upstream.into_split();
        let result = relay(H2Stream::new(send, body), reader, writer, &progress).await;
        match &result {
            Ok(stats) => debug!(received = stats.received, sent = stats.sent, "tunnel closed"),
            Err(e) => info!(%dst, ?src, error = %e, "tunnel failed"),
        }
        shared.inbound.closed(&request, &result);
    }
    .instrument(span)
    .await
}
