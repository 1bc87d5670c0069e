//! What the mesh knows of the cluster: every workload by address, and the policies. Replaced
//! as a whole at every commit, so a connection is handled against one consistent snapshot.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use warden_authz::{Decision, Destination, Peer, PolicySet, Request};
use warden_identity::Identity;

use crate::workloads::Workload;

/// A workload as the mesh sees it.
#[derive(Debug)]
pub struct MeshWorkload {
    pub workload: Workload,
    /// Its SPIFFE identity (namespace and service account).
    pub identity: Identity,
    pub meshed: bool,
}

impl MeshWorkload {
    pub fn is_local(&self) -> bool {
        self.workload.local.is_some()
    }
}

/// The `warden_policy_denials_total` policy and reason names of a deny decision.
pub fn denial_names(d: &Decision) -> (String, &'static str) {
    use warden_common::DropReason;
    match &d.policy {
        Some(p) => (p.clone(), DropReason::PolicyDeny.name()),
        None => ("default-deny".into(), DropReason::PolicyDefaultDeny.name()),
    }
}

/// One snapshot.
#[derive(Debug)]
pub struct View {
    pub by_ip: HashMap<Ipv4Addr, Arc<MeshWorkload>>,
    pub policies: Arc<PolicySet>,
}

impl View {
    /// The snapshot of `workloads` and `policies`. A workload whose identity cannot be formed
    /// (an invalid name) is left out: the mesh does not serve it, so nothing reaches it through
    /// the agent.
    pub fn new(workloads: &[Workload], policies: Arc<PolicySet>, trust_domain: &str) -> View {
        let mut by_ip = HashMap::with_capacity(workloads.len());
        for w in workloads {
            match Identity::spiffe(trust_domain, &w.namespace, &w.service_account) {
                Ok(identity) => {
                    let meshed = w.in_mesh();
                    by_ip.insert(w.ip, Arc::new(MeshWorkload { workload: w.clone(), identity, meshed }));
                }
                Err(e) => tracing::warn!(workload = %w.key(), "left out of the mesh: no SPIFFE identity: {e}"),
            }
        }
        View { by_ip, policies }
    }

    pub fn workload(&self, ip: Ipv4Addr) -> Option<&Arc<MeshWorkload>> {
        self.by_ip.get(&ip)
    }

    /// Authorize a TCP connection from the proven `source` identity at `source_ip` to local
    /// workload `dst` on `port` (the L4 policy engine; an mTLS peer is never refused by
    /// PeerAuthentication).
    pub fn authorize(&self, source: &Identity, source_ip: Ipv4Addr, dst: &MeshWorkload, port: u16) -> Decision {
        let w = &dst.workload;
        let req = Request {
            source: Peer { principal: Some(source.principal()), namespace: None, ip: Some(source_ip) },
            destination: Destination {
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                service_account: Some(w.service_account.clone()),
                ip: Some(w.ip),
                port,
                services: w.services.clone(),
            },
            ..Request::default()
        };
        self.policies.evaluate(&req)
    }
}
