//! One client HBONE connection: dialling it, and the driver task that owns it.
//!
//! Setup, all within `connect_timeout`:
//! 1. TCP connect to the node, TCP_NODELAY.
//! 2. TLS 1.3 with the source workload's certificate ([`ClientTls`]), ALPN `h2`; the server must
//!    authenticate as one of the expected identities (checked by the verifier, and again here).
//! 3. HTTP/2 handshake, then one PING round trip. The server sends its SETTINGS first, so once the
//!    PONG is back its `SETTINGS_MAX_CONCURRENT_STREAMS` is known, which the pool needs to decide
//!    when to open another connection. It is also where a refused client certificate surfaces: in
//!    TLS 1.3 the server checks it after the client has finished its handshake.
//!
//! The driver polls the connection, sends keepalive PINGs, and closes the connection when it has
//! been idle for `idle_timeout` (or at once when idle after the pool was dropped). Whatever ends
//! the connection, the driver removes it from the pool.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::wire::{Wire, batch_writes};
use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{Instrument, debug, info_span, warn};
use warden_identity::tls::VerifyError;

use crate::error::ConnectError;
use crate::pool::{Key, PoolOptions};
use crate::protocol::{CLIENT_MAX_HEADER_LIST_SIZE, STATUS_OK};
use crate::stream::{H2Stream, h2_to_io, keepalive};
use crate::tls::{ClientTls, Peer, client_alpn};

/// What the pool does for a connection's driver.
pub(crate) trait Registry: Send + Sync + 'static {
    /// Removes `conn` from the pool if it has been idle for `idle_timeout`; true if removed (the
    /// driver then closes it). Must decide under the same lock under which streams are reserved.
    fn retire_if_idle(&self, conn: &Arc<Conn>, idle_timeout: Duration) -> bool;
    /// Removes a connection that is gone.
    fn forget(&self, conn: &Arc<Conn>);
}

/// A pooled connection, shared by the pool, its driver and its tunnels.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) node: SocketAddr,
    pub(crate) peer: Peer,
    /// The certificate the connection was opened under ([`ClientTls::certificate`], read before
    /// the handshake: a rotation during it leaves the connection marked with the older one).
    pub(crate) certificate: Option<String>,
    sender: SendRequest<Bytes>,
    /// Our own cap on streams per connection (the peer's limit applies too).
    max_streams: usize,
    /// Streams reserved or open.
    active: AtomicUsize,
    /// When `active` last dropped (to zero); meaningful while it is zero.
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
    /// Wakes the driver when `active` changes.
    activity: Notify,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("node", &self.node)
            .field("peer", &self.peer.identity)
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl Conn {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.activity.notify_one();
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Streams this connection may carry: our cap, or the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`.
    fn capacity(&self) -> usize {
        self.sender.current_max_send_streams().min(self.max_streams)
    }

    /// Whether h2 still accepts requests (no GOAWAY, no connection error).
    fn usable(&self) -> bool {
        let mut sender = self.sender.clone();
        matches!(sender.poll_ready(&mut Context::from_waker(Waker::noop())), Poll::Ready(Ok(())))
    }

    /// Reserves a stream if there is room. Called under the pool's lock.
    pub(crate) fn try_reserve(&self) -> bool {
        if self.is_closed() || self.active() >= self.capacity() || !self.usable() {
            return false;
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        self.activity.notify_one();
        true
    }

    fn release(&self) {
        // Set before the decrement, so whoever sees zero also sees a fresh idle time.
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.activity.notify_one();
    }

    /// Whether the connection has carried no stream for `idle_timeout`.
    pub(crate) fn idle_for(&self, idle_timeout: Duration) -> bool {
        self.idle_deadline(idle_timeout).is_some_and(|d| d <= Instant::now())
    }

    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.active() > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + idle_timeout)
    }
}

/// A reserved stream slot on a connection; released on drop.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) conn: Arc<Conn>,
}

impl Lease {
    /// Takes over a slot reserved with [`Conn::try_reserve`].
    pub(crate) fn new(conn: Arc<Conn>) -> Self {
        Self { conn }
    }

    /// Sends the CONNECT request and waits for the response.
    pub(crate) async fn open(&self, request: http::Request<()>) -> Result<H2Stream, OpenError> {
        let mut sender = self.conn.sender.clone();
        poll_fn(|cx| sender.poll_ready(cx)).await.map_err(OpenError::Connection)?;
        let (response, send) = sender.send_request(request, false).map_err(OpenError::Connection)?;
        let response = response.await.map_err(|e| {
            // Refused before the server saw it (GOAWAY, REFUSED_STREAM) or the connection died:
            // nothing reached the destination, so another connection may try again.
            if e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                OpenError::Connection(e)
            } else {
                OpenError::Stream(e)
            }
        })?;
        if response.status() != STATUS_OK {
            return Err(OpenError::Refused(response.status()));
        }
        Ok(H2Stream::new(send, response.into_body()))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.release();
    }
}

/// Why a CONNECT failed on an established connection.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The connection cannot carry it; safe to retry elsewhere.
    Connection(h2::Error),
    /// The stream failed after the request may have reached the server.
    Stream(h2::Error),
    /// The server answered with this status.
    Refused(StatusCode),
}

/// Whether a connection's server certificate still stands ([`ClientTls::recheck`]), for its driver.
pub(crate) type Recheck = Arc<dyn Fn(&Peer) -> Result<(), VerifyError> + Send + Sync>;

/// Opens a connection for `key` and starts its driver.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dial<C: ClientTls>(
    tls: &C,
    key: &Key,
    options: &PoolOptions,
    id: u64,
    registry: Arc<dyn Registry>,
    pool_gone: watch::Receiver<()>,
    recheck: Recheck,
) -> Result<Arc<Conn>, ConnectError> {
    let node = key.node;
    let deadline = Instant::now() + options.connect_timeout;
    let timed_out = |stage| ConnectError::Timeout { node, stage, after: options.connect_timeout };

    let certificate = tls.certificate(&key.source);
    let config = tls
        .config(&key.source, &key.expected)
        .await
        .map_err(|e| ConnectError::TlsConfig { identity: key.source.clone(), source: Arc::new(e) })?;
    let tcp = timeout_at(deadline, TcpStream::connect(node))
        .await
        .map_err(|_| timed_out("TCP connect"))?
        .map_err(|e| ConnectError::Connect { node, source: Arc::new(e) })?;
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    // The server is authenticated by its SPIFFE identity; the name only has to be well-formed
    // (an IP address sends no SNI).
    let server_name = ServerName::IpAddress(node.ip().into());
    let mut tls_stream =
        timeout_at(deadline, TlsConnector::from(client_alpn(config)).connect(server_name, Wire::new(tcp)))
            .await
            .map_err(|_| timed_out("TLS handshake"))?
            .map_err(|e| ConnectError::Handshake { key: Box::new(key.clone()), source: Arc::new(e) })?;
    batch_writes(tls_stream.get_mut().1);
    let peer = Peer::of(tls_stream.get_ref().1).ok_or(ConnectError::NoServerIdentity { node })?;
    if !key.expected.is_empty() && !key.expected.contains(&peer.identity) {
        return Err(ConnectError::UnexpectedServerIdentity { key: Box::new(key.clone()), presented: peer.identity });
    }

    let flow = &options.flow;
    let handshake = h2::client::Builder::new()
        .initial_window_size(flow.stream_window)
        .initial_connection_window_size(flow.connection_window)
        .max_frame_size(flow.max_frame_size)
        .initial_max_send_streams(options.max_streams_per_connection as usize)
        .max_header_list_size(CLIENT_MAX_HEADER_LIST_SIZE)
        // One stream window of data may wait in h2 per stream: enough to fill the peer's window in
        // one go, never more (ztunnel does the same).
        .max_send_buffer_size(flow.stream_window as usize)
        .enable_push(false)
        .data_frame_budget(usize::MAX)
        .handshake::<_, Bytes>(tls_stream);
    let (sender, connection) = timeout_at(deadline, handshake)
        .await
        .map_err(|_| timed_out("HTTP/2 handshake"))?
        .map_err(|e| ConnectError::Http2 { node, source: Arc::new(e) })?;

    let conn = Arc::new(Conn {
        id,
        node,
        peer,
        certificate,
        sender,
        max_streams: options.max_streams_per_connection as usize,
        active: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
        closed: AtomicBool::new(false),
        activity: Notify::new(),
    });
    let (ready_tx, ready_rx) = oneshot::channel();
    let driver = Driver { conn: conn.clone(), registry, pool_gone, options: options.clone(), recheck };
    let span = info_span!("hbone_conn", id, %node, peer = %conn.peer.identity, source = %key.source);
    tokio::spawn(driver.run(connection, ready_tx).instrument(span));

    match timeout_at(deadline, ready_rx).await {
        Ok(Ok(Ok(()))) => {
            debug!(id, %node, max_streams = conn.capacity(), "HBONE connection ready");
            Ok(conn)
        }
        Ok(Ok(Err(source))) => Err(ConnectError::SetupFailed { key: Box::new(key.clone()), source: Arc::new(source) }),
        Ok(Err(_)) => Err(ConnectError::SetupFailed {
            key: Box::new(key.clone()),
            source: Arc::new(std::io::Error::other("BUG: the connection driver stopped during setup")),
        }),
        Err(_) => Err(timed_out("HTTP/2 SETTINGS exchange")),
    }
}

type ClientConnection = h2::client::Connection<TlsStream<Wire>, Bytes>;

struct Driver {
    conn: Arc<Conn>,
    registry: Arc<dyn Registry>,
    pool_gone: watch::Receiver<()>,
    options: PoolOptions,
    recheck: Recheck,
}

enum Setup {
    Ready,
    Failed(std::io::Error),
    Abandoned,
}

impl Driver {
    async fn run(mut self, mut connection: ClientConnection, mut ready: oneshot::Sender<std::io::Result<()>>) {
        let mut ping = connection.ping_pong();
        let setup = {
            let first_pong = async {
                match ping.as_mut() {
                    Some(p) => p.ping(h2::Ping::opaque()).await.map(drop),
                    None => Ok(()),
                }
            };
            tokio::select! {
                res = &mut connection => Setup::Failed(match res {
                    Err(e) => h2_to_io(e),
                    Ok(()) => std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed before the server's HTTP/2 SETTINGS",
                    ),
                }),
                pong = first_pong => match pong {
                    Ok(()) => Setup::Ready,
                    Err(e) => Setup::Failed(h2_to_io(e)),
                },
                () = ready.closed() => Setup::Abandoned,
            }
        };
        match setup {
            Setup::Ready => {
                if ready.send(Ok(())).is_err() {
                    return;
                }
            }
            Setup::Failed(e) => {
                debug!(error = %e, "HBONE connection setup failed");
                let _ = ready.send(Err(e));
                return;
            }
            Setup::Abandoned => return,
        }

        let keepalive = keepalive(ping, self.options.ping_interval, self.options.ping_timeout);
        tokio::pin!(keepalive);
        let mut recheck = tokio::time::interval(self.options.recheck_interval);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pool_open = true;
        loop {
            // Once the pool is gone, nothing new will use this connection: close it when idle.
            let idle_timeout = if pool_open { self.options.idle_timeout } else { Duration::ZERO };
            let idle_deadline = self.conn.idle_deadline(idle_timeout);
            tokio::select! {
                res = &mut connection => {
                    match res {
                        Ok(()) => debug!("HBONE connection closed"),
                        Err(e) => debug!(error = %e, "HBONE connection ended with an error"),
                    }
                    break;
                }
                failure = &mut keepalive => {
                    debug!(%failure, "server unresponsive; closing the HBONE connection");
                    break;
                }
                // An expired server certificate only retires the connection (the pool's checkout);
                // a revoked one ends it and its tunnels, as the server does with a revoked client.
                _ = recheck.tick() => {
                    if let Err(e @ VerifyError::Revoked { .. }) = (self.recheck)(&self.conn.peer) {
                        warn!(error = %e, "server certificate revoked; closing the HBONE connection and its tunnels");
                        break;
                    }
                }
                () = self.conn.activity.notified() => {
                    if self.conn.is_closed() && self.conn.active() == 0 {
                        debug!("HBONE connection dropped from the pool");
                        break;
                    }
                }
                _ = self.pool_gone.changed(), if pool_open => pool_open = false,
                () = sleep_until(idle_deadline.unwrap_or_else(Instant::now)), if idle_deadline.is_some() => {
                    if !pool_open || self.registry.retire_if_idle(&self.conn, idle_timeout) {
                        debug!(idle_timeout = ?idle_timeout, "closing idle HBONE connection");
                        break;
                    }
                }
            }
        }
        self.conn.mark_closed();
        self.registry.forget(&self.conn);
        // Dropping `connection` closes the socket; streams still open see an error.
    }
}
