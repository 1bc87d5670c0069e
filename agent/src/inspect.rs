//! `warden maps`: the live maps in human terms (workload, remote identity by name, port,
//! verdict, policy name, packets, bytes), read from the pins and named through the node record.
//! Works while the agent is down: the pins are the truth.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use serde::Serialize;
use warden_common::{
    Direction, DropReason, HOOK_CONNECT, HOOK_TUNNEL, IDENTITY_ANY, IPCACHE_SLOT_BITS, POLICY_ID_NONE, PROTO_ANY,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP, REMOTE_MESHED, REMOTE_SERVICE, Verdict,
};

use crate::{datapath::Maps, record::NodeRecord};

#[derive(Debug, Serialize)]
pub struct MapsView {
    pub generation: u32,
    pub active_slot: u8,
    pub endpoints: Vec<EndpointView>,
    pub ipcache: Vec<IpcacheView>,
    /// Service ports whose meshed clients' connections are shared with pods out of the mesh.
    pub services: Vec<ServiceSplitView>,
    pub fast_path: FastPathView,
    /// The node's policy routing for the mesh (rules 1000-1002, tables 15008 and 15009), read
    /// from the kernel of the namespace `warden maps` runs in.
    pub routing: Option<crate::mesh::routing::RoutingStatus>,
    /// Why `routing` could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_error: Option<String>,
}

/// One Service port of `warden_services_v2`: of every `meshed + plain.len()` connections of a
/// meshed client, `meshed` go to the agent and one to each of `plain`.
#[derive(Debug, Serialize)]
pub struct ServiceSplitView {
    /// The Service's address and port.
    pub service: String,
    pub meshed: u16,
    /// The pods out of the mesh: address and target port.
    pub plain: Vec<String>,
}

/// The same-node fast path: whether it is on, its redirected queues' bound, and what it did.
#[derive(Debug, Serialize)]
pub struct FastPathView {
    /// The committed switch (`--fast-path`).
    pub on: bool,
    /// The most a redirected queue may hold (0: the agent found no offsets; nothing redirected).
    pub queue_limit: u32,
    /// This kernel's `offsetof(struct sock, sk_user_data)` and `offsetof(struct sk_psock,
    /// msg_tot_len)`, from its BTF.
    pub sk_user_data_offset: u32,
    pub msg_tot_len_offset: u32,
    /// `warden_fastpath_counters_v2`, summed over CPUs.
    pub counters: FastPathCounters,
}

/// What the fast path did (the names of its `warden_fastpath_*` metrics).
#[derive(Debug, Serialize)]
pub struct FastPathCounters {
    pub sockets: u64,
    pub redirected_messages: u64,
    pub redirected_bytes: u64,
    pub tcp_messages: u64,
    /// Sockets that took TCP for good, by reason.
    pub fallbacks_no_peer: u64,
    pub fallbacks_changed: u64,
    pub fallbacks_backlog: u64,
}

impl From<warden_common::FastpathCounter> for FastPathCounters {
    fn from(c: warden_common::FastpathCounter) -> Self {
        FastPathCounters {
            sockets: c.sockets,
            redirected_messages: c.redirected_msgs,
            redirected_bytes: c.redirected_bytes,
            tcp_messages: c.passed_msgs,
            fallbacks_no_peer: c.no_peer,
            fallbacks_changed: c.fallbacks,
            fallbacks_backlog: c.backlog_fallbacks,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub workload: String,
    pub endpoint_id: u32,
    pub identity: u32,
    pub identity_name: String,
    pub ifindex: u32,
    pub ip: String,
    pub policy: Vec<EntryView>,
    pub counters: Vec<CounterView>,
}

#[derive(Debug, Serialize)]
pub struct EntryView {
    pub direction: &'static str,
    pub remote_identity: Option<u32>,
    pub remote: String,
    pub port: String,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub policy: String,
}

#[derive(Debug, Serialize)]
pub struct CounterView {
    /// Direction of the flows (who initiated them).
    pub direction: &'static str,
    pub hook: &'static str,
    pub remote_identity: u32,
    pub remote: String,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub policy: String,
    /// Totals, both ways.
    pub packets: u64,
    pub bytes: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub opened: u64,
    pub closed: u64,
}

#[derive(Debug, Serialize)]
pub struct IpcacheView {
    pub cidr: String,
    pub identity: u32,
    pub name: String,
    pub local_ifindex: u32,
    /// In the mesh: a meshed workload, or a Service with meshed pods.
    pub meshed: bool,
    /// A Service's virtual address: the agent picks one of its meshed pods (and `services` says
    /// whether pods out of the mesh take a share).
    pub service: bool,
}

fn verdict_name(v: u8) -> &'static str {
    match v {
        x if x == Verdict::Allow as u8 => Verdict::Allow.name(),
        x if x == Verdict::Deny as u8 => Verdict::Deny.name(),
        _ => "INVALID(deny)",
    }
}

fn reason_name(r: u8) -> &'static str {
    DropReason::from_u8(r).map_or("unknown", DropReason::name)
}

fn port_name(proto: u8, port: u16) -> String {
    match (proto, port) {
        (PROTO_ANY, _) => "*".into(),
        (PROTO_TCP, p) => format!("{p}/tcp"),
        (PROTO_UDP, p) => format!("{p}/udp"),
        (PROTO_ICMP, _) => "icmp".into(),
        (p, port) => format!("{port}/proto{p}"),
    }
}

/// Attempts at a consistent read before giving up.
const READ_ATTEMPTS: usize = 20;

/// Read the live maps under `pin_dir`, named through the record in `state_dir`. A commit that
/// flips the generation meanwhile clears the slot being read (and may rewrite the record): the
/// read is taken again until the generation is the same before and after it.
pub fn read(pin_dir: &Path, state_dir: &Path) -> anyhow::Result<MapsView> {
    let maps = Maps::open(pin_dir)?;
    for _ in 0..READ_ATTEMPTS {
        let view = read_once(&maps, state_dir)?;
        if maps.config().generation == view.generation {
            return Ok(view);
        }
    }
    anyhow::bail!("the agent committed a new generation during each of {READ_ATTEMPTS} reads of the maps; try again")
}

fn read_once(maps: &Maps, state_dir: &Path) -> anyhow::Result<MapsView> {
    let record = NodeRecord::load(state_dir)?;
    let config = maps.config();
    let slot = config.active_slot();
    let identity = |id: u32| -> String {
        if id == IDENTITY_ANY {
            return "*".into();
        }
        record
            .identity_names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| if id == 0 { "world".into() } else { format!("identity {id}") })
    };
    let policy = |id: u32, reason: u8| -> String {
        if id == POLICY_ID_NONE {
            return match DropReason::from_u8(reason) {
                Some(DropReason::PolicyDefaultDeny) => "(default: no ALLOW policy matched)".into(),
                Some(DropReason::None) => "(default: no ALLOW policy selects the workload)".into(),
                Some(r) => format!("({})", r.name()),
                None => "(default)".into(),
            };
        }
        record.policy_names.get(&id).cloned().unwrap_or_else(|| format!("policy {id}"))
    };
    let workload_of: BTreeMap<u32, String> = record.endpoints.iter().map(|(k, e)| (e.id, k.clone())).collect();

    let mut entries: BTreeMap<u32, Vec<EntryView>> = BTreeMap::new();
    let mut policy_keys: Vec<_> = maps.policy.iter().filter_map(Result::ok).filter(|(k, _)| k.slot() == slot).collect();
    policy_keys.sort_by_key(|(k, _)| {
        (k.endpoint_id, k.dir_slot, k.remote_identity == IDENTITY_ANY, k.remote_identity, k.proto == PROTO_ANY, k.dport)
    });
    for (k, v) in policy_keys {
        entries.entry(k.endpoint_id).or_default().push(EntryView {
            direction: k.direction().map_or("?", Direction::name),
            remote_identity: (k.remote_identity != IDENTITY_ANY).then_some(k.remote_identity),
            remote: identity(k.remote_identity),
            port: port_name(k.proto, k.dport),
            verdict: verdict_name(v.verdict),
            reason: reason_name(v.reason),
            policy: policy(v.policy_id, v.reason),
        });
    }

    let mut counters: BTreeMap<u32, Vec<CounterView>> = BTreeMap::new();
    let mut all: Vec<_> = maps.counters.iter().filter_map(Result::ok).collect();
    all.sort_by_key(|(k, _)| *k);
    for (k, per_cpu) in all {
        let mut c = warden_common::Counter::default();
        for cpu in per_cpu.iter() {
            c.add(cpu);
        }
        counters.entry(k.endpoint_id).or_default().push(CounterView {
            direction: Direction::from_u8(k.direction).map_or("?", Direction::name),
            hook: match k.hook {
                HOOK_CONNECT => "connect",
                HOOK_TUNNEL => "tunnel",
                _ => "tc",
            },
            remote_identity: k.remote_identity,
            remote: identity(k.remote_identity),
            verdict: verdict_name(k.verdict),
            reason: reason_name(k.reason),
            policy: policy(k.policy_id, k.reason),
            packets: c.packets_in + c.packets_out,
            bytes: c.bytes_in + c.bytes_out,
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            opened: c.opened,
            closed: c.closed,
        });
    }

    let mut endpoints: Vec<EndpointView> = maps
        .endpoints
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.slot == slot as u32)
        .map(|(k, e)| EndpointView {
            workload: workload_of.get(&e.endpoint_id).cloned().unwrap_or_else(|| format!("endpoint {}", e.endpoint_id)),
            endpoint_id: e.endpoint_id,
            identity: e.identity,
            identity_name: identity(e.identity),
            ifindex: k.ifindex,
            ip: Ipv4Addr::from(e.ip).to_string(),
            policy: entries.remove(&e.endpoint_id).unwrap_or_default(),
            counters: counters.remove(&e.endpoint_id).unwrap_or_default(),
        })
        .collect();
    endpoints.sort_by(|a, b| a.workload.cmp(&b.workload));
    // Counters of endpoints that are gone (or of drops before any endpoint was known).
    for (id, c) in counters {
        let workload = if id == 0 {
            "(no endpoint)".to_string()
        } else {
            workload_of.get(&id).cloned().unwrap_or(format!("endpoint {id} (removed)"))
        };
        endpoints.push(EndpointView {
            workload,
            endpoint_id: id,
            identity: 0,
            identity_name: String::new(),
            ifindex: 0,
            ip: String::new(),
            policy: vec![],
            counters: c,
        });
    }

    let mut ipcache: Vec<IpcacheView> = maps
        .ipcache
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.data().slot == slot)
        .map(|(k, v)| {
            let len = k.prefix_len().saturating_sub(IPCACHE_SLOT_BITS);
            IpcacheView {
                cidr: format!("{}/{}", Ipv4Addr::from(k.data().addr), len),
                identity: v.identity,
                name: identity(v.identity),
                local_ifindex: v.local_ifindex,
                meshed: v.flags & REMOTE_MESHED != 0,
                service: v.flags & REMOTE_SERVICE != 0,
            }
        })
        .collect();
    ipcache.sort_by(|a, b| a.cidr.cmp(&b.cidr));
    let mut services: Vec<ServiceSplitView> = maps
        .services
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.slot == slot)
        .map(|(k, v)| ServiceSplitView {
            service: format!("{}:{}", Ipv4Addr::from(k.addr), k.port),
            meshed: v.meshed,
            plain: v.plain_backends[..(v.plain as usize).min(v.plain_backends.len())]
                .iter()
                .map(|b| format!("{}:{}", Ipv4Addr::from(b.addr), b.port))
                .collect(),
        })
        .collect();
    services.sort_by(|a, b| a.service.cmp(&b.service));
    let kernel = maps.fastpath_kernel.get(&0, 0).unwrap_or_default();
    let fast_path = FastPathView {
        on: config.fast_path(),
        queue_limit: kernel.limit,
        sk_user_data_offset: kernel.sk_user_data,
        msg_tot_len_offset: kernel.psock_queued,
        counters: crate::datapath::maps::fast_path_counters(&maps.fastpath_counters)?.into(),
    };
    let (routing, routing_error) = match crate::mesh::routing::status() {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(MapsView {
        generation: config.generation,
        active_slot: slot,
        endpoints,
        ipcache,
        services,
        fast_path,
        routing,
        routing_error,
    })
}

/// Render as text tables.
pub fn render(v: &MapsView) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "generation {} (active slot {})", v.generation, v.active_slot);
    for e in &v.endpoints {
        let _ = writeln!(
            s,
            "\n{}  endpoint {}  identity {} ({})  ip {}  ifindex {}",
            e.workload, e.endpoint_id, e.identity, e.identity_name, e.ip, e.ifindex
        );
        if !e.policy.is_empty() {
            let _ = writeln!(s, "  {:<9} {:<40} {:<10} {:<7} POLICY", "DIRECTION", "REMOTE", "PORT", "VERDICT");
            for p in &e.policy {
                let _ =
                    writeln!(s, "  {:<9} {:<40} {:<10} {:<7} {}", p.direction, p.remote, p.port, p.verdict, p.policy);
            }
        }
        if !e.counters.is_empty() {
            let _ = writeln!(
                s,
                "  {:<9} {:<7} {:<32} {:<7} {:<19} {:>8} {:>8} {:>10} {:>10} {:>6} {:>6}  POLICY",
                "FLOWS",
                "HOOK",
                "REMOTE",
                "VERDICT",
                "REASON",
                "PKTS-IN",
                "PKTS-OUT",
                "BYTES-IN",
                "BYTES-OUT",
                "OPENED",
                "CLOSED"
            );
            for c in &e.counters {
                let _ = writeln!(
                    s,
                    "  {:<9} {:<7} {:<32} {:<7} {:<19} {:>8} {:>8} {:>10} {:>10} {:>6} {:>6}  {}",
                    c.direction,
                    c.hook,
                    c.remote,
                    c.verdict,
                    c.reason,
                    c.packets_in,
                    c.packets_out,
                    c.bytes_in,
                    c.bytes_out,
                    c.opened,
                    c.closed,
                    c.policy
                );
            }
        }
    }
    let _ = writeln!(s, "\nIDENTITY CACHE\n  {:<20} {:>9}  {:<8} {:<14} NAME", "CIDR", "IDENTITY", "IFINDEX", "MESH");
    for i in &v.ipcache {
        let mesh = match (i.meshed, i.service) {
            (true, true) => "service, meshed",
            (true, false) => "meshed",
            (false, true) => "service",
            (false, false) => "-",
        };
        let _ = writeln!(
            s,
            "  {:<20} {:>9}  {:<8} {:<14} {}",
            i.cidr,
            i.identity,
            if i.local_ifindex == 0 { "-".to_string() } else { i.local_ifindex.to_string() },
            mesh,
            i.name
        );
    }
    if !v.services.is_empty() {
        let _ =
            writeln!(s, "\nSERVICES SHARED WITH PODS OUT OF THE MESH\n  {:<22} {:>6}  PLAIN PODS", "SERVICE", "MESHED");
        for sv in &v.services {
            let _ = writeln!(s, "  {:<22} {:>6}  {}", sv.service, sv.meshed, sv.plain.join(" "));
        }
    }
    let f = &v.fast_path;
    let c = &f.counters;
    let _ = writeln!(
        s,
        "\nFAST PATH  {}  redirected queues bounded at {} bytes (sock.sk_user_data at {}, sk_psock.msg_tot_len at {})",
        if f.on { "on" } else { "off" },
        f.queue_limit,
        f.sk_user_data_offset,
        f.msg_tot_len_offset
    );
    let _ = writeln!(
        s,
        "  sockets {}  redirected {} sends, {} bytes  TCP sends {}  fell back: no peer {}, changed {}, backlog {}",
        c.sockets,
        c.redirected_messages,
        c.redirected_bytes,
        c.tcp_messages,
        c.fallbacks_no_peer,
        c.fallbacks_changed,
        c.fallbacks_backlog
    );
    render_routing(&mut s, v.routing.as_ref().ok_or(v.routing_error.as_deref().unwrap_or("?")));
    s
}

fn render_routing(s: &mut String, routing: Result<&crate::mesh::routing::RoutingStatus, &str>) {
    let r = match routing {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(s, "\nMESH ROUTING  not read: {e}");
            return;
        }
    };
    if r.rules.is_empty() && r.hbone_pods.is_empty() && !r.replies_table {
        let _ = writeln!(
            s,
            "\nMESH ROUTING  none in this network namespace (the node's, where the agent runs? an agent without --mesh? `warden cleanup`?)"
        );
        return;
    }
    let _ = writeln!(s, "\nMESH ROUTING");
    for rule in &r.rules {
        let _ = writeln!(s, "  {}{}", rule.rule, if rule.mesh { "" } else { "   <- another program's rule" });
    }
    for pref in &r.missing {
        let _ = writeln!(s, "  {pref}: missing (a running agent puts it back within 10 s)");
    }
    let pods: Vec<String> = r.hbone_pods.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        s,
        "  table {}: HBONE to {}{}",
        crate::mesh::routing::TABLE,
        if pods.is_empty() { "no pod".into() } else { pods.join(" ") },
        if r.earlier_catch_all { ", and an earlier agent's catch-all (every address)" } else { "" }
    );
    let _ = writeln!(
        s,
        "  table {}: {}",
        crate::mesh::routing::TABLE_TO_AGENT,
        if r.replies_table { "the replies of the agent's deliveries" } else { "empty" }
    );
}

#[cfg(test)]
mod tests {
    use crate::mesh::routing::{RoutingStatus, RuleStatus};

    fn render(r: Result<&RoutingStatus, &str>) -> String {
        let mut s = String::new();
        super::render_routing(&mut s, r);
        s
    }

    #[test]
    fn the_mesh_routing_section_names_foreign_and_missing_rules() {
        let r = RoutingStatus {
            rules: vec![
                RuleStatus { rule: "1000: from all iif lo ipproto tcp dport 15008 lookup main".into(), mesh: true },
                RuleStatus { rule: "1002: from 10.99.0.0/16 lookup 100".into(), mesh: false },
            ],
            missing: vec![1001, 1002],
            hbone_pods: vec!["10.0.1.2".parse().unwrap(), "10.0.1.3".parse().unwrap()],
            replies_table: true,
            earlier_catch_all: false,
        };
        assert_eq!(
            render(Ok(&r)),
            "\nMESH ROUTING\n  1000: from all iif lo ipproto tcp dport 15008 lookup main\n  \
             1002: from 10.99.0.0/16 lookup 100   <- another program's rule\n  \
             1001: missing (a running agent puts it back within 10 s)\n  \
             1002: missing (a running agent puts it back within 10 s)\n  \
             table 15008: HBONE to 10.0.1.2 10.0.1.3\n  table 15009: the replies of the agent's deliveries\n"
        );
        let none = RoutingStatus { rules: vec![], missing: vec![1000, 1001, 1002], hbone_pods: vec![], ..r };
        let none = RoutingStatus { replies_table: false, ..none };
        assert!(render(Ok(&none)).contains("MESH ROUTING  none"));
        assert_eq!(
            render(Err("routing: opening a netlink socket: denied")),
            "\nMESH ROUTING  not read: routing: opening a netlink socket: denied\n"
        );
    }
}
