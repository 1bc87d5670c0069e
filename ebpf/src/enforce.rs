//! The decision path every hook shares: committed state, flow cache, policy lookup, counters.
//! Every error path returns a deny; nothing here can pass a packet by failing.

use aya_ebpf::bindings::BPF_NOEXIST;
use warden_common::{
    Config, Counter, CounterKey, Direction, DropReason, EndpointInfo, EndpointKey, FLOW_REPLY, FlowKey,
    FlowValue, IDENTITY_WORLD, PolicyKey, PolicyValue, RemoteInfo, Verdict,
    lookup::{PolicyLookup, Query, decide},
};

use crate::{
    maps::{CONFIG, COUNTERS, ENDPOINTS, FLOWS, IPCACHE, POLICY, ipcache_key},
    packet::Tuple,
};

/// The outcome of one hook invocation, for counting.
pub struct Outcome {
    pub endpoint_id: u32,
    pub direction: Direction,
    pub value: PolicyValue,
}

impl Outcome {
    #[inline(always)]
    pub fn drop(endpoint_id: u32, direction: Direction, reason: DropReason) -> Self {
        Outcome { endpoint_id, direction, value: PolicyValue::deny(0, reason) }
    }
}

struct PolicyMap;

impl PolicyLookup for PolicyMap {
    #[inline(always)]
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        // SAFETY: the value is copied out at once; the map is never written by this program.
        unsafe { POLICY.get(key) }.copied()
    }
}

/// The committed configuration, or `NoState` before the agent has committed one.
#[inline(always)]
pub fn config() -> Result<Config, DropReason> {
    match CONFIG.get(0) {
        Some(c) if c.generation != 0 => Ok(*c),
        _ => Err(DropReason::NoState),
    }
}

#[inline(always)]
pub fn endpoint(slot: u8, ifindex: u32) -> Result<EndpointInfo, DropReason> {
    // SAFETY: copied out at once.
    unsafe { ENDPOINTS.get(EndpointKey { ifindex, slot: slot as u32 }) }.copied().ok_or(DropReason::UnknownEndpoint)
}

/// Identity-cache entry of a remote address (world when no prefix covers it).
#[inline(always)]
pub fn remote(slot: u8, addr: [u8; 4]) -> RemoteInfo {
    match IPCACHE.get(&ipcache_key(slot, addr)) {
        Some(r) => *r,
        None => RemoteInfo { identity: IDENTITY_WORLD, local_ifindex: 0 },
    }
}

#[inline(always)]
pub fn policy(slot: u8, endpoint_id: u32, direction: Direction, remote_identity: u32, proto: u8, dport: u16) -> PolicyValue {
    decide(&PolicyMap, &Query { slot, endpoint_id, direction, remote_identity, proto, dport })
}

/// Decide a packet of `t` seen on endpoint `ep`'s veth, travelling in `dir` relative to the
/// endpoint. Uses and maintains the flow cache: a flow decided under the committed generation is
/// not looked up again; a reply follows the decision of the flow it answers.
#[inline(always)]
pub fn decide_packet(cfg: &Config, ifindex: u32, ep: &EndpointInfo, dir: Direction, t: &Tuple) -> Outcome {
    let key = FlowKey {
        ifindex,
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        _pad: [0; 3],
    };
    let cached = FLOWS.get_ptr_mut(key);
    let mut is_reply = false;
    if let Some(f) = cached {
        // SAFETY: a valid pointer into the LRU map; only this flow's packets write it, and a
        // racing writer can only store another equally valid decision.
        let f = unsafe { &mut *f };
        if f.generation == cfg.generation {
            let direction = Direction::from_u8(f.direction).unwrap_or(dir);
            let value = PolicyValue { policy_id: f.policy_id, verdict: f.verdict, reason: f.reason, _pad: [0; 2] };
            return Outcome { endpoint_id: ep.endpoint_id, direction, value };
        }
        is_reply = f.flags & FLOW_REPLY != 0;
    }

    // The remote is the other end whichever way the packet goes.
    let remote_addr = match dir {
        Direction::Ingress => t.saddr,
        Direction::Egress => t.daddr,
    };
    let slot = cfg.active_slot();
    let remote_identity = remote(slot, remote_addr).identity;
    // A reply is decided as the flow it answers: the opposite direction, the port it was sent to.
    let (qdir, qport) = if is_reply {
        (match dir {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }, t.sport)
    } else {
        (dir, t.dport)
    };
    let value = policy(slot, ep.endpoint_id, qdir, remote_identity, t.proto, qport);

    let entry = FlowValue {
        generation: cfg.generation,
        endpoint_id: ep.endpoint_id,
        policy_id: value.policy_id,
        verdict: value.verdict,
        reason: value.reason,
        direction: qdir as u8,
        flags: if is_reply { FLOW_REPLY } else { 0 },
    };
    // Cache failures are harmless: the next packet decides again.
    let _ = FLOWS.insert(key, entry, 0);
    if !is_reply && value.verdict == Verdict::Allow as u8 {
        let reply = FlowValue { flags: FLOW_REPLY, ..entry };
        let _ = FLOWS.insert(key.reversed(), reply, 0);
    }
    Outcome { endpoint_id: ep.endpoint_id, direction: qdir, value }
}

/// Add one packet of `bytes` to the counter of `o` (per CPU, so no atomics are needed).
#[inline(always)]
pub fn count(o: &Outcome, hook: u8, bytes: u64) {
    let key = CounterKey {
        endpoint_id: o.endpoint_id,
        policy_id: o.value.policy_id,
        verdict: o.value.verdict,
        reason: o.value.reason,
        direction: o.direction as u8,
        hook,
    };
    match COUNTERS.get_ptr_mut(key) {
        Some(c) => {
            // SAFETY: per-CPU value of this CPU; BPF programs do not migrate while running.
            let c = unsafe { &mut *c };
            c.packets += 1;
            c.bytes += bytes;
        }
        None => {
            let _ = COUNTERS.insert(key, Counter { packets: 1, bytes }, BPF_NOEXIST as u64);
        }
    }
}
