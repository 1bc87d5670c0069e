//! The node's policy routing for the mesh (no iptables): two rules and one table.
//!
//! - HBONE to any address, arriving from outside the node (`! iif lo`), is delivered locally:
//!   the agent's listener on `0.0.0.0:15008` accepts connections to the pod addresses it serves
//!   (ztunnel's clients dial the destination pod's address), and the accepted socket's local
//!   address says which workload's certificate to present. The agent's own HBONE connections to
//!   other nodes (`iif lo`) are routed as usual.
//! - Packets the kernel marked [`MARK_TO_AGENT`] (a workload's replies to a connection the agent
//!   delivered with the client's address preserved) are delivered locally too, to the agent's
//!   transparent socket.
//!
//! - The capture address (`--capture-addr`, where `connect4` sends meshed workloads' connections)
//!   must be an address of the node. In the lab it is every host veth's gateway address; a CNI
//!   that answers for the gateway by proxy ARP (Calico's 169.254.1.1) does not make it local, so
//!   the agent adds it to `lo` (scope host: never chosen as a source address, labelled
//!   [`LABEL`]) when it is not local yet.
//!
//! Rules are added idempotently (an existing identical rule is kept) and left in place when the
//! agent stops, like the pinned programs: a restarting agent finds the node still routing to it.

use std::{net::Ipv4Addr, process::Command};

use warden_common::{MARK_MASK, MARK_TO_AGENT};

/// The routing table holding `local 0.0.0.0/0 dev lo` (the HBONE port's number).
pub const TABLE: u32 = 15008;
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

/// Add a rule unless one with the same priority exists.
fn rule(pref: u32, selector: &[&str]) -> Result<(), RoutingError> {
    let pref_s = pref.to_string();
    if ip(&["rule", "show", "pref", &pref_s])?.trim().is_empty() {
        let mut args = vec!["rule", "add", "pref", &pref_s];
        args.extend_from_slice(selector);
        ip(&args)?;
    }
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

/// Install the mesh's rules and table for HBONE on `hbone_port`, and make the capture address
/// local.
pub fn install(hbone_port: u16, capture: Ipv4Addr) -> Result<(), RoutingError> {
    if ensure_local(capture)? {
        tracing::info!(%capture, "the capture address was not local: added to lo");
    }
    let table = TABLE.to_string();
    let port = hbone_port.to_string();
    ip(&["route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
    rule(PREF_LOCAL_HBONE, &["iif", "lo", "ipproto", "tcp", "dport", &port, "lookup", "main"])?;
    rule(PREF_HBONE, &["ipproto", "tcp", "dport", &port, "lookup", &table])?;
    let mark = format!("{MARK_TO_AGENT:#x}/{MARK_MASK:#x}");
    rule(PREF_TO_AGENT, &["fwmark", &mark, "lookup", &table])?;
    Ok(())
}

/// Remove the rules and the table (`warden cleanup`).
pub fn remove() {
    for pref in [PREF_LOCAL_HBONE, PREF_HBONE, PREF_TO_AGENT] {
        let _ = ip(&["rule", "del", "pref", &pref.to_string()]);
    }
    let _ = ip(&["route", "flush", "table", &TABLE.to_string()]);
    let _ = ip(&["-4", "addr", "flush", "dev", "lo", "label", LABEL]);
}
