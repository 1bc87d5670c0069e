//! What the mesh knows of the cluster: every workload by address, the Services in front of them,
//! and the policies. Replaced as a whole at every commit, so a connection is handled against one
//! consistent snapshot.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use warden_authz::{Decision, Destination, Peer, PolicySet, Request};
use warden_identity::Identity;

use crate::{
    services::{ClusterDomain, Service},
    workloads::Workload,
};

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

/// A Service as the mesh sees it: its meshed, serving pods, taken in turn.
#[derive(Debug)]
pub struct MeshService {
    pub service: Service,
    pub backends: Vec<Arc<MeshWorkload>>,
    next: AtomicUsize,
}

/// One snapshot.
#[derive(Debug)]
pub struct View {
    pub by_ip: HashMap<Ipv4Addr, Arc<MeshWorkload>>,
    /// Services by virtual address.
    pub services: HashMap<Ipv4Addr, MeshService>,
    pub policies: Arc<PolicySet>,
    /// Services' hostnames end in it (`ServiceRef::hostname`).
    pub cluster_domain: ClusterDomain,
}

impl View {
    /// The snapshot of `workloads` and `policies`. A workload whose identity cannot be formed
    /// (an invalid name) is left out: the mesh does not serve it, so nothing reaches it through
    /// the agent.
    pub fn new(
        workloads: &[Workload],
        services: &[Service],
        policies: Arc<PolicySet>,
        trust_domain: &str,
        cluster_domain: &ClusterDomain,
    ) -> View {
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
        let workloads_of = crate::services::by_namespace(by_ip.values(), |w| w.workload.namespace.as_str());
        let services = services
            .iter()
            .map(|s| {
                // The pods the kernel captures the Service for (`Service::mesh_backend`): the
                // snapshot is rebuilt when a pod's readiness changes.
                let pods = workloads_of.get(s.namespace.as_str()).map_or(&[][..], Vec::as_slice);
                let mut backends: Vec<Arc<MeshWorkload>> =
                    pods.iter().copied().filter(|w| w.meshed && s.mesh_backend(&w.workload)).cloned().collect();
                backends.sort_by_key(|w| w.workload.ip);
                (s.cluster_ip, MeshService { service: s.clone(), backends, next: AtomicUsize::new(0) })
            })
            .collect();
        View { by_ip, services, policies, cluster_domain: cluster_domain.clone() }
    }

    /// The addresses of this node's meshed workloads: what HBONE is delivered for here.
    pub fn local_meshed(&self) -> BTreeSet<Ipv4Addr> {
        self.by_ip.values().filter(|w| w.meshed && w.is_local()).map(|w| w.workload.ip).collect()
    }

    pub fn workload(&self, ip: Ipv4Addr) -> Option<&Arc<MeshWorkload>> {
        self.by_ip.get(&ip)
    }

    /// For a connection to Service address `vip` on `port`: the next of its meshed, ready pods
    /// that serves that port, and the port it serves it on. Pods out of the mesh are not chosen
    /// (the agent reaches pods over HBONE only), nor pods not ready or terminating. `None` when
    /// the address is no Service's, or no such pod serves the port.
    pub fn service_backend(&self, vip: Ipv4Addr, port: u16) -> Option<(&Service, Arc<MeshWorkload>, u16)> {
        let s = self.services.get(&vip)?;
        let n = s.backends.len();
        let start = s.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| &s.backends[(start + i) % n]).find_map(|b| {
            let target = s.service.target_port(port, &b.workload)?;
            Some((&s.service, b.clone(), target))
        })
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        services::{ServicePort, TargetPort},
        workloads::test_pod,
    };

    /// [`test_pod`] off this node, with named container ports.
    fn pod(name: &str, ip: u8, meshed: bool, ready: bool, ports: &[(&str, u16)]) -> Workload {
        let mut w = test_pod(name, ip, meshed, ready, false);
        w.ports = ports.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        w
    }

    #[test]
    fn a_service_sends_to_its_meshed_ready_pods_in_turn_on_their_target_port() {
        let vip = Ipv4Addr::new(10, 96, 0, 1);
        let service = Service {
            name: "ledger".into(),
            namespace: "ns".into(),
            cluster_ip: vip,
            ports: vec![
                ServicePort { port: 80, target: TargetPort::Number(8080) },
                ServicePort { port: 443, target: TargetPort::Name("https".into()) },
            ],
            selector: BTreeMap::from([("app".to_string(), "ledger".to_string())]),
            node_local: false,
        };
        let workloads = [
            pod("a", 1, true, true, &[("https", 8443)]),
            pod("b", 2, true, true, &[]),
            pod("not-ready", 3, true, false, &[("https", 8443)]),
            pod("out-of-mesh", 4, false, true, &[("https", 8443)]),
        ];
        let view = View::new(
            &workloads,
            &[service],
            Arc::new(PolicySet::from_resources(Vec::new(), &Default::default()).unwrap()),
            "cluster.local",
            &ClusterDomain::default(),
        );
        let pick = |port| view.service_backend(vip, port).map(|(_, w, p)| (w.workload.name.clone(), p));
        let picks: Vec<_> = (0..4).map(|_| pick(80).unwrap()).collect();
        assert_eq!(picks, [("a".into(), 8080), ("b".into(), 8080), ("a".into(), 8080), ("b".into(), 8080)]);
        // Only a has a container port named https.
        assert_eq!((0..3).map(|_| pick(443)).collect::<Vec<_>>(), vec![Some(("a".into(), 8443)); 3]);
        assert_eq!(pick(81), None, "the Service has no port 81");
        assert!(view.service_backend(Ipv4Addr::new(10, 96, 0, 2), 80).is_none(), "no Service there");
    }

    /// `internalTrafficPolicy: Local`: only this node's pods, and none when it has none.
    #[test]
    fn a_node_local_service_sends_to_this_nodes_pods_only() {
        let (vip, other_vip) = (Ipv4Addr::new(10, 96, 0, 1), Ipv4Addr::new(10, 96, 0, 2));
        let service = |vip, app: &str| Service {
            name: app.into(),
            namespace: "ns".into(),
            cluster_ip: vip,
            ports: vec![ServicePort { port: 80, target: TargetPort::Number(8080) }],
            selector: BTreeMap::from([("app".to_string(), app.to_string())]),
            node_local: true,
        };
        let mut remote_only = pod("far", 3, true, true, &[]);
        remote_only.labels.insert("app".into(), "other".into());
        let workloads = [test_pod("near", 1, true, true, true), pod("remote", 2, true, true, &[]), remote_only];
        let view = View::new(
            &workloads,
            &[service(vip, "ledger"), service(other_vip, "other")],
            Arc::new(PolicySet::from_resources(Vec::new(), &Default::default()).unwrap()),
            "cluster.local",
            &ClusterDomain::default(),
        );
        let picks: Vec<_> =
            (0..3).map(|_| view.service_backend(vip, 80).map(|(_, w, _)| w.workload.name.clone())).collect();
        assert_eq!(picks, vec![Some("near".to_string()); 3], "the remote pod is never chosen");
        assert!(view.service_backend(other_vip, 80).is_none(), "no pod of `other` on this node: none at all");
    }

    /// HBONE is delivered on this node for its own meshed pods, ready or not, and for nothing else.
    #[test]
    fn hbone_is_taken_for_this_nodes_meshed_pods_only() {
        let workloads = [
            test_pod("here", 1, true, true, true),
            test_pod("starting", 2, true, false, true),
            test_pod("plain", 3, false, true, true),
            test_pod("elsewhere", 4, true, true, false),
        ];
        let view = View::new(
            &workloads,
            &[],
            Arc::new(PolicySet::from_resources(Vec::new(), &Default::default()).unwrap()),
            "cluster.local",
            &ClusterDomain::default(),
        );
        assert_eq!(view.local_meshed(), BTreeSet::from([Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]));
    }
}
