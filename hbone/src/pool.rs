//! The client side: a pool of HBONE connections, multiplexing tunnels per [`Key`].
//!
//! - A key is (source identity, node address, expected server identities): tunnels share a
//!   connection only when they present the same certificate to the same server and accept the
//!   same server identities.
//! - A tunnel goes on an open connection of its key with room under both our cap
//!   (`max_streams_per_connection`) and the server's `SETTINGS_MAX_CONCURRENT_STREAMS`; when all
//!   are full, another connection is opened.
//! - Opening is single-flight per key: concurrent callers that find no room wait for the one
//!   connection being opened (and share its error) instead of each opening their own.
//! - A connection that closed, failed its keepalive, or sent GOAWAY is dropped from the pool; a
//!   tunnel that was refused by such a connection before reaching the server is retried on a new
//!   one, so callers do not see a server restart.
//! - A connection without streams for `idle_timeout` is closed.
//! - A connection opened under a certificate the source no longer presents (rotated, replaced)
//!   takes no new tunnels and closes once its tunnels have ended: the new certificate is presented
//!   from the next tunnel on.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing::{Instrument, debug, debug_span, info};
use warden_identity::Identity;

use tokio::net::TcpStream;

use crate::client::{Conn, Lease, OpenError, Recheck, Registry, dial};
use crate::copy::{Progress, TransferError, TransferStats, relay};
use crate::error::ConnectError;
use crate::protocol::{
    BAGGAGE, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT, DEFAULT_POOL_IDLE_TIMEOUT,
    DEFAULT_POOL_MAX_STREAMS_PER_CONNECTION, DEFAULT_RECHECK_INTERVAL, FORWARDED, FlowControl, Forwarded, TRACEPARENT,
    TraceParent,
};
use crate::stream::H2Stream;
use crate::tls::ClientTls;

/// Attempts for one tunnel: a pooled connection that turns out to be closing costs one retry.
const MAX_ATTEMPTS: usize = 3;

/// Pool settings; every default is a named constant.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// HTTP/2 windows and frame size.
    pub flow: FlowControl,
    /// Most tunnels on one connection (the server's limit applies too).
    pub max_streams_per_connection: u32,
    /// A connection without tunnels for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on TCP connect, TLS handshake and HTTP/2 setup of a new connection.
    pub connect_timeout: Duration,
    /// Keepalive PING interval.
    pub ping_interval: Duration,
    /// An unanswered PING closes the connection after this long.
    pub ping_timeout: Duration,
    /// How often an open connection's server certificate is checked again (revoked: the
    /// connection ends with its tunnels).
    pub recheck_interval: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            flow: FlowControl::default(),
            max_streams_per_connection: DEFAULT_POOL_MAX_STREAMS_PER_CONNECTION,
            idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            recheck_interval: DEFAULT_RECHECK_INTERVAL,
        }
    }
}

/// What a pooled connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The source workload: its certificate is presented.
    pub source: Identity,
    /// The HBONE address to dial: the destination node's or pod's `ip:15008`.
    pub node: SocketAddr,
    /// Server identities accepted (sorted, no duplicates; empty: any trusted identity).
    pub expected: Vec<Identity>,
}

impl Key {
    /// A key; `expected` is sorted and deduplicated so equal sets give equal keys.
    pub fn new(source: Identity, node: SocketAddr, mut expected: Vec<Identity>) -> Self {
        expected.sort();
        expected.dedup();
        Self { source, node, expected }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} [", self.source, self.node)?;
        for (i, id) in self.expected.iter().enumerate() {
            write!(f, "{}{id}", if i == 0 { "" } else { ", " })?;
        }
        write!(f, "]")
    }
}

/// The CONNECT request of one tunnel.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    authority: SocketAddr,
    source: Option<SocketAddr>,
    host: Option<String>,
    baggage: Option<HeaderValue>,
    traceparent: Option<TraceParent>,
}

impl ConnectRequest {
    /// A tunnel to `authority`: the original destination `ip:port`.
    pub fn new(authority: SocketAddr) -> Self {
        Self { authority, source: None, host: None, baggage: None, traceparent: None }
    }

    /// The original source, sent as `forwarded: for="<ip:port>"` (as ztunnel does).
    pub fn forwarded_for(mut self, source: SocketAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// The service hostname the source addressed, sent as `forwarded: ...;host=<hostname>`.
    pub fn service_host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// A `baggage` header (ztunnel sends `k8s.cluster.name=...,k8s.namespace.name=...,...`).
    pub fn baggage(mut self, value: HeaderValue) -> Self {
        self.baggage = Some(value);
        self
    }

    /// The trace to send as `traceparent`; by default a new random one per tunnel.
    pub fn traceparent(mut self, trace: TraceParent) -> Self {
        self.traceparent = Some(trace);
        self
    }

    /// The destination requested.
    pub fn authority(&self) -> SocketAddr {
        self.authority
    }

    fn to_http(&self, trace: TraceParent) -> Result<Request<()>, ConnectError> {
        let invalid = |reason: String| ConnectError::InvalidRequest { reason };
        let uri: Uri = self.authority.to_string().parse().map_err(|e| invalid(format!("authority: {e}")))?;
        let mut builder = Request::builder().method(Method::CONNECT).uri(uri).version(Version::HTTP_2);
        if let Some(value) = Forwarded::header_value(self.source, self.host.as_deref()) {
            let value = HeaderValue::try_from(value).map_err(|e| invalid(format!("forwarded: {e}")))?;
            builder = builder.header(FORWARDED, value);
        }
        if let Some(baggage) = &self.baggage {
            builder = builder.header(BAGGAGE, baggage.clone());
        }
        builder = builder.header(TRACEPARENT, trace.to_string());
        builder.body(()).map_err(|e| invalid(e.to_string()))
    }
}

/// An open tunnel: a byte stream to the destination through the HBONE connection.
///
/// Reading returns EOF after the server's END_STREAM; shutting down the write side sends ours (the
/// destination's upstream sees FIN) while reading continues. Dropping it before both sides are
/// done resets the stream.
pub struct Tunnel {
    stream: H2Stream,
    lease: Lease,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel").field("connection", &self.lease.conn).finish()
    }
}

impl Tunnel {
    /// The identity the server authenticated as.
    pub fn peer_identity(&self) -> &Identity {
        &self.lease.conn.peer.identity
    }

    /// The pooled connection carrying this tunnel (ids are unique within a pool).
    pub fn connection_id(&self) -> u64 {
        self.lease.conn.id
    }

    /// Relays between this tunnel and `local` (the application's connection) until both
    /// directions are done, with half-close in both directions. `sent` counts bytes from `local`
    /// into the tunnel, `received` bytes from the tunnel to `local`; `progress` has them while
    /// the relay runs.
    pub async fn relay(self, local: TcpStream, progress: &Progress) -> Result<TransferStats, TransferError> {
        let Tunnel { stream, lease } = self;
        let (reader, writer) = local.into_split();
        let result = relay(stream, reader, writer, progress).await;
        drop(lease);
        result
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Connections and tunnels, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections.
    pub connections: usize,
    /// Tunnels open (or being opened) on them.
    pub streams: usize,
}

/// The outcome of one connection attempt, shared with the callers waiting for it.
type DialOutcome = Option<Result<(), ConnectError>>;

#[derive(Default)]
struct Slot {
    conns: Vec<Arc<Conn>>,
    /// The connection attempt under way, if any.
    dialing: Option<watch::Receiver<DialOutcome>>,
}

type Slots = HashMap<Key, Slot>;

fn lock(slots: &Mutex<Slots>) -> MutexGuard<'_, Slots> {
    slots.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes `conn` from `key`'s slot, and the slot when it is empty.
fn remove(slots: &mut Slots, key: &Key, conn: &Arc<Conn>) {
    if let Some(slot) = slots.get_mut(key) {
        slot.conns.retain(|c| !Arc::ptr_eq(c, conn));
        if slot.conns.is_empty() && slot.dialing.is_none() {
            slots.remove(key);
        }
    }
}

/// The pool's side of a connection driver.
struct SlotRegistry {
    slots: Weak<Mutex<Slots>>,
    key: Key,
}

impl Registry for SlotRegistry {
    fn retire_if_idle(&self, conn: &Arc<Conn>, idle_timeout: Duration) -> bool {
        let Some(slots) = self.slots.upgrade() else {
            return true;
        };
        let mut slots = lock(&slots);
        // Streams are reserved under this lock, so an idle connection stays idle until removed.
        if !conn.idle_for(idle_timeout) {
            return false;
        }
        conn.mark_closed();
        remove(&mut slots, &self.key, conn);
        true
    }

    fn forget(&self, conn: &Arc<Conn>) {
        if let Some(slots) = self.slots.upgrade() {
            remove(&mut lock(&slots), &self.key, conn);
        }
    }
}

struct Inner<C> {
    tls: C,
    options: PoolOptions,
    slots: Arc<Mutex<Slots>>,
    next_id: AtomicU64,
    /// Dropped with the pool: drivers then close their connections once idle.
    _alive: watch::Sender<()>,
    alive: watch::Receiver<()>,
}

/// A pool of HBONE connections. Cheap to clone; clones share connections.
pub struct Pool<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<C> fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("stats", &self.stats()).finish()
    }
}

/// Removes an abandoned connection attempt (its leader was cancelled) so another caller can lead.
struct DialGuard<'a> {
    slots: &'a Mutex<Slots>,
    key: &'a Key,
    flight: watch::Receiver<DialOutcome>,
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        let mut slots = lock(self.slots);
        if let Some(slot) = slots.get_mut(self.key)
            && slot.dialing.as_ref().is_some_and(|d| d.same_channel(&self.flight))
        {
            slot.dialing = None;
            if slot.conns.is_empty() {
                slots.remove(self.key);
            }
        }
    }
}

enum Checkout {
    Reserved(Lease),
    Lead(watch::Sender<DialOutcome>, watch::Receiver<DialOutcome>),
    Follow(watch::Receiver<DialOutcome>),
}

impl<C: ClientTls> Pool<C> {
    /// A pool taking client TLS configurations from `tls`.
    pub fn new(tls: C, options: PoolOptions) -> Self {
        let (alive_tx, alive_rx) = watch::channel(());
        Self {
            inner: Arc::new(Inner {
                tls,
                options,
                slots: Arc::new(Mutex::new(HashMap::new())),
                next_id: AtomicU64::new(1),
                _alive: alive_tx,
                alive: alive_rx,
            }),
        }
    }

    /// Opens a tunnel to `request`'s destination through `key.node`, on a pooled connection when
    /// one has room.
    pub async fn connect(&self, key: &Key, request: ConnectRequest) -> Result<Tunnel, ConnectError> {
        let trace = request.traceparent.unwrap_or_else(TraceParent::random);
        let span = debug_span!("hbone_out", node = %key.node, dst = %request.authority, trace = trace.trace_id());
        async {
            let mut attempt = 1;
            loop {
                let lease = self.lease(key).await?;
                match lease.open(request.to_http(trace)?).await {
                    Ok(stream) => {
                        debug!(connection = lease.conn.id, "tunnel open");
                        return Ok(Tunnel { stream, lease });
                    }
                    Err(OpenError::Refused(status)) => {
                        return Err(ConnectError::Refused { node: key.node, authority: request.authority, status });
                    }
                    Err(OpenError::Connection(e)) if attempt < MAX_ATTEMPTS => {
                        debug!(connection = lease.conn.id, error = %e, "pooled connection unusable; retrying");
                        lease.conn.mark_closed();
                        remove(&mut lock(&self.inner.slots), key, &lease.conn);
                        attempt += 1;
                    }
                    Err(OpenError::Connection(e) | OpenError::Stream(e)) => {
                        return Err(ConnectError::Http2 { node: key.node, source: Arc::new(e) });
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// A reserved stream slot on a connection of `key`, opening a connection if none has room.
    async fn lease(&self, key: &Key) -> Result<Lease, ConnectError> {
        loop {
            match self.checkout(key) {
                Checkout::Reserved(lease) => return Ok(lease),
                Checkout::Follow(mut flight) => {
                    // Wait for the attempt under way, then look again (its connection may be full
                    // by then). A cancelled leader closes the channel: look again too.
                    if let Ok(outcome) = flight.wait_for(Option::is_some).await
                        && let Some(Err(e)) = &*outcome
                    {
                        return Err(e.clone());
                    }
                }
                Checkout::Lead(done, flight) => {
                    let guard = DialGuard { slots: &self.inner.slots, key, flight };
                    let result = self.dial(key).await;
                    let mut slots = lock(&self.inner.slots);
                    let slot = slots.entry(key.clone()).or_default();
                    slot.dialing = None;
                    let lease = match &result {
                        Ok(conn) => {
                            slot.conns.push(conn.clone());
                            conn.try_reserve().then(|| Lease::new(conn.clone()))
                        }
                        Err(_) => {
                            if slot.conns.is_empty() {
                                slots.remove(key);
                            }
                            None
                        }
                    };
                    drop(slots);
                    drop(guard);
                    // Followers may all be gone; that is fine.
                    let _ = done.send(Some(result.as_ref().map(drop).map_err(Clone::clone)));
                    result?;
                    // Without a stream on the connection it just opened, looking again would only
                    // open another.
                    return lease.ok_or(ConnectError::NoStreams { node: key.node });
                }
            }
        }
    }

    fn checkout(&self, key: &Key) -> Checkout {
        let certificate = self.inner.tls.certificate(&key.source);
        let mut slots = lock(&self.inner.slots);
        let slot = slots.entry(key.clone()).or_default();
        slot.conns.retain(|c| {
            // Opened under a certificate the source no longer presents: no new tunnels. Its
            // driver closes it once the tunnels it carries have ended.
            if certificate.is_some() && c.certificate != certificate && !c.is_closed() {
                debug!(connection = c.id, key = %key, "source certificate replaced; retiring the connection");
                c.mark_closed();
            }
            // The server's certificate expired or was revoked since the handshake: the same.
            if !c.is_closed()
                && let Err(e) = self.inner.tls.recheck(&c.peer)
            {
                info!(connection = c.id, key = %key, error = %e, "server certificate lapsed; retiring the connection");
                c.mark_closed();
            }
            !c.is_closed()
        });
        if let Some(conn) = slot.conns.iter().find(|c| c.try_reserve()) {
            return Checkout::Reserved(Lease::new(conn.clone()));
        }
        if let Some(flight) = &slot.dialing {
            return Checkout::Follow(flight.clone());
        }
        let (done, flight) = watch::channel(None);
        slot.dialing = Some(flight.clone());
        Checkout::Lead(done, flight)
    }

    async fn dial(&self, key: &Key) -> Result<Arc<Conn>, ConnectError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let registry = Arc::new(SlotRegistry { slots: Arc::downgrade(&self.inner.slots), key: key.clone() });
        // The driver asks the pool's TLS source, while the pool lives.
        let inner = Arc::downgrade(&self.inner);
        let recheck: Recheck = Arc::new(move |peer| inner.upgrade().map_or(Ok(()), |i| i.tls.recheck(peer)));
        let result =
            dial(&self.inner.tls, key, &self.inner.options, id, registry, self.inner.alive.clone(), recheck).await;
        match &result {
            Ok(_) => debug!(id, key = %key, "opened HBONE connection"),
            Err(e) => debug!(key = %key, error = %e, "cannot open HBONE connection"),
        }
        result
    }
}

impl<C> Pool<C> {
    /// Connections and tunnels of one key.
    pub fn key_stats(&self, key: &Key) -> PoolStats {
        lock(&self.inner.slots).get(key).map(slot_stats).unwrap_or_default()
    }

    /// Connections and tunnels of the whole pool.
    pub fn stats(&self) -> PoolStats {
        lock(&self.inner.slots).values().map(slot_stats).fold(PoolStats::default(), |a, b| PoolStats {
            connections: a.connections + b.connections,
            streams: a.streams + b.streams,
        })
    }

    /// Statistics per key, sorted by key.
    pub fn stats_by_key(&self) -> Vec<(Key, PoolStats)> {
        let mut v: Vec<(Key, PoolStats)> =
            lock(&self.inner.slots).iter().map(|(k, s)| (k.clone(), slot_stats(s))).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

fn slot_stats(slot: &Slot) -> PoolStats {
    let open = slot.conns.iter().filter(|c| !c.is_closed());
    let (connections, streams) = open.fold((0, 0), |(n, s), c| (n + 1, s + c.active()));
    PoolStats { connections, streams }
}
