//! Istio's TCP metrics for the connections the agent carries, both sides, named with the
//! workloads the agent knows and counted live ([`LiveConnections`]): the source side of captured
//! connections (the kernel sees only their hop to the agent), the destination side of the
//! connections it delivers, and refusals the agent decides. The kernel, which counts a delivery by the identity of its
//! source address, cannot name a source workload: identities are per service account, and a
//! remote workload is not in this node's record. Bytes are TCP payload, as Istio counts them.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use super::view::MeshWorkload;
use crate::services::ServiceRef;
use crate::telemetry::metrics::{
    DenialLabels, FLAGS_DENY, FLAGS_NONE, SecurityPolicy, TcpLabels, TcpRecorder, TcpTotals,
};

/// Who reports a series (Istio's `reporter`).
#[derive(Clone, Copy)]
pub enum Reporter {
    Source,
    Destination,
}

/// The labels of a connection from `src` to `dst`, counted against `service` (the one the client
/// addressed, or the destination's guess: [`ServiceRef::for_destination`]).
pub fn labels(
    reporter: Reporter,
    src: &MeshWorkload,
    dst: &MeshWorkload,
    service: Option<&ServiceRef>,
    flags: &str,
) -> TcpLabels {
    let [destination_service, destination_service_name, destination_service_namespace] =
        TcpLabels::service_labels(service);
    TcpLabels {
        reporter: match reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
        .into(),
        source_workload: src.workload.name.clone(),
        source_workload_namespace: src.workload.namespace.clone(),
        source_principal: src.identity.to_string(),
        destination_workload: dst.workload.name.clone(),
        destination_workload_namespace: dst.workload.namespace.clone(),
        destination_principal: dst.identity.to_string(),
        destination_service,
        destination_service_name,
        destination_service_namespace,
        connection_security_policy: SecurityPolicy::MutualTls.label().into(),
        response_flags: flags.into(),
    }
}

/// A connection refused by `policy` for `reason` (a drop reason's name), attributed to the
/// destination workload.
pub fn refused(
    rec: &TcpRecorder,
    reporter: Reporter,
    src: &MeshWorkload,
    dst: &MeshWorkload,
    service: Option<&ServiceRef>,
    policy: &str,
    reason: &str,
) {
    let t = TcpTotals { opened: 1, closed: 1, received_bytes: 0, sent_bytes: 0 };
    rec.connection(&labels(reporter, src, dst, service, FLAGS_DENY), &t);
    if matches!(reporter, Reporter::Destination) {
        rec.denials(
            &DenialLabels {
                policy: policy.into(),
                workload: dst.workload.name.clone(),
                namespace: dst.workload.namespace.clone(),
                direction: "ingress".into(),
                reason: reason.into(),
            },
            1,
        );
    }
}

/// How long a connection whose socket is gone waits for its close to be reported (the tunnel's
/// client left before the response, the task was cancelled) before it is closed as it stands.
const GONE_GRACE: Duration = Duration::from_secs(60);
/// Connections registered between two sweeps of gone ones (bounds what a node nobody scrapes
/// holds).
const SWEEP_EVERY: u64 = 1024;

/// Which connection: the original client's address (as the tunnel's `forwarded` header or the
/// captured socket gives it) and the destination. Metrics only: a client that reuses one for two
/// streams gets them closed in order.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub client: Option<SocketAddr>,
    pub destination: SocketAddr,
}

/// Which of the agent's two sockets of a carried connection is read: it says which side reports
/// the connection and which of the socket's counters is the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The captured socket from the source workload, accepted on the capture port: the source
    /// side. Payload received from the workload is the request.
    Captured,
    /// The agent's socket to the destination workload (`deliver::connect`): the destination side.
    /// Payload the workload acknowledged is the request.
    Delivered,
}

impl End {
    fn reporter(self) -> Reporter {
        match self {
            End::Captured => Reporter::Source,
            End::Delivered => Reporter::Destination,
        }
    }

    /// `(request, response)` of a socket's payload counters.
    fn split(self, p: socket::Payload) -> (u64, u64) {
        match self {
            End::Captured => (p.received, p.acked),
            End::Delivered => (p.acked, p.received),
        }
    }

    fn opened(self) -> socket::Opened {
        match self {
            End::Captured => socket::Opened::Passive,
            End::Delivered => socket::Opened::Active,
        }
    }
}

/// One side of the connections the agent carries, counted live: Istio reports a connection's
/// bytes while it lasts. A connection is opened when it is registered; at each scrape the growth
/// of every open one is read from the agent's socket at that side's workload, from the socket's
/// own TCP counters (`TCP_INFO`; [`End`] says which is the request), with no cost on the data
/// path; at its close the relay's exact totals settle the remainder (bytes the same-node fast
/// path moved bypass TCP's counters, so they arrive then).
///
/// The relay owns the socket. A connection holds its descriptor number and the socket's cookie,
/// and reads it only while the number still names that socket (the cookie, read before and
/// after, is unique to a socket), so a closed and reused descriptor is never misread.
#[derive(Clone)]
pub struct LiveConnections {
    rec: TcpRecorder,
    end: End,
    open: Arc<Mutex<Open>>,
}

/// Open connections, in the order they were opened per key. Memory per open connection is what
/// `bench mtls`'s 1,000-connection figure weighs: a key almost always has one connection (a
/// one-element `Vec`, not a `VecDeque`'s four slots), and the connections between one pair of
/// workloads share one label set.
#[derive(Default)]
struct Open {
    by_key: HashMap<ConnKey, Vec<Live>>,
    /// Label sets in use, shared; one is dropped when the sweep finds no connection holds it.
    labels: HashSet<Arc<TcpLabels>>,
    registered: u64,
}

impl Open {
    /// The shared copy of `labels`.
    fn intern(&mut self, labels: TcpLabels) -> Arc<TcpLabels> {
        if let Some(shared) = self.labels.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        self.labels.insert(shared.clone());
        shared
    }

    /// Give back the table's room once it is mostly empty: a burst of 1,000 connections would
    /// otherwise keep 180 KiB of buckets for the agent's life, and pin heap pages with them.
    fn shrink(&mut self) {
        if self.by_key.capacity() > 64 && self.by_key.len() * 4 < self.by_key.capacity() {
            self.by_key.shrink_to(self.by_key.len() * 2);
        }
    }

    fn push(&mut self, key: ConnKey, c: Live) {
        self.by_key.entry(key).or_insert_with(|| Vec::with_capacity(1)).push(c);
    }
}

struct Live {
    labels: Arc<TcpLabels>,
    fd: RawFd,
    cookie: u64,
    /// Request and response bytes already in the series.
    request: u64,
    response: u64,
    /// When the socket was first found gone.
    gone: Option<Instant>,
}

impl LiveConnections {
    /// `end`'s side of the connections, counted into `rec`'s series, polled before each scrape.
    pub fn new(rec: &TcpRecorder, end: End) -> LiveConnections {
        let c = LiveConnections { rec: rec.clone(), end, open: Arc::default() };
        let poll = c.clone();
        rec.on_scrape(move || poll.poll());
        c
    }

    /// A connection from `src` to `dst` is open, and `socket` is the agent's socket at this
    /// side's workload: one connection opened now.
    pub fn opened(
        &self,
        key: ConnKey,
        src: &MeshWorkload,
        dst: &MeshWorkload,
        service: Option<&ServiceRef>,
        socket: &TcpStream,
    ) {
        let labels = labels(self.end.reporter(), src, dst, service, FLAGS_NONE);
        self.rec.connection(&labels, &TcpTotals { opened: 1, ..TcpTotals::default() });
        let fd = socket.as_raw_fd();
        let cookie = socket::cookie(fd);
        let mut open = self.lock();
        let labels = open.intern(labels);
        let Some(cookie) = cookie else {
            // Not a socket the kernel can name: counted at its close only.
            tracing::debug!(destination = %key.destination, end = ?self.end, "connection without a socket cookie; counted at close");
            open.push(key, Live::gone(labels));
            return;
        };
        open.push(key, Live { labels, fd, cookie, request: 0, response: 0, gone: None });
        open.registered += 1;
        if open.registered.is_multiple_of(SWEEP_EVERY) {
            self.sweep(&mut open);
        }
    }

    /// The connection of `key` is over: the relay moved `request` and `response` bytes in all.
    pub fn closed(&self, key: &ConnKey, request: u64, response: u64) {
        let c = {
            let mut open = self.lock();
            let Some(queue) = open.by_key.get_mut(key).filter(|q| !q.is_empty()) else { return };
            let c = queue.remove(0);
            if queue.is_empty() {
                open.by_key.remove(key);
                open.shrink();
            }
            c
        };
        let t = TcpTotals {
            opened: 0,
            closed: 1,
            received_bytes: request.saturating_sub(c.request),
            sent_bytes: response.saturating_sub(c.response),
        };
        self.rec.connection(&c.labels, &t);
    }

    /// Add every open connection's growth since the last poll to its series.
    pub fn poll(&self) {
        let mut open = self.lock();
        for c in open.by_key.values_mut().flatten() {
            c.poll(&self.rec, self.end);
        }
        self.sweep(&mut open);
    }

    /// Close the connections whose socket has been gone for [`GONE_GRACE`] without a close.
    fn sweep(&self, open: &mut Open) {
        let now = Instant::now();
        for queue in open.by_key.values_mut() {
            queue.retain_mut(|c| {
                if c.gone.is_none() && !c.alive() {
                    c.gone = Some(now);
                }
                let expired = c.gone.is_some_and(|t| now.duration_since(t) >= GONE_GRACE);
                if expired {
                    self.rec.connection(&c.labels, &TcpTotals { closed: 1, ..TcpTotals::default() });
                }
                !expired
            });
        }
        open.by_key.retain(|_, q| !q.is_empty());
        open.shrink();
        open.labels.retain(|labels| Arc::strong_count(labels) > 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Live {
    fn gone(labels: Arc<TcpLabels>) -> Live {
        Live { labels, fd: -1, cookie: 0, request: 0, response: 0, gone: Some(Instant::now()) }
    }

    fn alive(&self) -> bool {
        self.gone.is_none() && socket::cookie(self.fd) == Some(self.cookie)
    }

    /// Read the socket's counters (only while it is established: its SYN and FIN occupy a
    /// sequence number each, which TCP's byte counters include) and add the growth.
    fn poll(&mut self, rec: &TcpRecorder, end: End) {
        if self.gone.is_some() {
            return;
        }
        let Some(live) = socket::payload(self.fd, self.cookie, end.opened()) else {
            if !self.alive() {
                self.gone = Some(Instant::now());
            }
            return;
        };
        let (request, response) = end.split(live);
        let t = TcpTotals {
            opened: 0,
            closed: 0,
            received_bytes: request.saturating_sub(self.request),
            sent_bytes: response.saturating_sub(self.response),
        };
        self.request = self.request.max(request);
        self.response = self.response.max(response);
        rec.connection(&self.labels, &t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> TcpLabels {
        let s = |v: &str| v.to_string();
        TcpLabels {
            reporter: s("source"),
            source_workload: s("a"),
            source_workload_namespace: s("team"),
            source_principal: s("spiffe://cluster.local/ns/team/sa/a"),
            destination_workload: s("b"),
            destination_workload_namespace: s("team"),
            destination_principal: s("spiffe://cluster.local/ns/team/sa/b"),
            destination_service: s("b.team.svc.cluster.local"),
            destination_service_name: s("b"),
            destination_service_namespace: s("team"),
            connection_security_policy: s("mutual_tls"),
            response_flags: s(FLAGS_NONE),
        }
    }

    #[test]
    fn a_burst_of_connections_leaves_no_table_behind_and_each_close_is_counted_once() {
        let rec = TcpRecorder::default();
        let live = LiveConnections::new(&rec, End::Captured);
        let key = |i: u16| ConnKey {
            client: Some(SocketAddr::from(([10, 0, 0, 1], 1024 + i))),
            destination: SocketAddr::from(([10, 0, 0, 2], 80)),
        };
        {
            let mut open = live.lock();
            let shared = open.intern(labels());
            for i in 0..1000 {
                open.push(key(i), Live::gone(shared.clone()));
            }
            assert!(open.by_key.capacity() >= 1000);
        }
        for i in 0..1000 {
            live.closed(&key(i), 10, 20);
        }
        live.closed(&key(0), 10, 20);
        let open = live.lock();
        assert!(open.by_key.is_empty());
        assert!(open.by_key.capacity() <= 64, "the table kept room for {} connections", open.by_key.capacity());
        drop(open);
        assert_eq!(
            rec.closed_total(&labels()),
            1000,
            "each close once; a close of a key no longer open is not counted"
        );
    }
}

/// A TCP socket's own counters, read by descriptor.
mod socket {
    use std::os::fd::RawFd;

    /// `SO_COOKIE` (asm-generic/socket.h; not in the libc crate): a socket's unique 64-bit id.
    const SO_COOKIE: libc::c_int = 57;
    /// `TCP_ESTABLISHED` of `tcpi_state` (include/net/tcp_states.h; not in the libc crate).
    const TCP_ESTABLISHED: u8 = 1;

    /// The cookie of the socket `fd` names, if it names one.
    pub fn cookie(fd: RawFd) -> Option<u64> {
        if fd < 0 {
            return None;
        }
        let mut v: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a correctly sized output buffer; an invalid descriptor fails with EBADF.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_COOKIE, (&mut v as *mut u64).cast(), &mut len) };
        (rc == 0 && len as usize == std::mem::size_of::<u64>()).then_some(v)
    }

    /// How the socket's connection was opened: an active open's acknowledged bytes include its
    /// SYN, a passive open's do not (the child socket starts with its SYN-ACK acknowledged).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Opened {
        Active,
        Passive,
    }

    /// Payload bytes of an established connection.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Payload {
        /// Sent and acknowledged by the peer.
        pub acked: u64,
        /// Received in order from the peer.
        pub received: u64,
    }

    /// `TCP_INFO` of the socket `fd` names, if it is still the socket of `cookie` and
    /// established. Linux's `tcpi_bytes_acked` counts every acknowledged sequence number, so an
    /// active open's counts its SYN once; `tcpi_bytes_received` counts the data only.
    pub fn payload(fd: RawFd, cookie: u64, opened: Opened) -> Option<Payload> {
        if self::cookie(fd)? != cookie {
            return None;
        }
        // SAFETY: tcp_info is plain data; zero is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: a correctly sized output buffer.
        let rc = unsafe {
            libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
        };
        // Read the cookie again: the descriptor named the same socket all along (a socket, once
        // closed, never comes back under a number).
        if rc != 0 || self::cookie(fd)? != cookie || info.tcpi_state != TCP_ESTABLISHED {
            return None;
        }
        // The fields up to tcpi_bytes_received exist since Linux 4.1.
        let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + std::mem::size_of::<u64>();
        if (len as usize) < needed {
            return None;
        }
        let syn = match opened {
            Opened::Active => 1,
            Opened::Passive => 0,
        };
        Some(Payload { acked: info.tcpi_bytes_acked.saturating_sub(syn), received: info.tcpi_bytes_received })
    }

    #[cfg(test)]
    mod tests {
        use std::{
            io::{Read as _, Write as _},
            net::{TcpListener, TcpStream},
            os::fd::AsRawFd as _,
            time::{Duration, Instant},
        };

        use super::*;

        /// Poll `f` until it returns `want` (acknowledgements arrive asynchronously).
        fn settles(want: Payload, f: impl Fn() -> Option<Payload>) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while f() != Some(want) {
                assert!(Instant::now() < deadline, "{:?} never became {want:?}", f());
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        #[test]
        fn an_established_sockets_counters_are_its_payload_and_a_reused_descriptor_is_never_read() {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut server, _) = l.accept().unwrap();
            let fd = client.as_raw_fd();
            let c = cookie(fd).expect("a socket has a cookie");
            let (sfd, sc) = (server.as_raw_fd(), cookie(server.as_raw_fd()).unwrap());
            assert_ne!(sc, c, "cookies are per socket");
            // Established, nothing sent: neither end's SYN is payload.
            settles(Payload { acked: 0, received: 0 }, || payload(fd, c, Opened::Active));
            settles(Payload { acked: 0, received: 0 }, || payload(sfd, sc, Opened::Passive));
            client.write_all(&[7; 1000]).unwrap();
            let mut buf = [0; 1000];
            server.read_exact(&mut buf).unwrap();
            server.write_all(b"twelve bytes").unwrap();
            let mut back = [0; 12];
            client.read_exact(&mut back).unwrap();
            settles(Payload { acked: 1000, received: 12 }, || payload(fd, c, Opened::Active));
            settles(Payload { acked: 12, received: 1000 }, || payload(sfd, sc, Opened::Passive));
            // A wrong cookie is another socket: not read.
            assert_eq!(payload(fd, c ^ 1, Opened::Active), None);
            // Half-closed (FIN sent): no longer established, not read (the FIN is not payload).
            client.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(server.read(&mut buf).unwrap(), 0);
            assert_eq!(payload(fd, c, Opened::Active), None);
            assert_eq!(payload(sfd, sc, Opened::Passive), None, "the peer's FIN arrived: CLOSE_WAIT");
            // Closed, and the number (the lowest free one, unless another test's thread took it
            // first) reused by another established socket: never read as the old one.
            drop(client);
            let other = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let _accepted = l.accept().unwrap();
            if other.as_raw_fd() == fd {
                assert!(cookie(fd).is_some_and(|o| o != c), "the number names another socket now");
            }
            assert_eq!(payload(fd, c, Opened::Active), None);
        }
    }
}
