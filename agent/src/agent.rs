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
    let mut services_split =
        if capture.is_some() { crate::services::splits(&services, &pods_of, &mut warnings) } else { Vec::new() };
    // In a fixed order, whatever order the source lists workloads and Services in, so that the
    // same state compares equal (`same_commit`).
    endpoints.sort_unstable_by_key(|(ifindex, _)| *ifindex);
    services_split.sort_unstable_by_key(|(k, _)| (k.addr, k.port));
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

/// Apply a desired state: check that it fits the maps, release departed workloads, commit the new
/// state, attach new or moved workloads, and save the record. A state that does not fit is
/// refused before anything is touched (the error names the map and what fills it). `adopt`
/// re-attaches every workload (after a restart), which swaps the programs inside the pinned links
/// without a gap.
pub fn apply(
    dp: &mut Datapath,
    record: &mut NodeRecord,
    state_dir: &Path,
    d: &Desired,
    adopt: bool,
) -> Result<u32, ApplyError> {
    let wanted: BTreeMap<String, &Workload> =
        d.workloads.iter().filter(|w| w.local.is_some()).map(|w| (w.key(), w)).collect();

    // 0. Everything must fit before anything is touched: the running state stays whole otherwise.
    dp.check(&d.state, &d.policy_names).map_err(crate::datapath::CommitError::from)?;

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
    let generation = dp.commit(&d.state, &d.policy_names)?;

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
    record.committed(d.identity_names.clone(), d.policy_names.clone());
    record.save(state_dir)?;
    Ok(generation)
}

/// The warnings of the last state built, so that each is logged when it first appears.
#[derive(Default)]
struct LoggedWarnings {
    /// The compiler's (an ALLOW rule with L7 attributes that never matches in the kernel, two
    /// workloads sharing an address, a Service with too many pods out of the mesh).
    compiler: Vec<String>,
    /// The policies' own (what `warden policy validate` warns about: a rule narrowed or widened
    /// at L4, a warden extension, a skipped file).
    policies: Vec<String>,
}

/// The warnings of `now` that `before` did not have.
fn new_warnings<'a>(now: &'a [String], before: &'a [String]) -> impl Iterator<Item = &'a String> {
    now.iter().filter(|w| !before.contains(w))
}

/// Logs a state's warnings, the compiler's and the policies' own, when they first appear, so an
/// unchanged policy set does not repeat them at each build.
fn log_desired(d: &Desired, logged: &mut LoggedWarnings) {
    for w in new_warnings(&d.warnings, &logged.compiler) {
        tracing::warn!("{w}");
    }
    logged.compiler.clone_from(&d.warnings);
    let now = d.policies.warnings();
    for w in new_warnings(now, &logged.policies) {
        tracing::warn!("{}", w.strip_prefix("warning: ").unwrap_or(w));
    }
    logged.policies = now.to_vec();
}

/// Whether applying `d` would write exactly what applying `committed` wrote: the kernel's state
/// (maps and configuration), the local workloads' attachments and cgroups, and the names the node
/// record keeps. The rest of the inputs (labels and annotations no policy reads, L7 details, the
/// Services the mesh alone uses) is not the kernel's: a change there needs no commit, and a
/// commit would cost the kernel's flow cache (a new generation re-decides every cached flow).
fn same_commit(committed: &Desired, d: &Desired) -> bool {
    fn locals(d: &Desired) -> BTreeMap<String, &crate::workloads::Local> {
        d.workloads.iter().filter_map(|w| w.local.as_ref().map(|l| (w.key(), l))).collect()
    }
    committed.state == d.state
        && committed.identity_names == d.identity_names
        && committed.policy_names == d.policy_names
        && locals(committed) == locals(d)
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
    let mut logged = LoggedWarnings::default();
    log_desired(&desired, &mut logged);
    let generation = apply(&mut dp, &mut record, &cfg.state_dir, &desired, true)?;
    telemetry.committed();
    telemetry.commit_succeeded(generation);
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
    // What the kernel holds, to tell a change of the inputs from a change of the node's state;
    // none when a failed apply may have left the kernel between two states.
    let mut committed = Some(desired);

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
                log_desired(&d, &mut logged);
                if committed.as_ref().is_some_and(|c| same_commit(c, &d)) {
                    tracing::debug!(
                        generation = record.generation,
                        "the inputs changed but not the node's state: nothing to commit"
                    );
                } else {
                    match apply(&mut dp, &mut record, &cfg.state_dir, &d, false) {
                        Ok(generation) => {
                            telemetry.commit_succeeded(generation);
                            tracing::info!(
                                generation,
                                workloads = d.workloads.len(),
                                entries = d.state.policy.len(),
                                "committed"
                            );
                        }
                        Err(e) => {
                            tracing::error!(
                                "applying the new state failed; the last committed state keeps running: {e}"
                            );
                            telemetry.commit_failed();
                            // A state refused for its size touched nothing; any other failure may
                            // have left part of the new state (detached workloads, a commit
                            // without its attachments): the next state is applied whole.
                            if !matches!(e, ApplyError::Commit(datapath::CommitError::Capacity(_))) {
                                committed = None;
                            }
                            continue;
                        }
                    }
                }
                // What is not the kernel's follows every valid build: the next recompile time,
                // the workloads' certificates, the mesh's view (its workloads, Services and the
                // whole policies, L7 included).
                valid_until = d.valid_until;
                if let Some(c) = &certs {
                    c.sync_workloads(&d.workloads).await;
                }
                if let Some(m) = &mesh {
                    m.update(mesh_view(&d, &cfg)).await;
                }
                committed = Some(d);
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

    /// Inputs of `local` pods of this node in namespace `ns` and `remote` pods elsewhere, each
    /// with its own service account, in namespace `bulk`, under `policies` (YAML).
    fn inputs_with(local: u8, remote: u8, policies: &str) -> Inputs {
        let mut workloads: Vec<Workload> = (0..local).map(|i| pod(&format!("w{i}"), 1 + i, true, true, true)).collect();
        for i in 0..remote {
            let mut p = pod(&format!("bulk-{i}"), 100 + i, true, true, false);
            p.namespace = "bulk".into();
            workloads.push(p);
        }
        let resources = warden_authz::parse_str(policies, "test.yaml").unwrap();
        Inputs {
            workloads,
            services: Vec::new(),
            policies: warden_authz::PolicySet::from_resources(resources, &Default::default()).unwrap(),
            outside_mesh: Vec::new(),
        }
    }

    fn inputs(remote: u8, policies: &str) -> Inputs {
        inputs_with(1, remote, policies)
    }

    fn allow_from_bulk(name: &str, ports: std::ops::RangeInclusive<u16>) -> String {
        let ports: Vec<String> = ports.map(|p| format!("\"{p}\"")).collect();
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: ns}}\n\
             spec:\n  action: ALLOW\n  rules:\n  - from: [{{source: {{namespaces: [bulk]}}}}]\n\
             \x20   to: [{{operation: {{ports: [{}]}}}}]\n",
            ports.join(", ")
        )
    }

    /// The audit's reproducer: 150 remote pods, each its own identity, and one policy allowing
    /// them 900 ports on the node's two pods. The state is valid but takes more than one slot's
    /// share of the policy map; the check refuses it before anything is written, naming the map,
    /// the numbers and the policy, so the operator knows what to shrink.
    #[test]
    fn an_oversized_policy_set_is_refused_naming_the_map_the_numbers_and_the_policy() {
        let mut record = NodeRecord::default();
        let policies = allow_from_bulk("bulk-ports", 1..=900);
        let d = build(inputs_with(2, 150, &policies), "cluster.local", None, &mut record).unwrap();
        assert_eq!(d.state.policy.len(), 270_004, "the audit's count");
        let e = datapath::Entries::default();
        let err =
            datapath::commit::fits(&d.state.entries(), &e, &datapath::Entries::BUILT, &d.state.policy, &d.policy_names)
                .unwrap_err();
        let text = datapath::CommitError::from(err).to_string();
        let count = d.state.policy.len().to_string();
        for part in ["warden_policy_v1", &count, "524288", "262144", "ns/bulk-ports ("] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
        // A third of the ports fits.
        let third = allow_from_bulk("bulk-ports", 1..=300);
        let d = build(inputs_with(2, 150, &third), "cluster.local", None, &mut record).unwrap();
        let fits =
            datapath::commit::fits(&d.state.entries(), &e, &datapath::Entries::BUILT, &d.state.policy, &d.policy_names);
        assert_eq!(fits, Ok(()));
    }

    /// A change of the inputs that changes nothing the node enforces needs no commit (which would
    /// bump the generation and make the kernel decide every cached flow again); one that does,
    /// does.
    #[test]
    fn only_a_change_of_what_the_kernel_holds_needs_a_commit() {
        let mut record = NodeRecord::default();
        let policies = allow_from_bulk("bulk-ports", 8080..=8081);
        let mut build = |inputs: Inputs| build(inputs, "cluster.local", None, &mut record).unwrap();
        let committed = build(inputs(3, &policies));
        assert!(same_commit(&committed, &build(inputs(3, &policies))), "the same inputs again");

        // A label no policy reads on a remote pod, an annotation-like change.
        let mut relabelled = inputs(3, &policies);
        relabelled.workloads[2].labels.insert("team".into(), "payments".into());
        assert!(same_commit(&committed, &build(relabelled)));
        // A policy of a namespace with no workload of this node.
        let elsewhere = format!(
            "{policies}---\n{}",
            allow_from_bulk("other", 9090..=9090).replace("namespace: ns", "namespace: far")
        );
        assert!(same_commit(&committed, &build(inputs(3, &elsewhere))));

        // What the kernel enforces: a port, a new remote identity, the local pod's cgroup.
        assert!(!same_commit(&committed, &build(inputs(3, &allow_from_bulk("bulk-ports", 8080..=8082)))));
        assert!(!same_commit(&committed, &build(inputs(4, &policies))));
        let mut moved = inputs(3, &policies);
        moved.workloads[0].local.as_mut().unwrap().cgroup = Some("/sys/fs/cgroup/w".into());
        assert!(!same_commit(&committed, &build(moved)));
        // A policy renamed with the same rules: the entries name the new policy.
        assert!(!same_commit(&committed, &build(inputs(3, &allow_from_bulk("renamed", 8080..=8081)))));
        // The workloads listed in another order are the same state.
        let mut reordered = inputs(3, &policies);
        reordered.workloads.reverse();
        assert!(same_commit(&committed, &build(reordered)));
    }

    #[test]
    fn only_new_warnings_are_logged_again() {
        let before = vec!["a".to_string(), "b".to_string()];
        let now = vec!["b".to_string(), "c".to_string()];
        assert_eq!(new_warnings(&now, &before).collect::<Vec<_>>(), ["c"]);
        assert_eq!(new_warnings(&now, &now).count(), 0);
    }
}
