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
//! Rules and routes are added idempotently (an existing identical rule is kept) and left in place
//! when the agent stops, like the pinned programs: a restarting agent finds the node still
//! routing to it. Agents before 2026-12-06 made every address local in [`TABLE`] and sent the
//! replies there too; [`install`] takes such a node over (the replies' rule is pointed at its own
//! table, the catch-all goes once the pods' routes are in).

use std::{collections::BTreeSet, io::Write as _, net::Ipv4Addr, process::Command};

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

#[derive(Debug, thiserror::Error)]
#[error("routing: `ip {args}` failed: {reason}")]
pub struct RoutingError {
    args: String,
    reason: String,
}

fn ip(args: &[&str]) -> Result<String, RoutingError> {
    let err = |reason: String| RoutingError { args: args.join(" "), reason };
    let out = Command::new("ip").args(args).output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `commands` through one `ip -batch`, every one attempted (`-force`); the first failure is
/// reported with the command's line.
fn ip_batch(commands: &[String]) -> Result<(), RoutingError> {
    use std::process::Stdio;
    let err = |reason: String| RoutingError { args: format!("-force -batch - ({} commands)", commands.len()), reason };
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let written = stdin.write_all(commands.join("\n").as_bytes());
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    written.map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// Make the rule at `pref` exactly `selector ... lookup table`: added when there is none,
/// replaced when it is an earlier agent's that looks up another table. Another program's rule at
/// that priority is an error: the mesh would not get its packets.
fn rule(pref: u32, selector: &[&str], table: &str) -> Result<(), RoutingError> {
    let pref_s = pref.to_string();
    let existing = ip(&["rule", "show", "pref", &pref_s])?;
    let existing = existing.trim();
    if !existing.is_empty() && !is_ours(pref, existing) {
        return Err(RoutingError {
            args: format!("rule show pref {pref}"),
            reason: format!(
                "priority {pref} holds another program's rule ({existing}); the mesh needs priorities {PREF_LOCAL_HBONE}-{PREF_TO_AGENT}"
            ),
        });
    }
    if existing.split_whitespace().next_back() == Some(table) {
        return Ok(());
    }
    if !existing.is_empty() {
        tracing::info!(rule = existing, table, "routing: replacing a rule of an earlier agent");
        ip(&["rule", "del", "pref", &pref_s])?;
    }
    let mut args = vec!["rule", "add", "pref", &pref_s];
    args.extend_from_slice(selector);
    args.extend_from_slice(&["lookup", table]);
    ip(&args)?;
    Ok(())
}

/// Make `addr` an address of the node unless it is one already. True when it was added.
pub fn ensure_local(addr: Ipv4Addr) -> Result<bool, RoutingError> {
    let a = addr.to_string();
    // `ip route get` fails for an address with no route at all: not local either.
    if ip(&["-4", "route", "get", &a]).is_ok_and(|r| r.starts_with("local ")) {
        return Ok(false);
    }
    ip(&["addr", "add", &format!("{a}/32"), "dev", "lo", "scope", "host", "label", LABEL])?;
    Ok(true)
}

/// The `local` routes of [`TABLE`]: the addresses HBONE is delivered for, and whether the
/// catch-all of an earlier agent is there.
fn served() -> Result<(BTreeSet<Ipv4Addr>, bool), RoutingError> {
    match ip(&["-4", "route", "show", "table", &TABLE.to_string(), "type", "local"]) {
        Ok(routes) => Ok(parse_served(&routes)),
        // No route was ever added to it on this node.
        Err(e) if e.reason.contains("table does not exist") => Ok((BTreeSet::new(), false)),
        Err(e) => Err(e),
    }
}

/// [`served`] from `ip route show`'s output.
fn parse_served(routes: &str) -> (BTreeSet<Ipv4Addr>, bool) {
    let (mut pods, mut catch_all) = (BTreeSet::new(), false);
    for line in routes.lines() {
        // `local 10.0.1.2 dev lo scope host`; ip 6.1 omits the type filtered on, later ones print
        // it.
        let dst = line.split_whitespace().find(|w| *w != "local").unwrap_or_default();
        match dst {
            "default" | "0.0.0.0/0" => catch_all = true,
            d => {
                if let Ok(a) = d.trim_end_matches("/32").parse() {
                    pods.insert(a);
                }
            }
        }
    }
    (pods, catch_all)
}

fn hbone_route(verb: &str, pod: Ipv4Addr) -> String {
    format!("route {verb} local {pod}/32 dev lo table {TABLE}")
}

/// Make [`TABLE`] deliver HBONE for exactly `pods` (this node's meshed pods): routes are added
/// for new pods and removed for pods gone or out of the mesh, read from the kernel each time, so
/// a failed or interrupted change is made good by the next. Returns how many routes changed.
pub fn serve(pods: &BTreeSet<Ipv4Addr>) -> Result<usize, RoutingError> {
    let (have, _) = served()?;
    let commands: Vec<String> = pods
        .difference(&have)
        .map(|p| hbone_route("replace", *p))
        .chain(have.difference(pods).map(|p| hbone_route("del", *p)))
        .collect();
    if !commands.is_empty() {
        ip_batch(&commands)?;
    }
    Ok(commands.len())
}

/// Install the mesh's rules and tables for HBONE on `hbone_port`, delivering it for `pods`, and
/// make the capture address local.
pub fn install(hbone_port: u16, capture: Ipv4Addr, pods: &BTreeSet<Ipv4Addr>) -> Result<(), RoutingError> {
    if ensure_local(capture)? {
        tracing::info!(%capture, "the capture address was not local: added to lo");
    }
    let to_agent = TABLE_TO_AGENT.to_string();
    let port = hbone_port.to_string();
    ip(&["route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &to_agent])?;
    let mark = format!("{MARK_TO_AGENT:#x}/{MARK_MASK:#x}");
    rule(PREF_TO_AGENT, &["fwmark", &mark], &to_agent)?;
    serve(pods)?;
    rule(PREF_LOCAL_HBONE, &["iif", "lo", "ipproto", "tcp", "dport", &port], "main")?;
    rule(PREF_HBONE, &["ipproto", "tcp", "dport", &port], &TABLE.to_string())?;
    // Only now that the pods' routes are in: an earlier agent's catch-all goes.
    if served()?.1 {
        ip(&["route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", &TABLE.to_string()])?;
        tracing::info!(table = TABLE, "routing: removed an earlier agent's catch-all local route");
    }
    Ok(())
}

/// Whether `rule` (a line of `ip rule show`) at priority `pref` is the one [`install`] adds
/// there, by its selector and table: `warden cleanup` must not take another program's rule that
/// happens to sit at the same priority.
fn is_ours(pref: u32, rule: &str) -> bool {
    let table = rule.split_whitespace().next_back().unwrap_or_default();
    let (hbone, to_agent) = (TABLE.to_string(), TABLE_TO_AGENT.to_string());
    match pref {
        PREF_LOCAL_HBONE => rule.contains(" iif lo ipproto tcp dport ") && table == "main",
        PREF_HBONE => rule.contains(" ipproto tcp dport ") && !rule.contains(" iif ") && table == hbone,
        // An earlier agent's looked up the HBONE table.
        PREF_TO_AGENT => {
            rule.contains(&format!(" fwmark {MARK_TO_AGENT:#x}/{MARK_MASK:#x} "))
                && (table == to_agent || table == hbone)
        }
        _ => false,
    }
}

/// Remove the mesh's rules, its tables and the capture address it added (`warden cleanup`): the
/// node routes as without the mesh. Only what [`install`] made is removed (rules by their
/// selector and table, the address by its label); the tables are flushed only if a rule of the
/// mesh looked them up. Returns what was removed, for the caller to report.
pub fn remove() -> Vec<String> {
    let mut removed = Vec::new();
    let mut ours = false;
    for pref in [PREF_LOCAL_HBONE, PREF_HBONE, PREF_TO_AGENT] {
        let pref_s = pref.to_string();
        let Ok(shown) = ip(&["rule", "show", "pref", &pref_s]) else { continue };
        let rule = shown.trim();
        if is_ours(pref, rule) && ip(&["rule", "del", "pref", &pref_s]).is_ok() {
            removed.push(format!("rule {rule}"));
            ours = true;
        }
    }
    if ours {
        for table in [TABLE, TABLE_TO_AGENT] {
            if ip(&["route", "flush", "table", &table.to_string()]).is_ok() {
                removed.push(format!("table {table}"));
            }
        }
    }
    if ip(&["-4", "addr", "show", "dev", "lo", "label", LABEL]).is_ok_and(|a| !a.trim().is_empty())
        && ip(&["-4", "addr", "flush", "dev", "lo", "label", LABEL]).is_ok()
    {
        removed.push(format!("address {LABEL}"));
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_pods_and_an_earlier_agents_catch_all_are_read_from_ip_route() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let (pods, catch_all) = parse_served(
            "local default dev lo scope host \nlocal 10.0.1.2 dev lo scope host \n10.0.1.3 dev lo scope host\n",
        );
        assert_eq!(pods, BTreeSet::from([ip("10.0.1.2"), ip("10.0.1.3")]));
        assert!(catch_all);
        assert_eq!(parse_served("local 0.0.0.0/0 dev lo scope host\n"), (BTreeSet::new(), true));
        assert_eq!(parse_served(""), (BTreeSet::new(), false));
    }

    #[test]
    fn cleanup_takes_the_meshs_rules_and_no_others() {
        assert!(is_ours(1000, "1000:\tfrom all iif lo ipproto tcp dport 15008 lookup main"));
        assert!(is_ours(1001, "1001:\tfrom all ipproto tcp dport 15008 lookup 15008"));
        assert!(is_ours(1002, "1002:\tfrom all fwmark 0x200000/0xf00000 lookup 15009"));
        assert!(is_ours(1002, "1002:\tfrom all fwmark 0x200000/0xf00000 lookup 15008"), "an earlier agent's");
        assert!(!is_ours(1000, "1000:\tfrom all ipproto tcp dport 443 lookup main"), "not from lo");
        assert!(!is_ours(1000, "1000:\tfrom 10.0.0.0/8 lookup 100"));
        assert!(!is_ours(1001, "1001:\tfrom all fwmark 0x200000/0xf00000 lookup 100"));
        assert!(!is_ours(1002, "1002:\tfrom all ipproto tcp dport 443 lookup 200"));
        assert!(!is_ours(1003, "1003:\tfrom all ipproto tcp dport 15008 lookup 15008"), "not a priority of ours");
    }

    #[test]
    fn a_pod_route_is_one_host_route_in_the_hbone_table() {
        assert_eq!(
            hbone_route("replace", "10.0.1.2".parse().unwrap()),
            "route replace local 10.0.1.2/32 dev lo table 15008"
        );
    }
}
