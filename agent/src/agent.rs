//! The node agent: turns the workload file and the policies into a node state, commits it to the
//! datapath, attaches the programs to local workloads, and follows changes live.
//!
//! Inputs are validated completely before anything is applied. An invalid change is logged with
//! every error and ignored: the last good state keeps running. A restart adopts the pinned maps
//! and links (see `datapath::attach`) and reconciles them with the inputs without a gap.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ipnet::Ipv4Net;
use warden_common::{
    Direction, EP_MESHED, EndpointInfo, IDENTITY_ANY, IDENTITY_WORLD, PROTO_ANY, REMOTE_MESHED, REMOTE_SERVICE,
    RemoteInfo,
};

use crate::{
    datapath::{self, Datapath, NodeState, attach},
    record::{EndpointRecord, NodeRecord},
    source::{Inputs, Source, SourceError},
    workloads::Workload,
};

/// How often the inputs are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub trust_domain: String,
    /// Metrics (`:15020/stats/prometheus`), readiness (`:15021/healthz/ready`), access logs.
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Workload certificates and the admin endpoint (`GET /certs`); none without a CA.
    pub certs: Option<crate::certs::CertsConfig>,
    /// The mTLS data plane (capture, HBONE); none: L4 enforcement only.
    pub mesh: Option<crate::mesh::MeshConfig>,
    /// Whether TCP from the node's own stack (kubelet's probes) to its workloads is exempt from
    /// policy, in the kernel (`--node-probes`).
    pub node_probes: NodeProbes,
}

/// `warden agent --node-probes`: what the kernel does with a TCP connection that the node's own
/// network stack opens to one of its workloads (kubelet's readiness and liveness probes come from
/// the node's network namespace). See docs/mesh.md, "Kubelet probes and the node".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeProbes {
    /// Allowed without policy, counted with reason `node_local` (Istio ambient exempts probes,
    /// Cilium allows the host by default). Every process in the node's network namespace,
    /// hostNetwork pods included, is "the node".
    #[default]
    Allow,
    /// Decided by the node's address like any peer: an ALLOW policy must name it, and STRICT
    /// refuses it as plaintext.
    Deny,
}

/// Why a set of inputs could not become a node state. Nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("compiling policies: {0}")]
    Compile(#[from] warden_authz::CompileError),
}

/// A validated, compiled set of inputs, ready to apply.
pub struct Desired {
    pub workloads: Vec<Workload>,
    /// The Services the mesh carries connections to.
    pub services: Vec<crate::services::Service>,
    /// The policies, for the mesh's authorization of mTLS connections.
    pub policies: std::sync::Arc<warden_authz::PolicySet>,
    pub state: NodeState,
    pub identity_names: BTreeMap<u32, String>,
    pub policy_names: BTreeMap<u32, String>,
    pub valid_until: Option<SystemTime>,
    pub warnings: Vec<String>,
}

/// Compile a snapshot of the inputs into a node state. Pure with respect to the kernel.
pub fn build(
    inputs: Inputs,
    trust_domain: &str,
    capture: Option<SocketAddrV4>,
    record: &mut NodeRecord,
) -> Result<Desired, BuildError> {
    let Inputs { workloads, services, policies, outside_mesh } = inputs;

    let authz_workloads: Vec<warden_authz::Workload> = workloads
        .iter()
        .map(|w| warden_authz::Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone(),
            ip: w.ip,
            services: w.services.clone(),
        })
        .collect();
    let local: Vec<(usize, u32)> = workloads
        .iter()
        .enumerate()
        .filter(|(_, w)| w.local.is_some())
        .map(|(i, w)| (i, record.endpoint_id(&w.key())))
        .collect();
    // With the mesh on, every workload in it is reached over HBONE, and traffic that did not come
    // through an agent is decided in the plaintext view of its policy.
    let meshed = |w: &Workload| capture.is_some() && w.in_mesh();
    let local_meshed: Vec<bool> = local.iter().map(|(i, _)| meshed(&workloads[*i])).collect();
    let input = warden_authz::CompileInput {
        policies: &policies,
        workloads: &authz_workloads,
        local: &local,
        meshed: &local_meshed,
        trust_domain,
        now: SystemTime::now(),
    };
    let compiled = warden_authz::compile(&input, record)?;

    // The identity of an address, as the kernel's longest-prefix match will find it.
    let identity_of = |ip: Ipv4Addr| {
        compiled
            .ipcache
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map_or(IDENTITY_WORLD, |(_, id)| *id)
    };
    let mut ipcache: BTreeMap<Ipv4Net, RemoteInfo> = compiled
        .ipcache
        .iter()
        .map(|(net, id)| (*net, RemoteInfo { identity: *id, local_ifindex: 0, flags: 0 }))
        .collect();
    // A meshed workload's /32 says it is reached over HBONE.
    for w in workloads.iter().filter(|w| w.local.is_none() && meshed(w)) {
        let identity = identity_of(w.ip);
        ipcache.insert(Ipv4Net::from(w.ip), RemoteInfo { identity, local_ifindex: 0, flags: REMOTE_MESHED });
    }
    // A Service's virtual address is captured as a meshed workload's is while a pod the mesh
    // can carry it to is there (`Service::mesh_backend`: meshed, ready, on this node for a
    // node-local Service); the agent picks among those pods.
    // Pods a source keeps out of its workloads (opted out) are never backends the mesh carries to,
    // but they take their share of the Service's connections (`services::splits`).
    let pods_of = crate::services::by_namespace(workloads.iter().chain(&outside_mesh), |w| w.namespace.as_str());
    for s in &services {
        let pods = pods_of.get(s.namespace.as_str()).map_or(&[][..], Vec::as_slice);
        if capture.is_some() && s.captured(pods) {
            let info = RemoteInfo {
                identity: identity_of(s.cluster_ip),
                local_ifindex: 0,
                flags: REMOTE_MESHED | REMOTE_SERVICE,
            };
            ipcache.insert(Ipv4Net::from(s.cluster_ip), info);
        }
    }
    // Endpoint directions whose policy is the default entry alone (egress, always: Istio has no
    // egress authorization) get a flag that saves the kernel three lookups per new flow.
    let mut specific: BTreeSet<(u32, Direction, bool)> = BTreeSet::new();
    for (k, _) in &compiled.policy {
        if let Some(dir) = k.direction()
            && (k.remote_identity != IDENTITY_ANY || k.proto != PROTO_ANY || k.dport != 0)
        {
            specific.insert((k.endpoint_id, dir, k.is_plaintext()));
        }
    }
    let flags = |endpoint_id: u32| {
        [(Direction::Ingress, false), (Direction::Ingress, true), (Direction::Egress, false)]
            .into_iter()
            .filter(|(d, p)| !specific.contains(&(endpoint_id, *d, *p)))
            .fold(0, |f, (d, p)| f | EndpointInfo::default_only_flag(d, p))
    };
    let mut endpoints = Vec::new();
    for (i, endpoint_id) in &local {
        let w = &workloads[*i];
        let l = w.local.as_ref().expect("local workloads have a veth");
        let identity = identity_of(w.ip);
        // Every local workload has its own /32 so the cgroup hook can find it as a destination.
        let remote_flags = if meshed(w) { REMOTE_MESHED } else { 0 };
        ipcache.insert(Ipv4Net::from(w.ip), RemoteInfo { identity, local_ifindex: l.ifindex, flags: remote_flags });
        let flags = flags(*endpoint_id) | if meshed(w) { EP_MESHED } else { 0 };
        endpoints.push((l.ifindex, EndpointInfo { endpoint_id: *endpoint_id, identity, ip: w.ip.octets(), flags }));
    }
    let mut warnings = compiled.warnings;
    let services_split =
        if capture.is_some() { crate::services::splits(&services, &pods_of, &mut warnings) } else { Vec::new() };
    Ok(Desired {
        state: NodeState {
            ipcache: ipcache.into_iter().collect(),
            endpoints,
            policy: compiled.policy,
            services: services_split,
            capture,
            events: false,
            fast_path: false,
            node_exempt: false,
        },
        identity_names: compiled.identities,
        policy_names: compiled.policy_names,
        valid_until: compiled.valid_until,
        warnings,
        workloads,
        services,
        policies: std::sync::Arc::new(policies),
    })
}

/// Errors while applying a validated state to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Commit(#[from] crate::datapath::CommitError),
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    #[error("{workload}: registering cgroup {path}: {source}")]
    Cgroup { workload: String, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Record(#[from] crate::record::RecordError),
}

/// Apply a desired state: release departed workloads, commit the new state, attach new or moved
/// workloads, and save the record. `adopt` re-attaches every workload (after a restart), which
/// swaps the programs inside the pinned links without a gap.
pub fn apply(
    dp: &mut Datapath,
    record: &mut NodeRecord,
    state_dir: &Path,
    d: &Desired,
    adopt: bool,
) -> Result<u32, ApplyError> {
    let wanted: BTreeMap<String, &Workload> =
        d.workloads.iter().filter(|w| w.local.is_some()).map(|w| (w.key(), w)).collect();

    // 1. Workloads that left (or whose pins outlived them): detach before their state goes.
    let mut gone: BTreeSet<String> = record.endpoints.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
    gone.extend(attach::pinned_workloads(&dp.pin_dir).into_iter().filter(|k| !wanted.contains_key(k)));
    for key in &gone {
        dp.detach(key);
        if let Some(cg) = record.endpoints.get(key).and_then(|e| e.cgroup_id) {
            dp.clear_cgroup(cg);
        }
        record.endpoints.remove(key);
        tracing::info!(workload = %key, "detached");
    }

    // 2. The new state, atomically.
    let generation = dp.commit(&d.state)?;

    // 3. Attach what is new, moved, or (after a restart) adopted.
    for (key, w) in &wanted {
        let l = w.local.as_ref().expect("filtered on local");
        let endpoint = d.state.endpoints.iter().find(|(i, _)| *i == l.ifindex).map(|(_, e)| e);
        let identity = endpoint.map_or(0, |e| e.identity);
        let meshed = endpoint.is_some_and(EndpointInfo::is_meshed);
        let previous = record.endpoints.get(key).cloned();
        let mesh_hooked = l.cgroup.is_none() || attach::has_sock_ops(&dp.pin_dir, key) == meshed;
        let unchanged = mesh_hooked
            && previous.as_ref().is_some_and(|p| p.ifindex == l.ifindex && p.veth == l.veth && p.cgroup == l.cgroup);
        let cgroup_id = match &l.cgroup {
            Some(path) => Some(dp.set_cgroup(path, l.ifindex).map_err(|source| ApplyError::Cgroup {
                workload: key.clone(),
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        if let Some(old) = previous.as_ref().and_then(|p| p.cgroup_id).filter(|old| Some(*old) != cgroup_id) {
            dp.clear_cgroup(old);
        }
        if !unchanged || adopt {
            dp.attach(key, l, meshed)?;
            tracing::info!(workload = %key, veth = %l.veth, ifindex = l.ifindex, "attached");
        }
        record.endpoints.insert(
            key.clone(),
            EndpointRecord {
                id: record.endpoint_ids.get(key).copied().unwrap_or(0),
                veth: l.veth.clone(),
                ifindex: l.ifindex,
                ip: w.ip.to_string(),
                identity,
                cgroup: l.cgroup.clone(),
                cgroup_id,
            },
        );
    }

    record.generation = generation;
    record.identity_names = d.identity_names.clone();
    record.policy_names = d.policy_names.clone();
    record.save(state_dir)?;
    Ok(generation)
}

/// Logs a state's warnings: the compiler's at every commit; the policies' own (what `warden
/// policy validate` warns about: a rule narrowed or widened at L4, a warden extension, a skipped
/// file) when they first appear, so an unchanged policy set does not repeat them at each commit.
fn log_desired(d: &Desired, policy_warnings: &mut Vec<String>) {
    for w in &d.warnings {
        tracing::warn!("{w}");
    }
    let now = d.policies.warnings();
    for w in now.iter().filter(|w| !policy_warnings.contains(w)) {
        tracing::warn!("{}", w.strip_prefix("warning: ").unwrap_or(w));
    }
    *policy_warnings = now.to_vec();
}

/// Read and compile the source's current inputs.
fn snapshot(source: &mut dyn Source, cfg: &AgentConfig, record: &mut NodeRecord) -> Result<Desired, BuildError> {
    let inputs = source.read()?;
    let mut desired = build(inputs, &cfg.trust_domain, cfg.mesh.as_ref().map(|m| m.capture), record)?;
    // The kernel writes flow events only for the access log, their one reader.
    desired.state.events = cfg.telemetry.access_log != crate::telemetry::AccessLogFormat::Off;
    desired.state.fast_path = cfg.mesh.as_ref().is_some_and(|m| m.fast_path);
    desired.state.node_exempt = cfg.node_probes == NodeProbes::Allow;
    Ok(desired)
}

fn mesh_view(d: &Desired, cfg: &AgentConfig) -> crate::mesh::View {
    let domain = cfg.mesh.as_ref().map(|m| m.cluster_domain.clone()).unwrap_or_default();
    crate::mesh::View::new(&d.workloads, &d.services, d.policies.clone(), &cfg.trust_domain, &domain)
}

/// Run the agent until SIGTERM/SIGINT. The first snapshot must succeed (the agent does not start
/// on bad input); later bad input is reported and ignored.
pub async fn run(cfg: AgentConfig, mut source: Box<dyn Source>) -> anyhow::Result<()> {
    // One agent per pin directory, for the agent's life: taken before anything binds a port, so
    // a second agent says what is in its way. On a node without pins yet it is taken once they
    // exist, after the input and the CA were found good (bad input touches nothing).
    let held =
        |e| anyhow::anyhow!("{e}: one agent per pin directory (stop that one, or give this one another --pin-dir)");
    let pins = crate::datapath::lock::PinLock::acquire_existing(&cfg.pin_dir).map_err(held)?;
    // Serving before the first commit: readiness answers 503 until the node enforces.
    let mut telemetry = crate::telemetry::Telemetry::new(cfg.telemetry.clone(), &cfg.pin_dir, &cfg.state_dir);
    // Certificate metrics (expiry per identity, rotations, CRL age) on the same endpoint.
    let cert_metrics = cfg.certs.as_ref().map(|_| warden_identity::metrics::Metrics::new(telemetry.registry_mut()));
    let mesh_metrics = telemetry.tcp_recorder();
    let routing_metrics = cfg.mesh.as_ref().map(|_| crate::mesh::routing::Metrics::new(telemetry.registry_mut()));
    let mut telemetry = telemetry.serve().await?;
    let mut record = NodeRecord::load(&cfg.state_dir)?;
    let desired = snapshot(source.as_mut(), &cfg, &mut record)
        .map_err(|e| anyhow::anyhow!("refusing to start on invalid input:\n{e}"))?;
    // A broken CA stops the agent before it touches the kernel.
    let certs = cfg
        .certs
        .as_ref()
        .map(|c| crate::certs::WorkloadCerts::serve(c, &cfg.trust_domain, cert_metrics))
        .transpose()?;
    if let Some(m) = &cfg.mesh {
        m.check()?;
        tracing::info!(records = ?warden_identity::tls::RecordCipher::for_this_cpu(), "mesh: TLS record cipher (AES-GCM)");
    }
    let _pins = match pins {
        Some(lock) => lock,
        None => {
            crate::datapath::prepare_pin_dir(&cfg.pin_dir)?;
            crate::datapath::lock::PinLock::acquire(&cfg.pin_dir).map_err(held)?
        }
    };
    let mut dp = Datapath::load(&cfg.pin_dir)?;
    // The fast path files the agent's own sockets from its own cgroup; without that, it stays off.
    let mut cfg = cfg;
    // It also needs to read a redirected queue's length, or a slow reader's queue would grow
    // without bound; without either, it stays off.
    if let Some(m) = cfg.mesh.as_mut().filter(|m| m.fast_path) {
        match start_fast_path(&mut dp, &m.cgroup_root) {
            Ok((cgroup, limit)) => {
                tracing::info!(cgroup = %cgroup.display(), queue_limit = limit, "same-node fast path on")
            }
            Err(e) => {
                tracing::warn!("same-node fast path off: {e}");
                m.fast_path = false;
            }
        }
    }
    let mut desired = desired;
    desired.state.fast_path = cfg.mesh.as_ref().is_some_and(|m| m.fast_path);
    // The mesh serves before the first commit turns capture on: once the committed generation is
    // visible, the listeners are up.
    let mesh = match (&cfg.mesh, &certs) {
        (Some(m), Some(c)) => {
            let view = mesh_view(&desired, &cfg);
            let routing = routing_metrics.expect("registered whenever the mesh is configured");
            Some(crate::mesh::Mesh::start(m, c, &cfg.pin_dir, view, mesh_metrics, routing).await?)
        }
        (Some(_), None) => anyhow::bail!("the mesh needs workload certificates: give a CA (--ca-dir or --ca-addr)"),
        _ => None,
    };
    let mut policy_warnings = Vec::new();
    log_desired(&desired, &mut policy_warnings);
    let generation = apply(&mut dp, &mut record, &cfg.state_dir, &desired, true)?;
    telemetry.committed();
    // Loading and compiling freed far more than the steady state holds.
    crate::memory::trim();
    crate::memory::spawn_trimmer();
    if let Some(c) = &certs {
        c.sync_workloads(&desired.workloads).await;
    }
    tracing::info!(generation, source = %source.describe(), workloads = desired.workloads.len(), entries = desired.state.policy.len(), "committed; enforcing");
    // Start-up is done: its code need not stay mapped (`memory::release_code`).
    match crate::memory::release_code() {
        Ok(bytes) => tracing::debug!(bytes, "start-up code released from the resident set"),
        Err(e) => tracing::debug!("start-up code stays resident: {e}"),
    }
    let mut valid_until = desired.valid_until;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    let mut routing = tokio::time::interval_at(
        tokio::time::Instant::now() + crate::mesh::ROUTING_RECHECK,
        crate::mesh::ROUTING_RECHECK,
    );
    routing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
            _ = routing.tick() => {
                if let Some(m) = &mesh {
                    m.recheck_routing().await;
                }
                continue;
            }
        }
        let expired = valid_until.is_some_and(|t| SystemTime::now() >= t);
        if !source.changed() && !expired {
            continue;
        }
        match snapshot(source.as_mut(), &cfg, &mut record) {
            Ok(d) => {
                log_desired(&d, &mut policy_warnings);
                match apply(&mut dp, &mut record, &cfg.state_dir, &d, false) {
                    Ok(generation) => {
                        valid_until = d.valid_until;
                        tracing::info!(
                            generation,
                            workloads = d.workloads.len(),
                            entries = d.state.policy.len(),
                            "committed"
                        );
                        if let Some(c) = &certs {
                            c.sync_workloads(&d.workloads).await;
                        }
                        if let Some(m) = &mesh {
                            m.update(mesh_view(&d, &cfg)).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!("applying the new state failed; the last committed state keeps running: {e}")
                    }
                }
            }
            Err(e) => tracing::error!("ignoring invalid input; the last good state keeps running:\n{e}"),
        }
    }
    tracing::info!("stopping; pinned programs and maps keep enforcing");
    Ok(())
}

/// The kernel's side of the fast path: the redirected queues' bound ([`datapath::fast_path_kernel`]),
/// then sock_ops on the agent's own cgroup. Returns the cgroup and the bound.
fn start_fast_path(dp: &mut Datapath, cgroup_root: &Path) -> Result<(PathBuf, u32), Box<dyn std::error::Error>> {
    let kernel = datapath::fast_path_kernel(Path::new(datapath::btf::VMLINUX), Path::new(TCP_RMEM))?;
    dp.set_fast_path_kernel(kernel)?;
    Ok((dp.attach_agent(cgroup_root)?, kernel.limit))
}

/// The node's TCP receive buffer sizes (min, default, max).
const TCP_RMEM: &str = "/proc/sys/net/ipv4/tcp_rmem";

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        services::{Service, ServicePort, TargetPort},
        workloads::test_pod as pod,
    };

    /// The kernel's flags for Service address `vip` once `pods` are built with a `ledger` Service
    /// there (`node_local`: `internalTrafficPolicy: Local`).
    fn service_flags(pods: Vec<Workload>, node_local: bool) -> Option<u32> {
        let vip = Ipv4Addr::new(10, 96, 0, 1);
        let service = Service {
            name: "ledger".into(),
            namespace: "ns".into(),
            cluster_ip: vip,
            ports: vec![ServicePort { port: 80, target: TargetPort::Number(8080) }],
            selector: BTreeMap::from([("app".to_string(), "ledger".to_string())]),
            node_local,
        };
        let inputs = Inputs {
            workloads: pods,
            services: vec![service],
            policies: warden_authz::PolicySet::from_resources(Vec::new(), &Default::default()).unwrap(),
            outside_mesh: Vec::new(),
        };
        let capture = Some(SocketAddrV4::new(Ipv4Addr::new(169, 254, 1, 1), 15001));
        let desired = build(inputs, "cluster.local", capture, &mut NodeRecord::default()).unwrap();
        desired.state.ipcache.iter().find(|(net, _)| *net == Ipv4Net::from(vip)).map(|(_, info)| info.flags)
    }

    /// The kernel captures a Service's address exactly while the agent has a pod to carry it to:
    /// otherwise the connection is the Service proxy's, which reaches the ready pods out of the
    /// mesh instead of the agent refusing it.
    #[test]
    fn a_services_address_is_captured_only_while_a_meshed_ready_pod_can_take_it() {
        let captured = Some(REMOTE_MESHED | REMOTE_SERVICE);
        assert_eq!(
            service_flags(vec![pod("m", 2, true, true, false), pod("p", 3, false, true, false)], false),
            captured
        );
        // A rollout into the mesh: the meshed pod is still starting, the plain one serves.
        assert_eq!(
            service_flags(vec![pod("starting", 2, true, false, false), pod("p", 3, false, true, false)], false),
            None,
            "no ready meshed pod: left to the Service proxy"
        );
        assert_eq!(service_flags(vec![pod("p", 3, false, true, true)], false), None, "no meshed pod at all");
        // internalTrafficPolicy: Local: a meshed pod of this node, or the proxy (which may have a
        // local pod out of the mesh, or drops the connection as before).
        assert_eq!(service_flags(vec![pod("here", 2, true, true, true)], true), captured);
        assert_eq!(
            service_flags(vec![pod("elsewhere", 2, true, true, false), pod("p", 3, false, true, true)], true),
            None,
            "node-local, and the only meshed pod is on another node"
        );
    }
}
