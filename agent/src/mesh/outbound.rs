//! The capture listener (15001): a meshed workload's `connect()` to a meshed destination was
//! redirected here by the kernel (`ebpf/src/capture.rs`), which filed the original destination
//! under the workload's (address, source port).
//!
//! The source identity needs no certificate here: the connection comes from the workload's own
//! veth, where the kernel drops forged source addresses, so its address names its workload. A
//! destination on another node is reached over HBONE, presenting the source workload's
//! certificate; one on this node is authorized and delivered directly.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use warden_authz::Verdict;
use warden_common::{OrigDst, SockAddr, names};
use warden_hbone::{ConnectRequest, Key, Pool, Progress, SecretManagerTls, copy::relay_plain};

use crate::services::ServiceRef;

use super::{
    deliver,
    local_hop::LocalCongestion,
    metrics::{ConnKey, LiveConnections, Reporter, Request, refused},
    view::{MeshWorkload, View, denial_names},
};
use crate::telemetry::metrics::TcpRecorder;

/// The kernel's record of captured connections (`warden_orig_dst_v1`).
pub struct OrigDstMap(Mutex<BpfHashMap<MapData, SockAddr, OrigDst>>);

impl OrigDstMap {
    pub fn open(pin_dir: &Path) -> anyhow::Result<OrigDstMap> {
        let path = pin_dir.join(names::ORIG_DST);
        let map = Map::from_map_data(MapData::from_pin(&path)?)?;
        Ok(OrigDstMap(Mutex::new(map.try_into()?)))
    }

    /// The original destination of the connection from `client`, taken out of the map.
    pub fn take(&self, client: SocketAddrV4) -> Option<OrigDst> {
        let key = SockAddr { addr: client.ip().octets(), port: client.port(), _pad: 0 };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig)
    }
}

/// Where a captured connection to `dst` goes: a workload's address as it is, or a Service's
/// address resolved to one of its meshed, serving pods, on the port that pod serves the Service
/// port on (with the Service, for metrics and the tunnel's `host`). `None`, logged, when `dst` is
/// a Service no such pod serves on that port.
fn resolve(
    view: &View,
    client: SocketAddrV4,
    dst: SocketAddrV4,
) -> Option<(SocketAddrV4, Option<Arc<MeshWorkload>>, Option<ServiceRef>)> {
    if let Some(w) = view.workload(*dst.ip()) {
        return Some((dst, Some(w.clone()).filter(|w| w.meshed), None));
    }
    match view.service_backend(*dst.ip(), dst.port()) {
        Some((service, pod, port)) => {
            let to = SocketAddrV4::new(pod.workload.ip, port);
            tracing::debug!(service = %service.key(), address = %dst, pod = %pod.workload.key(), %to, "service");
            Some((to, Some(pod), Some(service.reference(&view.cluster_domain))))
        }
        None => match view.services.get(dst.ip()) {
            Some(s) if s.service.node_local => {
                tracing::warn!(%client, service = %s.service.key(), destination = %dst, "no meshed pod of the service on this node serves this port (internalTrafficPolicy: Local); refused");
                None
            }
            Some(s) => {
                tracing::warn!(%client, service = %s.service.key(), destination = %dst, "no meshed pod of the service serves this port; refused");
                None
            }
            None => Some((dst, None, None)),
        },
    }
}

pub struct Outbound {
    pub view: watch::Receiver<Arc<View>>,
    pub metrics: TcpRecorder,
    /// The source side of every captured connection.
    pub captures: LiveConnections,
    /// The destination side of same-node deliveries.
    pub deliveries: LiveConnections,
    pub orig: OrigDstMap,
    pub pool: Pool<SecretManagerTls>,
    pub hbone_port: u16,
    /// For same-node deliveries.
    pub local_congestion: LocalCongestion,
    /// The capture listener: its address is the source of a workload's delivery to itself.
    pub capture: SocketAddrV4,
}

impl Outbound {
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, SocketAddr::V4(client))) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.handle(stream, client).await });
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("capture listener: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, mut stream: TcpStream, client: SocketAddrV4) {
        let _ = stream.set_nodelay(true);
        let Some(orig) = self.orig.take(client) else {
            tracing::warn!(%client, "captured connection without an original destination; refused");
            return;
        };
        let dst = SocketAddrV4::new(orig.dst.addr.into(), orig.dst.port);
        // One snapshot for the whole connection.
        let view = self.view.borrow().clone();
        let source = view.workload(*client.ip()).filter(|w| w.is_local() && w.meshed).cloned();
        let Some((dst, target, addressed)) = resolve(&view, client, dst) else { return };
        let key = ConnKey { client: Some(SocketAddr::V4(client)), destination: SocketAddr::V4(dst) };
        let (Some(source), Some(target)) = (source, target) else {
            tracing::warn!(%client, destination = %dst, "captured connection between workloads the mesh does not serve; refused");
            return;
        };
        // What the metrics count it against: the Service addressed, or the destination's guess (as
        // the destination side makes it, from the `host` this side sends).
        let service =
            addressed.clone().or_else(|| ServiceRef::for_destination(&target.workload, None, &view.cluster_domain));
        if target.is_local() {
            // Same node: no wire to protect; authorize with the source's identity and deliver.
            let decision = view.authorize(&source.identity, *client.ip(), &target, dst.port());
            if decision.decision == Verdict::Deny {
                let (policy, reason) = denial_names(&decision);
                for reporter in [Reporter::Source, Reporter::Destination] {
                    refused(&self.metrics, reporter, &source, &target, service.as_ref(), &policy, reason);
                }
                tracing::info!(source = %source.identity, destination = %dst, %policy, "connection denied");
                let _ = stream.shutdown().await;
                return;
            }
            // A workload that reached itself through a Service: delivered from the capture address.
            let delivered = if target.workload.ip == *client.ip() {
                Box::pin(deliver::connect_hairpin(*self.capture.ip(), dst, self.local_congestion)).await
            } else {
                Box::pin(deliver::connect(*client.ip(), dst, self.local_congestion)).await
            };
            match delivered {
                Ok(upstream) => {
                    // Both sides count the one relay: the client's side is its `a` (sent: the
                    // request).
                    let progress = Arc::new(Progress::default());
                    let ends = (&*source, &*target);
                    self.captures.opened(key, ends, service.as_ref(), progress.clone(), Request::Sent);
                    self.deliveries.opened(key, ends, service.as_ref(), progress.clone(), Request::Sent);
                    // Chunks of up to 256 KiB as over HBONE (tokio's 8 KiB copy buffers cost a system
                    // call pair per 8 KiB), allocated only while data flows.
                    // A failed relay reports no totals: it closes with the bytes counted so far.
                    let (request, response) = match relay_plain(stream, upstream, &progress).await {
                        Ok(totals) => totals,
                        Err(_) => Request::Sent.totals(&progress),
                    };
                    self.captures.closed(&key, request, response);
                    self.deliveries.closed(&key, request, response);
                }
                Err(e) => tracing::info!(destination = %dst, "delivery failed: {e}"),
            }
            return;
        }
        let node = SocketAddr::V4(SocketAddrV4::new(*dst.ip(), self.hbone_port));
        let pool_key = Key::new(source.identity.clone(), node, vec![target.identity.clone()]);
        let mut request = ConnectRequest::new(SocketAddr::V4(dst)).forwarded_for(SocketAddr::V4(client));
        if let Some(s) = &addressed {
            request = request.service_host(s.hostname());
        }
        // Boxed: dialling a new HBONE connection (TCP, TLS, HTTP/2 handshakes) is a large future,
        // and inline it would stay part of this task for the connection's whole life.
        match Box::pin(self.pool.connect(&pool_key, request)).await {
            Ok(tunnel) => {
                let progress = Arc::new(Progress::default());
                self.captures.opened(key, (&source, &target), service.as_ref(), progress.clone(), Request::Sent);
                let stats = tunnel.relay(stream, &progress).await.unwrap_or_else(|e| {
                    tracing::debug!(destination = %dst, "tunnel ended with an error: {e}");
                    e.stats
                });
                // What the tunnel sent is the request.
                self.captures.closed(&key, stats.sent, stats.received);
            }
            Err(e) => {
                if e.is_denied() {
                    refused(
                        &self.metrics,
                        Reporter::Source,
                        &source,
                        &target,
                        service.as_ref(),
                        "remote",
                        "policy_deny",
                    );
                }
                tracing::info!(source = %source.identity, destination = %dst, "tunnel refused: {e}");
            }
        }
    }
}
