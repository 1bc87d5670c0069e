//! The node's policy routing for the mesh (no iptables): three rules and two tables.
//!
//! - HBONE to a meshed pod of this node, arriving from outside the node (`! iif lo`), is
//!   delivered locally: the agent's listener on `0.0.0.0:15008` accepts connections to the pod
//!   addresses it serves (ztunnel's clients dial the destination pod's address), and the accepted
//!   socket's local address says which workload's certificate to present. [`TABLE`] holds one
//!   `local` route per such pod, kept to the mesh's pods at every commit ([`serve`]). A packet
//!   for port 15008 to any other address finds no route there and goes on to the main table, as
//!   without the mesh: the replies to a client whose source port happens to be 15008, or a
//!   connection to a pod out of the mesh that listens on 15008. The agent's own HBONE
//!   connections to other nodes (`iif lo`) are routed as usual.
//! - Packets the kernel marked [`MARK_TO_AGENT`] (a workload's replies to a connection the agent
//!   delivered with the client's address preserved) are delivered locally too, to the agent's
//!   transparent socket, by [`TABLE_TO_AGENT`]: every address is local there.
//!
//! - The capture address (`--capture-addr`, where `connect4` sends meshed workloads' connections)
//!   must be an address of the node. In the lab it is every host veth's gateway address; a CNI
//!   that answers for the gateway by proxy ARP (Calico's 169.254.1.1) does not make it local, so
//!   the agent adds it to `lo` (scope host: never chosen as a source address, labelled
//!   [`LABEL`]) when it is not local yet.
//!
//! The agent speaks rtnetlink itself ([`netlink`]): no `ip` binary on the node. Rules and routes
//! are made good idempotently (an existing identical rule is kept), at start, at every commit
//! (the pods' routes) and every [`crate::mesh::ROUTING_RECHECK`] (all of it: a rule, route or
//! address removed under the agent is put back), and left in place when the agent stops, like
//! the pinned programs: a restarting agent finds the node still routing to it. Agents before 2026-12-06 made every address local in [`TABLE`] and sent the
//! replies there too; [`install`] takes such a node over (the replies' rule is pointed at its own
//! table, the catch-all goes once the pods' routes are in).

mod netlink;

use std::{collections::BTreeSet, net::Ipv4Addr};

use netlink::{Netlink, loopback};
pub use netlink::{NetlinkError, Rule};
use warden_common::{MARK_MASK, MARK_TO_AGENT};

/// The routing table of HBONE: `local <pod>` for each meshed pod of the node (the HBONE port's
/// number).
pub const TABLE: u32 = 15008;
/// The routing table of the replies to the agent's deliveries: `local 0.0.0.0/0 dev lo`.
pub const TABLE_TO_AGENT: u32 = 15009;
/// The label of the capture address when the agent adds it to `lo`.
pub const LABEL: &str = "lo:warden";
/// Rule priorities: before the main table (32766).
const PREF_LOCAL_HBONE: u32 = 1000;
const PREF_HBONE: u32 = 1001;
const PREF_TO_AGENT: u32 = 1002;
const TABLE_MAIN: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(
        "routing: priority {} holds another program's rule ({rule}); the mesh needs priorities {PREF_LOCAL_HBONE}-{PREF_TO_AGENT}",
        rule.pref
    )]
    Foreign { rule: Rule },
}

/// The mesh's three rules for HBONE on `hbone_port`, in the order [`install`] makes them good:
/// the replies' rule first, the HBONE rules once their table is filled.
fn mesh_rules(hbone_port: u16) -> [Rule; 3] {
    let rule = |pref, table| Rule { pref, iif: None, tcp_dport: None, fwmark: None, table, other: Vec::new() };
    [
        // The replies of the workloads the agent delivers to, marked by TC.
        Rule { fwmark: Some((MARK_TO_AGENT, MARK_MASK)), ..rule(PREF_TO_AGENT, TABLE_TO_AGENT) },
        // The agent's own HBONE connections to other nodes are routed as usual.
        Rule { iif: Some("lo".into()), tcp_dport: Some(hbone_port), ..rule(PREF_LOCAL_HBONE, TABLE_MAIN) },
        // HBONE from outside the node: to the agent, for the pods of [`TABLE`].
        Rule { tcp_dport: Some(hbone_port), ..rule(PREF_HBONE, TABLE) },
    ]
}

/// Whether `found` (a rule at one of the mesh's priorities) is one [`install`] adds there, for any
/// HBONE port, or an earlier agent's: `warden cleanup` and a starting agent must not take
/// another program's rule that happens to sit at the same priority.
fn is_ours(found: &Rule) -> bool {
    let earlier_replies = Rule { table: TABLE, ..mesh_rules(0)[0].clone() };
    mesh_rules(found.tcp_dport.unwrap_or(0)).contains(found) || *found == earlier_replies
}

/// Make `want` the one rule at its priority: added when there is none, an earlier agent's (or
/// one for another port) replaced. Another program's rule there is an error: the mesh would not
/// get its packets. True when anything changed.
fn rule(nl: &mut Netlink, want: &Rule) -> Result<bool, RoutingError> {
    let found = nl.rules(want.pref)?;
    if let Some(foreign) = found.iter().find(|r| !is_ours(r)) {
        return Err(RoutingError::Foreign { rule: foreign.clone() });
    }
    if found.len() == 1 && found[0] == *want {
        return Ok(false);
    }
    for old in found.iter().filter(|r| *r != want) {
        tracing::info!(rule = %old, "routing: replacing a rule of an earlier agent");
        nl.del_rule(old)?;
    }
    if !found.contains(want) {
        nl.add_rule(want)?;
    }
    Ok(true)
}

/// Make `addr` an address of the node unless it is one already. True when it was added.
fn ensure_local(nl: &mut Netlink, addr: Ipv4Addr) -> Result<bool, RoutingError> {
    if nl.is_local(addr)? {
        return Ok(false);
    }
    nl.add_host_address(addr, 32, loopback()?, LABEL)?;
    Ok(true)
}

/// The pods [`TABLE`] delivers HBONE for, and whether the catch-all of an earlier agent is there.
fn served(nl: &mut Netlink) -> Result<(BTreeSet<Ipv4Addr>, bool), RoutingError> {
    let routes = nl.local_routes(TABLE)?;
    let catch_all = routes.iter().any(|(_, prefix)| *prefix == 0);
    Ok((routes.into_iter().filter(|(_, prefix)| *prefix == 32).map(|(a, _)| a).collect(), catch_all))
}

/// Whether [`TABLE_TO_AGENT`] holds its catch-all: the replies of the agent's deliveries are
/// delivered locally.
fn replies_table(nl: &mut Netlink) -> Result<bool, RoutingError> {
    Ok(nl.local_routes(TABLE_TO_AGENT)?.iter().any(|(_, prefix)| *prefix == 0))
}

/// Make [`TABLE`] deliver HBONE for exactly `pods` (this node's meshed pods), given the pods it
/// delivers for now (`have`, read from the kernel each time by the caller, so a failed or
/// interrupted change is made good by the next): routes are added for new pods and removed for
/// pods gone or out of the mesh. Every change is attempted; the first failure is returned.
/// Returns how many routes changed.
fn serve_with(nl: &mut Netlink, have: &BTreeSet<Ipv4Addr>, pods: &BTreeSet<Ipv4Addr>) -> Result<usize, RoutingError> {
    let lo = loopback()?;
    let (mut changed, mut first_error) = (0, None);
    let changes = pods.difference(have).map(|p| (*p, true)).chain(have.difference(pods).map(|p| (*p, false)));
    for (pod, add) in changes {
        let done =
            if add { nl.replace_local_route(pod, 32, TABLE, lo) } else { nl.del_local_route(pod, 32, TABLE, lo) };
        match done {
            Ok(()) => changed += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(changed),
    }
}

/// [`serve_with`] on a socket of its own: what the agent calls at each commit.
pub fn serve(pods: &BTreeSet<Ipv4Addr>) -> Result<usize, RoutingError> {
    let nl = &mut Netlink::open()?;
    let (have, _) = served(nl)?;
    serve_with(nl, &have, pods)
}

/// Install the mesh's rules and tables for HBONE on `hbone_port`, delivering it for `pods`, and
/// make the capture address local. Idempotent: run again, it puts back whatever was removed or
/// changed under the agent. Returns how many rules, routes and addresses it had to change.
pub fn install(hbone_port: u16, capture: Ipv4Addr, pods: &BTreeSet<Ipv4Addr>) -> Result<usize, RoutingError> {
    let nl = &mut Netlink::open()?;
    let mut changed = 0;
    if ensure_local(nl, capture)? {
        tracing::info!(%capture, "the capture address was not local: added to lo");
        changed += 1;
    }
    if !replies_table(nl)? {
        nl.replace_local_route(Ipv4Addr::UNSPECIFIED, 0, TABLE_TO_AGENT, loopback()?)?;
        changed += 1;
    }
    let [to_agent, local_hbone, hbone] = mesh_rules(hbone_port);
    changed += usize::from(rule(nl, &to_agent)?);
    // Serving the pods touches only their /32 routes: the catch-all read here is still there after.
    let (have, earlier_catch_all) = served(nl)?;
    changed += serve_with(nl, &have, pods)?;
    changed += usize::from(rule(nl, &local_hbone)?);
    changed += usize::from(rule(nl, &hbone)?);
    // Only now that the pods' routes are in: an earlier agent's catch-all goes.
    if earlier_catch_all {
        nl.del_local_route(Ipv4Addr::UNSPECIFIED, 0, TABLE, loopback()?)?;
        tracing::info!(table = TABLE, "routing: removed an earlier agent's catch-all local route");
        changed += 1;
    }
    Ok(changed)
}

/// What the agent's checks of the routing found (`warden_mesh_routing_*`), so an operator can
/// alert on a node whose routing something else keeps changing, or that the agent cannot fix.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    restored: prometheus_client::metrics::counter::Counter,
    failed: prometheus_client::metrics::counter::Counter,
}

impl Metrics {
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "warden_mesh_routing_restored",
            "Rules, routes and addresses of the mesh's policy routing that the agent put back after something else changed them",
            m.restored.clone(),
        );
        registry.register(
            "warden_mesh_routing_failures",
            "Checks and updates of the mesh's policy routing that failed (the agent's log says why)",
            m.failed.clone(),
        );
        m
    }

    pub fn restored(&self, n: usize) {
        self.restored.inc_by(n as u64);
    }

    pub fn failed(&self) {
        self.failed.inc();
    }
}

/// The node's routing for the mesh as the kernel has it, for `warden maps`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoutingStatus {
    /// Every rule at the mesh's priorities, as `ip rule` prints it, and whether it is the mesh's.
    pub rules: Vec<RuleStatus>,
    /// The priorities of the mesh's rules that hold none of its rules.
    pub missing: Vec<u32>,
    /// The pods HBONE is delivered to the agent for ([`TABLE`]).
    pub hbone_pods: Vec<Ipv4Addr>,
    /// [`TABLE_TO_AGENT`] delivers the replies of the agent's deliveries locally.
    pub replies_table: bool,
    /// [`TABLE`] still holds an earlier agent's catch-all.
    pub earlier_catch_all: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleStatus {
    pub rule: String,
    pub mesh: bool,
}

/// Read the node's routing for the mesh, changing nothing.
pub fn status() -> Result<RoutingStatus, RoutingError> {
    let nl = &mut Netlink::open()?;
    let (mut rules, mut missing) = (Vec::new(), Vec::new());
    for pref in [PREF_LOCAL_HBONE, PREF_HBONE, PREF_TO_AGENT] {
        let found = nl.rules(pref)?;
        if !found.iter().any(is_ours) {
            missing.push(pref);
        }
        rules.extend(found.into_iter().map(|r| RuleStatus { mesh: is_ours(&r), rule: r.to_string() }));
    }
    let (pods, earlier_catch_all) = served(nl)?;
    let replies_table = replies_table(nl)?;
    Ok(RoutingStatus { rules, missing, hbone_pods: pods.into_iter().collect(), replies_table, earlier_catch_all })
}

/// Remove the mesh's rules, its tables and the capture address it added (`warden cleanup`): the
/// node routes as without the mesh. Only what [`install`] made is removed (rules by their
/// selector and table, the address by its label); the tables are emptied only if a rule of the
/// mesh looked them up. Returns what was removed, for the caller to report, and the first
/// failure.
pub fn remove() -> (Vec<String>, Option<RoutingError>) {
    let mut removed = Vec::new();
    let mut nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => return (removed, Some(e.into())),
    };
    let result = remove_with(&mut nl, &mut removed);
    (removed, result.err())
}

fn remove_with(nl: &mut Netlink, removed: &mut Vec<String>) -> Result<(), RoutingError> {
    let mut ours = false;
    for pref in [PREF_LOCAL_HBONE, PREF_HBONE, PREF_TO_AGENT] {
        for rule in nl.rules(pref)?.into_iter().filter(is_ours) {
            nl.del_rule(&rule)?;
            removed.push(format!("rule {rule}"));
            ours = true;
        }
    }
    let lo = loopback()?;
    if ours {
        for table in [TABLE, TABLE_TO_AGENT] {
            let routes = nl.local_routes(table)?;
            for (dst, prefix) in &routes {
                nl.del_local_route(*dst, *prefix, table, lo)?;
            }
            if !routes.is_empty() {
                removed.push(format!("table {table} ({} routes)", routes.len()));
            }
        }
    }
    for (addr, prefix) in nl.labelled_addresses(lo, LABEL)? {
        nl.del_address(addr, prefix, lo, LABEL)?;
        removed.push(format!("address {addr}/{prefix} ({LABEL})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(pref: u32) -> Rule {
        Rule { pref, iif: None, tcp_dport: None, fwmark: None, table: TABLE_MAIN, other: Vec::new() }
    }

    #[test]
    fn the_mesh_knows_its_own_rules_for_any_port_and_no_others() {
        for r in mesh_rules(15008).iter().chain(&mesh_rules(4000)) {
            assert!(is_ours(r), "{r}");
        }
        let [to_agent, local_hbone, hbone] = mesh_rules(15008);
        assert_eq!(to_agent.to_string(), "1002: from all fwmark 0x200000/0xf00000 lookup 15009");
        assert_eq!(local_hbone.to_string(), "1000: from all iif lo ipproto tcp dport 15008 lookup main");
        assert_eq!(hbone.to_string(), "1001: from all ipproto tcp dport 15008 lookup 15008");
        assert!(is_ours(&Rule { table: TABLE, ..to_agent.clone() }), "an earlier agent's replies' rule");

        assert!(!is_ours(&Rule { tcp_dport: Some(443), ..found(1000) }), "not from lo");
        assert!(!is_ours(&Rule { table: 100, other: vec!["from 10.0.0.0/8".into()], ..found(1000) }));
        assert!(!is_ours(&Rule { fwmark: Some((MARK_TO_AGENT, MARK_MASK)), table: 100, ..found(1001) }));
        assert!(!is_ours(&Rule { tcp_dport: Some(443), table: 200, ..found(1002) }));
        assert!(!is_ours(&Rule { pref: 1003, ..hbone.clone() }), "not a priority of ours");
        assert!(!is_ours(&Rule { other: vec!["action Blackhole".into()], ..hbone }), "not a lookup");
    }
}
