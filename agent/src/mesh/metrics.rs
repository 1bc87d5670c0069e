//! Istio's TCP metrics for the connections the agent carries, both sides, named with the
//! workloads the agent knows and counted live ([`LiveConnections`]): the source side of captured
//! connections (the kernel sees only their hop to the agent), the destination side of the
//! connections it delivers, and refusals the agent decides. The kernel, which counts a delivery by the identity of its
//! source address, cannot name a source workload: identities are per service account, and a
//! remote workload is not in this node's record. Bytes are TCP payload, as Istio counts them.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use warden_hbone::Progress;

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

/// How long a connection whose relay is gone waits for its close to be reported (the task was
/// cancelled) before it is closed as it stands.
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

/// Which side of a carried connection is counted: it says who reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The captured connection from the source workload: the source side.
    Captured,
    /// The delivery to the destination workload: the destination side.
    Delivered,
}

impl End {
    fn reporter(self) -> Reporter {
        match self {
            End::Captured => Reporter::Source,
            End::Delivered => Reporter::Destination,
        }
    }
}

/// Which of a relay's counts ([`Progress`]) is the request, from the source workload towards the
/// destination: `sent` when the source's side is the relay's local one (a captured connection),
/// `received` when the tunnel brings it (a delivery of an HBONE stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Sent,
    Received,
}

impl Request {
    /// `(request, response)` of a relay's counts so far.
    pub fn totals(self, p: &Progress) -> (u64, u64) {
        let s = p.stats();
        match self {
            Request::Sent => (s.sent, s.received),
            Request::Received => (s.received, s.sent),
        }
    }
}

/// One side of the connections the agent carries, counted live: Istio reports a connection's
/// bytes while it lasts. A connection is opened when it is registered; at each scrape the growth
/// of every open one is read from its relay's counts ([`Progress`]: one relaxed atomic add per
/// chunk on the data path); at its close the relay's totals settle the remainder. Bytes the
/// same-node fast path moves are counted as any others: the relay reads and writes them.
///
/// A connection shares its `Progress` with the relay; once the relay has let go of it without a
/// close (its task cancelled), the connection is closed as it stands after [`GONE_GRACE`].
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
    progress: Arc<Progress>,
    request_is: Request,
    /// Request and response bytes already in the series.
    request: u64,
    response: u64,
    /// When the relay was first found gone.
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

    /// A connection from `src` to `dst` is open, and its relay counts into `progress` (`request`
    /// says which count is the request): one connection opened now.
    pub fn opened(
        &self,
        key: ConnKey,
        (src, dst): (&MeshWorkload, &MeshWorkload),
        service: Option<&ServiceRef>,
        progress: Arc<Progress>,
        request: Request,
    ) {
        let labels = labels(self.end.reporter(), src, dst, service, FLAGS_NONE);
        self.rec.connection(&labels, &TcpTotals { opened: 1, ..TcpTotals::default() });
        let mut open = self.lock();
        let labels = open.intern(labels);
        open.push(key, Live::new(labels, progress, request));
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
            c.poll(&self.rec);
        }
        self.sweep(&mut open);
    }

    /// Close the connections whose relay has been gone for [`GONE_GRACE`] without a close.
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
    fn new(labels: Arc<TcpLabels>, progress: Arc<Progress>, request_is: Request) -> Live {
        Live { labels, progress, request_is, request: 0, response: 0, gone: None }
    }

    /// The relay still holds its counts.
    fn alive(&self) -> bool {
        self.gone.is_none() && Arc::strong_count(&self.progress) > 1
    }

    /// Add the relay's growth since the last poll.
    fn poll(&mut self, rec: &TcpRecorder) {
        if self.gone.is_some() {
            return;
        }
        if !self.alive() {
            self.gone = Some(Instant::now());
        }
        let (request, response) = self.request_is.totals(&self.progress);
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
                // Relays already gone: a Progress nobody else holds.
                open.push(key(i), Live::new(shared.clone(), Arc::default(), Request::Sent));
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

    /// A connection's bytes reach the series while it is open, from its relay's counts (the
    /// same-node fast path's bytes included: the relay moves them), and its close adds only what
    /// the last poll had not.
    #[tokio::test]
    async fn an_open_connections_bytes_are_counted_live_and_its_close_settles_the_rest() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (a, b) = tokio::join!(tokio::net::TcpStream::connect(l.local_addr().unwrap()), l.accept());
            (a.unwrap(), b.unwrap().0)
        }
        let rec = TcpRecorder::default();
        let live = LiveConnections::new(&rec, End::Captured);
        let key = ConnKey {
            client: Some(SocketAddr::from(([10, 0, 0, 1], 1024))),
            destination: SocketAddr::from(([10, 0, 0, 2], 80)),
        };
        let ((mut client, relay_a), (relay_b, mut server)) = (pair().await, pair().await);
        let progress = Arc::new(Progress::default());
        {
            let mut open = live.lock();
            let shared = open.intern(labels());
            open.push(key, Live::new(shared, progress.clone(), Request::Sent));
        }
        let counted = progress.clone();
        let relay = tokio::spawn(async move { warden_hbone::copy::relay_plain(relay_a, relay_b, &counted).await });

        client.write_all(&[7; 1000]).await.unwrap();
        server.read_exact(&mut [0; 1000]).await.unwrap();
        server.write_all(b"twelve bytes").await.unwrap();
        client.read_exact(&mut [0; 12]).await.unwrap();
        live.poll();
        assert_eq!(rec.bytes_total(&labels()), (1000, 12), "counted while open");
        live.poll();
        assert_eq!(rec.bytes_total(&labels()), (1000, 12), "a second poll adds nothing");

        client.write_all(&[8; 500]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        server.shutdown().await.unwrap();
        let (request, response) = relay.await.unwrap().unwrap();
        assert_eq!((request, response), (1500, 12));
        live.closed(&key, request, response);
        assert_eq!(rec.bytes_total(&labels()), (1500, 12), "the close adds what the polls had not");
        assert_eq!(rec.closed_total(&labels()), 1);
        live.poll();
        assert_eq!(rec.bytes_total(&labels()), (1500, 12), "a closed connection is no longer polled");
    }
}
