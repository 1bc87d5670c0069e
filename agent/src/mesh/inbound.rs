//! The HBONE server (15008): a connection arrives over mutual TLS from a peer node's agent (or
//! any HBONE client), carrying one CONNECT stream per tunneled connection.
//!
//! For each stream: the destination must be a meshed workload on this node; the claimed source
//! address (`forwarded`) must belong to a workload whose identity is the one the client's
//! certificate proves (a workload forging another's address gains nothing); the policy engine
//! decides with that identity; an allowed stream is delivered to the workload (`deliver`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{net::TcpStream, sync::watch};
use warden_authz::Verdict;
use warden_hbone::{
    BoxError, Inbound, InboundRequest, Progress, Refusal, SecretManagerTls, ServerTls, TransferError, TransferStats,
};

use crate::services::ServiceRef;

use super::{
    deliver,
    local_hop::LocalCongestion,
    metrics::{ConnKey, LiveConnections, Reporter, Request, refused},
    view::{View, denial_names},
};
use crate::telemetry::metrics::TcpRecorder;

/// The server side's certificate: the destination workload's, chosen by the address the client
/// dialled (the workload's own: HBONE clients dial the destination pod's address).
pub struct WorkloadTls {
    pub tls: SecretManagerTls,
    pub view: watch::Receiver<Arc<View>>,
}

impl ServerTls for WorkloadTls {
    async fn config(&self, local: SocketAddr) -> Result<Arc<rustls::ServerConfig>, BoxError> {
        let IpAddr::V4(ip) = local.ip() else {
            return Err(format!("{local}: IPv6 is not served").into());
        };
        let identity = {
            let view = self.view.borrow();
            match view.workload(ip) {
                Some(w) if w.is_local() && w.meshed => w.identity.clone(),
                _ => return Err(format!("{ip} is not a meshed workload on this node").into()),
            }
        };
        self.tls.server_config(&identity).await
    }

    fn recheck(&self, peer: &warden_hbone::Peer) -> Result<(), warden_identity::tls::VerifyError> {
        self.tls.recheck(peer)
    }
}

/// Authorizes and delivers tunneled connections.
pub struct Handler {
    pub view: watch::Receiver<Arc<View>>,
    pub metrics: TcpRecorder,
    /// The destination side of the deliveries, named after the proven source workload.
    pub deliveries: LiveConnections,
    /// The agent's own ports, never a tunnel's destination (ztunnel refuses them too).
    pub reserved_ports: Vec<u16>,
    pub local_congestion: LocalCongestion,
}

impl Inbound for Handler {
    async fn open(&self, req: &InboundRequest, progress: Arc<Progress>) -> Result<TcpStream, Refusal> {
        // One snapshot for the whole request (an owned `Arc`: nothing is borrowed across awaits).
        let view = self.view.borrow().clone();
        let SocketAddr::V4(dst) = req.destination else {
            return Err(Refusal::bad_request("IPv6 destinations are not served"));
        };
        if self.reserved_ports.contains(&dst.port()) {
            return Err(Refusal::bad_request(format!("{dst}: a port of the node agent")));
        }
        let Some(target) = view.workload(*dst.ip()).filter(|w| w.is_local() && w.meshed) else {
            return Err(Refusal::bad_request(format!("{}: not a meshed workload on this node", dst.ip())));
        };
        // ztunnel's rule: the tunnel's authority is the address the client dialled.
        if req.connection.local.ip() != req.destination.ip() {
            return Err(Refusal::bad_request(format!(
                "authority {} differs from the dialled address {}",
                req.destination, req.connection.local
            )));
        }
        let peer = req.peer_identity();
        let Some(IpAddr::V4(source_ip)) = req.forwarded.for_ip else {
            return Err(Refusal::bad_request("no source address (`forwarded: for=`)"));
        };
        // The claimed source must be a workload of the proven identity.
        let Some(source) = view.workload(source_ip).filter(|src| &src.identity == peer) else {
            tracing::warn!(%peer, %source_ip, destination = %dst, "refused: the source address is not a workload of the peer's identity");
            return Err(Refusal::denied("source address does not belong to the peer identity"));
        };
        let decision = view.authorize(peer, source_ip, target, dst.port());
        let workload = target.workload.key();
        let service =
            ServiceRef::for_destination(&target.workload, req.forwarded.host.as_deref(), &view.cluster_domain);
        if decision.decision == Verdict::Deny {
            let (policy, reason) = denial_names(&decision);
            refused(&self.metrics, Reporter::Destination, source, target, service.as_ref(), &policy, reason);
            tracing::info!(%peer, source = %source_ip, destination = %dst, %workload, %policy, "mTLS connection denied");
            return Err(Refusal::denied(policy));
        }
        let upstream = deliver::connect(source_ip, dst, self.local_congestion)
            .await
            .map_err(|e| Refusal::unreachable(e.to_string()))?;
        // Through the tunnel to the workload is the request.
        self.deliveries.opened(delivery_key(req), (source, target), service.as_ref(), progress, Request::Received);
        let policy = decision.policy.as_deref().unwrap_or("default");
        tracing::debug!(%peer, source = %source_ip, destination = %dst, %workload, %policy, "mTLS connection allowed");
        Ok(upstream)
    }

    fn closed(&self, req: &InboundRequest, result: &Result<TransferStats, TransferError>) {
        let stats = result.as_ref().map_or_else(|e| e.stats, |s| *s);
        // Through the tunnel to the workload is the request.
        self.deliveries.closed(&delivery_key(req), stats.received, stats.sent);
        match result {
            Ok(s) => {
                tracing::debug!(destination = %req.destination, sent = s.sent, received = s.received, "tunnel closed")
            }
            Err(e) => tracing::debug!(destination = %req.destination, "tunnel failed: {e}"),
        }
    }
}

/// The delivery of a tunnel: its original client, its destination.
fn delivery_key(req: &InboundRequest) -> ConnKey {
    ConnKey { client: req.forwarded.for_addr(), destination: req.destination }
}
