//! Map keys, values and names. Field order is chosen so no struct has implicit padding; the
//! explicit `_pad` fields must be zero (hash keys compare all bytes).

/// Directory under bpffs where every warden map, program link and state file is pinned.
pub const PIN_DIR: &str = "/sys/fs/bpf/warden";

/// Pinned map names. A layout change bumps the version suffix so an old pin is never misread.
pub mod names {
    /// Array[1] of [`super::Config`]: the committed generation (low bit = active slot) and the
    /// node agent's capture address.
    pub const CONFIG: &str = "warden_config_v2";
    /// LPM trie: ([`super::IpcacheAddr`]) -> [`super::RemoteInfo`]. The identity cache.
    pub const IPCACHE: &str = "warden_ipcache_v2";
    /// Hash: [`super::IpcacheAddr`] -> [`super::RemoteInfo`]. The identity cache's /32 entries
    /// (every workload address) again, exact-match: one hash lookup instead of a trie walk. A /32
    /// is the longest prefix there is, so a hit here is what the trie would answer.
    pub const IPCACHE_HOSTS: &str = "warden_ipcache_hosts_v2";
    /// Hash: [`super::EndpointKey`] -> [`super::EndpointInfo`]. Local workloads by host veth.
    pub const ENDPOINTS: &str = "warden_endpoints_v1";
    /// Hash: cgroup id (u64) -> host veth ifindex (u32). Resolves a cgroup hook to its endpoint.
    pub const CGROUPS: &str = "warden_cgroups_v1";
    /// Hash: [`super::PolicyKey`] -> [`super::PolicyValue`]. The identity policy.
    pub const POLICY: &str = "warden_policy_v1";
    /// LRU hash: [`super::FlowKey`] -> [`super::FlowValue`]. Decided flows, one entry for both
    /// directions of a flow and, on one node, for both of its ends.
    pub const FLOWS: &str = "warden_flows_v4";
    /// Per-CPU hash: [`super::CounterKey`] -> [`super::Counter`]. Packets/bytes per decision.
    pub const COUNTERS: &str = "warden_counters_v2";
    /// Ring buffer of [`super::FlowEvent`]: decided new flows (allowed and denied) and closes, for
    /// access logs. Written on the slow path only; a full buffer drops events, never packets.
    pub const EVENTS: &str = "warden_events_v1";
    /// Socket storage: [`super::Captured`] per captured socket, for the socket's life. Written by
    /// `connect4`; read by sock_ops, which files it in [`ORIG_DST`] once the source port exists,
    /// and by `getpeername4`, which answers the original destination instead of the agent's
    /// listener.
    pub const CAPTURED: &str = "warden_captured_v2";
    /// LRU hash: [`super::SockAddr`] (the workload's address and source port) -> [`super::OrigDst`].
    /// Where the node agent finds a captured connection's original destination when it accepts it.
    pub const ORIG_DST: &str = "warden_orig_dst_v1";
    /// Sock hash: [`super::SockKey`] (a socket's own 4-tuple) -> socket. The same-node fast
    /// path's sockets (see `ebpf/src/fastpath.rs`); its sk_msg program is attached to it.
    pub const FASTPATH_SOCKS: &str = "warden_fastpath_socks_v1";
    /// Socket storage: [`super::FastpathSock`] per socket of [`FASTPATH_SOCKS`]: whether its sends
    /// are redirected, decided once at its first send.
    pub const FASTPATH_STATE: &str = "warden_fastpath_state_v1";
    /// Per-CPU array[1] of [`super::FastpathCounter`]: what the fast path did.
    pub const FASTPATH_COUNTERS: &str = "warden_fastpath_counters_v2";
    /// LRU hash: [`super::SockKey`] -> committed generation. Active ends added to
    /// [`FASTPATH_SOCKS`] whose passive end has not reached ESTABLISHED yet; the passive end
    /// takes its entry out (sock_ops cannot look a socket up in the sock hash itself).
    pub const FASTPATH_ACTIVE: &str = "warden_fastpath_active_v1";
    /// LRU hash: [`super::SockKey`] -> the kernel address of that socket (`struct sock *`), for
    /// each socket of [`FASTPATH_SOCKS`]. The sk_msg program reads the peer socket's redirected
    /// queue through it ([`super::FastpathKernel`]); a stale entry can only make a socket fall
    /// back to TCP.
    pub const FASTPATH_PEERS: &str = "warden_fastpath_peers_v1";
    /// Array[1] of [`super::FastpathKernel`]: where this kernel keeps a socket's redirected queue
    /// length, and how long it may grow. Written by the agent before it turns the fast path on.
    pub const FASTPATH_KERNEL: &str = "warden_fastpath_kernel_v1";
    /// Hash: [`super::ServiceKey`] (slot, a Service's address and port) -> [`super::ServiceSplit`].
    /// How `connect4` shares a meshed client's connections to a Service between its meshed pods
    /// (the agent, over the mesh) and its pods out of the mesh (the client's own socket, sent
    /// straight to one of them), in proportion to their numbers, as ztunnel does.
    pub const SERVICES: &str = "warden_services_v2";

    pub const ALL: [&str; 18] = [
        CONFIG,
        IPCACHE,
        IPCACHE_HOSTS,
        ENDPOINTS,
        CGROUPS,
        POLICY,
        FLOWS,
        COUNTERS,
        EVENTS,
        CAPTURED,
        ORIG_DST,
        FASTPATH_SOCKS,
        FASTPATH_STATE,
        FASTPATH_COUNTERS,
        FASTPATH_ACTIVE,
        FASTPATH_PEERS,
        FASTPATH_KERNEL,
        SERVICES,
    ];

    /// Pins of maps an earlier version used and this one does not, removed when the agent loads.
    /// `warden_captured_v1` was an LRU hash by socket cookie, emptied as each socket got its
    /// source port. `warden_fastpath_counters_v1` had no `backlog_fallbacks`.
    pub const RETIRED: [&str; 2] = ["warden_captured_v1", "warden_fastpath_counters_v1"];
}

/// Map capacities. The policy map holds two slots, so its capacity is twice the entries one
/// state may hold.
pub mod capacity {
    pub const IPCACHE: u32 = 2 * 262_144;
    pub const ENDPOINTS: u32 = 2 * 4_096;
    pub const CGROUPS: u32 = 4_096;
    pub const POLICY: u32 = 2 * 262_144;
    pub const FLOWS: u32 = 262_144;
    pub const COUNTERS: u32 = 65_536;
    /// Bytes of the event ring buffer (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Captured connections between `connect()` and the agent's `accept()`.
    pub const CAPTURED: u32 = 65_536;
    /// Sockets of the same-node fast path (two per hop: the workload's and the agent's).
    pub const FASTPATH_SOCKS: u32 = 65_536;
    /// Service ports with pods out of the mesh, per slot.
    pub const SERVICES: u32 = 2 * 8_192;
}

/// Socket marks (`SO_MARK`, `skb->mark`) warden uses, within [`MARK_MASK`]. Only a process with
/// CAP_NET_ADMIN in the node's network namespace can set them: a workload's marks are cleared
/// when its packets cross its veth into the node.
pub const MARK_MASK: u32 = 0x00f0_0000;
/// The node agent's connection to a local workload, carrying a connection it received over mTLS:
/// decided in the authenticated view of the workload's ingress policy.
pub const MARK_TUNNEL: u32 = 0x0010_0000;
/// Set by the kernel on a workload's replies to such a connection, whose destination (the
/// original client's address, preserved by the agent) is not on this node: a policy-routing rule
/// delivers marked packets locally, to the agent's transparent socket.
pub const MARK_TO_AGENT: u32 = 0x0020_0000;

/// Numeric identity of the outside world: an address no workload or policy CIDR covers.
pub const IDENTITY_WORLD: u32 = 0;
/// Wildcard identity in a [`PolicyKey`]: any remote identity.
pub const IDENTITY_ANY: u32 = u32::MAX;

/// Wildcard protocol in a [`PolicyKey`] (with port 0): any protocol, any port.
pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Policy id 0: no policy decided (the default verdict).
pub const POLICY_ID_NONE: u32 = 0;

/// Traffic direction, relative to the local workload.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Into the workload: the remote is the source, the port is the workload's.
    Ingress = 0,
    /// Out of the workload: the remote is the destination, the port is the remote's.
    Egress = 1,
}

impl Direction {
    pub const fn from_u8(v: u8) -> Option<Direction> {
        match v {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Verdict stored in a [`PolicyValue`]. 0 is not a verdict: a zeroed value fails closed.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow = 1,
    Deny = 2,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        }
    }
}

/// The single entry of the config array. 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Incremented on every committed state; `generation & 1` is the active slot. 0 means no
    /// state was ever committed, and every packet is dropped with [`crate::DropReason::NoState`].
    pub generation: u32,
    /// `CONFIG_*` switches.
    pub flags: u32,
    /// The node agent's outbound listener, where `connect()`s of meshed workloads to meshed
    /// destinations are redirected (network-order address, host-order port). Port 0: no capture.
    pub capture_addr: [u8; 4],
    pub capture_port: u16,
    pub _pad: u16,
}

/// [`Config::flags`]: the programs write access-log events to `warden_events_v1`. Set only while
/// a reader drains the ring (the agent's access log): an event nobody reads is a ring-buffer
/// reservation and a clock read per new flow for nothing.
pub const CONFIG_EVENTS: u32 = 1 << 0;

impl Config {
    pub const fn active_slot(&self) -> u8 {
        (self.generation & 1) as u8
    }

    pub const fn events(&self) -> bool {
        self.flags & CONFIG_EVENTS != 0
    }

    pub const fn fast_path(&self) -> bool {
        self.flags & CONFIG_FAST_PATH != 0
    }

    pub const fn node_exempt(&self) -> bool {
        self.flags & CONFIG_NODE_EXEMPT != 0
    }

    /// Whether meshed workloads' connections are captured (a capture port is set).
    pub const fn captures(&self) -> bool {
        self.capture_port != 0
    }

    /// Whether `addr:port` (network-order address, host-order port) is the agent's capture
    /// listener. Never while capture is off.
    #[inline(always)]
    pub fn is_capture_listener(&self, addr: [u8; 4], port: u16) -> bool {
        self.captures() && addr == self.capture_addr && port == self.capture_port
    }
}

/// [`Config::flags`]: the same-node fast path is on. Read by sock_ops (whether to add sockets to
/// [`names::FASTPATH_SOCKS`]) and by sk_msg at every send (off: every socket falls back to TCP for
/// good, which is safe at any moment; see `ebpf/src/fastpath.rs`).
pub const CONFIG_FAST_PATH: u32 = 1 << 1;

/// [`Config::flags`]: TCP connections from the node's own network stack to a local workload are
/// allowed without policy, with reason [`crate::DropReason::NodeLocal`] (kubelet's probes, as
/// Istio ambient's probe bypass and Cilium's `allow-localhost`). Read by the TC program when it
/// decides a new flow towards a workload whose packet was not received on any interface
/// (`skb->ingress_ifindex == 0`) and carries no [`MARK_TUNNEL`]. Clear (also in a zeroed config):
/// the node is decided by its address like any peer.
pub const CONFIG_NODE_EXEMPT: u32 = 1 << 2;

/// The data part of an identity-cache LPM key: the slot byte, then the IPv4 address in network
/// order. The LPM prefix length counts the slot's 8 bits first, so a /24 is stored as 32.
/// The trailing padding (never covered by a prefix) keeps the key a multiple of the value's
/// alignment, which the kernel requires.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheAddr {
    pub slot: u8,
    pub addr: [u8; 4],
    pub _pad: [u8; 3],
}

/// Bits of the slot byte in an identity-cache prefix length.
pub const IPCACHE_SLOT_BITS: u32 = 8;

/// What the identity cache knows about a remote address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RemoteInfo {
    /// Numeric identity (see [`IDENTITY_WORLD`]).
    pub identity: u32,
    /// Host-veth ifindex when the address is a workload on this node, else 0.
    pub local_ifindex: u32,
    /// `REMOTE_*` flags.
    pub flags: u32,
}

/// [`RemoteInfo::flags`]: the address is a workload in the mesh, reached over HBONE.
pub const REMOTE_MESHED: u32 = 1 << 0;
/// [`RemoteInfo::flags`]: the address is a Service's virtual address (with [`REMOTE_MESHED`]:
/// some of its pods are meshed, and the agent picks one). `connect4` then looks in
/// [`names::SERVICES`] for pods out of the mesh to share the connections with.
pub const REMOTE_SERVICE: u32 = 1 << 1;

/// An IPv4 socket address: network-order address, host-order port. 8 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

/// A captured connection's original destination and who made it. 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDst {
    pub dst: SockAddr,
    /// The endpoint whose `connect()` was captured.
    pub endpoint_id: u32,
    /// The committed generation the capture was decided under.
    pub generation: u32,
}

/// A captured socket's record ([`names::CAPTURED`]): where its `connect()` was going, and where
/// `connect4` sent it instead. 24 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Captured {
    pub orig: OrigDst,
    /// The agent's capture listener. `getpeername()` answers `orig.dst` only while the socket's
    /// peer is this address: never for a socket that was connected elsewhere since.
    pub via: SockAddr,
}

/// A Service port, in one slot ([`names::SERVICES`]): network-order address, host-order port.
/// 8 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub slot: u8,
    pub _pad: u8,
}

/// The most pods out of the mesh one Service port's split names; more are left out (the agent
/// warns). A Deployment being moved into the mesh a few pods at a time keeps all its old pods in
/// the share up to this many (`_v1` held 32). Entries are allocated only for Service ports that
/// have such pods (`BPF_F_NO_PREALLOC`).
pub const SERVICE_PLAIN_MAX: usize = 256;

/// How a meshed client's connections to one Service port are shared ([`names::SERVICES`]):
/// `meshed` of every `meshed + plain` go to the agent (which picks a meshed pod), the others
/// straight to `plain_backends[i]`, pod address and target port. 2,052 bytes, no implicit padding;
/// the program reads it in place, never on its stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceSplit {
    pub meshed: u16,
    pub plain: u16,
    pub plain_backends: [SockAddr; SERVICE_PLAIN_MAX],
}

impl Default for ServiceSplit {
    fn default() -> Self {
        ServiceSplit { meshed: 0, plain: 0, plain_backends: [SockAddr::default(); SERVICE_PLAIN_MAX] }
    }
}

/// A TCP socket's 4-tuple as the socket itself sees it: its own address and port first (network
/// order addresses, host order ports). The key of [`names::FASTPATH_SOCKS`]; a socket's peer on the
/// node is filed under the same tuple reversed. 12 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_addr: [u8; 4],
    pub remote_addr: [u8; 4],
    pub local_port: u16,
    pub remote_port: u16,
}

impl SockKey {
    /// The key of the socket at the other end of the connection.
    pub const fn reversed(&self) -> SockKey {
        SockKey {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// [`FastpathSock::decision`]: no send yet.
pub const FASTPATH_UNDECIDED: u8 = 0;
/// [`FastpathSock::decision`]: sends go to the peer socket's receive queue (while the generation
/// holds and the switch is on).
pub const FASTPATH_REDIRECT: u8 = 1;
/// [`FastpathSock::decision`]: sends take TCP, for the socket's life.
pub const FASTPATH_PASS: u8 = 2;

/// The fast path's per-socket state: the decision made at the socket's first send, and the
/// committed generation it was made under. 8 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastpathSock {
    pub generation: u32,
    /// `FASTPATH_*`.
    pub decision: u8,
    pub _pad: [u8; 3],
}

/// What the fast path did, per CPU. 56 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastpathCounter {
    /// Sockets added to the sock hash at ESTABLISHED.
    pub sockets: u64,
    /// Sends redirected to the peer socket, and their bytes.
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    /// Sockets whose first send took TCP, for their life: no peer filed yet, or the switch off or
    /// a new generation committed since the socket was filed.
    pub no_peer: u64,
    /// Redirecting sockets that fell back to TCP (policy committed, switch off, peer gone).
    pub fallbacks: u64,
    /// Sends that took TCP from a socket of the sock hash.
    pub passed_msgs: u64,
    /// Redirecting sockets that fell back to TCP because their peer's redirected queue would have
    /// grown past [`FastpathKernel::limit`] (its reader is slower than the sender). Not in
    /// `fallbacks`; a queue that cannot be read counts as no peer.
    pub backlog_fallbacks: u64,
}

/// Where a socket's redirected queue length lives in this kernel, found by the agent in the
/// kernel's BTF (`/sys/kernel/btf/vmlinux`), and the most it may hold. A redirected send is taken
/// from the sender's buffer and charged to the receiver at once, so nothing makes a sender wait
/// for a slow reader as TCP's window does: the sk_msg program reads the peer's queue length
/// (`((struct sk_psock *)(sk->sk_user_data & ~7))->msg_tot_len`) before each redirect, and a
/// send that would take it past `limit` takes TCP instead, for the socket's life. Offsets of 0:
/// unknown, and no send is redirected. 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastpathKernel {
    /// `offsetof(struct sock, sk_user_data)`: the socket's `struct sk_psock *`, with flags in
    /// its low bits, while it is in a sock map.
    pub sk_user_data: u32,
    /// `offsetof(struct sk_psock, msg_tot_len)`: the bytes in the socket's redirected queue.
    pub psock_queued: u32,
    /// The most a peer's redirected queue may hold after a send: the node's largest TCP receive
    /// buffer (`net.ipv4.tcp_rmem`'s maximum), what a TCP window would let in flight.
    pub limit: u32,
    pub _pad: u32,
}

/// The low bits of `sk_user_data` that are flags, not the pointer (`SK_USER_DATA_NOCOPY`,
/// `SK_USER_DATA_BPF`, `SK_USER_DATA_PSOCK` in the kernel's `include/net/sock.h`).
pub const SK_USER_DATA_FLAGS: u64 = 0b111;

impl FastpathCounter {
    pub fn add(&mut self, o: &FastpathCounter) {
        self.sockets += o.sockets;
        self.redirected_msgs += o.redirected_msgs;
        self.redirected_bytes += o.redirected_bytes;
        self.no_peer += o.no_peer;
        self.fallbacks += o.fallbacks;
        self.passed_msgs += o.passed_msgs;
        self.backlog_fallbacks += o.backlog_fallbacks;
    }
}

/// Key of the endpoint map: a local workload's host-side veth, per slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ifindex: u32,
    pub slot: u32,
}

/// A local workload. `endpoint_id` is stable for the workload's life (counters are keyed by it);
/// `identity` is the numeric identity of its own address, which is how peers see it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    pub endpoint_id: u32,
    pub identity: u32,
    /// The workload's IPv4 address, network order.
    pub ip: [u8; 4],
    /// `EP_*` switches.
    pub flags: u32,
}

/// [`EndpointInfo::flags`]: the endpoint's only ingress policy entry is its default `(*, *)`, so
/// the lookup goes straight to it (the three more specific keys cannot exist).
pub const EP_INGRESS_DEFAULT_ONLY: u32 = 1 << 0;
/// [`EndpointInfo::flags`]: as [`EP_INGRESS_DEFAULT_ONLY`], for egress.
pub const EP_EGRESS_DEFAULT_ONLY: u32 = 1 << 1;
/// [`EndpointInfo::flags`]: as [`EP_INGRESS_DEFAULT_ONLY`], for the plaintext view of ingress.
pub const EP_PLAINTEXT_DEFAULT_ONLY: u32 = 1 << 2;
/// [`EndpointInfo::flags`]: the workload is in the mesh. Its outbound TCP to meshed destinations
/// is captured by the node agent, and ingress that did not come through the agent is decided by
/// the plaintext view of its policy.
pub const EP_MESHED: u32 = 1 << 3;

impl EndpointInfo {
    /// The `EP_*_DEFAULT_ONLY` flag of `direction` (and, for ingress, of the view).
    pub const fn default_only_flag(direction: Direction, plaintext: bool) -> u32 {
        match (direction, plaintext) {
            (Direction::Ingress, false) => EP_INGRESS_DEFAULT_ONLY,
            (Direction::Ingress, true) => EP_PLAINTEXT_DEFAULT_ONLY,
            (Direction::Egress, _) => EP_EGRESS_DEFAULT_ONLY,
        }
    }
    /// Whether the endpoint's policy in `direction` (and view) is its default entry alone.
    pub const fn default_only(&self, direction: Direction, plaintext: bool) -> bool {
        self.flags & Self::default_only_flag(direction, plaintext) != 0
    }
    pub const fn is_meshed(&self) -> bool {
        self.flags & EP_MESHED != 0
    }
}

/// "May `remote_identity` reach local workload `endpoint_id` on `dport`/`proto` in `direction`?"
///
/// Wildcards: `remote_identity == IDENTITY_ANY` matches any identity; `proto == PROTO_ANY` with
/// `dport == 0` matches any protocol and port. [`crate::lookup::decide`] tries the most specific
/// key first; the compiler materialises intersections so the first hit is the right answer.
///
/// Two views of ingress policy exist for an endpoint in the mesh ([`EP_MESHED`]): the
/// authenticated view (keys without [`PolicyKey::PLAINTEXT_BIT`]) answers for connections the
/// node agent delivers over mTLS, where the remote identity was proven by a certificate; the
/// plaintext view (keys with the bit) answers for everything else, which Istio evaluates as a
/// peer without identity and refuses on ports under a STRICT PeerAuthentication.
///
/// Field order: the two u32s, then u16, then the two u8s: 12 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub remote_identity: u32,
    /// Destination port, host order (the workload's port for ingress, the remote's for egress).
    pub dport: u16,
    pub proto: u8,
    /// `Direction` as u8, the plaintext view in bit 6, the slot in bit 7 (see [`PolicyKey::new`]).
    pub dir_slot: u8,
}

impl PolicyKey {
    pub const SLOT_BIT: u8 = 0x80;
    /// The key belongs to the plaintext view (see the type's documentation).
    pub const PLAINTEXT_BIT: u8 = 0x40;

    pub const fn new(
        slot: u8,
        endpoint_id: u32,
        direction: Direction,
        remote_identity: u32,
        proto: u8,
        dport: u16,
    ) -> Self {
        PolicyKey {
            endpoint_id,
            remote_identity,
            dport,
            proto,
            dir_slot: (direction as u8) | if slot & 1 == 1 { Self::SLOT_BIT } else { 0 },
        }
    }
    pub const fn slot(&self) -> u8 {
        (self.dir_slot & Self::SLOT_BIT != 0) as u8
    }
    pub const fn direction(&self) -> Option<Direction> {
        Direction::from_u8(self.dir_slot & !(Self::SLOT_BIT | Self::PLAINTEXT_BIT))
    }
    /// The same key in the plaintext view (`true`) or the authenticated one.
    pub const fn with_plaintext(mut self, plaintext: bool) -> Self {
        self.dir_slot = (self.dir_slot & !Self::PLAINTEXT_BIT) | if plaintext { Self::PLAINTEXT_BIT } else { 0 };
        self
    }
    pub const fn is_plaintext(&self) -> bool {
        self.dir_slot & Self::PLAINTEXT_BIT != 0
    }
    /// The same key in the other slot.
    pub const fn with_slot(mut self, slot: u8) -> Self {
        self.dir_slot = (self.dir_slot & !Self::SLOT_BIT) | if slot & 1 == 1 { Self::SLOT_BIT } else { 0 };
        self
    }
}

/// A policy decision: verdict, why, and which policy decided it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// The deciding policy, [`POLICY_ID_NONE`] for a default verdict.
    pub policy_id: u32,
    /// [`Verdict`] as u8; anything else is treated as a deny.
    pub verdict: u8,
    /// [`crate::DropReason`] as u8 for a deny; for an allow 0, or the exemption that allowed it
    /// without policy ([`crate::DropReason::NodeLocal`], decided by the kernel, never compiled).
    pub reason: u8,
    pub _pad: [u8; 2],
}

impl PolicyValue {
    pub const fn allow(policy_id: u32) -> Self {
        PolicyValue { policy_id, verdict: Verdict::Allow as u8, reason: 0, _pad: [0; 2] }
    }
    pub const fn deny(policy_id: u32, reason: crate::DropReason) -> Self {
        PolicyValue { policy_id, verdict: Verdict::Deny as u8, reason: reason as u8, _pad: [0; 2] }
    }
    /// Fail closed: only an explicit allow allows.
    pub const fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow as u8
    }
}

/// A flow (addresses network order, ports host order), with its two ends in canonical order: the
/// lower (address, port) first. A flow and its replies therefore share one entry, and so do the
/// two veths a flow between two workloads of the node crosses: one insert per new flow, one lookup
/// per packet whichever way it travels. Each end's decision is kept apart in the value
/// ([`FlowValue`]), with the veth it belongs to. 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_lo: [u8; 4],
    pub addr_hi: [u8; 4],
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key of a packet from `(saddr, sport)` to `(daddr, dport)`, and whether the packet's
    /// source is the key's lower end.
    #[inline(always)]
    pub fn of(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> (FlowKey, bool) {
        let (s, d) = (u32::from_be_bytes(saddr), u32::from_be_bytes(daddr));
        let src_lo = s < d || (s == d && sport <= dport);
        let key = if src_lo {
            FlowKey { addr_lo: saddr, addr_hi: daddr, port_lo: sport, port_hi: dport, proto, _pad: [0; 3] }
        } else {
            FlowKey { addr_lo: daddr, addr_hi: saddr, port_lo: dport, port_hi: sport, proto, _pad: [0; 3] }
        };
        (key, src_lo)
    }
}

/// [`FlowValue::ends`] index of the key's lower end.
pub const FLOW_END_LO: usize = 0;
/// [`FlowValue::ends`] index of the key's higher end.
pub const FLOW_END_HI: usize = 1;

/// Flow-cache flag: a FIN or RST was seen on this end's veth; the close is counted once per end.
pub const FLOW_CLOSED: u8 = 2;
/// Flow-cache flag: the flow is the node agent's delivery of an mTLS connection (its packets
/// towards the workload carry [`MARK_TUNNEL`]); replies are marked [`MARK_TO_AGENT`].
pub const FLOW_TUNNEL: u8 = 4;
/// Flow-cache flag: this end was decided on the other end's veth, for a packet on its way here
/// (two workloads of one node), and this end's veth has not seen a packet of it since. Only such
/// an end answers a TCP SYN from the cache (every other SYN is decided afresh); the first packet
/// that uses it clears the flag and is logged as this end's decision.
pub const FLOW_PEER_DECIDED: u8 = 8;
/// Flow-cache flag: the flow was opened by the node's own network stack (its packets towards the
/// workload were not received on any interface and carry no mark; see [`CONFIG_NODE_EXEMPT`]). A
/// packet of the flow's 5-tuple that arrived on an interface is decided afresh, so a forgery
/// from the wire never inherits the node's exemption.
pub const FLOW_NODE: u8 = 16;

/// One end's cached decision: the end's workload (by its veth) and the flow as that workload
/// sees it. Valid only on that veth and while `generation` equals the committed generation.
/// 24 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowEnd {
    /// Host veth of the workload at this end; 0 when this end was not decided (not a workload of
    /// this node, or not seen yet).
    pub ifindex: u32,
    pub generation: u32,
    pub endpoint_id: u32,
    /// The other end's identity when the flow was decided (for counters and metrics).
    pub remote_identity: u32,
    pub policy_id: u32,
    pub verdict: u8,
    pub reason: u8,
    /// `Direction` of the flow relative to this end's workload: egress when it initiated the flow.
    pub direction: u8,
    /// [`FLOW_CLOSED`], [`FLOW_TUNNEL`], [`FLOW_PEER_DECIDED`], [`FLOW_NODE`].
    pub flags: u8,
}

/// A cached flow: the decision of each of its ends, indexed by [`FLOW_END_LO`] and
/// [`FLOW_END_HI`] (see [`FlowKey`]). 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowValue {
    pub ends: [FlowEnd; 2],
}

/// Counter key: traffic per (workload, remote identity, deciding policy, verdict, reason, flow
/// direction, hook). The remote identity makes Istio's per-peer TCP metrics derivable.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub endpoint_id: u32,
    pub remote_identity: u32,
    pub policy_id: u32,
    pub verdict: u8,
    pub reason: u8,
    /// `Direction` of the flow (who initiated it), not of the packet.
    pub direction: u8,
    /// Which hook counted it: [`HOOK_TC`], [`HOOK_CONNECT`] or [`HOOK_TUNNEL`].
    pub hook: u8,
}

pub const HOOK_TC: u8 = 0;
/// The socket-layer hooks: `connect()` (connect4, allowed and refused) and refused UDP sends
/// (sendmsg4; an allowed one is counted at TC, as its datagram crosses the veth).
pub const HOOK_CONNECT: u8 = 1;
/// The TC hook, for a flow of the mesh: the agent's delivery of an mTLS connection (ingress) or a
/// workload's captured connection to the agent (egress; the agent reports the source side).
pub const HOOK_TUNNEL: u8 = 2;

/// [`FlowEvent::kind`]: a new flow was decided (allowed or denied).
pub const EVENT_DECIDED: u8 = 1;
/// [`FlowEvent::kind`]: a TCP connection was closed (first FIN or RST).
pub const EVENT_CLOSED: u8 = 2;

/// One access-log event (addresses network order, ports host order). 40 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Boot-time clock, nanoseconds.
    pub ktime_ns: u64,
    pub endpoint_id: u32,
    pub remote_identity: u32,
    pub policy_id: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`EVENT_DECIDED`] or [`EVENT_CLOSED`].
    pub kind: u8,
    pub verdict: u8,
    pub reason: u8,
    /// Flow direction relative to the endpoint.
    pub direction: u8,
    /// [`HOOK_TC`] or [`HOOK_CONNECT`].
    pub hook: u8,
    pub _pad: [u8; 2],
}

/// Per-CPU traffic counters. For [`HOOK_CONNECT`], `packets_out` counts calls (`connect()`, a
/// refused UDP send).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets and bytes delivered into the workload.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Packets and bytes the workload sent.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// TCP connections opened (SYN seen) and closed (first FIN or RST seen).
    pub opened: u64,
    pub closed: u64,
}

impl Counter {
    pub fn add(&mut self, o: &Counter) {
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
        self.opened += o.opened;
        self.closed += o.closed;
    }
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, has no implicit padding and is valid for any bit
    // pattern (integers and byte arrays only).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::IpcacheAddr {}
    unsafe impl aya::Pod for super::RemoteInfo {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowEnd {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::Captured {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::FastpathSock {}
    unsafe impl aya::Pod for super::FastpathCounter {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceSplit {}
    unsafe impl aya::Pod for super::FastpathKernel {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_have_no_hidden_padding() {
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<IpcacheAddr>(), 8);
        assert_eq!(size_of::<RemoteInfo>(), 12);
        assert_eq!(size_of::<SockAddr>(), 8);
        assert_eq!(size_of::<OrigDst>(), 16);
        assert_eq!(size_of::<Captured>(), 24);
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceSplit>(), 4 + 8 * SERVICE_PLAIN_MAX);
        assert_eq!(size_of::<EndpointKey>(), 8);
        assert_eq!(size_of::<EndpointInfo>(), 16);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<FlowEnd>(), 24);
        assert_eq!(size_of::<FlowValue>(), 48);
        assert_eq!(size_of::<CounterKey>(), 16);
        assert_eq!(size_of::<Counter>(), 48);
        assert_eq!(size_of::<FlowEvent>(), 40);
        assert_eq!(size_of::<SockKey>(), 12);
        assert_eq!(size_of::<FastpathSock>(), 8);
        assert_eq!(size_of::<FastpathCounter>(), 56);
        assert_eq!(size_of::<FastpathKernel>(), 16);
    }

    #[test]
    fn sock_key_reversed_is_the_peer_and_round_trips() {
        let client =
            SockKey { local_addr: [10, 0, 1, 2], remote_addr: [169, 254, 1, 1], local_port: 40000, remote_port: 15001 };
        let agent = client.reversed();
        assert_eq!(agent.local_addr, [169, 254, 1, 1]);
        assert_eq!((agent.local_port, agent.remote_port), (15001, 40000));
        assert_eq!(agent.reversed(), client);
    }

    #[test]
    fn flow_key_is_the_same_both_ways() {
        let a = [10, 0, 0, 2];
        let b = [10, 0, 0, 10];
        let (fwd, fwd_lo) = FlowKey::of(a, b, 40000, 80, PROTO_TCP);
        let (rev, rev_lo) = FlowKey::of(b, a, 80, 40000, PROTO_TCP);
        assert_eq!(fwd, rev);
        assert_ne!(fwd_lo, rev_lo);
        assert!(fwd_lo, "10.0.0.2 orders before 10.0.0.10 as a number, not as text");
        // Same address both ends: the port orders.
        let (k1, lo1) = FlowKey::of(a, a, 5000, 80, PROTO_TCP);
        let (k2, lo2) = FlowKey::of(a, a, 80, 5000, PROTO_TCP);
        assert_eq!(k1, k2);
        assert!(!lo1 && lo2);
        // The protocol is part of the flow.
        assert_ne!(FlowKey::of(a, b, 40000, 80, PROTO_UDP).0, fwd);
    }

    #[test]
    fn policy_key_plaintext_bit_keeps_direction_and_slot() {
        let k = PolicyKey::new(1, 7, Direction::Ingress, 42, PROTO_TCP, 443).with_plaintext(true);
        assert!(k.is_plaintext());
        assert_eq!(k.direction(), Some(Direction::Ingress));
        assert_eq!(k.slot(), 1);
        assert_eq!(k.with_slot(0).slot(), 0);
        assert!(k.with_slot(0).is_plaintext());
        assert!(!k.with_plaintext(false).is_plaintext());
        assert_ne!(k, k.with_plaintext(false));
    }

    #[test]
    fn policy_key_slot_bit_round_trips() {
        let k = PolicyKey::new(1, 7, Direction::Egress, 42, PROTO_TCP, 443);
        assert_eq!(k.slot(), 1);
        assert_eq!(k.direction(), Some(Direction::Egress));
        let k0 = k.with_slot(0);
        assert_eq!(k0.slot(), 0);
        assert_eq!(k0.direction(), Some(Direction::Egress));
        assert_eq!(k0.with_slot(1), k);
    }
}
