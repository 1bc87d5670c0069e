//! Kubernetes Services as the mesh uses them: a virtual address and ports in front of the pods
//! its selector picks.
//!
//! A meshed client's `connect()` to a Service's address is captured as one to a pod is: the
//! kernel's socket hooks see the virtual address, before any DNAT (kube-proxy) or socket-level
//! translation (a CNI's, attached higher in the cgroup tree) could hide the Service. The agent
//! then picks one of the Service's meshed pods, maps the Service port to that pod's target port,
//! and carries the connection to it, as ztunnel does. Without this, a meshed client reaching its
//! peer through a Service would bypass the mesh: plaintext, and dropped by a STRICT peer.
//!
//! In the workload file (the Kubernetes source reads the same from the API):
//!
//! ```yaml
//! services:
//!   - name: ledger
//!     namespace: fintech-core
//!     clusterIP: 10.96.0.10
//!     selector: {app: ledger}
//!     ports:
//!       - {port: 80, targetPort: 8080}   # a number, or a container port's name
//!       - {port: 443, targetPort: https}
//!     internalTrafficPolicy: Local       # optional: only this node's pods (default Cluster)
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
    sync::Arc,
};

use serde::Deserialize;
use warden_common::{SERVICE_PLAIN_MAX, ServiceKey, ServiceSplit, SockAddr};

use crate::workloads::Workload;

/// The cluster's DNS domain (kubelet's `clusterDomain`, ztunnel's `CLUSTER_DOMAIN`): a Service's
/// hostname is `<name>.<namespace>.svc.<domain>`. `cluster.local` unless the cluster says
/// otherwise (`warden agent --cluster-domain`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterDomain(Arc<str>);

impl Default for ClusterDomain {
    fn default() -> Self {
        ClusterDomain(Arc::from("cluster.local"))
    }
}

impl FromStr for ClusterDomain {
    type Err = String;

    /// A DNS subdomain as Kubernetes names one (RFC 1123): lowercase labels of letters, digits
    /// and `-`, each 1-63 characters and neither starting nor ending with `-`, at most 253 in
    /// all, no trailing dot.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 253 {
            return Err(format!("{s:?}: a cluster domain has 1 to 253 characters"));
        }
        for label in s.split('.') {
            let valid = (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !valid {
                return Err(format!(
                    "{s:?}: label {label:?} is not 1-63 lowercase letters, digits or '-' (not first or last)"
                ));
            }
        }
        Ok(ClusterDomain(Arc::from(s)))
    }
}

impl fmt::Display for ClusterDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Service by name, as Istio's metrics label it (`destination_service*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
    pub domain: ClusterDomain,
}

impl ServiceRef {
    /// `<name>.<namespace>.svc.<domain>`: Istio's `destination_service`, and the `host` of an
    /// HBONE request's `forwarded` header.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, self.domain)
    }

    /// The Service a connection to workload `w` counts against, as ztunnel guesses it for the
    /// destination side: the one whose hostname the client addressed (`host`) if it is one of
    /// `w`'s, else `w`'s only Service; none when `w` has several and the client named none.
    pub fn for_destination(w: &Workload, host: Option<&str>, domain: &ClusterDomain) -> Option<ServiceRef> {
        let of =
            |name: &String| ServiceRef { name: name.clone(), namespace: w.namespace.clone(), domain: domain.clone() };
        if let Some(named) = host.and_then(|h| w.services.iter().map(of).find(|s| s.hostname() == h)) {
            return Some(named);
        }
        match w.services.as_slice() {
            [only] => Some(of(only)),
            _ => None,
        }
    }
}

/// A Service the mesh can carry connections to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// The virtual address clients connect to.
    pub cluster_ip: Ipv4Addr,
    /// Its TCP ports (the mesh carries TCP only).
    pub ports: Vec<ServicePort>,
    /// The labels a pod of the Service's namespace must carry. Never empty: a Service without a
    /// selector has hand-made endpoints, which the mesh does not follow.
    pub selector: BTreeMap<String, String>,
    /// `internalTrafficPolicy: Local`: a client reaches only the Service's pods on its own node,
    /// and none when there are none (as kube-proxy drops it). `Cluster` (the default): any.
    pub node_local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target: TargetPort,
}

/// Where a Service port leads on each pod (Kubernetes' `targetPort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port's name: each pod says which number it is.
    Name(String),
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// This Service by name, in the cluster of `domain`.
    pub fn reference(&self, domain: &ClusterDomain) -> ServiceRef {
        ServiceRef { name: self.name.clone(), namespace: self.namespace.clone(), domain: domain.clone() }
    }

    /// Whether `w` is one of the Service's pods.
    pub fn selects(&self, w: &Workload) -> bool {
        w.namespace == self.namespace && selector_matches(&self.selector, &w.labels)
    }

    /// Whether the mesh carries a connection to this Service to `w`: one of its pods, in the mesh,
    /// ready, and on this node when the Service keeps its traffic on the node
    /// (`internalTrafficPolicy: Local`). The kernel captures the Service's address only while
    /// such a pod exists, and the agent picks among exactly those. Otherwise the connection is
    /// left to the node's Service proxy (kube-proxy), which sends it to the pods that are ready,
    /// in plaintext: a Service whose only meshed pods are still starting, behind pods out of the
    /// mesh (a rollout into the mesh), keeps serving.
    pub fn mesh_backend(&self, w: &Workload) -> bool {
        w.in_mesh() && self.serving(w)
    }

    /// Whether `w` serves the Service from where this node's clients reach it: selected, ready,
    /// and on this node when the Service is node-local.
    fn serving(&self, w: &Workload) -> bool {
        w.ready && self.selects(w) && (!self.node_local || w.local.is_some())
    }

    /// Whether the kernel captures the Service's address for meshed clients: one of `pods` (its
    /// namespace's) is a [`Self::mesh_backend`].
    pub fn captured(&self, pods: &[&Workload]) -> bool {
        pods.iter().any(|w| self.mesh_backend(w))
    }

    /// Whether `w` is one of the Service's pods out of the mesh that serve it: the ones a meshed
    /// client's connections are shared with ([`splits`]). `node_local` as [`Self::mesh_backend`].
    pub fn plain_backend(&self, w: &Workload) -> bool {
        !w.in_mesh() && self.serving(w)
    }

    /// The port `backend` serves Service port `port` on: `None` when the Service has no such
    /// port, or the backend no container port of the target's name.
    pub fn target_port(&self, port: u16, backend: &Workload) -> Option<u16> {
        match &self.ports.iter().find(|p| p.port == port)?.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => backend.ports.get(name).copied(),
        }
    }
}

/// A `services[]` entry of the workload file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Entry {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<PortEntry>,
    internal_traffic_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortEntry {
    port: Option<u32>,
    target_port: Option<serde_yaml::Value>,
    protocol: Option<String>,
}

/// One problem in a `services[]` entry: (field, reason).
pub(crate) type Problem = (String, String);

impl Entry {
    /// The Service this entry describes, or every problem with it. `is_label` checks names.
    pub(crate) fn validate(self, is_label: impl Fn(&str) -> bool) -> Result<Service, Vec<Problem>> {
        let mut problems: Vec<Problem> = Vec::new();
        let label = |v: Option<String>, field: &str, problems: &mut Vec<Problem>| match v {
            Some(s) if is_label(&s) => Some(s),
            Some(s) => {
                problems.push((field.into(), format!("{s:?} is not a DNS-1123 label")));
                None
            }
            None => {
                problems.push((field.into(), "is required".into()));
                None
            }
        };
        let name = label(self.name, "name", &mut problems);
        let namespace = label(self.namespace, "namespace", &mut problems);
        let cluster_ip = match self.cluster_ip.as_deref().map(str::parse::<Ipv4Addr>) {
            Some(Ok(ip)) if !ip.is_unspecified() => Some(ip),
            Some(_) => {
                let ip = self.cluster_ip.unwrap_or_default();
                problems.push(("clusterIP".into(), format!("{ip:?} is not an IPv4 address a client can reach")));
                None
            }
            None => {
                problems.push(("clusterIP".into(), "is required".into()));
                None
            }
        };
        if self.selector.is_empty() {
            problems.push(("selector".into(), "is required: the mesh follows a Service's pods by its selector".into()));
        }
        if self.ports.is_empty() {
            problems.push(("ports".into(), "needs at least one port".into()));
        }
        let node_local = match self.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                problems.push(("internalTrafficPolicy".into(), format!("{other:?} is neither Cluster nor Local")));
                false
            }
        };
        let mut ports = Vec::new();
        for (i, p) in self.ports.into_iter().enumerate() {
            let at = |f: &str| format!("ports[{i}].{f}");
            match p.protocol.as_deref() {
                None | Some("TCP") => {}
                // Kubernetes' other protocols: valid, but not carried by the mesh.
                Some("UDP" | "SCTP") => continue,
                Some(other) => {
                    problems.push((at("protocol"), format!("{other:?} is not TCP, UDP or SCTP")));
                    continue;
                }
            }
            let port = match p.port.map(u16::try_from) {
                Some(Ok(n)) if n > 0 => n,
                Some(_) => {
                    problems.push((at("port"), format!("{} is not a port (1-65535)", p.port.unwrap_or_default())));
                    continue;
                }
                None => {
                    problems.push((at("port"), "is required".into()));
                    continue;
                }
            };
            if ports.iter().any(|q: &ServicePort| q.port == port) {
                problems.push((at("port"), format!("{port} is listed twice")));
                continue;
            }
            let target = match p.target_port {
                // Kubernetes' default: the same number.
                None => TargetPort::Number(port),
                Some(serde_yaml::Value::Number(n)) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
                    Some(n) if n > 0 => TargetPort::Number(n),
                    _ => {
                        problems.push((at("targetPort"), format!("{n} is not a port (1-65535)")));
                        continue;
                    }
                },
                Some(serde_yaml::Value::String(s)) if is_port_name(&s) => TargetPort::Name(s),
                Some(v) => {
                    problems.push((at("targetPort"), format!("{v:?} is neither a port number nor a port name")));
                    continue;
                }
            };
            ports.push(ServicePort { port, target });
        }
        match (name, namespace, cluster_ip) {
            (Some(name), Some(namespace), Some(cluster_ip)) if problems.is_empty() => {
                Ok(Service { name, namespace, cluster_ip, ports, selector: self.selector, node_local })
            }
            _ => Err(problems),
        }
    }
}

/// `items` grouped by namespace. A Service's selector picks pods of its own namespace only, so
/// Services and pods matched per namespace cost the sum of each namespace's Services times its
/// pods, not every Service times every pod of the cluster.
pub fn by_namespace<'a, T>(
    items: impl IntoIterator<Item = &'a T>,
    namespace: impl Fn(&'a T) -> &'a str,
) -> HashMap<&'a str, Vec<&'a T>> {
    let mut map: HashMap<&str, Vec<&T>> = HashMap::new();
    for item in items {
        map.entry(namespace(item)).or_default().push(item);
    }
    map
}

/// Whether a Service's `selector` picks a pod (of its namespace) with `labels`: every pair
/// matches, and an empty selector picks nothing (such a Service's endpoints are made by hand).
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Kubernetes port name (IANA_SVC_NAME): 1-15 lower-case alphanumerics and '-', with a letter.
pub fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// How `connect4` shares a meshed client's connections to each port of the [`Service::captured`]
/// `services` (`pods_of`: the pods of each namespace) that also has pods out
/// of the mesh ([`Service::plain_backend`]) serving that port: as many shares to the agent as
/// meshed pods serve the port, one to each plain pod, straight to its address and target port
/// (`warden_services_v2`, `ebpf/src/service.rs`). Keys in slot 0. A port with more than
/// [`SERVICE_PLAIN_MAX`] such pods keeps the first of them by address, with a warning.
pub fn splits(
    services: &[Service],
    pods_of: &HashMap<&str, Vec<&Workload>>,
    warnings: &mut Vec<String>,
) -> Vec<(ServiceKey, ServiceSplit)> {
    let mut out = Vec::new();
    for s in services {
        let pods = pods_of.get(s.namespace.as_str()).map_or(&[][..], Vec::as_slice);
        if !s.captured(pods) {
            continue; // the Service proxy's
        }
        for p in &s.ports {
            let meshed = pods.iter().filter(|w| s.mesh_backend(w) && s.target_port(p.port, w).is_some()).count();
            let mut plain: Vec<SockAddr> = pods
                .iter()
                .filter(|w| s.plain_backend(w))
                .filter_map(|w| s.target_port(p.port, w).map(|t| SockAddr { addr: w.ip.octets(), port: t, _pad: 0 }))
                .collect();
            if plain.is_empty() {
                continue;
            }
            plain.sort_by_key(|b| (b.addr, b.port));
            if plain.len() > SERVICE_PLAIN_MAX {
                warnings.push(format!(
                    "service {}/{} port {}: {} pods out of the mesh; meshed clients reach the first {SERVICE_PLAIN_MAX}",
                    s.namespace,
                    s.name,
                    p.port,
                    plain.len()
                ));
                plain.truncate(SERVICE_PLAIN_MAX);
            }
            let mut split = ServiceSplit {
                meshed: meshed.min(u16::MAX as usize) as u16,
                plain: plain.len() as u16,
                ..ServiceSplit::default()
            };
            split.plain_backends[..plain.len()].copy_from_slice(&plain);
            out.push((ServiceKey { addr: s.cluster_ip.octets(), port: p.port, slot: 0, _pad: 0 }, split));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, labels: &[(&str, &str)], ports: &[(&str, u16)]) -> Workload {
        Workload {
            name: "w".into(),
            namespace: ns.into(),
            service_account: "sa".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            services: Vec::new(),
            ports: ports.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ready: true,
            local: None,
        }
    }

    fn entry(yaml: &str) -> Entry {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn ports_map_by_number_name_or_default_and_selection_is_by_namespace_and_labels() {
        let s = entry(
            "{name: ledger, namespace: ns, clusterIP: 10.96.0.10, selector: {app: ledger},
              ports: [{port: 80, targetPort: 8080}, {port: 443, targetPort: https}, {port: 9000},
                      {port: 53, protocol: UDP}]}",
        )
        .validate(|_| true)
        .unwrap();
        assert_eq!(s.key(), "ns/ledger");
        assert_eq!(s.ports.len(), 3, "UDP is not carried by the mesh: {s:?}");
        assert!(!s.node_local, "internalTrafficPolicy defaults to Cluster");
        let local = entry(
            "{name: l, namespace: ns, clusterIP: 10.96.0.11, selector: {app: l}, ports: [{port: 80}],
              internalTrafficPolicy: Local}",
        );
        assert!(local.validate(|_| true).unwrap().node_local);
        let pod = workload("ns", &[("app", "ledger"), ("v", "1")], &[("https", 8443)]);
        assert!(s.selects(&pod));
        assert!(!s.selects(&workload("other", &[("app", "ledger")], &[])), "another namespace");
        assert!(!s.selects(&workload("ns", &[("app", "x")], &[])), "other labels");
        assert_eq!(s.target_port(80, &pod), Some(8080));
        assert_eq!(s.target_port(443, &pod), Some(8443));
        assert_eq!(s.target_port(9000, &pod), Some(9000), "targetPort defaults to port");
        assert_eq!(s.target_port(53, &pod), None, "not a TCP port of the Service");
        assert_eq!(s.target_port(443, &workload("ns", &[("app", "ledger")], &[])), None, "no port named https");
    }

    #[test]
    fn the_destination_service_is_the_one_addressed_or_the_only_one() {
        let d = ClusterDomain::default();
        let mut w = workload("ns", &[], &[]);
        assert_eq!(ServiceRef::for_destination(&w, None, &d), None, "no Service");
        w.services = vec!["a".into()];
        let a = ServiceRef { name: "a".into(), namespace: "ns".into(), domain: d.clone() };
        assert_eq!(a.hostname(), "a.ns.svc.cluster.local");
        assert_eq!(ServiceRef::for_destination(&w, None, &d), Some(a.clone()), "the only one");
        w.services = vec!["a".into(), "b".into()];
        assert_eq!(ServiceRef::for_destination(&w, None, &d), None, "two, none named");
        assert_eq!(ServiceRef::for_destination(&w, Some("b.ns.svc.cluster.local"), &d).unwrap().name, "b");
        assert_eq!(ServiceRef::for_destination(&w, Some("c.ns.svc.cluster.local"), &d), None, "not one of w's");

        // Another cluster domain: hostnames end in it, and only its hostnames name a Service.
        let corp: ClusterDomain = "corp.example".parse().unwrap();
        let b = ServiceRef::for_destination(&w, Some("b.ns.svc.corp.example"), &corp).unwrap();
        assert_eq!((b.name.as_str(), b.hostname()), ("b", "b.ns.svc.corp.example".to_string()));
        assert_eq!(ServiceRef::for_destination(&w, Some("b.ns.svc.cluster.local"), &corp), None);
    }

    #[test]
    fn by_namespace_groups_in_order_and_a_service_matches_only_its_namespaces_pods() {
        let pods = [
            workload("a", &[("app", "x")], &[]),
            workload("b", &[("app", "x")], &[]),
            workload("a", &[("app", "y")], &[]),
        ];
        let of = by_namespace(pods.iter(), |w| w.namespace.as_str());
        assert_eq!(of.len(), 2);
        assert_eq!(of["a"].iter().map(|w| w.labels["app"].as_str()).collect::<Vec<_>>(), ["x", "y"]);
        let s = entry("{name: s, namespace: b, clusterIP: 10.96.0.1, selector: {app: x}, ports: [{port: 80}]}")
            .validate(|_| true)
            .unwrap();
        let picked: Vec<_> = of.get("b").into_iter().flatten().filter(|w| s.selects(w)).collect();
        assert_eq!(picked.len(), 1, "the app=x pod of namespace b, not a's");
        assert!(!of.contains_key("c"));
    }

    #[test]
    fn a_cluster_domain_is_a_dns_subdomain() {
        assert_eq!(ClusterDomain::default().to_string(), "cluster.local");
        for good in ["cluster.local", "k8s", "prod-1.corp.example", "a.b.c.d"] {
            assert_eq!(good.parse::<ClusterDomain>().unwrap().to_string(), good);
        }
        let err = |s: &str| s.parse::<ClusterDomain>().unwrap_err();
        assert_eq!(err(""), "\"\": a cluster domain has 1 to 253 characters");
        assert_eq!(
            err("Cluster.local"),
            "\"Cluster.local\": label \"Cluster\" is not 1-63 lowercase letters, digits or '-' (not first or last)"
        );
        assert!(err("cluster.local.").contains("label \"\""), "a trailing dot: {}", err("cluster.local."));
        assert!(err("-a.b").contains("label \"-a\""));
        assert!(err("a_b.c").contains("label \"a_b\""));
        assert!(err(&"a".repeat(64)).contains("is not 1-63"));
        assert!(err(&["a"; 128].join(".")).contains("1 to 253"));
    }

    #[test]
    fn every_problem_names_its_field() {
        let problems = entry(
            "{name: Bad, clusterIP: 10.96.0.300, ports: [{port: 0}, {port: 80, targetPort: 70000},
              {port: 81, targetPort: Not_a_name}, {port: 82, protocol: QUIC}, {port: 83}, {port: 83}],
              internalTrafficPolicy: Nearby}",
        )
        .validate(|s| s.bytes().all(|b| b.is_ascii_lowercase()))
        .unwrap_err();
        let text = format!("{problems:?}");
        for needle in [
            "(\"name\", \"\\\"Bad\\\" is not a DNS-1123 label\")",
            "(\"namespace\", \"is required\")",
            "(\"clusterIP\", \"\\\"10.96.0.300\\\" is not an IPv4 address a client can reach\")",
            "(\"selector\", \"is required",
            "(\"ports[0].port\", \"0 is not a port (1-65535)\")",
            "(\"ports[1].targetPort\", \"70000 is not a port (1-65535)\")",
            "(\"ports[2].targetPort\", \"String(\\\"Not_a_name\\\") is neither a port number nor a port name\")",
            "(\"ports[3].protocol\", \"\\\"QUIC\\\" is not TCP, UDP or SCTP\")",
            "(\"ports[5].port\", \"83 is listed twice\")",
            "(\"internalTrafficPolicy\", \"\\\"Nearby\\\" is neither Cluster nor Local\")",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
    }

    /// Of a Service's ready pods serving a port, the meshed ones are counted (the agent's share)
    /// and the others listed with their target port; a port no pod out of the mesh serves, and a
    /// Service the kernel does not capture, have no split.
    #[test]
    fn a_services_split_counts_its_meshed_pods_and_lists_the_others() {
        use crate::workloads::test_pod as pod;
        let named = |mut w: Workload, port: u16| {
            w.ports.insert("http".into(), port);
            w
        };
        let service = |name: &str, ip: u8, target: TargetPort, node_local: bool| Service {
            name: name.into(),
            namespace: "ns".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, ip),
            ports: vec![
                ServicePort { port: 80, target },
                ServicePort { port: 81, target: TargetPort::Name("admin".into()) },
            ],
            selector: BTreeMap::from([("app".to_string(), "ledger".to_string())]),
            node_local,
        };
        let pods = [
            named(pod("m1", 1, true, true, false), 8080),
            named(pod("m2", 2, true, true, true), 8080),
            named(pod("p1", 4, false, true, true), 9090),
            named(pod("p2", 3, false, true, false), 9091),
            named(pod("p-starting", 5, false, false, true), 9090),
        ];
        let splits_of = |services: &[Service]| {
            let of = by_namespace(pods.iter(), |w| w.namespace.as_str());
            let mut warnings = Vec::new();
            let out = splits(services, &of, &mut warnings);
            assert!(warnings.is_empty(), "{warnings:?}");
            out.into_iter()
                .map(|(k, v)| {
                    let plain: Vec<(u8, u16)> =
                        v.plain_backends[..v.plain as usize].iter().map(|b| (b.addr[3], b.port)).collect();
                    ((Ipv4Addr::from(k.addr), k.port, k.slot), v.meshed, plain)
                })
                .collect::<Vec<_>>()
        };
        let vip = |ip| Ipv4Addr::new(10, 96, 0, ip);
        // Port 80 by name: two meshed pods, two plain ready ones (by address); port 81's `admin`
        // no pod has.
        assert_eq!(
            splits_of(&[service("ledger", 1, TargetPort::Name("http".into()), false)]),
            [((vip(1), 80, 0), 2, vec![(3, 9091), (4, 9090)])]
        );
        // A number: every pod serves it.
        assert_eq!(
            splits_of(&[service("ledger", 1, TargetPort::Number(7000), false)]),
            [((vip(1), 80, 0), 2, vec![(3, 7000), (4, 7000)])]
        );
        // Node-local: this node's pods only (m2, p1).
        assert_eq!(
            splits_of(&[service("ledger", 2, TargetPort::Name("http".into()), true)]),
            [((vip(2), 80, 0), 1, vec![(4, 9090)])]
        );
        // Not captured (no meshed pod serving): the Service proxy's, no split.
        let mut no_meshed = service("ledger", 3, TargetPort::Number(7000), false);
        no_meshed.selector = BTreeMap::from([("app".to_string(), "other".to_string())]);
        assert_eq!(splits_of(&[no_meshed]), []);
    }

    #[test]
    fn a_split_names_at_most_its_capacity_of_pods_and_says_so() {
        use crate::workloads::test_pod as pod;
        let mut pods = vec![pod("m", 1, true, true, false)];
        let over = SERVICE_PLAIN_MAX + 8;
        pods.extend((0..over as u32).map(|i| {
            let mut p = pod(&format!("p{i}"), 0, false, true, false);
            // Listed last address first: the split keeps the first by address, not by listing.
            p.ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 1)) + (over as u32 - 1 - i));
            p
        }));
        let service = Service {
            name: "ledger".into(),
            namespace: "ns".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            ports: vec![ServicePort { port: 80, target: TargetPort::Number(8080) }],
            selector: BTreeMap::from([("app".to_string(), "ledger".to_string())]),
            node_local: false,
        };
        let mut warnings = Vec::new();
        let out = splits(&[service], &by_namespace(pods.iter(), |w| w.namespace.as_str()), &mut warnings);
        assert_eq!(out[0].1.plain as usize, SERVICE_PLAIN_MAX);
        assert_eq!(out[0].1.plain_backends[0].addr, [10, 1, 0, 1], "the first by address");
        assert_eq!(out[0].1.plain_backends[SERVICE_PLAIN_MAX - 1].addr, [10, 1, 1, 0], "the 256th");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains(&format!("ns/ledger port 80: {over} pods out of the mesh")), "{warnings:?}");
    }
}
