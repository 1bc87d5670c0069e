//! Compilation of the L4-enforceable part of a [`PolicySet`] into the datapath's maps.
//!
//! # Identities
//! The kernel derives a remote's numeric identity by an LPM lookup of its address in the
//! identity cache. An identity is therefore an equivalence class of remote addresses that no
//! policy can tell apart at L4:
//! - every CIDR referenced by an applicable policy (`ipBlocks`, `notIpBlocks`, `source.ip`) gets
//!   a CIDR identity, `cidr:<net>`: the addresses whose most specific policy CIDR it is;
//! - every workload gets `spiffe://<td>/ns/<ns>/sa/<sa>` (its principal; the datapath binds a
//!   workload's address to it and drops spoofed sources), suffixed `|cidr:<net>` with its most
//!   specific policy CIDR when one covers it, so workloads of one service account share an
//!   identity unless some policy CIDR separates them;
//! - everything else is the world (0).
//!
//! # Entries
//! For each local endpoint, the decision is computed for every identity class and every TCP
//! port any applicable rule names (plus "any other port or protocol"), with the engine's own
//! matchers, then written as the fewest entries for which [`warden_common::lookup::decide`]
//! returns exactly that decision: the world's decisions become the `IDENTITY_ANY` entries, and
//! an identity gets `(id, *)` / `(id, proto, port)` entries only where it differs from what the
//! lookup would otherwise find (this is the closure the lookup requires).
//!
//! # Views
//! Ingress is compiled once per [`View`]. Every endpoint gets the authenticated view (keys
//! without [`PolicyKey::PLAINTEXT_BIT`]): the remote is its class, with the class's principal.
//! An endpoint in the mesh also gets the plaintext view (keys with the bit): the same classes,
//! each as a peer without identity at the class's addresses, so only address attributes can
//! match it and a STRICT PeerAuthentication refuses it. Both views run the same code; the view
//! only chooses the peer.

use crate::error::CompileError;
use crate::eval::{Addr, Env, PeerView, clock, condition_matches, principal_parts, source_matches};
use crate::model::*;
use crate::set::FastMap;
use crate::set::{PolicySet, RuleRef, Target, Workload};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, SystemTime};
use warden_common::{
    Direction, DropReason, IDENTITY_ANY, IDENTITY_WORLD, POLICY_ID_NONE, PROTO_ANY, PROTO_TCP, PolicyKey, PolicyValue,
};

/// Stable numbering, owned by the agent (ids survive recompiles and restarts).
pub trait IdAllocator {
    /// Never 0 ([`POLICY_ID_NONE`]).
    fn policy_id(&mut self, namespace: &str, name: &str) -> u32;
    /// Never 0 ([`IDENTITY_WORLD`]) nor `u32::MAX` ([`IDENTITY_ANY`]).
    fn identity_id(&mut self, canonical: &str) -> u32;
}

pub struct CompileInput<'a> {
    pub policies: &'a PolicySet,
    /// Every workload the node knows (local and remote).
    pub workloads: &'a [Workload],
    /// (index into `workloads`, endpoint id) of the workloads enforced on this node.
    pub local: &'a [(usize, u32)],
    /// Which of `local` are in the mesh (parallel to `local`; a missing entry is `false`). A
    /// meshed endpoint also gets the plaintext view of its ingress policy (see [`PolicyKey`]);
    /// `&[]` compiles every endpoint as before.
    pub meshed: &'a [bool],
    pub trust_domain: &'a str,
    pub now: SystemTime,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// CIDR -> numeric identity (LPM; the agent adds the slot and `local_ifindex`).
    pub ipcache: Vec<(Ipv4Net, u32)>,
    /// Policy entries with slot 0 (the agent re-slots them), sorted by key.
    pub policy: Vec<(PolicyKey, PolicyValue)>,
    /// Numeric identity -> human name (`fintech-core/order-service`, `cidr 10.0.0.0/8`, `world`).
    pub identities: BTreeMap<u32, String>,
    /// Policy id -> `namespace/name` (PeerAuthentications: `namespace/PeerAuthentication/name`).
    pub policy_names: BTreeMap<u32, String>,
    /// When a time-dependent condition changes value; recompile then.
    pub valid_until: Option<SystemTime>,
    pub warnings: Vec<String>,
}

/// The name a PeerAuthentication is given to the policy id allocator (AuthorizationPolicies
/// use their own name; a PeerAuthentication may share it).
pub fn peer_authentication_id_name(name: &str) -> String {
    format!("PeerAuthentication/{name}")
}

/// A set of (protocol, port) pairs: TCP ports listed, or everything but the TCP ports listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PortSet {
    Only(BTreeSet<u16>),
    AllBut(BTreeSet<u16>),
}

impl PortSet {
    pub fn all() -> Self {
        PortSet::AllBut(BTreeSet::new())
    }
    /// `None`: a non-TCP packet, or a TCP port no set lists.
    pub fn contains(&self, p: Option<u16>) -> bool {
        match (self, p) {
            (PortSet::Only(s), Some(p)) => s.contains(&p),
            (PortSet::Only(_), None) => false,
            (PortSet::AllBut(s), Some(p)) => !s.contains(&p),
            (PortSet::AllBut(_), None) => true,
        }
    }
    pub fn and(self, o: PortSet) -> PortSet {
        use PortSet::*;
        match (self, o) {
            (Only(a), Only(b)) => Only(a.intersection(&b).copied().collect()),
            (Only(a), AllBut(b)) | (AllBut(b), Only(a)) => Only(a.difference(&b).copied().collect()),
            (AllBut(a), AllBut(b)) => AllBut(a.union(&b).copied().collect()),
        }
    }
    pub fn or(self, o: PortSet) -> PortSet {
        use PortSet::*;
        match (self, o) {
            (Only(a), Only(b)) => Only(a.union(&b).copied().collect()),
            (Only(a), AllBut(b)) | (AllBut(b), Only(a)) => AllBut(b.difference(&a).copied().collect()),
            (AllBut(a), AllBut(b)) => AllBut(a.intersection(&b).copied().collect()),
        }
    }
    fn listed(&self) -> &BTreeSet<u16> {
        match self {
            PortSet::Only(s) | PortSet::AllBut(s) => s,
        }
    }
    fn from_lists(pos: &[u16], neg: &[u16]) -> PortSet {
        let p = if pos.is_empty() { PortSet::all() } else { PortSet::Only(pos.iter().copied().collect()) };
        p.and(PortSet::AllBut(neg.iter().copied().collect()))
    }
}

/// The port part of a rule at L4 (`to` ports and `destination.port`).
pub(crate) fn rule_ports(r: &Rule) -> PortSet {
    let mut ps = if r.to.is_empty() {
        PortSet::all()
    } else {
        r.to.iter()
            .map(|o| PortSet::from_lists(&o.ports, &o.not_ports))
            .reduce(PortSet::or)
            .unwrap_or_else(PortSet::all)
    };
    for c in &r.when {
        if let (Key::DestinationPort, Values::Ports(p), Values::Ports(n)) = (&c.key, &c.values, &c.not_values) {
            ps = ps.and(PortSet::from_lists(p, n));
        }
    }
    ps
}

fn is_remote_key(k: &Key) -> bool {
    matches!(k, Key::SourceIp | Key::SourceNamespace | Key::SourcePrincipal | Key::SourceServiceAccount)
}
fn is_const_key(k: &Key) -> bool {
    matches!(k, Key::DestinationIp | Key::TimeOfDay | Key::DayOfWeek)
}

/// Which view of an endpoint's ingress policy is compiled (see [`PolicyKey`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    /// Connections the node agent delivers over mTLS: the remote is its class, with the class's
    /// principal (the agent checked it against the certificate); principal-less classes are
    /// plaintext peers, as before the mesh.
    Authenticated,
    /// Connections that did not come through the agent: Istio evaluates them as a peer without
    /// identity (no principal, namespace or service account) at the class's addresses.
    Plaintext,
}

/// One identity class.
struct Class {
    id: u32,
    principal: Option<String>,
    addr: Addr,
}

struct Prepared {
    ports: Rc<PortSet>,
    /// `when` conditions on the destination address and the clock hold (per endpoint).
    value: PolicyValue,
}

pub fn compile(input: &CompileInput, ids: &mut dyn IdAllocator) -> Result<Compiled, CompileError> {
    let set = input.policies;
    let mut out = Compiled::default();
    if input.meshed.len() > input.local.len() {
        return Err(CompileError::MeshedLength { meshed: input.meshed.len(), local: input.local.len() });
    }
    // Local endpoints.
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for &(i, ep) in input.local {
        let w = input.workloads.get(i).ok_or(CompileError::LocalIndexOutOfRange {
            endpoint_id: ep,
            index: i,
            len: input.workloads.len(),
        })?;
        if let Some(&j) = seen.get(&ep) {
            let first = &input.workloads[j];
            return Err(CompileError::DuplicateEndpoint {
                endpoint_id: ep,
                first: format!("{}/{}", first.namespace, first.name),
                second: format!("{}/{}", w.namespace, w.name),
            });
        }
        seen.insert(ep, i);
    }

    // Policies that apply to a local endpoint.
    let targets: Vec<Target> = input.local.iter().map(|&(i, _)| Target::from(&input.workloads[i])).collect();
    let mut applicable: BTreeSet<u32> = BTreeSet::new();
    for (pi, p) in set.authz.iter().enumerate() {
        if p.dry_run || p.action == Action::Audit {
            continue;
        }
        if targets.iter().any(|t| set.applies(pi as u32, t)) {
            applicable.insert(pi as u32);
        }
    }

    // Policy CIDRs.
    let mut cidrs: BTreeSet<Ipv4Net> = BTreeSet::new();
    for &pi in &applicable {
        for r in &set.authz[pi as usize].rules {
            for s in &r.from {
                cidrs.extend(s.ip_blocks.iter().chain(&s.not_ip_blocks).copied());
            }
            for c in &r.when {
                if let (Key::SourceIp, Values::Ips(p), Values::Ips(n)) = (&c.key, &c.values, &c.not_values) {
                    cidrs.extend(p.iter().chain(n).copied());
                }
            }
        }
    }
    let most_specific = |a: std::net::Ipv4Addr| -> Option<Ipv4Net> {
        (0..=32u8).rev().find_map(|len| {
            let n = Ipv4Net::new(a, len).ok()?.trunc();
            cidrs.contains(&n).then_some(n)
        })
    };

    // Identity classes.
    let mut by_id: HashMap<u32, String> = HashMap::new();
    let mut check_id = |id: u32, canonical: &str| -> Result<(), CompileError> {
        if id == IDENTITY_WORLD || id == IDENTITY_ANY {
            return Err(CompileError::ReservedId { what: "identity", id, name: canonical.to_string() });
        }
        if let Some(prev) = by_id.get(&id) {
            if prev != canonical {
                return Err(CompileError::IdentityCollision { id, first: prev.clone(), second: canonical.to_string() });
            }
        } else {
            by_id.insert(id, canonical.to_string());
        }
        Ok(())
    };
    let mut classes: Vec<Class> = vec![Class { id: IDENTITY_WORLD, principal: None, addr: Addr::Region(None) }];
    out.identities.insert(IDENTITY_WORLD, "world".to_string());
    let mut ipcache: BTreeMap<Ipv4Net, u32> = BTreeMap::new();
    for c in &cidrs {
        let canonical = format!("cidr:{c}");
        let id = ids.identity_id(&canonical);
        check_id(id, &canonical)?;
        classes.push(Class { id, principal: None, addr: Addr::Region(Some(*c)) });
        out.identities.insert(id, format!("cidr {c}"));
        ipcache.insert(*c, id);
    }
    let mut class_of: HashMap<String, usize> = HashMap::new();
    let mut ip_owner: HashMap<std::net::Ipv4Addr, usize> = HashMap::new();
    for (wi, w) in input.workloads.iter().enumerate() {
        if let Some(&prev) = ip_owner.get(&w.ip) {
            let p = &input.workloads[prev];
            out.warnings.push(format!(
                "workloads {}/{} and {}/{} share address {}; the first one's identity is used",
                p.namespace, p.name, w.namespace, w.name, w.ip
            ));
            continue;
        }
        ip_owner.insert(w.ip, wi);
        let principal = format!("{}/ns/{}/sa/{}", input.trust_domain, w.namespace, w.service_account);
        let cidr = most_specific(w.ip);
        let canonical = match cidr {
            Some(c) => format!("spiffe://{principal}|cidr:{c}"),
            None => format!("spiffe://{principal}"),
        };
        let ci = match class_of.get(&canonical) {
            Some(&ci) => ci,
            None => {
                let id = ids.identity_id(&canonical);
                check_id(id, &canonical)?;
                let name = match cidr {
                    Some(c) => format!("{}/{} in {c}", w.namespace, w.service_account),
                    None => format!("{}/{}", w.namespace, w.service_account),
                };
                out.identities.insert(id, name);
                classes.push(Class { id, principal: Some(principal.clone()), addr: Addr::Ip(w.ip) });
                class_of.insert(canonical, classes.len() - 1);
                classes.len() - 1
            }
        };
        ipcache.insert(Ipv4Net::from(w.ip), classes[ci].id);
    }
    out.ipcache = ipcache.into_iter().collect();

    // Policy ids.
    let mut policy_ids: HashMap<u32, u32> = HashMap::new();
    let mut by_pid: HashMap<u32, String> = HashMap::new();
    let mut alloc_policy =
        |ns: &str, name: &str, display: String, ids: &mut dyn IdAllocator| -> Result<u32, CompileError> {
            let id = ids.policy_id(ns, name);
            if id == POLICY_ID_NONE {
                return Err(CompileError::ReservedId { what: "policy", id, name: display });
            }
            match by_pid.get(&id) {
                Some(prev) if *prev != display => {
                    return Err(CompileError::PolicyIdCollision { id, first: prev.clone(), second: display });
                }
                _ => {
                    by_pid.insert(id, display);
                }
            }
            Ok(id)
        };
    for &pi in &applicable {
        let p = &set.authz[pi as usize];
        let id = alloc_policy(&p.namespace, &p.name, p.key(), ids)?;
        policy_ids.insert(pi, id);
        out.policy_names.insert(id, p.key());
    }

    for &pi in &applicable {
        let p = &set.authz[pi as usize];
        for (ri, r) in p.rules.iter().enumerate() {
            match p.action {
                Action::Allow if r.has_l7 => out.warnings.push(format!(
                    "{} rule {ri}: ALLOW rule with L7 attributes never matches in the kernel (L4)",
                    p.key()
                )),
                Action::Deny | Action::Custom if r.only_l7 => out.warnings.push(format!(
                    "{} rule {ri}: {} rule with only L7 attributes denies every connection in the kernel (L4)",
                    p.key(),
                    p.action
                )),
                _ => {}
            }
        }
    }

    let now_clock = clock(input.now, set.options.utc_offset_minutes);
    let mut port_cache: FastMap<(u32, u32), Rc<PortSet>> = FastMap::default();
    let mut time_dependent = false;
    let mut entries: Vec<(PolicyKey, PolicyValue)> = Vec::new();
    let mut cands: Vec<RuleRef> = Vec::new();

    for (k, &(wi, ep)) in input.local.iter().enumerate() {
        let w = &input.workloads[wi];
        let t = targets[k];
        entries.push((
            PolicyKey::new(0, ep, Direction::Egress, IDENTITY_ANY, PROTO_ANY, 0),
            PolicyValue::allow(POLICY_ID_NONE),
        ));
        let scopes = set.scopes(t.namespace);
        let allow_applies = set.allow_applies(&t, &scopes);
        let default = if allow_applies {
            PolicyValue::deny(POLICY_ID_NONE, DropReason::PolicyDefaultDeny)
        } else {
            PolicyValue::allow(POLICY_ID_NONE)
        };

        // PeerAuthentication: ports where plaintext peers are refused.
        let (base_mode, base_by, overrides) = set.mtls_ports(&t);
        let mut pa_value = |p: Option<&PeerAuth>,
                            ids: &mut dyn IdAllocator,
                            out: &mut Compiled|
         -> Result<PolicyValue, CompileError> {
            let p = p.expect("a STRICT mode is always set by some PeerAuthentication");
            let id = alloc_policy(
                &p.namespace,
                &peer_authentication_id_name(&p.name),
                format!("{}/PeerAuthentication/{}", p.namespace, p.name),
                ids,
            )?;
            out.policy_names.insert(id, format!("{}/PeerAuthentication/{}", p.namespace, p.name));
            Ok(PolicyValue::deny(id, DropReason::PlaintextStrict))
        };
        let strict_other = if base_mode == MtlsMode::Strict { Some(pa_value(base_by, ids, &mut out)?) } else { None };
        let mut strict_ports: BTreeMap<u16, Option<PolicyValue>> = BTreeMap::new();
        for (port, m, by) in overrides {
            let v = if m == MtlsMode::Strict { Some(pa_value(by, ids, &mut out)?) } else { None };
            strict_ports.insert(port, v);
        }
        let strict = |p: Option<u16>| -> Option<PolicyValue> {
            match p.and_then(|p| strict_ports.get(&p)) {
                Some(v) => *v,
                None => strict_other,
            }
        };

        // Per-endpoint rule preparation: constant conditions and port sets.
        let mut prepared: FastMap<(u32, u32), Option<Prepared>> = FastMap::default();
        let mut prepare = |rr: &RuleRef, time_dependent: &mut bool| -> Option<(Rc<PortSet>, PolicyValue)> {
            let e = prepared.entry((rr.policy, rr.rule)).or_insert_with(|| {
                let p = &set.authz[rr.policy as usize];
                let r = &p.rules[rr.rule as usize];
                if p.action == Action::Allow && r.has_l7 {
                    return None;
                }
                let env = Env {
                    peer: PeerView { principal: None, namespace: None, sa: None, addr: Addr::Unknown },
                    dest_ip: Some(w.ip),
                    proto: PROTO_TCP,
                    port: 0,
                    clock: now_clock,
                    l7: None,
                };
                if r.when.iter().any(|c| matches!(c.key, Key::TimeOfDay | Key::DayOfWeek)) {
                    *time_dependent = true;
                }
                if !r.when.iter().filter(|c| is_const_key(&c.key)).all(|c| condition_matches(c, &env)) {
                    return None;
                }
                let ports = port_cache.entry((rr.policy, rr.rule)).or_insert_with(|| Rc::new(rule_ports(r))).clone();
                let id = policy_ids[&rr.policy];
                let value = if p.action == Action::Allow {
                    PolicyValue::allow(id)
                } else {
                    PolicyValue::deny(id, DropReason::PolicyDeny)
                };
                Some(Prepared { ports, value })
            });
            e.as_ref().map(|p| (Rc::clone(&p.ports), p.value))
        };

        // Decisions of one class in one view: (value for "other", values per listed port).
        let mut decide_class = |c: &Class,
                                view: View,
                                extra_ports: &BTreeSet<u16>,
                                time_dependent: &mut bool|
         -> (PolicyValue, BTreeMap<u16, PolicyValue>, BTreeSet<u16>) {
            let peer = match view {
                View::Authenticated => {
                    let sa = c.principal.as_deref().and_then(principal_parts);
                    PeerView { principal: c.principal.as_deref(), namespace: sa.map(|(n, _)| n), sa, addr: c.addr }
                }
                View::Plaintext => PeerView { principal: None, namespace: None, sa: None, addr: c.addr },
            };
            set.candidates(&t, &scopes, peer.principal, peer.namespace, peer.sa, &mut cands);
            let env = Env { peer, dest_ip: Some(w.ip), proto: PROTO_TCP, port: 0, clock: now_clock, l7: None };
            let mut matching: Vec<(Rc<PortSet>, PolicyValue)> = Vec::new();
            for rr in cands.iter() {
                let Some((ports, value)) = prepare(rr, time_dependent) else { continue };
                let r = &set.authz[rr.policy as usize].rules[rr.rule as usize];
                let remote_ok = (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, &peer, None)))
                    && r.when.iter().filter(|c| is_remote_key(&c.key)).all(|c| condition_matches(c, &env));
                if remote_ok {
                    matching.push((ports, value));
                }
            }
            // As in the engine: a peer without a principal is refused where mTLS is STRICT.
            let plaintext = peer.principal.is_none();
            let mut listed: BTreeSet<u16> = extra_ports.clone();
            for (ps, _) in &matching {
                listed.extend(ps.listed());
            }
            if plaintext {
                listed.extend(strict_ports.keys());
            }
            let at = |p: Option<u16>| -> PolicyValue {
                if plaintext && let Some(v) = strict(p) {
                    return v;
                }
                matching.iter().find(|(ps, _)| ps.contains(p)).map(|(_, v)| *v).unwrap_or(default)
            };
            let other = at(None);
            let per_port = listed.iter().map(|&p| (p, at(Some(p)))).collect();
            (other, per_port, listed)
        };

        let views: &[View] = if input.meshed.get(k).copied().unwrap_or(false) {
            &[View::Authenticated, View::Plaintext]
        } else {
            &[View::Authenticated]
        };
        for &view in views {
            let key = |id: u32, proto: u8, port: u16| {
                PolicyKey::new(0, ep, Direction::Ingress, id, proto, port).with_plaintext(view == View::Plaintext)
            };
            // The world defines the wildcard entries, the default `(*, *)` always.
            let (w_other, w_ports, w_listed) = decide_class(&classes[0], view, &BTreeSet::new(), &mut time_dependent);
            entries.push((key(IDENTITY_ANY, PROTO_ANY, 0), w_other));
            for (&p, &v) in &w_ports {
                if v != w_other {
                    entries.push((key(IDENTITY_ANY, PROTO_TCP, p), v));
                }
            }
            let lookup_any = |p: u16| -> PolicyValue { w_ports.get(&p).copied().unwrap_or(w_other) };
            for c in &classes[1..] {
                let (other, ports, _) = decide_class(c, view, &w_listed, &mut time_dependent);
                let has_any = other != w_other;
                if has_any {
                    entries.push((key(c.id, PROTO_ANY, 0), other));
                }
                for (&p, &v) in &ports {
                    let fallback = if has_any { other } else { lookup_any(p) };
                    if v != fallback {
                        entries.push((key(c.id, PROTO_TCP, p), v));
                    }
                }
            }
        }
    }

    if time_dependent {
        out.valid_until = next_time_boundary(set, &applicable, input.now);
    }
    entries.sort_by_key(|(k, _)| *k);
    out.policy = entries;
    Ok(out)
}

/// The next instant after `now` at which a time condition of an applicable policy may change.
fn next_time_boundary(set: &PolicySet, applicable: &BTreeSet<u32>, now: SystemTime) -> Option<SystemTime> {
    let mut minutes: BTreeSet<u32> = BTreeSet::new();
    for &pi in applicable {
        for r in &set.authz[pi as usize].rules {
            for c in &r.when {
                for v in [&c.values, &c.not_values] {
                    match v {
                        Values::Windows(ws) => {
                            for w in ws {
                                minutes.insert(w.start % 1440);
                                minutes.insert(w.end % 1440);
                            }
                        }
                        Values::Days(d) if !d.is_empty() => {
                            minutes.insert(0);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    let (cur, _) = clock(now, set.options.utc_offset_minutes);
    let secs_into_minute = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() % 60).unwrap_or(0);
    let sub = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let start_of_minute = now - Duration::from_secs(secs_into_minute) - Duration::from_nanos(sub as u64);
    minutes
        .iter()
        .map(|&m| {
            let delta = (m + 1440 - cur) % 1440;
            let delta = if delta == 0 { 1440 } else { delta };
            start_of_minute + Duration::from_secs(delta as u64 * 60)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every port set over listed ports {1, 2, 3} plus "other", checked against plain set logic.
    #[test]
    fn port_set_algebra_matches_set_semantics() {
        let universe = [Some(1u16), Some(2), Some(3), None];
        let subsets: Vec<BTreeSet<u16>> =
            (0..8u8).map(|m| (1..=3u16).filter(|p| m & (1 << (p - 1)) != 0).collect()).collect();
        let mut sets = Vec::new();
        for s in &subsets {
            sets.push(PortSet::Only(s.clone()));
            sets.push(PortSet::AllBut(s.clone()));
        }
        for a in &sets {
            for b in &sets {
                for &p in &universe {
                    assert_eq!(
                        a.clone().and(b.clone()).contains(p),
                        a.contains(p) && b.contains(p),
                        "{a:?} and {b:?} at {p:?}"
                    );
                    assert_eq!(
                        a.clone().or(b.clone()).contains(p),
                        a.contains(p) || b.contains(p),
                        "{a:?} or {b:?} at {p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn rule_ports_combine_operations_and_destination_port() {
        let r = Rule {
            from: vec![],
            to: vec![
                Operation { ports: vec![80, 81], ..Operation::default() },
                Operation { not_ports: vec![80, 22], ..Operation::default() },
            ],
            when: vec![Condition {
                key: Key::DestinationPort,
                values: Values::Ports(vec![]),
                not_values: Values::Ports(vec![81]),
            }],
            has_l7: false,
            only_l7: false,
        };
        let ps = rule_ports(&r);
        assert!(
            ps.contains(Some(80))
                && !ps.contains(Some(81))
                && !ps.contains(Some(22))
                && ps.contains(Some(443))
                && ps.contains(None)
        );
    }
}
