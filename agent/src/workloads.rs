//! The workload file: which workloads this node knows, and for local ones where to enforce.
//!
//! ```yaml
//! workloads:
//!   - name: payment-processor
//!     namespace: fintech-core
//!     serviceAccount: payment-processor
//!     labels: {app: payment-processor}
//!     ip: 10.0.1.5
//!     veth: wd-payment        # host-side veth; omit for a workload on another node
//!     cgroup: /sys/fs/cgroup/unified/warden-lab/payment-processor   # optional
//!     ports: {http: 8080}     # named container ports, for Services' named targetPorts; optional
//!     ready: true             # serving (Kubernetes' readiness); optional, default true
//! services: []                # optional; see `crate::services`
//! ```
//! Loading checks everything it can before anything is applied: YAML shape, unknown fields,
//! duplicate names and addresses, that each veth exists on this node and each cgroup is a cgroup
//! directory. Every error names the file, the entry and the field.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::services::{self, Service};
use warden_authz::names::{is_dns_label, is_dns_subdomain};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    workloads: Vec<Entry>,
    #[serde(default)]
    services: Vec<services::Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    name: Option<String>,
    namespace: Option<String>,
    service_account: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ip: Option<String>,
    veth: Option<String>,
    cgroup: Option<PathBuf>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    /// Kubernetes' endpoint readiness; true unless said otherwise.
    ready: Option<bool>,
}

/// A workload as the agent uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    /// Services (in the workload's namespace) selecting it, for policies bound by `targetRefs`.
    pub services: Vec<String>,
    /// Named container ports (name -> number), for Services' named target ports.
    pub ports: BTreeMap<String, u16>,
    /// Serving: ready and not terminating, as Kubernetes decides which pods a Service sends to.
    /// Only such pods are chosen behind a Service; every workload keeps its identity either way.
    pub ready: bool,
    /// Present for workloads enforced on this node.
    pub local: Option<Local>,
}

/// The label that takes a workload out of the mesh (Istio ambient's opt-out: `none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

impl Workload {
    /// `namespace/name`, the workload's key everywhere in the agent.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the workload takes part in the mesh when the node runs one: every workload but
    /// those labelled `istio.io/dataplane-mode: none`, as ambient's opt-out.
    pub fn in_mesh(&self) -> bool {
        self.labels.get(DATAPLANE_MODE_LABEL).is_none_or(|m| m != "none")
    }

    /// The workload's SPIFFE identity.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub veth: String,
    pub ifindex: u32,
    pub cgroup: Option<PathBuf>,
}

/// One problem in a workload file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub file: PathBuf,
    /// `workloads[3]` (or empty for file-level errors).
    pub entry: String,
    /// Field path inside the entry, e.g. `ip`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if !self.entry.is_empty() {
            write!(f, ": {}", self.entry)?;
        }
        if !self.field.is_empty() {
            write!(f, ".{}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every problem found in a workload file; nothing was applied.
#[derive(Debug, thiserror::Error)]
pub struct WorkloadErrors(pub Vec<FieldError>);

impl fmt::Display for WorkloadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Resolves a veth name to its ifindex on this node. A seam so tests need no interfaces.
pub trait Links {
    fn ifindex(&self, name: &str) -> Option<u32>;
}

/// The host's interfaces (in the agent's network namespace).
pub struct HostLinks;

impl Links for HostLinks {
    fn ifindex(&self, name: &str) -> Option<u32> {
        let c = std::ffi::CString::new(name).ok()?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
        (idx != 0).then_some(idx)
    }
}

/// What a workload file describes.
#[derive(Debug)]
pub struct Loaded {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
}

/// Read and validate a workload file. All-or-nothing: any error returns every error found.
pub fn load(path: &Path, links: &dyn Links) -> Result<Loaded, WorkloadErrors> {
    let err = |entry: String, field: &str, reason: String| FieldError {
        file: path.to_path_buf(),
        entry,
        field: field.to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| WorkloadErrors(vec![err(String::new(), "", format!("cannot read: {e}"))]))?;
    let file: File = serde_yaml::from_str(&text).map_err(|e| {
        let at = e.location().map(|l| format!(" (line {}, column {})", l.line(), l.column())).unwrap_or_default();
        WorkloadErrors(vec![err(String::new(), "", format!("invalid workload file{at}: {e}"))])
    })?;

    let mut errors = Vec::new();
    let mut out = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut ips: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut veths: HashMap<String, usize> = HashMap::new();
    for (i, e) in file.workloads.into_iter().enumerate() {
        let entry = format!("workloads[{i}]");
        // Kubernetes' rules: a namespace is a DNS-1123 label, a pod or service account name a
        // DNS-1123 subdomain (labels joined by '.').
        let mut required = |v: Option<String>, field: &str| match v {
            Some(s) if if field == "namespace" { is_dns_label(&s) } else { is_dns_subdomain(&s) } => Some(s),
            Some(s) if field == "namespace" => {
                errors.push(err(
                    entry.clone(),
                    field,
                    format!("{s:?} is not a DNS-1123 label (lower-case alphanumerics and '-', at most 63)"),
                ));
                None
            }
            Some(s) => {
                errors.push(err(
                    entry.clone(),
                    field,
                    format!("{s:?} is not a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.', at most 253)"),
                ));
                None
            }
            None => {
                errors.push(err(entry.clone(), field, "is required".into()));
                None
            }
        };
        let name = required(e.name, "name");
        let namespace = required(e.namespace, "namespace");
        let service_account = required(e.service_account, "serviceAccount");
        let ip = match e.ip.as_deref().map(str::parse::<Ipv4Addr>) {
            Some(Ok(ip)) => Some(ip),
            Some(Err(_)) => {
                errors.push(err(entry.clone(), "ip", format!("{:?} is not an IPv4 address", e.ip.unwrap_or_default())));
                None
            }
            None => {
                errors.push(err(entry.clone(), "ip", "is required".into()));
                None
            }
        };
        let local = match e.veth {
            None => {
                if e.cgroup.is_some() {
                    errors.push(err(entry.clone(), "cgroup", "needs a veth: only local workloads are enforced".into()));
                }
                None
            }
            Some(veth) => {
                if let Some(prev) = veths.insert(veth.clone(), i) {
                    errors.push(err(entry.clone(), "veth", format!("{veth:?} is already used by workloads[{prev}]")));
                }
                let ifindex = links.ifindex(&veth);
                if ifindex.is_none() {
                    errors.push(err(entry.clone(), "veth", format!("no interface {veth:?} on this node")));
                }
                if let Some(cg) = &e.cgroup
                    && !cg.join("cgroup.procs").is_file()
                {
                    errors.push(err(entry.clone(), "cgroup", format!("{} is not a cgroup v2 directory", cg.display())));
                }
                ifindex.map(|ifindex| Local { veth, ifindex, cgroup: e.cgroup })
            }
        };
        if let (Some(name), Some(namespace), Some(service_account), Some(ip)) = (name, namespace, service_account, ip) {
            let key = format!("{namespace}/{name}");
            if let Some(prev) = names.insert(key.clone(), i) {
                errors.push(err(entry.clone(), "name", format!("{key} is already defined by workloads[{prev}]")));
            }
            if let Some(prev) = ips.insert(ip, i) {
                errors.push(err(entry.clone(), "ip", format!("{ip} is already used by workloads[{prev}]")));
            }
            for (port, n) in &e.ports {
                let field = format!("ports.{port}");
                if !services::is_port_name(port) {
                    errors.push(err(
                        entry.clone(),
                        &field,
                        format!("{port:?} is not a port name (1-15 of a-z, 0-9, '-')"),
                    ));
                }
                if *n == 0 {
                    errors.push(err(entry.clone(), &field, "0 is not a port (1-65535)".into()));
                }
            }
            let (labels, services, ports, ready) = (e.labels, e.services, e.ports, e.ready.unwrap_or(true));
            out.push(Workload { name, namespace, service_account, labels, ip, services, ports, ready, local });
        }
    }
    let mut svcs: Vec<Service> = Vec::new();
    for (i, e) in file.services.into_iter().enumerate() {
        let entry = format!("services[{i}]");
        match e.validate(is_dns_label) {
            Ok(s) => {
                if let Some(prev) = svcs.iter().position(|p| p.key() == s.key()) {
                    errors.push(err(entry, "name", format!("{} is already defined by services[{prev}]", s.key())));
                } else if let Some(prev) = svcs.iter().position(|p| p.cluster_ip == s.cluster_ip) {
                    errors.push(err(
                        entry,
                        "clusterIP",
                        format!("{} is already used by services[{prev}]", s.cluster_ip),
                    ));
                } else if let Some(w) = ips.get(&s.cluster_ip) {
                    errors.push(err(entry, "clusterIP", format!("{} is the address of workloads[{w}]", s.cluster_ip)));
                } else {
                    svcs.push(s);
                }
            }
            Err(problems) => {
                errors.extend(problems.into_iter().map(|(field, reason)| err(entry.clone(), &field, reason)))
            }
        }
    }
    if !errors.is_empty() {
        return Err(WorkloadErrors(errors));
    }
    // A workload is selected by the Services of the file too (for `targetRefs` and metrics).
    let services_of = crate::services::by_namespace(svcs.iter(), |s| s.namespace.as_str());
    for w in &mut out {
        let in_namespace = services_of.get(w.namespace.as_str()).map_or(&[][..], Vec::as_slice);
        let selecting: Vec<String> = in_namespace.iter().filter(|s| s.selects(w)).map(|s| s.name.clone()).collect();
        w.services.extend(selecting);
        w.services.sort();
        w.services.dedup();
    }
    Ok(Loaded { workloads: out, services: svcs })
}

/// A pod of app `ledger` in namespace `ns` at `10.0.0.<ip>`, for tests: in the mesh or opted out,
/// ready or not, on this node (a veth) or another.
#[cfg(test)]
pub(crate) fn test_pod(name: &str, ip: u8, meshed: bool, ready: bool, local: bool) -> Workload {
    let mut labels = BTreeMap::from([("app".to_string(), "ledger".to_string())]);
    if !meshed {
        labels.insert(DATAPLANE_MODE_LABEL.into(), "none".into());
    }
    Workload {
        name: name.into(),
        namespace: "ns".into(),
        service_account: name.into(),
        labels,
        ip: Ipv4Addr::new(10, 0, 0, ip),
        services: Vec::new(),
        ports: BTreeMap::new(),
        ready,
        local: local.then(|| Local { veth: format!("veth-{name}"), ifindex: 10 + u32::from(ip), cgroup: None }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeLinks;
    impl Links for FakeLinks {
        fn ifindex(&self, name: &str) -> Option<u32> {
            match name {
                "wd-a" => Some(10),
                "wd-b" => Some(11),
                _ => None,
            }
        }
    }

    fn load_str(yaml: &str) -> Result<Vec<Workload>, WorkloadErrors> {
        load_all(yaml).map(|l| l.workloads)
    }

    fn load_all(yaml: &str) -> Result<Loaded, WorkloadErrors> {
        let dir = std::env::temp_dir().join(format!("warden-wl-{}-{}", std::process::id(), yaml.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("workloads.yaml");
        std::fs::write(&p, yaml).unwrap();
        load(&p, &FakeLinks)
    }

    #[test]
    fn loads_local_and_remote_workloads() {
        let w = load_str(
            "workloads:\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.1, veth: wd-a, labels: {app: a}}\n- {name: r, namespace: ns, serviceAccount: sa, ip: 10.0.9.1}\n",
        )
        .unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].local.as_ref().unwrap().ifindex, 10);
        assert_eq!(w[0].labels["app"], "a");
        assert!(w[1].local.is_none());
        assert_eq!(w[0].key(), "ns/a");
    }

    #[test]
    fn pod_and_service_account_names_are_subdomains_and_namespaces_labels() {
        let w = load_str("workloads:\n- {name: web.v2, namespace: ns, serviceAccount: my.sa, ip: 10.0.0.1}\n").unwrap();
        assert_eq!(w[0].key(), "ns/web.v2");
        assert_eq!(w[0].service_account, "my.sa");
        let e =
            load_str("workloads:\n- {name: a., namespace: my.ns, serviceAccount: .sa, ip: 10.0.0.1}\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("workloads[0].name: \"a.\" is not a DNS-1123 subdomain"), "{text}");
        assert!(text.contains("workloads[0].namespace: \"my.ns\" is not a DNS-1123 label"), "{text}");
        assert!(text.contains("workloads[0].serviceAccount: \".sa\" is not a DNS-1123 subdomain"), "{text}");
    }

    #[test]
    fn every_error_names_entry_and_field() {
        let e = load_str(
            "workloads:\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.300, veth: wd-a}\n- {name: b, namespace: ns, serviceAccount: sa, ip: 10.0.0.2, veth: wd-missing}\n- {name: B, namespace: ns, ip: 10.0.0.3}\n",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("workloads[0].ip: \"10.0.0.300\" is not an IPv4 address"), "{text}");
        assert!(text.contains("workloads[1].veth: no interface \"wd-missing\" on this node"), "{text}");
        assert!(text.contains("workloads[2].name: \"B\" is not a DNS-1123 subdomain"), "{text}");
        assert!(text.contains("workloads[2].serviceAccount: is required"), "{text}");
        assert!(text.contains("workloads.yaml"), "{text}");
    }

    #[test]
    fn services_select_their_pods_and_are_checked_against_the_workloads() {
        let l = load_all(
            "workloads:\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.1, labels: {app: a}, ports: {http: 8080}}\n- {name: b, namespace: ns, serviceAccount: sa, ip: 10.0.0.2, labels: {app: b}}\nservices:\n- {name: a-svc, namespace: ns, clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80, targetPort: http}]}\n",
        )
        .unwrap();
        assert_eq!(l.services.len(), 1);
        assert_eq!(l.workloads[0].services, ["a-svc"], "selected by the file's Service");
        assert!(l.workloads[1].services.is_empty());
        assert_eq!(l.services[0].target_port(80, &l.workloads[0]), Some(8080));
        assert!(l.workloads[0].ready, "serving unless said otherwise");
        let l = load_all("workloads:\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.1, ready: false}\n")
            .unwrap();
        assert!(!l.workloads[0].ready);

        let e = load_all(
            "workloads:\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.1, ports: {Bad_Name: 1}}\nservices:\n- {name: s, namespace: ns, clusterIP: 10.0.0.1, selector: {app: a}, ports: [{port: 80}]}\n- {name: t, namespace: ns, clusterIP: 10.96.0.9, ports: [{port: 80, targetPort: -1}]}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workloads[0].ports.Bad_Name: \"Bad_Name\" is not a port name"), "{e}");
        assert!(e.contains("services[0].clusterIP: 10.0.0.1 is the address of workloads[0]"), "{e}");
        assert!(e.contains("services[1].selector: is required"), "{e}");
        assert!(e.contains("services[1].ports[0].targetPort: -1 is not a port (1-65535)"), "{e}");
        assert!(e.contains("workloads.yaml"), "{e}");
    }

    #[test]
    fn duplicates_and_unknown_fields_are_refused() {
        let e = load_str(
            "workloads:\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.1, veth: wd-a}\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.1, veth: wd-a}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workloads[1].name: ns/a is already defined by workloads[0]"), "{e}");
        assert!(e.contains("workloads[1].ip: 10.0.0.1 is already used by workloads[0]"), "{e}");
        assert!(e.contains("workloads[1].veth: \"wd-a\" is already used by workloads[0]"), "{e}");
        let e = load_str("workloads:\n- {name: a, namespace: ns, serviceAccount: sa, ip: 10.0.0.1, vet: x}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `vet`"), "{e}");
        let e = load_str("workloads: [\n").unwrap_err().to_string();
        assert!(e.contains("invalid workload file (line"), "{e}");
    }
}
