//! The cluster as the watchers last saw it, and how it becomes this node's workloads. Pure: the
//! node is reached only through a [`Locator`], so the rules are unit-tested without a cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::ResourceExt as _;

use super::node::Locator;
use crate::workloads::{Local, Workload};

/// The label that enrolls a namespace or a single pod (`ambient`) and opts a pod out (`none`), as
/// in Istio ambient (istio-cni's `PodRedirectionEnabled`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
/// The annotation Istio's injector puts on a pod it gave a sidecar. Such a pod does its own
/// mTLS: ambient leaves it alone even in an enrolled namespace, and so does warden.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// The objects of one watched kind. During a (re)list the new objects are buffered and replace
/// the old ones only when the list is complete, so a snapshot never sees half a list.
pub struct Store<K> {
    pub objects: BTreeMap<String, K>,
    relisting: Option<BTreeMap<String, K>>,
    /// The initial list since the last (re)start of the watch has completed.
    pub synced: bool,
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Store { objects: BTreeMap::new(), relisting: None, synced: false }
    }
}

/// What a watcher saw, without the object type's details.
pub enum Change<K> {
    /// A (re)list begins.
    Init,
    /// An object of the (re)list.
    InitApply(K),
    /// The (re)list is complete.
    InitDone,
    Apply(K),
    Delete(K),
}

fn key<K: kube::Resource>(o: &K) -> String {
    format!("{}/{}", o.meta().namespace.as_deref().unwrap_or(""), o.meta().name.as_deref().unwrap_or(""))
}

impl<K: kube::Resource> Store<K> {
    /// The visible version of `o` (same namespace/name).
    pub fn get(&self, o: &K) -> Option<&K> {
        self.objects.get(&key(o))
    }

    /// Apply one change. True when the visible objects changed.
    pub fn apply(&mut self, change: Change<K>) -> bool {
        match change {
            Change::Init => {
                self.relisting = Some(BTreeMap::new());
                self.synced = false;
                false
            }
            Change::InitApply(o) => {
                self.relisting.get_or_insert_default().insert(key(&o), o);
                false
            }
            Change::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Change::Apply(o) => {
                self.objects.insert(key(&o), o);
                true
            }
            Change::Delete(o) => self.objects.remove(&key(&o)).is_some(),
        }
    }
}

/// What the stores keep of an object: only the fields the agent reads, so memory follows the
/// cluster's pod count, not the size of its pod specs (a pod's managed fields and containers can
/// be many kilobytes).
pub trait Compact {
    fn compact(&mut self);
}

fn compact_meta(m: &mut kube::api::ObjectMeta) {
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
}

impl Compact for Pod {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
        // Of the annotations, only whether the pod has a sidecar (its value, a JSON summary of
        // the injection, is not read).
        let sidecar = self.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
        self.metadata.annotations = sidecar.then(|| [(SIDECAR_STATUS_ANNOTATION.to_string(), String::new())].into());
        if let Some(spec) = &self.spec {
            // Of the containers, only their named ports (Services' named target ports); a
            // container without one is not kept at all.
            let containers = spec
                .containers
                .iter()
                .filter_map(|c| {
                    let named: Vec<_> = c.ports.iter().flatten().filter(|p| p.name.is_some()).cloned().collect();
                    (!named.is_empty())
                        .then(|| k8s_openapi::api::core::v1::Container { ports: Some(named), ..Default::default() })
                })
                .collect();
            self.spec = Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: spec.node_name.clone(),
                host_network: spec.host_network,
                service_account_name: spec.service_account_name.clone(),
                containers,
                ..Default::default()
            });
        }
        if let Some(status) = &self.status {
            self.status = Some(k8s_openapi::api::core::v1::PodStatus {
                phase: status.phase.clone(),
                pod_ip: status.pod_ip.clone(),
                // Only readiness, for Services.
                conditions: status
                    .conditions
                    .as_ref()
                    .map(|cs| cs.iter().filter(|c| c.type_ == "Ready").cloned().collect()),
                ..Default::default()
            });
        }
    }
}

impl Compact for Namespace {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
        self.metadata.annotations = None;
        self.spec = None;
        self.status = None;
    }
}

impl Compact for Service {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
        self.metadata.annotations = None;
        if let Some(spec) = &self.spec {
            self.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
                selector: spec.selector.clone(),
                cluster_ip: spec.cluster_ip.clone(),
                cluster_ips: spec.cluster_ips.clone(),
                ports: spec.ports.clone(),
                internal_traffic_policy: spec.internal_traffic_policy.clone(),
                ..Default::default()
            });
        }
        self.status = None;
    }
}

/// Policies keep their annotations (`istio.io/dry-run` is one) and status (warden's own report).
impl Compact for kube::api::DynamicObject {
    fn compact(&mut self) {
        compact_meta(&mut self.metadata);
    }
}

/// Why a pod is not a workload (for debug logs and tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// Neither its namespace nor the pod is labelled `istio.io/dataplane-mode: ambient`.
    NotEnrolled,
    /// Labelled `istio.io/dataplane-mode: none`.
    OptedOut,
    /// It has an Istio sidecar ([`SIDECAR_STATUS_ANNOTATION`]).
    Sidecar,
    HostNetwork,
    NoAddress,
    Finished,
    NotIpv4(String),
}

/// Whether the pod is in the mesh by its labels, as istio-cni decides it for ambient: its
/// namespace (`namespace_enrolled`) or the pod itself labelled `ambient`, the pod not labelled
/// `none`, and no sidecar.
pub fn enrollment(pod: &Pod, namespace_enrolled: bool) -> Result<(), Skip> {
    match pod.labels().get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some(DATAPLANE_MODE_NONE) => return Err(Skip::OptedOut),
        Some(DATAPLANE_MODE_AMBIENT) => {}
        _ if namespace_enrolled => {}
        _ => return Err(Skip::NotEnrolled),
    }
    if pod.annotations().contains_key(SIDECAR_STATUS_ANNOTATION) {
        return Err(Skip::Sidecar);
    }
    Ok(())
}

/// The pod as a workload, or why not.
pub fn pod_workload(pod: &Pod, namespace_enrolled: bool, services: &[&Service]) -> Result<Workload, Skip> {
    enrollment(pod, namespace_enrolled)?;
    pod_record(pod, services)
}

/// The pod's address, identity, labels, Services, named ports and readiness, whether or not it
/// is in the mesh.
fn pod_record(pod: &Pod, services: &[&Service]) -> Result<Workload, Skip> {
    let labels = pod.labels();
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Err(Skip::HostNetwork);
    }
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return Err(Skip::Finished);
    }
    let ip = match status.and_then(|s| s.pod_ip.as_deref()) {
        None | Some("") => return Err(Skip::NoAddress),
        Some(ip) => ip.parse::<Ipv4Addr>().map_err(|_| Skip::NotIpv4(ip.to_string()))?,
    };
    let namespace = pod.namespace().unwrap_or_default();
    let service_account = spec
        .and_then(|s| s.service_account_name.clone().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "default".to_string());
    let labels: BTreeMap<String, String> = labels.clone();
    let mut selecting: Vec<String> = services
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|s| {
            let sel = s.spec.as_ref().and_then(|s| s.selector.as_ref());
            sel.is_some_and(|sel| crate::services::selector_matches(sel, &labels))
        })
        .map(|s| s.name_any())
        .collect();
    selecting.sort();
    // Named TCP container ports (Kubernetes' default protocol is TCP).
    let ports = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
        .collect();
    // As an EndpointSlice's `serving`: the Ready condition, and not terminating.
    let ready = pod.metadata.deletion_timestamp.is_none()
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Ok(Workload {
        name: pod.name_any(),
        namespace,
        service_account,
        labels,
        ip,
        services: selecting,
        ports,
        ready,
        local: None,
    })
}

/// The Service as the mesh carries it, or `None` for one it does not: headless (no cluster IP),
/// IPv6-only, without a selector (hand-made endpoints), or without a TCP port. A dual-stack
/// Service is carried by its IPv4 cluster IP, whichever family is primary. Its
/// `internalTrafficPolicy` is kept (Local: this node's pods only).
pub fn mesh_service(svc: &Service) -> Option<crate::services::Service> {
    use crate::services::{ServicePort, TargetPort};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec = svc.spec.as_ref()?;
    let cluster_ip =
        spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.as_ref()).find_map(|ip| ip.parse::<Ipv4Addr>().ok())?;
    let selector: BTreeMap<String, String> = spec.selector.clone().unwrap_or_default();
    if selector.is_empty() {
        return None;
    }
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
            };
            Some(ServicePort { port, target })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    // Kubernetes validates the field (Cluster or Local); anything but Local is the default.
    let node_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    Some(crate::services::Service {
        name: svc.name_any(),
        namespace: svc.namespace()?,
        cluster_ip,
        ports,
        selector,
        node_local,
    })
}

/// The workloads of the cluster as this node enforces them, and the local pods whose veth or
/// cgroup could not be found yet (retried while any remain).
pub struct NodeView {
    pub workloads: Vec<Workload>,
    /// The Services the mesh carries: those of namespaces with workloads (enrolled, or with a
    /// pod enrolled on its own).
    pub services: Vec<crate::services::Service>,
    /// Pods of those namespaces out of the mesh (opted out, with a sidecar, or not enrolled)
    /// that one of those Services selects: left alone, but given their share of meshed
    /// clients' connections to the Service. Each is labelled `istio.io/dataplane-mode: none`
    /// here (`Workload::in_mesh` reads the label).
    pub outside_mesh: Vec<Workload>,
    pub unresolved: Vec<String>,
}

/// Build this node's view: every enrolled pod ([`enrollment`]) is a workload (identity); pods in
/// `local` are also enforced here when their veth is found.
pub fn node_view(
    namespaces: &Store<Namespace>,
    local: &Store<Pod>,
    remote: &Store<Pod>,
    services: &Store<Service>,
    locator: &mut dyn Locator,
) -> NodeView {
    let enrolled: BTreeSet<String> = namespaces
        .objects
        .values()
        .filter(|n| n.labels().get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_AMBIENT))
        .map(|n| n.name_any())
        .collect();
    let namespace_enrolled = |pod: &Pod| pod.namespace().is_some_and(|n| enrolled.contains(&n));
    let all_pods = || local.objects.values().chain(remote.objects.values());
    // Namespaces with workloads: the enrolled ones, and those of pods enrolled on their own.
    let meshed: BTreeSet<String> = enrolled
        .iter()
        .cloned()
        .chain(all_pods().filter(|p| enrollment(p, namespace_enrolled(p)).is_ok()).filter_map(|p| p.namespace()))
        .collect();
    let services: Vec<&Service> =
        services.objects.values().filter(|s| s.namespace().is_some_and(|n| meshed.contains(&n))).collect();
    // Each pod is matched against its own namespace's Services only.
    let services_of = crate::services::by_namespace(services.iter().copied(), |s| {
        s.metadata.namespace.as_deref().unwrap_or_default()
    });
    let mut unresolved = Vec::new();
    let mut outside_mesh = Vec::new();
    locator.refresh();
    // Local pods first: when two pods claim one address (a pod being replaced), the local one wins.
    let mut by_ip: BTreeMap<Ipv4Addr, Workload> = BTreeMap::new();
    let pods = local.objects.values().map(|p| (p, true)).chain(remote.objects.values().map(|p| (p, false)));
    for (pod, is_local) in pods {
        if !pod.namespace().is_some_and(|n| meshed.contains(&n)) {
            continue;
        }
        let ns_services = pod.metadata.namespace.as_deref().and_then(|n| services_of.get(n));
        let ns_services = ns_services.map_or(&[][..], Vec::as_slice);
        let mut w = match pod_workload(pod, namespace_enrolled(pod), ns_services) {
            Ok(w) => w,
            Err(why @ (Skip::OptedOut | Skip::Sidecar | Skip::NotEnrolled)) => {
                // A Service's pod out of the mesh: on this node when its veth is (for a
                // node-local Service), never enforced.
                if let Some(mut w) = pod_record(pod, ns_services).ok().filter(|w| !w.services.is_empty()) {
                    if is_local && let Some((veth, ifindex)) = locator.veth(w.ip) {
                        w.local = Some(Local { veth, ifindex, cgroup: None });
                    }
                    // Out of the mesh as `Workload::in_mesh` sees it, whatever kept it out.
                    w.labels.insert(DATAPLANE_MODE_LABEL.to_string(), DATAPLANE_MODE_NONE.to_string());
                    tracing::trace!(pod = %w.key(), reason = ?why, "out of the mesh, behind a Service");
                    outside_mesh.push(w);
                }
                continue;
            }
            Err(_) => continue,
        };
        if let Some(existing) = by_ip.get(&w.ip) {
            tracing::debug!(pod = %w.key(), other = %existing.key(), ip = %w.ip, "address already claimed; skipping");
            continue;
        }
        if is_local {
            match locator.veth(w.ip) {
                Some((veth, ifindex)) => {
                    let cgroup = pod.metadata.uid.as_deref().and_then(|uid| locator.cgroup(uid));
                    if cgroup.is_none() {
                        unresolved.push(format!(
                            "{}: no cgroup for pod UID {}",
                            w.key(),
                            pod.metadata.uid.as_deref().unwrap_or("?")
                        ));
                    }
                    w.local = Some(Local { veth, ifindex, cgroup });
                }
                None => unresolved.push(format!("{}: no /32 route to {} on this node", w.key(), w.ip)),
            }
        }
        by_ip.insert(w.ip, w);
    }
    let mut workloads: Vec<Workload> = by_ip.into_values().collect();
    workloads.sort_by_key(|w| w.key());
    let mut services: Vec<crate::services::Service> = services.iter().filter_map(|s| mesh_service(s)).collect();
    services.sort_by_key(|s| s.key());
    outside_mesh.sort_by_key(|w: &Workload| w.key());
    NodeView { workloads, services, outside_mesh, unresolved }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct FakeNode;
    impl Locator for FakeNode {
        fn veth(&mut self, ip: Ipv4Addr) -> Option<(String, u32)> {
            (ip.octets()[3] < 100).then(|| (format!("veth{}", ip.octets()[3]), 10 + ip.octets()[3] as u32))
        }
        fn cgroup(&mut self, uid: &str) -> Option<PathBuf> {
            (uid != "no-cgroup").then(|| PathBuf::from(format!("/cg/pod{uid}")))
        }
    }

    fn ns(name: &str, mode: Option<&str>) -> Namespace {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        if let Some(m) = mode {
            n.metadata.labels = Some([(DATAPLANE_MODE_LABEL.to_string(), m.to_string())].into());
        }
        n
    }

    fn pod(ns: &str, name: &str, ip: Option<&str>, labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                          "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "spec": {"serviceAccountName": format!("sa-{name}"), "containers": []},
            "status": {"phase": "Running", "podIP": ip},
        }))
        .unwrap()
    }

    #[test]
    fn services_keep_their_address_and_tcp_ports_and_pods_their_named_ports_through_compaction() {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ledger", "namespace": "ns", "annotations": {"big": "x"}},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "ledger"}, "type": "ClusterIP",
                     "internalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "targetPort": "https"},
                               {"port": 9000}, {"port": 53, "protocol": "UDP"}]},
        }))
        .unwrap();
        s.compact();
        let m = mesh_service(&s).expect("a ClusterIP Service with a selector");
        let mut dual = s.clone();
        dual.spec.as_mut().unwrap().cluster_ip = Some("fd00::10".into());
        dual.spec.as_mut().unwrap().cluster_ips = Some(vec!["fd00::10".into(), "10.96.0.20".into()]);
        dual.compact();
        assert_eq!(mesh_service(&dual).unwrap().cluster_ip, Ipv4Addr::new(10, 96, 0, 20), "IPv6 primary, IPv4 second");
        assert_eq!((m.key(), m.cluster_ip), ("ns/ledger".to_string(), Ipv4Addr::new(10, 96, 0, 10)));
        assert!(m.node_local, "internalTrafficPolicy: Local survives compaction");
        let mut cluster = s.clone();
        cluster.spec.as_mut().unwrap().internal_traffic_policy = Some("Cluster".into());
        assert!(!mesh_service(&cluster).unwrap().node_local);
        use crate::services::{ServicePort, TargetPort};
        assert_eq!(
            m.ports,
            [
                ServicePort { port: 80, target: TargetPort::Number(8080) },
                ServicePort { port: 443, target: TargetPort::Name("https".into()) },
                ServicePort { port: 9000, target: TargetPort::Number(9000) },
            ],
            "TCP ports only; targetPort defaults to the port"
        );
        for (what, spec) in [
            ("headless", serde_json::json!({"clusterIP": "None", "selector": {"app": "x"}, "ports": [{"port": 80}]})),
            ("no selector", serde_json::json!({"clusterIP": "10.96.0.11", "ports": [{"port": 80}]})),
            ("IPv6", serde_json::json!({"clusterIP": "fd00::1", "selector": {"app": "x"}, "ports": [{"port": 80}]})),
            (
                "IPv6, single-stack list",
                serde_json::json!({"clusterIP": "fd00::1", "clusterIPs": ["fd00::1"], "selector": {"app": "x"},
                                   "ports": [{"port": 80}]}),
            ),
            (
                "UDP only",
                serde_json::json!({"clusterIP": "10.96.0.12", "selector": {"app": "x"},
                                           "ports": [{"port": 53, "protocol": "UDP"}]}),
            ),
        ] {
            let s: Service =
                serde_json::from_value(serde_json::json!({"metadata": {"name": "s", "namespace": "ns"}, "spec": spec}))
                    .unwrap();
            assert_eq!(mesh_service(&s), None, "{what}");
        }

        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "l", "namespace": "ns", "labels": {"app": "ledger"}},
            "spec": {"containers": [
                {"name": "app", "image": "x", "ports": [{"name": "https", "containerPort": 8443}, {"containerPort": 9}]},
                {"name": "dns", "image": "y", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7"},
        }))
        .unwrap();
        p.compact();
        let w = pod_workload(&p, true, &[&s]).unwrap();
        assert_eq!(w.ports, [("https".to_string(), 8443)].into(), "named TCP container ports");
        assert_eq!(m.target_port(443, &w), Some(8443));
        assert_eq!(w.services, ["ledger"]);
        assert!(!w.ready, "no Ready condition reported yet");
    }

    #[test]
    fn a_pod_serves_when_ready_and_not_terminating() {
        let with = |ready: &str, terminating: bool| {
            let mut p = pod("team", "a", Some("10.0.0.2"), &[]);
            p.status.as_mut().unwrap().conditions = Some(vec![
                serde_json::from_value(serde_json::json!({"type": "PodScheduled", "status": "True"})).unwrap(),
                serde_json::from_value(serde_json::json!({"type": "Ready", "status": ready})).unwrap(),
            ]);
            if terminating {
                p.metadata.deletion_timestamp =
                    Some(serde_json::from_value(serde_json::json!("2026-12-06T00:00:00Z")).unwrap());
            }
            p.compact();
            assert_eq!(p.status.as_ref().unwrap().conditions.as_ref().map(Vec::len), Some(1), "only Ready is kept");
            pod_workload(&p, true, &[]).unwrap().ready
        };
        assert!(with("True", false));
        assert!(!with("False", false));
        assert!(!with("True", true), "terminating");
    }

    fn svc(ns: &str, name: &str, selector: &[(&str, &str)]) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        }))
        .unwrap()
    }

    fn store<K: kube::Resource>(objs: Vec<K>) -> Store<K> {
        let mut s = Store::default();
        s.apply(Change::Init);
        for o in objs {
            s.apply(Change::InitApply(o));
        }
        s.apply(Change::InitDone);
        s
    }

    #[test]
    fn enrolled_pods_become_workloads_local_ones_with_veth_and_cgroup() {
        let nss = store(vec![ns("team", Some("ambient")), ns("plain", None), ns("off", Some("none"))]);
        let local = store(vec![
            pod("team", "a", Some("10.0.0.2"), &[("app", "a")]),
            pod("team", "opted-out", Some("10.0.0.3"), &[("app", "x"), (DATAPLANE_MODE_LABEL, "none")]),
            pod("team", "pending", None, &[]),
            pod("team", "noroute", Some("10.0.0.200"), &[]),
            pod("plain", "p", Some("10.0.0.4"), &[]),
        ]);
        let remote =
            store(vec![pod("team", "r", Some("10.0.1.9"), &[("app", "r")]), pod("off", "o", Some("10.0.1.10"), &[])]);
        let services = store(vec![
            svc("team", "a-svc", &[("app", "a")]),
            svc("team", "all", &[]),
            svc("plain", "a-other-ns", &[("app", "a")]),
        ]);
        let v = node_view(&nss, &local, &remote, &services, &mut FakeNode);
        let keys: Vec<String> = v.workloads.iter().map(Workload::key).collect();
        assert_eq!(keys, ["team/a", "team/noroute", "team/r"]);
        let a = &v.workloads[0];
        assert_eq!(a.service_account, "sa-a");
        assert_eq!(a.services, ["a-svc"], "selector-less services select nothing; other namespaces never");
        assert_eq!(a.local, Some(Local { veth: "veth2".into(), ifindex: 12, cgroup: Some("/cg/poduid-a".into()) }));
        assert_eq!(v.workloads[1].local, None, "no route yet: identity only, retried");
        assert_eq!(v.workloads[2].local, None, "remote pods are identities");
        assert_eq!(v.unresolved, ["team/noroute: no /32 route to 10.0.0.200 on this node"]);
        assert!(v.outside_mesh.is_empty(), "no Service selects the opted-out pod");
    }

    /// A pod opted out of the mesh stays no workload (never enforced), but when a Service of its
    /// namespace selects it, it is kept aside: meshed clients' connections to that Service are
    /// shared with it.
    #[test]
    fn an_opted_out_pod_behind_a_service_is_kept_aside_for_its_share() {
        let nss = store(vec![ns("team", Some("ambient"))]);
        let local = store(vec![
            pod("team", "a", Some("10.0.0.2"), &[("app", "a")]),
            pod("team", "a-plain", Some("10.0.0.3"), &[("app", "a"), (DATAPLANE_MODE_LABEL, "none")]),
            pod("team", "alone", Some("10.0.0.5"), &[("app", "x"), (DATAPLANE_MODE_LABEL, "none")]),
        ]);
        let remote =
            store(vec![pod("team", "a-far", Some("10.0.1.3"), &[("app", "a"), (DATAPLANE_MODE_LABEL, "none")])]);
        let services = store(vec![svc("team", "a-svc", &[("app", "a")])]);
        let v = node_view(&nss, &local, &remote, &services, &mut FakeNode);
        let keys = |ws: &[Workload]| ws.iter().map(Workload::key).collect::<Vec<_>>();
        assert_eq!(keys(&v.workloads), ["team/a"]);
        assert_eq!(keys(&v.outside_mesh), ["team/a-far", "team/a-plain"]);
        let plain = &v.outside_mesh[1];
        assert_eq!(plain.services, ["a-svc"]);
        assert!(!plain.in_mesh());
        assert_eq!(
            plain.local,
            Some(Local { veth: "veth3".into(), ifindex: 13, cgroup: None }),
            "on this node, not enforced"
        );
        assert_eq!(v.outside_mesh[0].local, None);
    }

    fn with_sidecar(mut p: Pod) -> Pod {
        p.metadata.annotations = Some(
            [(
                SIDECAR_STATUS_ANNOTATION.to_string(),
                r#"{"containers":["istio-proxy"],"revision":"default"}"#.to_string(),
            )]
            .into(),
        );
        p
    }

    /// As in Istio ambient (istio-cni's `PodRedirectionEnabled`): the label `ambient` enrolls a
    /// namespace or a single pod; `none` on a pod opts it out, whatever its namespace says.
    #[test]
    fn a_pod_label_enrolls_the_pod_on_its_own() {
        let nss = store(vec![ns("team", Some("ambient")), ns("plain", None), ns("off", Some("none"))]);
        let local = store(vec![
            pod("plain", "solo", Some("10.0.0.2"), &[("app", "web"), (DATAPLANE_MODE_LABEL, "ambient")]),
            pod("plain", "web-plain", Some("10.0.0.3"), &[("app", "web")]),
            pod("plain", "other", Some("10.0.0.4"), &[("app", "other")]),
            pod("off", "o", Some("10.0.0.5"), &[(DATAPLANE_MODE_LABEL, "ambient")]),
            pod("team", "t", Some("10.0.0.6"), &[(DATAPLANE_MODE_LABEL, "ambient")]),
        ]);
        let remote = store(vec![
            pod("plain", "far", Some("10.0.1.2"), &[(DATAPLANE_MODE_LABEL, "ambient")]),
            pod("quiet", "q", Some("10.0.1.3"), &[("app", "web")]),
        ]);
        let carried = |ns: &str, name: &str, selector: &[(&str, &str)]| {
            let mut s = svc(ns, name, selector);
            let spec = s.spec.as_mut().unwrap();
            spec.cluster_ip = Some("10.96.0.10".into());
            spec.ports = Some(vec![serde_json::from_value(serde_json::json!({"port": 80})).unwrap()]);
            s
        };
        let services = store(vec![
            carried("plain", "web", &[("app", "web")]),
            carried("quiet", "web", &[("app", "web")]),
            carried("off", "o", &[("app", "o")]),
        ]);
        let v = node_view(&nss, &local, &remote, &services, &mut FakeNode);
        let keys = |ws: &[Workload]| ws.iter().map(Workload::key).collect::<Vec<_>>();
        assert_eq!(keys(&v.workloads), ["off/o", "plain/far", "plain/solo", "team/t"]);
        let solo = &v.workloads[2];
        assert!(solo.in_mesh());
        assert_eq!(
            solo.local,
            Some(Local { veth: "veth2".into(), ifindex: 12, cgroup: Some("/cg/poduid-solo".into()) })
        );
        assert_eq!(solo.services, ["web"], "its namespace's Services select it");
        assert_eq!(v.workloads[1].local, None, "an identity elsewhere");
        // The Services of namespaces with a workload are carried; the unenrolled pods behind
        // them take their share, out of the mesh.
        let svc_keys: Vec<String> = v.services.iter().map(|s| s.key()).collect();
        assert_eq!(svc_keys, ["off/o", "plain/web"], "not those of namespaces without a workload");
        assert_eq!(keys(&v.outside_mesh), ["plain/web-plain"]);
        assert!(!v.outside_mesh[0].in_mesh());
        assert_eq!(v.outside_mesh[0].services, ["web"]);
        assert_eq!(pod_workload(&local.objects["plain/web-plain"], false, &[]), Err(Skip::NotEnrolled));
    }

    /// ztunnel leaves pods with a sidecar alone (they do their own mTLS), even in an enrolled
    /// namespace or labelled `ambient` themselves: no workload, never enforced. Behind a
    /// Service, they take their share of meshed clients' connections, as opted-out pods.
    #[test]
    fn a_pod_with_a_sidecar_is_left_alone() {
        let nss = store(vec![ns("team", Some("ambient")), ns("plain", None)]);
        let mut sidecar = with_sidecar(pod("team", "s", Some("10.0.0.2"), &[("app", "a")]));
        sidecar.compact();
        assert!(sidecar.annotations().contains_key(SIDECAR_STATUS_ANNOTATION), "compaction keeps the marker");
        assert_eq!(sidecar.annotations()[SIDECAR_STATUS_ANNOTATION], "", "not its value");
        let local = store(vec![
            sidecar,
            pod("team", "a", Some("10.0.0.3"), &[("app", "a")]),
            with_sidecar(pod("team", "alone", Some("10.0.0.4"), &[("app", "x")])),
            with_sidecar(pod("plain", "p", Some("10.0.0.5"), &[(DATAPLANE_MODE_LABEL, "ambient")])),
        ]);
        let remote = store(vec![with_sidecar(pod("team", "far", Some("10.0.1.2"), &[("app", "a")]))]);
        let services = store(vec![svc("team", "a-svc", &[("app", "a")])]);
        let v = node_view(&nss, &local, &remote, &services, &mut FakeNode);
        let keys = |ws: &[Workload]| ws.iter().map(Workload::key).collect::<Vec<_>>();
        assert_eq!(keys(&v.workloads), ["team/a"]);
        assert_eq!(keys(&v.outside_mesh), ["team/far", "team/s"]);
        assert!(v.outside_mesh.iter().all(|w| !w.in_mesh()));
        assert_eq!(v.outside_mesh[1].local, Some(Local { veth: "veth2".into(), ifindex: 12, cgroup: None }));
        assert_eq!(pod_workload(&local.objects["team/alone"], true, &[]), Err(Skip::Sidecar));
        assert_eq!(pod_workload(&local.objects["plain/p"], false, &[]), Err(Skip::Sidecar));
    }

    #[test]
    fn skips_finished_host_network_and_ipv6_pods() {
        let mut p = pod("team", "done", Some("10.0.0.2"), &[]);
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(pod_workload(&p, true, &[]), Err(Skip::Finished));
        let mut p = pod("team", "host", Some("10.0.0.2"), &[]);
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(pod_workload(&p, true, &[]), Err(Skip::HostNetwork));
        let p = pod("team", "v6", Some("fd00::1"), &[]);
        assert_eq!(pod_workload(&p, true, &[]), Err(Skip::NotIpv4("fd00::1".into())));
        let mut p = pod("team", "nosa", Some("10.0.0.2"), &[]);
        p.spec.as_mut().unwrap().service_account_name = None;
        assert_eq!(pod_workload(&p, true, &[]).unwrap().service_account, "default");
    }

    #[test]
    fn compacted_pods_keep_what_makes_the_workload() {
        let mut p = pod("team", "a", Some("10.0.0.2"), &[("app", "a")]);
        p.spec.as_mut().unwrap().containers = vec![Default::default()];
        p.metadata.annotations = Some([("big".to_string(), "x".repeat(4096))].into());
        let before = pod_workload(&p, true, &[]).unwrap();
        p.compact();
        assert_eq!(pod_workload(&p, true, &[]).unwrap(), before);
        assert!(p.spec.as_ref().unwrap().containers.is_empty() && p.metadata.annotations.is_none());
    }

    #[test]
    fn a_relist_replaces_the_objects_only_when_complete() {
        let mut s = store(vec![ns("a", None), ns("b", None)]);
        assert!(s.synced);
        s.apply(Change::Init);
        assert!(!s.synced);
        s.apply(Change::InitApply(ns("b", None)));
        assert_eq!(s.objects.len(), 2, "the old list stays visible during the relist");
        assert!(s.apply(Change::InitDone));
        assert!(s.synced);
        assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["/b"]);
        assert!(s.apply(Change::Apply(ns("c", None))));
        assert!(s.apply(Change::Delete(ns("b", None))));
        assert!(!s.apply(Change::Delete(ns("zz", None))));
        assert_eq!(s.objects.keys().collect::<Vec<_>>(), ["/c"]);
    }
}
