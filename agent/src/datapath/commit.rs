//! Committing a node state to the maps, atomically from the datapath's point of view.
//!
//! 1. Clear the inactive slot when it may hold leftovers (an interrupted commit, or an earlier
//!    agent's): a full scan of the slotted maps, skipped when this process left it empty.
//! 2. Write the whole new state into the inactive slot. Packets do not see it yet.
//! 3. Flip `Config::generation` (one 4-byte array write): the new slot becomes active, and every
//!    cached flow is re-decided once against it.
//! 4. Clear the slot that was active.
//!
//! A failure in 1–2 leaves the active slot untouched (the last good state keeps running) and
//! returns the error; 4 failing leaves garbage in the inactive slot that the next commit clears.
//!
//! Before 1, the state is checked against the maps' capacities ([`check`]): each slotted map's
//! capacity is shared by both slots, and while the new state is written the running one still
//! holds its slot, so one state may take half of each map. A state that needs more is refused,
//! naming the map and what fills it, before anything is written.

use std::{collections::BTreeMap, fmt};

use aya::maps::lpm_trie::Key;
use ipnet::Ipv4Net;
use warden_common::{
    CONFIG_EVENTS, CONFIG_FAST_PATH, CONFIG_NODE_EXEMPT, Config, EndpointInfo, EndpointKey, IPCACHE_SLOT_BITS,
    IpcacheAddr, POLICY_ID_NONE, PolicyKey, PolicyValue, RemoteInfo, ServiceKey, ServiceSplit, capacity, names,
};

use super::maps::Maps;

/// Everything the datapath needs for one node, slot-free.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    pub ipcache: Vec<(Ipv4Net, RemoteInfo)>,
    /// (host veth ifindex, endpoint).
    pub endpoints: Vec<(u32, EndpointInfo)>,
    /// Keys in slot 0; the commit re-slots them.
    pub policy: Vec<(PolicyKey, PolicyValue)>,
    /// How meshed clients' connections to Service ports with pods out of the mesh are shared;
    /// keys in slot 0.
    pub services: Vec<(ServiceKey, ServiceSplit)>,
    /// The node agent's outbound listener, when the node runs the mesh.
    pub capture: Option<std::net::SocketAddrV4>,
    /// The kernel writes access-log events (someone reads them).
    pub events: bool,
    /// The same-node fast path is on (`CONFIG_FAST_PATH`).
    pub fast_path: bool,
    /// TCP from the node's own stack to its workloads is allowed without policy
    /// (`CONFIG_NODE_EXEMPT`, `warden agent --node-probes allow`).
    pub node_exempt: bool,
}

/// aya's map errors say only which call failed ("`bpf_map_update_elem` failed") and keep the
/// errno in their `source()`; the errno tells a full map (E2BIG, ENOSPC) from a missing one or a
/// permission, so each message shows the whole chain ([`crate::describe`]), and the map errors are
/// kept out of `source()` so that a chain printer does not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error("writing {map} failed after {written} entries (the active state is unchanged): {}", crate::describe(.error))]
    Write { map: &'static str, written: usize, error: aya::maps::MapError },
    #[error("clearing slot {slot} of {map} failed: {}", crate::describe(.error))]
    Clear { map: &'static str, slot: u8, error: aya::maps::MapError },
    #[error("flipping the committed generation failed (the active state is unchanged): {}", crate::describe(.0))]
    Flip(aya::maps::MapError),
}

/// Entries per slotted map: what one state takes in its slot, what a slot holds, or (as
/// [`Slots::capacity`]) what a map holds for both slots together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub ipcache: usize,
    pub ipcache_hosts: usize,
    pub endpoints: usize,
    pub policy: usize,
    pub services: usize,
}

impl Entries {
    /// The capacities the maps are built with (`warden_common::capacity`), both slots together.
    pub const BUILT: Entries = Entries {
        ipcache: capacity::IPCACHE as usize,
        ipcache_hosts: capacity::IPCACHE as usize,
        endpoints: capacity::ENDPOINTS as usize,
        policy: capacity::POLICY as usize,
        services: capacity::SERVICES as usize,
    };

    /// (pinned name, entries, what puts entries there) per slotted map.
    fn by_map(&self) -> [(&'static str, usize, &'static str); 5] {
        [
            (names::IPCACHE, self.ipcache, "one per workload address, ipBlocks CIDR and captured Service address"),
            (names::IPCACHE_HOSTS, self.ipcache_hosts, "one per workload and captured Service address"),
            (names::ENDPOINTS, self.endpoints, "one per workload of this node"),
            (
                names::POLICY,
                self.policy,
                "per workload of this node, one per remote identity and port its rules tell apart",
            ),
            (names::SERVICES, self.services, "one per Service port with pods out of the mesh"),
        ]
    }
}

// The cgroups map is not slotted: it holds one entry per local workload with a cgroup, never
// more than one state's endpoints, so the endpoints' check covers it.
const _: () = assert!(capacity::CGROUPS >= capacity::ENDPOINTS / 2);

impl NodeState {
    /// The entries this state takes in each slotted map (what [`commit`] writes).
    pub fn entries(&self) -> Entries {
        Entries {
            ipcache: self.ipcache.len(),
            ipcache_hosts: self.ipcache.iter().filter(|(net, _)| net.prefix_len() == 32).count(),
            endpoints: self.endpoints.len(),
            policy: self.policy.len(),
            services: self.services.len(),
        }
    }
}

/// What the committer knows about the slots between commits.
#[derive(Clone, Debug)]
pub struct Slots {
    /// The inactive slot is known to be empty (this process cleared it after its last commit).
    /// False after loading: an earlier agent may have died mid-commit.
    pub inactive_clean: bool,
    /// What the active slot holds; counted in the maps once after loading (an earlier agent's
    /// state), then known from each commit.
    pub active: Option<Entries>,
    /// The maps' capacities, both slots together ([`Maps::capacity`]).
    pub capacity: Entries,
}

impl Slots {
    pub fn new(capacity: Entries) -> Slots {
        Slots { inactive_clean: false, active: None, capacity }
    }
}

/// A state that does not fit the maps. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityError {
    /// The map's pinned name.
    pub map: &'static str,
    /// The entries the new state needs there.
    pub entries: usize,
    /// The most it may take: half the map's capacity, less what the active slot holds beyond
    /// its half.
    pub limit: usize,
    /// The map's capacity, both slots together.
    pub capacity: usize,
    /// What the active slot (the running state) holds in the map.
    pub active: usize,
    /// What puts entries in the map.
    pub what: &'static str,
    /// For the policy map: the policies with the most entries, most first: (name, entries).
    pub top: Vec<(String, usize)>,
    /// The other policies with entries: how many, and their entries together.
    pub rest: (usize, usize),
}

/// How many of the policies with the most entries a [`CapacityError`] names.
const TOP_POLICIES: usize = 5;

impl fmt::Display for CapacityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let CapacityError { map, entries, limit, capacity, active, .. } = self;
        let half = capacity / 2;
        write!(f, "the new state needs {entries} entries in {map}, which holds {capacity} for two states ")?;
        f.write_str("(the running one keeps its slot until the new one is committed): ")?;
        if limit < &half {
            write!(f, "the running state holds {active}, more than its half (committed by an agent that did not ")?;
            write!(f, "check), so the new one may take {limit}")?;
        } else {
            write!(f, "one state may take {limit}")?;
        }
        write!(f, " ({})", self.what)?;
        if !self.top.is_empty() {
            f.write_str("; the most entries come from ")?;
            for (i, (name, n)) in self.top.iter().enumerate() {
                write!(f, "{}{name} ({n})", if i == 0 { "" } else { ", " })?;
            }
            if self.rest.0 > 0 {
                write!(f, " and {} more policies ({} entries)", self.rest.0, self.rest.1)?;
            }
        }
        f.write_str("; nothing was written")
    }
}

impl std::error::Error for CapacityError {}

/// Whether a state needing `needed` fits beside an active slot holding `active`, in maps of
/// `capacity` (both slots together). A state may take half of each map, so that any state that
/// fits can follow any other (a state taking more would fit now and block every later commit:
/// the next one is written while it still holds its slot); and it must fit beside what the
/// active slot really holds, should that be more than its half. `policy` and `policy_names`
/// name the policies with the most entries when the policy map is the one that overflows.
pub fn fits(
    needed: &Entries,
    active: &Entries,
    capacity: &Entries,
    policy: &[(PolicyKey, PolicyValue)],
    policy_names: &BTreeMap<u32, String>,
) -> Result<(), CapacityError> {
    let maps = needed.by_map().into_iter().zip(active.by_map()).zip(capacity.by_map());
    for (((map, entries, what), (_, active, _)), (_, capacity, _)) in maps {
        let limit = (capacity / 2).min(capacity.saturating_sub(active));
        if entries <= limit {
            continue;
        }
        let (top, rest) = if map == names::POLICY { top_policies(policy, policy_names) } else { (Vec::new(), (0, 0)) };
        return Err(CapacityError { map, entries, limit, capacity, active, what, top, rest });
    }
    Ok(())
}

/// The policies with the most entries, most first, and (how many others, their entries).
/// Entries no policy decided are the endpoints' defaults.
fn top_policies(
    policy: &[(PolicyKey, PolicyValue)],
    names: &BTreeMap<u32, String>,
) -> (Vec<(String, usize)>, (usize, usize)) {
    let mut by_id: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, v) in policy {
        *by_id.entry(v.policy_id).or_default() += 1;
    }
    let mut counts: Vec<(u32, usize)> = by_id.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let name = |id: u32| match (id, names.get(&id)) {
        (POLICY_ID_NONE, _) => "the workloads' defaults".to_string(),
        (_, Some(n)) => n.clone(),
        (id, None) => format!("policy id {id}"),
    };
    let rest = counts.iter().skip(TOP_POLICIES).fold((0, 0), |(p, e), (_, n)| (p + 1, e + n));
    (counts.into_iter().take(TOP_POLICIES).map(|(id, n)| (name(id), n)).collect(), rest)
}

/// Count what `slot` holds in the slotted maps (a full scan).
pub fn count_slot(maps: &Maps, slot: u8) -> Entries {
    Entries {
        ipcache: maps.ipcache.keys().filter_map(Result::ok).filter(|k| k.data().slot == slot).count(),
        ipcache_hosts: maps.ipcache_hosts.keys().filter_map(Result::ok).filter(|k| k.slot == slot).count(),
        endpoints: maps.endpoints.keys().filter_map(Result::ok).filter(|k| k.slot == slot as u32).count(),
        policy: maps.policy.keys().filter_map(Result::ok).filter(|k| k.slot() == slot).count(),
        services: maps.services.keys().filter_map(Result::ok).filter(|k| k.slot == slot).count(),
    }
}

/// Check that `state` fits the maps beside the running state ([`fits`]), counting what the
/// active slot holds if this process does not know it yet.
pub fn check(
    maps: &Maps,
    state: &NodeState,
    policy_names: &BTreeMap<u32, String>,
    slots: &mut Slots,
) -> Result<(), CapacityError> {
    let active = match slots.active {
        Some(a) => a,
        None => *slots.active.insert(count_slot(maps, maps.config().active_slot())),
    };
    fits(&state.entries(), &active, &slots.capacity, &state.policy, policy_names)
}

fn ipcache_key(slot: u8, net: &Ipv4Net) -> Key<IpcacheAddr> {
    Key::new(
        IPCACHE_SLOT_BITS + net.prefix_len() as u32,
        IpcacheAddr { slot, addr: net.network().octets(), _pad: [0; 3] },
    )
}

/// Delete every entry of `slot` from the slotted maps.
pub fn clear_slot(maps: &mut Maps, slot: u8) -> Result<(), CommitError> {
    let stale: Vec<_> = maps.policy.keys().filter_map(Result::ok).filter(|k| k.slot() == slot).collect();
    for k in stale {
        maps.policy.remove(&k).map_err(|error| CommitError::Clear { map: names::POLICY, slot, error })?;
    }
    let stale: Vec<_> = maps.endpoints.keys().filter_map(Result::ok).filter(|k| k.slot == slot as u32).collect();
    for k in stale {
        maps.endpoints.remove(&k).map_err(|error| CommitError::Clear { map: names::ENDPOINTS, slot, error })?;
    }
    let stale: Vec<_> = maps.ipcache.keys().filter_map(Result::ok).filter(|k| k.data().slot == slot).collect();
    for k in stale {
        maps.ipcache.remove(&k).map_err(|error| CommitError::Clear { map: names::IPCACHE, slot, error })?;
    }
    let stale: Vec<_> = maps.ipcache_hosts.keys().filter_map(Result::ok).filter(|k| k.slot == slot).collect();
    for k in stale {
        maps.ipcache_hosts.remove(&k).map_err(|error| CommitError::Clear { map: names::IPCACHE_HOSTS, slot, error })?;
    }
    let stale: Vec<_> = maps.services.keys().filter_map(Result::ok).filter(|k| k.slot == slot).collect();
    for k in stale {
        maps.services.remove(&k).map_err(|error| CommitError::Clear { map: names::SERVICES, slot, error })?;
    }
    Ok(())
}

/// Commit `state`; returns the new generation. Refuses a state that does not fit ([`check`])
/// before writing anything. `slots.inactive_clean` says the inactive slot is known to be empty
/// (this process cleared it after its last commit); it is set false while writing and true again
/// only once the old slot has been cleared. `policy_names` name the policies an error blames.
pub fn commit(
    maps: &mut Maps,
    state: &NodeState,
    policy_names: &BTreeMap<u32, String>,
    slots: &mut Slots,
) -> Result<u32, CommitError> {
    check(maps, state, policy_names, slots)?;
    let current = maps.config();
    let next = match current.generation.wrapping_add(1) {
        0 => 2, // 0 means "never committed"; 2 keeps the slot parity of 0.
        g => g,
    };
    let slot = (next & 1) as u8;
    if !std::mem::replace(&mut slots.inactive_clean, false) {
        clear_slot(maps, slot)?;
    }

    for (i, (net, info)) in state.ipcache.iter().enumerate() {
        maps.ipcache.insert(&ipcache_key(slot, net), *info, 0).map_err(|error| CommitError::Write {
            map: names::IPCACHE,
            written: i,
            error,
        })?;
    }
    // The /32 entries again, in the exact-match table the kernel tries first.
    for (i, (net, info)) in state.ipcache.iter().filter(|(net, _)| net.prefix_len() == 32).enumerate() {
        let key = IpcacheAddr { slot, addr: net.network().octets(), _pad: [0; 3] };
        maps.ipcache_hosts.insert(key, *info, 0).map_err(|error| CommitError::Write {
            map: names::IPCACHE_HOSTS,
            written: i,
            error,
        })?;
    }
    for (i, (ifindex, ep)) in state.endpoints.iter().enumerate() {
        maps.endpoints
            .insert(EndpointKey { ifindex: *ifindex, slot: slot as u32 }, *ep, 0)
            .map_err(|error| CommitError::Write { map: names::ENDPOINTS, written: i, error })?;
    }
    for (i, (k, v)) in state.policy.iter().enumerate() {
        maps.policy.insert(k.with_slot(slot), *v, 0).map_err(|error| CommitError::Write {
            map: names::POLICY,
            written: i,
            error,
        })?;
    }

    for (i, (k, v)) in state.services.iter().enumerate() {
        maps.services.insert(ServiceKey { slot, ..*k }, *v, 0).map_err(|error| CommitError::Write {
            map: names::SERVICES,
            written: i,
            error,
        })?;
    }

    let (capture_addr, capture_port) = state.capture.map_or(([0; 4], 0), |a| (a.ip().octets(), a.port()));
    let flags = if state.events { CONFIG_EVENTS } else { 0 }
        | if state.fast_path && state.capture.is_some() { CONFIG_FAST_PATH } else { 0 }
        | if state.node_exempt { CONFIG_NODE_EXEMPT } else { 0 };
    let config = Config { generation: next, flags, capture_addr, capture_port, _pad: 0 };
    maps.config.set(0, config, 0).map_err(CommitError::Flip)?;
    slots.active = Some(state.entries());

    clear_slot(maps, current.active_slot())?;
    slots.inactive_clean = true;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use warden_common::{Direction, DropReason, PROTO_TCP};

    use super::*;

    /// `n` ingress entries of endpoint 1 decided by `policy_id`, from identities numbered from
    /// `first`.
    fn entries_of(policy_id: u32, first: u32, n: usize) -> Vec<(PolicyKey, PolicyValue)> {
        (0..n as u32)
            .map(|i| {
                let key = PolicyKey::new(0, 1, Direction::Ingress, first + i / 900, PROTO_TCP, (i % 900) as u16 + 1);
                (key, PolicyValue::allow(policy_id))
            })
            .collect()
    }

    fn policy_entries(n: usize) -> Entries {
        Entries { policy: n, ..Entries::default() }
    }

    /// The audit's reproducer: a state of 270,004 policy entries fits the empty map (524,288) but
    /// would block every later commit, which is written while it still holds its slot. It is
    /// refused at once, naming the map, the count, the capacity and the policies that fill it.
    #[test]
    fn a_state_over_its_slots_share_is_refused_naming_the_map_and_the_policies_that_fill_it() {
        let mut policy = entries_of(7, 100, 269_100);
        policy.extend(entries_of(8, 1_000, 900));
        policy.push((
            PolicyKey::new(0, 1, Direction::Ingress, warden_common::IDENTITY_ANY, warden_common::PROTO_ANY, 0),
            PolicyValue::deny(POLICY_ID_NONE, DropReason::PolicyDefaultDeny),
        ));
        policy.extend(entries_of(9, 2_000, 3));
        let names = BTreeMap::from([(7, "bulk/wide-open".to_string()), (8, "team/small".to_string())]);
        let needed = Entries { policy: policy.len(), endpoints: 1, ipcache: 151, ipcache_hosts: 151, services: 0 };
        assert_eq!(needed.policy, 270_004);
        let err = fits(&needed, &Entries::default(), &Entries::BUILT, &policy, &names).unwrap_err();
        assert_eq!(
            (err.map, err.entries, err.limit, err.capacity, err.active),
            ("warden_policy_v1", 270_004, 262_144, 524_288, 0)
        );
        assert_eq!(
            err.top,
            [
                ("bulk/wide-open".to_string(), 269_100),
                ("team/small".to_string(), 900),
                ("policy id 9".to_string(), 3),
                ("the workloads' defaults".to_string(), 1),
            ]
        );
        let text = err.to_string();
        for part in [
            "270004 entries in warden_policy_v1",
            "holds 524288 for two states",
            "one state may take 262144",
            "the most entries come from bulk/wide-open (269100), team/small (900)",
            "nothing was written",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
        // Through the commit's error type, as the agent logs it.
        assert_eq!(CommitError::from(err).to_string(), text);

        // One slot's share exactly fits, beside a running state of the same size.
        let share = policy_entries(262_144);
        assert_eq!(fits(&share, &share, &Entries::BUILT, &[], &names), Ok(()));
        assert!(fits(&policy_entries(262_145), &Entries::default(), &Entries::BUILT, &[], &names).is_err());
    }

    /// A running state over its half (committed by an agent that did not check) leaves the next
    /// state less than half: what the commit really needs is room beside it.
    #[test]
    fn a_running_state_over_its_half_leaves_the_rest_of_the_map() {
        let running = policy_entries(270_004);
        assert_eq!(fits(&policy_entries(254_284), &running, &Entries::BUILT, &[], &BTreeMap::new()), Ok(()));
        let err = fits(&policy_entries(254_285), &running, &Entries::BUILT, &[], &BTreeMap::new()).unwrap_err();
        assert_eq!((err.limit, err.active), (254_284, 270_004));
        let text = err.to_string();
        assert!(
            text.contains("the running state holds 270004, more than its half") && text.contains("may take 254284"),
            "{text}"
        );
    }

    /// Every slotted map is checked, each against its own capacity, and says what fills it.
    #[test]
    fn every_slotted_map_is_checked_against_its_own_capacity() {
        let cap = Entries::BUILT;
        let ok = Entries { ipcache: 1, ipcache_hosts: 1, endpoints: 1, policy: 1, services: 0 };
        assert_eq!(fits(&ok, &ok, &cap, &[], &BTreeMap::new()), Ok(()));
        for (needed, map, what) in [
            (Entries { endpoints: 4_097, ..ok }, "warden_endpoints_v1", "one per workload of this node"),
            (Entries { ipcache: 262_145, ..ok }, "warden_ipcache_v2", "ipBlocks CIDR"),
            (Entries { ipcache_hosts: 262_145, ..ok }, "warden_ipcache_hosts_v2", "captured Service address"),
            (Entries { services: 8_193, ..ok }, "warden_services_v2", "pods out of the mesh"),
        ] {
            let err = fits(&needed, &ok, &cap, &[], &BTreeMap::new()).unwrap_err();
            assert_eq!(err.map, map);
            assert!(err.to_string().contains(what), "{err}");
        }
        // The capacities the kernel reports (a pinned map made by another version) are the ones
        // checked against.
        let small = Entries { policy: 1_000, ..cap };
        assert!(fits(&policy_entries(501), &Entries::default(), &small, &[], &BTreeMap::new()).is_err());
    }

    /// A failed map write shows the errno aya keeps as the system call error's cause.
    #[test]
    fn a_failed_write_names_its_errno() {
        let error = aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
        });
        let e = CommitError::Write { map: names::POLICY, written: 254_284, error };
        assert_eq!(
            e.to_string(),
            "writing warden_policy_v1 failed after 254284 entries (the active state is unchanged): \
             `bpf_map_update_elem` failed: Argument list too long (os error 7)"
        );
        assert!(std::error::Error::source(&e).is_none(), "shown once, not again as a cause");
    }

    #[test]
    fn a_states_entries_count_its_host_addresses_twice() {
        let info = RemoteInfo { identity: 1, local_ifindex: 0, flags: 0 };
        let state = NodeState {
            ipcache: vec![("10.0.0.0/8".parse().unwrap(), info), ("10.0.0.1/32".parse().unwrap(), info)],
            policy: entries_of(1, 1, 3),
            ..NodeState::default()
        };
        assert_eq!(state.entries(), Entries { ipcache: 2, ipcache_hosts: 1, endpoints: 0, policy: 3, services: 0 });
    }
}
