//! Every map the programs use, declared once. Types and names come from `warden-common`; each
//! map is BTF-typed (`#[btf_map]`) so `bpftool map dump` prints field names, and is pinned by
//! the agent under `/sys/fs/bpf/warden/<name>`.

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage, SockHash, lpm_trie::Key,
    },
    macros::btf_map,
};
use warden_common::{
    Captured, Config, Counter, CounterKey, EndpointInfo, EndpointKey, FastpathCounter, FastpathKernel, FastpathSock,
    FlowEvent, FlowKey, FlowValue, IpcacheAddr, OrigDst, PolicyKey, PolicyValue, RemoteInfo, ServiceKey, ServiceSplit,
    SockAddr, SockKey,
    capacity::{
        CAPTURED as CAPTURED_CAP, CGROUPS as CGROUPS_CAP, COUNTERS as COUNTERS_CAP, ENDPOINTS as ENDPOINTS_CAP,
        EVENTS_BYTES, FASTPATH_SOCKS as FASTPATH_SOCKS_CAP, FLOWS as FLOWS_CAP, IPCACHE as IPCACHE_CAP,
        POLICY as POLICY_CAP, SERVICES as SERVICES_CAP,
    },
};

/// The committed generation; its low bit selects the active slot.
#[btf_map(name = "warden_config_v2")]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Identity cache: (slot, IPv4 prefix) -> identity of the remote.
#[btf_map(name = "warden_ipcache_v2")]
pub static IPCACHE: LpmTrie<IpcacheAddr, RemoteInfo, { IPCACHE_CAP as usize }> = LpmTrie::new();

/// The identity cache's /32 entries, exact-match (allocated on insert: most of it stays unused).
#[btf_map(name = "warden_ipcache_hosts_v2")]
pub static IPCACHE_HOSTS: HashMap<IpcacheAddr, RemoteInfo, { IPCACHE_CAP as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Local workloads by (host veth ifindex, slot).
#[btf_map(name = "warden_endpoints_v1")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { ENDPOINTS_CAP as usize }> = HashMap::new();

/// Workload cgroup id -> host veth ifindex, for the cgroup hooks.
#[btf_map(name = "warden_cgroups_v1")]
pub static CGROUPS: HashMap<u64, u32, { CGROUPS_CAP as usize }> = HashMap::new();

/// Identity policy: (slot, endpoint, direction, remote identity, proto, port) -> decision.
#[btf_map(name = "warden_policy_v1")]
pub static POLICY: HashMap<PolicyKey, PolicyValue, { POLICY_CAP as usize }> = HashMap::new();

/// Flow cache: decisions of flows (and their replies), per end of the flow that is a workload of
/// this node, each valid for one generation. Per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`): under connection churn every insert into a full
/// map evicts, and the common list would take a global lock for it.
#[btf_map(name = "warden_flows_v4")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, { FLOWS_CAP as usize }, { BPF_F_NO_COMMON_LRU as usize }> =
    LruHashMap::new();

/// Packets and bytes per (endpoint, policy, verdict, reason, direction, hook), per CPU.
#[btf_map(name = "warden_counters_v2")]
pub static COUNTERS: PerCpuHashMap<CounterKey, Counter, { COUNTERS_CAP as usize }> = PerCpuHashMap::new();

/// Access-log events: decided new flows and closes (slow path only).
#[btf_map(name = "warden_events_v1")]
pub static EVENTS: RingBuf<FlowEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

/// A captured socket's original destination, for the socket's life (freed with it).
#[btf_map(name = "warden_captured_v2")]
pub static CAPTURED: SkStorage<Captured> = SkStorage::new();

/// Captured connections by the workload's (address, source port), for the agent's `accept()`.
#[btf_map(name = "warden_orig_dst_v1")]
pub static ORIG_DST: LruHashMap<SockAddr, OrigDst, { CAPTURED_CAP as usize }> = LruHashMap::new();

/// The same-node fast path's sockets by their own 4-tuple; `warden_fastpath` (sk_msg) is attached
/// to it.
#[btf_map(name = "warden_fastpath_socks_v1")]
pub static FASTPATH_SOCKS: SockHash<SockKey, { FASTPATH_SOCKS_CAP as usize }> = SockHash::new();

/// The fast path's decision per socket of `FASTPATH_SOCKS` (created when the socket is added).
#[btf_map(name = "warden_fastpath_state_v1")]
pub static FASTPATH_STATE: SkStorage<FastpathSock> = SkStorage::new();

/// Active ends of the fast path waiting for their passive end (which takes the entry out).
#[btf_map(name = "warden_fastpath_active_v1")]
pub static FASTPATH_ACTIVE: LruHashMap<SockKey, u32, { FASTPATH_SOCKS_CAP as usize }> = LruHashMap::new();

/// Each socket of `FASTPATH_SOCKS`'s kernel address, by its own 4-tuple: where sk_msg finds the
/// peer socket's redirected queue.
#[btf_map(name = "warden_fastpath_peers_v1")]
pub static FASTPATH_PEERS: LruHashMap<SockKey, u64, { FASTPATH_SOCKS_CAP as usize }> = LruHashMap::new();

/// Where this kernel keeps a socket's redirected queue length, and its limit (set by the agent).
#[btf_map(name = "warden_fastpath_kernel_v1")]
pub static FASTPATH_KERNEL: Array<FastpathKernel, 1> = Array::new();

/// What the fast path did.
#[btf_map(name = "warden_fastpath_counters_v2")]
pub static FASTPATH_COUNTERS: PerCpuArray<FastpathCounter, 1> = PerCpuArray::new();

#[inline(always)]
pub fn ipcache_key(slot: u8, addr: [u8; 4]) -> Key<IpcacheAddr> {
    Key::new(warden_common::IPCACHE_SLOT_BITS + 32, IpcacheAddr { slot, addr, _pad: [0; 3] })
}

/// How a meshed client's connections to a Service port are shared between the agent and the
/// Service's pods out of the mesh (`crate::service`), per slot.
#[btf_map(name = "warden_services_v2")]
pub static SERVICES: HashMap<ServiceKey, ServiceSplit, { SERVICES_CAP as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();
