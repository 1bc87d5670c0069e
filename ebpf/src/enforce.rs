//! The decision path every hook shares: committed state, flow cache, policy lookup, counters.
//! Every error path returns a deny; nothing here can pass a packet by failing.

use aya_ebpf::bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP};
use warden_common::{
    Config, Counter, CounterKey, Direction, DropReason, EndpointInfo, EndpointKey, FLOW_CLOSED, FLOW_END_HI,
    FLOW_END_LO, FLOW_NODE, FLOW_PEER_DECIDED, FLOW_TUNNEL, FlowEnd, FlowEvent, FlowKey, FlowValue, IDENTITY_WORLD,
    IpcacheAddr, PROTO_TCP, PolicyKey, PolicyValue, RemoteInfo, Verdict,
    lookup::{PolicyLookup, Query, decide, decide_default},
};

use crate::{
    maps::{CONFIG, COUNTERS, ENDPOINTS, EVENTS, FLOWS, IPCACHE, IPCACHE_HOSTS, POLICY, ipcache_key},
    packet::Tuple,
};

/// The outcome of one hook invocation, for counting.
pub struct Outcome {
    pub endpoint_id: u32,
    pub remote_identity: u32,
    /// Direction of the flow (who initiated it), relative to the endpoint.
    pub direction: Direction,
    /// The packet answers a flow initiated by the other side.
    pub reply: bool,
    /// The flow is the node agent's delivery of a connection it received over mTLS.
    pub tunnel: bool,
    pub value: PolicyValue,
}

impl Outcome {
    #[inline(always)]
    pub fn drop(endpoint_id: u32, direction: Direction, reason: DropReason) -> Self {
        Outcome {
            endpoint_id,
            remote_identity: IDENTITY_WORLD,
            direction,
            reply: false,
            tunnel: false,
            value: PolicyValue::deny(0, reason),
        }
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

/// Identity-cache entry of a remote address (world when no prefix covers it): the /32 table
/// first, then the longest-prefix match.
#[inline(always)]
pub fn remote(slot: u8, addr: [u8; 4]) -> RemoteInfo {
    // SAFETY: copied out at once.
    if let Some(r) = unsafe { IPCACHE_HOSTS.get(IpcacheAddr { slot, addr, _pad: [0; 3] }) } {
        return *r;
    }
    match IPCACHE.get(&ipcache_key(slot, addr)) {
        Some(r) => *r,
        None => RemoteInfo { identity: IDENTITY_WORLD, local_ifindex: 0, flags: 0 },
    }
}

#[inline(always)]
pub fn policy(
    slot: u8,
    ep: &EndpointInfo,
    direction: Direction,
    remote_identity: u32,
    proto: u8,
    dport: u16,
    plaintext: bool,
) -> PolicyValue {
    let endpoint_id = ep.endpoint_id;
    if ep.default_only(direction, plaintext) {
        return decide_default(&PolicyMap, slot, endpoint_id, direction, plaintext);
    }
    decide(&PolicyMap, &Query { slot, endpoint_id, direction, remote_identity, proto, dport, plaintext })
}

/// The view of a meshed endpoint's ingress policy that decides a flow (see `PolicyKey`): plaintext
/// for TCP that the node agent did not deliver over mTLS. Other protocols are not carried by the
/// mesh (as in Istio ambient, whose PeerAuthentication leaves UDP alone): the address decides.
#[inline(always)]
pub fn plaintext_view(ep: &EndpointInfo, direction: Direction, proto: u8, tunnel: bool) -> bool {
    ep.is_meshed() && direction == Direction::Ingress && proto == PROTO_TCP && !tunnel
}

/// A packet's flow: its tuple, its flow-cache key, and which end of the key sent it.
pub struct Flow {
    pub t: Tuple,
    pub key: FlowKey,
    /// The packet's source is the key's lower end.
    pub src_lo: bool,
}

impl Flow {
    #[inline(always)]
    pub fn new(t: Tuple) -> Flow {
        let (key, src_lo) = FlowKey::of(t.saddr, t.daddr, t.sport, t.dport, t.proto);
        Flow { t, key, src_lo }
    }

    /// The end (`FLOW_END_*`) of the workload a hook acts for when the packet travels in `dir`
    /// relative to it: the packet's source when it leaves the workload, its destination when it
    /// enters.
    #[inline(always)]
    pub fn end(&self, dir: Direction) -> usize {
        if self.src_lo == (dir == Direction::Egress) { FLOW_END_LO } else { FLOW_END_HI }
    }
}

/// End `end` of the flow-cache entry `p` (constant indices: no bounds check to verify).
#[inline(always)]
fn end_of(p: *mut FlowValue, end: usize) -> *mut FlowEnd {
    // SAFETY: `p` points to a live map value; only an address is computed.
    unsafe { if end == FLOW_END_LO { &raw mut (*p).ends[FLOW_END_LO] } else { &raw mut (*p).ends[FLOW_END_HI] } }
}

/// Set end `end` of a flow-cache value (constant indices, as [`end_of`]).
#[inline(always)]
fn set_end(v: &mut FlowValue, end: usize, e: FlowEnd) {
    if end == FLOW_END_LO {
        v.ends[FLOW_END_LO] = e;
    } else {
        v.ends[FLOW_END_HI] = e;
    }
}

/// What the flow cache knows about a packet.
pub enum Cached {
    /// Decided under the committed generation: no further lookup is needed. The pointer is the
    /// workload's end of the entry, for marking the flow closed without a second lookup.
    Hit(Outcome, *mut FlowEnd),
    /// Not decided under this generation; `is_reply` when the packet answers a flow decided
    /// earlier, which is re-decided as that flow; `tunnel` when the flow is (or, for a forward
    /// packet, claims by its mark to be) the agent's delivery of an mTLS connection; `node` when
    /// the flow was (or, for a forward packet, is being) opened by the node's own stack.
    Miss { is_reply: bool, tunnel: bool, node: bool },
}

/// A flow's entry in the flow cache, looked up once and asked for either end.
pub struct FlowEntry(Option<*mut FlowValue>);

impl FlowEntry {
    #[inline(always)]
    pub fn lookup(f: &Flow) -> FlowEntry {
        FlowEntry(FLOWS.get_ptr_mut(&f.key))
    }

    /// The fast path: the decision the entry holds for one end of the flow, in either direction.
    /// `ifindex` is the veth of the workload the hook asks for; `hook` is the direction the
    /// packet travels relative to that workload; `marked`: the packet carries the agent's tunnel
    /// mark (only packets towards the workload can); `node`: the packet comes from the node's
    /// own stack, unmarked (only packets towards the workload are told apart); `syn`: the packet
    /// opens a TCP connection.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn decision(
        &self,
        cfg: &Config,
        f: &Flow,
        ifindex: u32,
        hook: Direction,
        marked: bool,
        node: bool,
        syn: bool,
    ) -> Cached {
        let fresh = Cached::Miss { is_reply: false, tunnel: marked, node };
        let Some(p) = self.0 else {
            return fresh;
        };
        let end = end_of(p, f.end(hook));
        // SAFETY: a valid pointer into the LRU map, read at once.
        let v = unsafe { *end };
        // An end is decided for one workload: on any other veth (a packet forging this workload's
        // address, or the other end's) it is no decision at all.
        if v.ifindex == 0 || v.ifindex != ifindex {
            return fresh;
        }
        // Forward packets travel in the flow's direction and replies against it; only an allowed
        // flow has replies. Anything else (a packet forged to look like a reply, an answer to a
        // denied flow) is decided afresh as a new flow.
        let forward = v.direction == hook as u8;
        if !forward && v.verdict != Verdict::Allow as u8 {
            return fresh;
        }
        // A SYN opens a new connection: decided afresh (a reused 5-tuple starts clean), unless the
        // sender's veth on this node decided this end for it a moment ago.
        if syn && (!forward || v.flags & FLOW_PEER_DECIDED == 0) {
            return fresh;
        }
        // A tunneled flow's packets towards the workload all carry the agent's mark, and a plain
        // flow's none; a node flow's come from the node's stack, and no other flow's do: a packet
        // that differs (a forgery of the flow's 5-tuple from the wire) is decided afresh, in its own
        // view.
        let tunnel = v.flags & FLOW_TUNNEL != 0;
        let from_node = v.flags & FLOW_NODE != 0;
        if forward && hook == Direction::Ingress && (tunnel != marked || from_node != node) {
            return fresh;
        }
        if v.generation != cfg.generation {
            return Cached::Miss { is_reply: !forward, tunnel, node: from_node };
        }
        let direction = if v.direction == Direction::Egress as u8 { Direction::Egress } else { Direction::Ingress };
        let value = PolicyValue { policy_id: v.policy_id, verdict: v.verdict, reason: v.reason, _pad: [0; 2] };
        let o = Outcome {
            endpoint_id: v.endpoint_id,
            remote_identity: v.remote_identity,
            direction,
            reply: !forward,
            tunnel,
            value,
        };
        Cached::Hit(o, end)
    }
}

/// Whether the slow path writes its decision to the flow cache. The TC hooks do; the sendmsg4
/// hook, which decides a datagram just before TC sees it, does not: one writer keeps inserts
/// (which evict in a full LRU map) to one per flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    Write,
    ReadOnly,
}

/// The remote end of a flow whichever way its packet goes.
#[inline(always)]
pub fn remote_addr(f: &Flow, dir: Direction) -> [u8; 4] {
    match dir {
        Direction::Ingress => f.t.saddr,
        Direction::Egress => f.t.daddr,
    }
}

/// The slow path, given `dst`, the identity-cache entry of the flow's remote end
/// ([`remote_addr`]; the caller looks it up, as it may need it again): decide a packet
/// travelling in `dir` relative to endpoint `ep` (on the veth of `ifindex`) from the policy map,
/// and cache the decision for both directions of the flow. A reply is decided as the flow it
/// answers. A TCP flow the node's own stack opened (`node`) is allowed without policy while the
/// agent exempts them (`CONFIG_NODE_EXEMPT`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn decide_new(
    cfg: &Config,
    f: &Flow,
    ifindex: u32,
    ep: &EndpointInfo,
    dir: Direction,
    is_reply: bool,
    tunnel: bool,
    node: bool,
    cache: Cache,
    dst: &RemoteInfo,
) -> Outcome {
    let remote_addr = remote_addr(f, dir);
    let slot = cfg.active_slot();
    let (qdir, qport) = query(f, dir, is_reply);
    let exempt = node && cfg.node_exempt() && qdir == Direction::Ingress && f.t.proto == PROTO_TCP;
    let value = if exempt {
        PolicyValue { reason: DropReason::NodeLocal as u8, ..PolicyValue::allow(0) }
    } else {
        policy(slot, ep, qdir, dst.identity, f.t.proto, qport, plaintext_view(ep, qdir, f.t.proto, tunnel))
    };
    // A meshed workload's connection to the agent's capture listener is the mesh's too (for an
    // egress flow, `remote_addr` and `qport` are where it was sent, whichever way this packet goes).
    let tunnel = tunnel || (qdir == Direction::Egress && ep.is_meshed() && cfg.is_capture_listener(remote_addr, qport));
    let o = Outcome {
        endpoint_id: ep.endpoint_id,
        remote_identity: dst.identity,
        direction: qdir,
        reply: is_reply,
        tunnel,
        value,
    };
    if cache == Cache::Write {
        let mut entry = FlowValue::default();
        // This packet's close is counted now; the flag keeps later ones from counting again.
        let closed = if f.t.is_fin_or_rst() { FLOW_CLOSED } else { 0 };
        let from_node = if node { FLOW_NODE } else { 0 };
        set_end(&mut entry, f.end(dir), flow_end(cfg, ifindex, &o, closed | from_node));
        // An allowed packet leaving a workload for another workload of this node (outside the
        // mesh's tunnel, whose packets go to the agent) meets that workload's veth next: decide
        // that end now, so its hook finds the flow decided. One insert per flow instead of one
        // per veth.
        if dir == Direction::Egress && value.is_allow() && !tunnel && dst.local_ifindex != 0 {
            // An unknown peer is left undecided: its own hook decides (and drops).
            if let Ok(peer) = endpoint(slot, dst.local_ifindex) {
                let p = decide_peer(slot, f, ep, &peer, is_reply);
                set_end(&mut entry, f.end(Direction::Ingress), flow_end(cfg, dst.local_ifindex, &p, FLOW_PEER_DECIDED));
            }
        }
        // A failed insert is harmless: the next packet decides again.
        let _ = FLOWS.insert(&f.key, entry, 0);
    }
    o
}

/// The policy query of a packet travelling in `dir`: a flow is decided in its own direction on
/// the port it was sent to, so a reply is decided as the flow it answers (the opposite
/// direction, the port it came from).
#[inline(always)]
fn query(f: &Flow, dir: Direction, is_reply: bool) -> (Direction, u16) {
    match (dir, is_reply) {
        (_, false) => (dir, f.t.dport),
        (Direction::Ingress, true) => (Direction::Egress, f.t.sport),
        (Direction::Egress, true) => (Direction::Ingress, f.t.sport),
    }
}

/// The decision of `peer`, the workload of this node that a packet from `ep` (leaving it, source
/// address checked) is on its way to, exactly as the hook on the peer's veth would make it: the
/// packet enters the peer, without the mesh's tunnel mark, from `ep`'s identity (an endpoint's
/// identity is its address's, which is how the identity cache answers for that address).
#[inline(always)]
pub fn decide_peer(slot: u8, f: &Flow, ep: &EndpointInfo, peer: &EndpointInfo, is_reply: bool) -> Outcome {
    let (qdir, qport) = query(f, Direction::Ingress, is_reply);
    let value = policy(slot, peer, qdir, ep.identity, f.t.proto, qport, plaintext_view(peer, qdir, f.t.proto, false));
    Outcome {
        endpoint_id: peer.endpoint_id,
        remote_identity: ep.identity,
        direction: qdir,
        reply: is_reply,
        tunnel: false,
        value,
    }
}

/// The flow-cache end of outcome `o` for the workload on `ifindex`, with `flags` besides the
/// tunnel flag.
#[inline(always)]
fn flow_end(cfg: &Config, ifindex: u32, o: &Outcome, flags: u8) -> FlowEnd {
    FlowEnd {
        ifindex,
        generation: cfg.generation,
        endpoint_id: o.endpoint_id,
        remote_identity: o.remote_identity,
        policy_id: o.value.policy_id,
        verdict: o.value.verdict,
        reason: o.value.reason,
        direction: o.direction as u8,
        flags: flags | if o.tunnel { FLOW_TUNNEL } else { 0 },
    }
}

/// Mark a cached end closed. True the first time, so a connection's close is counted once per
/// end whichever side ends it.
#[inline(always)]
pub fn mark_closed(end: *mut FlowEnd) -> bool {
    // SAFETY: a valid pointer into the LRU map; a racing close can at worst count twice.
    let v = unsafe { &mut *end };
    let first = v.flags & FLOW_CLOSED == 0;
    v.flags |= FLOW_CLOSED;
    first
}

/// Take an end decided on the other end's veth ([`FLOW_PEER_DECIDED`]) into use. True the first
/// time, when the packet is logged as that end's decision (as its own slow path would have).
#[inline(always)]
pub fn take_peer_decided(end: *mut FlowEnd) -> bool {
    // SAFETY: a valid pointer into the LRU map. Written only when set, so the packets that follow
    // do not dirty the entry; a racing packet can at worst log the decision twice.
    let v = unsafe { &mut *end };
    let first = v.flags & FLOW_PEER_DECIDED != 0;
    if first {
        v.flags &= !FLOW_PEER_DECIDED;
    }
    first
}

/// Emit an access-log event for the flow of `t` (`reply`: `t` travels against the flow, whose
/// source is then `t`'s destination), when the agent reads them (`CONFIG_EVENTS`). A full ring
/// buffer loses the event, never the packet.
#[inline(always)]
pub fn emit(kind: u8, hook: u8, t: &Tuple, reply: bool, o: &Outcome) {
    // An array lookup the verifier inlines: cheaper than passing the config down every caller.
    if !config().is_ok_and(|c| c.events()) {
        return;
    }
    let (saddr, daddr, sport, dport) =
        if reply { (t.daddr, t.saddr, t.dport, t.sport) } else { (t.saddr, t.daddr, t.sport, t.dport) };
    let e = FlowEvent {
        // SAFETY: no arguments.
        ktime_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() },
        endpoint_id: o.endpoint_id,
        remote_identity: o.remote_identity,
        policy_id: o.value.policy_id,
        saddr,
        daddr,
        sport,
        dport,
        proto: t.proto,
        kind,
        verdict: o.value.verdict,
        reason: o.value.reason,
        direction: o.direction as u8,
        hook,
        _pad: [0; 2],
    };
    // No wakeup: the agent drains the ring on a timer (a wakeup per event is an irq_work and a
    // context switch per new flow).
    let _ = EVENTS.output(&e, BPF_RB_NO_WAKEUP as u64);
}

/// Traffic of one hook invocation.
pub struct Traffic {
    /// The packet enters the workload (else it leaves it).
    pub inbound: bool,
    pub bytes: u64,
    pub opened: bool,
    pub closed: bool,
}

/// Add `t` to the counter of `o` (per CPU, so no atomics are needed).
#[inline(always)]
pub fn count(o: &Outcome, hook: u8, t: &Traffic) {
    let key = CounterKey {
        endpoint_id: o.endpoint_id,
        remote_identity: o.remote_identity,
        policy_id: o.value.policy_id,
        verdict: o.value.verdict,
        reason: o.value.reason,
        direction: o.direction as u8,
        hook,
    };
    let mut add = Counter::default();
    if t.inbound {
        add.packets_in = 1;
        add.bytes_in = t.bytes;
    } else {
        add.packets_out = 1;
        add.bytes_out = t.bytes;
    }
    add.opened = t.opened as u64;
    add.closed = t.closed as u64;
    match COUNTERS.get_ptr_mut(key) {
        Some(c) => {
            // SAFETY: per-CPU value of this CPU; BPF programs do not migrate while running.
            let c = unsafe { &mut *c };
            c.packets_in += add.packets_in;
            c.bytes_in += add.bytes_in;
            c.packets_out += add.packets_out;
            c.bytes_out += add.bytes_out;
            c.opened += add.opened;
            c.closed += add.closed;
        }
        None => {
            let _ = COUNTERS.insert(key, add, BPF_NOEXIST as u64);
        }
    }
}
