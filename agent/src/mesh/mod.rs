//! The mTLS data plane: capture, HBONE tunnels between node agents, authorization with the peer's
//! proven identity, and delivery to the workload tagged for the kernel.
//!
//! | module      | concern                                                                |
//! |-------------|------------------------------------------------------------------------|
//! | `routing`   | the node's policy-routing rules that hand HBONE and tunnel replies to the agent |
//! | `outbound`  | the capture listener (15001): original destination, HBONE to the peer   |
//! | `inbound`   | the HBONE server (15008): authorize, deliver to the workload            |
//! | `deliver`   | the last hop: a transparent, marked socket to the local workload        |
//! | `local_hop` | the congestion control of the hops to workloads of this node            |
//! | `view`      | the snapshot of workloads and policies a connection is handled against  |
//! | `metrics`   | Istio's TCP metrics for the connections the agent carries               |

mod deliver;
mod inbound;
pub mod local_hop;
mod metrics;
mod outbound;
pub mod routing;
pub mod view;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
};

use tokio::{net::TcpListener, sync::watch};
use warden_hbone::{HboneServer, Pool, PoolOptions, SecretManagerTls, ServerOptions};
use warden_identity::tls::CompliancePolicy;

pub use view::View;

/// Where the mesh listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// The outbound capture listener: an address every workload reaches on the node (the
    /// gateway on its host veth), port 15001 as ztunnel's.
    pub capture: SocketAddrV4,
    /// The HBONE port (15008).
    pub hbone_port: u16,
    /// The same-node fast path (`ebpf/src/fastpath.rs`): sockets of a same-node hop exchange bytes
    /// through their receive queues instead of TCP/IP and the veth.
    pub fast_path: bool,
    /// The cgroup v2 hierarchy holding the agent's own cgroup (the fast path files the agent's
    /// sockets from there).
    pub cgroup_root: std::path::PathBuf,
    /// The congestion control of the agent's sockets to workloads of this node.
    pub local_congestion: local_hop::LocalCongestion,
    /// The cluster's DNS domain: Services' hostnames (`destination_service`, an HBONE request's
    /// `forwarded: host=`) end in it.
    pub cluster_domain: crate::services::ClusterDomain,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            capture: SocketAddrV4::new(Ipv4Addr::new(169, 254, 1, 1), 15001),
            hbone_port: 15008,
            fast_path: false,
            cgroup_root: crate::source::kube::node::default_cgroup_root(),
            local_congestion: local_hop::LocalCongestion::default(),
            cluster_domain: crate::services::ClusterDomain::default(),
        }
    }
}

impl MeshConfig {
    /// What the kernel must accept of this configuration, checked before the agent touches it.
    pub fn check(&self) -> anyhow::Result<()> {
        self.local_congestion.check()
    }
}

/// Ports of the node agent that are never a tunnel's destination (ztunnel's: outbound, inbound
/// plaintext, HBONE, admin, metrics, readiness).
const AGENT_PORTS: [u16; 3] = [15000, 15020, 15021];

/// How often the agent checks the node's routing for the mesh (its rules, tables and capture
/// address: a few netlink dumps) and puts back what was changed under it, besides the pods' routes
/// at every commit.
pub const ROUTING_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// The running mesh. Dropping it does not stop the listeners (they live as long as the agent).
pub struct Mesh {
    view: watch::Sender<Arc<View>>,
    hbone_port: u16,
    capture: Ipv4Addr,
    routing: routing::Metrics,
}

impl Mesh {
    /// Install the node's routing, start the HBONE server and the capture listener.
    pub async fn start(
        cfg: &MeshConfig,
        certs: &crate::certs::WorkloadCerts,
        pin_dir: &Path,
        view: View,
        metrics: crate::telemetry::metrics::TcpRecorder,
        routing_metrics: routing::Metrics,
    ) -> anyhow::Result<Mesh> {
        routing::install(cfg.hbone_port, *cfg.capture.ip(), &view.local_meshed())?;
        let (tx, rx) = watch::channel(Arc::new(view));
        let tls = SecretManagerTls::new(certs.secrets().clone(), CompliancePolicy::from_env()?);

        let mut reserved = vec![cfg.capture.port(), 15006, cfg.hbone_port];
        reserved.extend(AGENT_PORTS);
        let listener = hbone_listener(cfg.hbone_port)?;
        let deliveries = metrics::LiveConnections::new(&metrics, metrics::End::Delivered);
        let captures = metrics::LiveConnections::new(&metrics, metrics::End::Captured);
        let server = HboneServer::new(
            listener,
            inbound::WorkloadTls { tls: tls.clone(), view: rx.clone() },
            inbound::Handler {
                view: rx.clone(),
                metrics: metrics.clone(),
                deliveries: deliveries.clone(),
                reserved_ports: reserved,
                local_congestion: cfg.local_congestion,
            },
            ServerOptions::default(),
        );
        tokio::spawn(server.run());

        let outbound = Arc::new(outbound::Outbound {
            view: rx,
            metrics,
            captures,
            deliveries,
            orig: outbound::OrigDstMap::open(pin_dir)?,
            pool: Pool::new(tls, PoolOptions::default()),
            hbone_port: cfg.hbone_port,
            local_congestion: cfg.local_congestion,
            capture: cfg.capture,
        });
        tokio::spawn(outbound.run(capture_listener(cfg.capture, cfg.local_congestion)?));
        tracing::info!(capture = %cfg.capture, hbone = cfg.hbone_port, "mesh: capturing and serving HBONE");
        Ok(Mesh { view: tx, hbone_port: cfg.hbone_port, capture: *cfg.capture.ip(), routing: routing_metrics })
    }

    /// Serve the next snapshot, and take HBONE for the node's meshed pods as it has them. A
    /// routing change that fails is logged, and made good by the next check (the routes are read
    /// back from the kernel each time).
    pub async fn update(&self, view: View) {
        let pods = view.local_meshed();
        self.view.send_replace(Arc::new(view));
        match self.routing_change(move || routing::serve(&pods)).await {
            Some(0) | None => {}
            Some(changed) => tracing::info!(changed, "mesh: HBONE routes follow the node's meshed pods"),
        }
    }

    /// Put the node's routing for the mesh back as the snapshot being served needs it, should
    /// anything else have changed it (the agent calls this every [`ROUTING_RECHECK`]).
    pub async fn recheck_routing(&self) {
        let (port, capture, pods) = (self.hbone_port, self.capture, self.view.borrow().local_meshed());
        match self.routing_change(move || routing::install(port, capture, &pods)).await {
            Some(0) | None => {}
            Some(changed) => {
                self.routing.restored(changed);
                tracing::warn!(changed, "mesh: the node's routing had been changed under the agent; restored")
            }
        }
    }

    /// Run a routing change off the runtime; a failure is counted and logged (the next check, at
    /// most [`ROUTING_RECHECK`] away, tries again). How many rules, routes and addresses changed.
    async fn routing_change(
        &self,
        change: impl FnOnce() -> Result<usize, routing::RoutingError> + Send + 'static,
    ) -> Option<usize> {
        let failed = match tokio::task::spawn_blocking(change).await {
            Ok(Ok(changed)) => return Some(changed),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        self.routing.failed();
        tracing::error!("mesh: the node's routing not made good (retried within {ROUTING_RECHECK:?}): {failed}");
        None
    }
}

/// The HBONE listener on `0.0.0.0`. `IP_TRANSPARENT`: it accepts connections to the addresses of
/// the pods it serves (routed here by `routing`), and its replies leave from those addresses,
/// which are not the node's own.
fn hbone_listener(port: u16) -> std::io::Result<TcpListener> {
    listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), |s| s.set_ip_transparent_v4(true))
}

/// The capture listener. `IP_FREEBIND`: the gateway address exists only once a workload's veth
/// carries it, and the agent may start first. The connections it accepts inherit its congestion
/// control.
fn capture_listener(addr: SocketAddrV4, congestion: local_hop::LocalCongestion) -> std::io::Result<TcpListener> {
    listener(addr, |s| {
        s.set_freebind_v4(true)?;
        congestion.apply(s)
    })
}

/// A non-blocking listener on `addr`, with `option` set before the bind.
fn listener(
    addr: SocketAddrV4,
    option: impl FnOnce(&socket2::Socket) -> std::io::Result<()>,
) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    option(&socket)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(addr).into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
