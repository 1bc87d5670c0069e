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

use aya::maps::lpm_trie::Key;
use ipnet::Ipv4Net;
use warden_common::{
    CONFIG_EVENTS, CONFIG_FAST_PATH, CONFIG_NODE_EXEMPT, Config, EndpointInfo, EndpointKey, IPCACHE_SLOT_BITS,
    IpcacheAddr, PolicyKey, PolicyValue, RemoteInfo, ServiceKey, ServiceSplit,
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

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("writing {map} failed after {written} entries (the active state is unchanged): {source}")]
    Write { map: &'static str, written: usize, source: aya::maps::MapError },
    #[error("clearing slot {slot} of {map} failed: {source}")]
    Clear { map: &'static str, slot: u8, source: aya::maps::MapError },
    #[error("flipping the committed generation failed (the active state is unchanged): {0}")]
    Flip(aya::maps::MapError),
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
        maps.policy.remove(&k).map_err(|source| CommitError::Clear { map: "policy", slot, source })?;
    }
    let stale: Vec<_> = maps.endpoints.keys().filter_map(Result::ok).filter(|k| k.slot == slot as u32).collect();
    for k in stale {
        maps.endpoints.remove(&k).map_err(|source| CommitError::Clear { map: "endpoints", slot, source })?;
    }
    let stale: Vec<_> = maps.ipcache.keys().filter_map(Result::ok).filter(|k| k.data().slot == slot).collect();
    for k in stale {
        maps.ipcache.remove(&k).map_err(|source| CommitError::Clear { map: "ipcache", slot, source })?;
    }
    let stale: Vec<_> = maps.ipcache_hosts.keys().filter_map(Result::ok).filter(|k| k.slot == slot).collect();
    for k in stale {
        maps.ipcache_hosts.remove(&k).map_err(|source| CommitError::Clear { map: "ipcache_hosts", slot, source })?;
    }
    let stale: Vec<_> = maps.services.keys().filter_map(Result::ok).filter(|k| k.slot == slot).collect();
    for k in stale {
        maps.services.remove(&k).map_err(|source| CommitError::Clear { map: "services", slot, source })?;
    }
    Ok(())
}

/// Commit `state`; returns the new generation. `inactive_clean` says the inactive slot is known
/// to be empty (this process cleared it after its last commit); it is set false while writing and
/// true again only once the old slot has been cleared.
pub fn commit(maps: &mut Maps, state: &NodeState, inactive_clean: &mut bool) -> Result<u32, CommitError> {
    let current = maps.config();
    let next = match current.generation.wrapping_add(1) {
        0 => 2, // 0 means "never committed"; 2 keeps the slot parity of 0.
        g => g,
    };
    let slot = (next & 1) as u8;
    if !std::mem::replace(inactive_clean, false) {
        clear_slot(maps, slot)?;
    }

    for (i, (net, info)) in state.ipcache.iter().enumerate() {
        maps.ipcache.insert(&ipcache_key(slot, net), *info, 0).map_err(|source| CommitError::Write {
            map: "ipcache",
            written: i,
            source,
        })?;
    }
    // The /32 entries again, in the exact-match table the kernel tries first.
    for (i, (net, info)) in state.ipcache.iter().filter(|(net, _)| net.prefix_len() == 32).enumerate() {
        let key = IpcacheAddr { slot, addr: net.network().octets(), _pad: [0; 3] };
        maps.ipcache_hosts.insert(key, *info, 0).map_err(|source| CommitError::Write {
            map: "ipcache_hosts",
            written: i,
            source,
        })?;
    }
    for (i, (ifindex, ep)) in state.endpoints.iter().enumerate() {
        maps.endpoints
            .insert(EndpointKey { ifindex: *ifindex, slot: slot as u32 }, *ep, 0)
            .map_err(|source| CommitError::Write { map: "endpoints", written: i, source })?;
    }
    for (i, (k, v)) in state.policy.iter().enumerate() {
        maps.policy.insert(k.with_slot(slot), *v, 0).map_err(|source| CommitError::Write {
            map: "policy",
            written: i,
            source,
        })?;
    }

    for (i, (k, v)) in state.services.iter().enumerate() {
        maps.services.insert(ServiceKey { slot, ..*k }, *v, 0).map_err(|source| CommitError::Write {
            map: "services",
            written: i,
            source,
        })?;
    }

    let (capture_addr, capture_port) = state.capture.map_or(([0; 4], 0), |a| (a.ip().octets(), a.port()));
    let flags = if state.events { CONFIG_EVENTS } else { 0 }
        | if state.fast_path && state.capture.is_some() { CONFIG_FAST_PATH } else { 0 }
        | if state.node_exempt { CONFIG_NODE_EXEMPT } else { 0 };
    let config = Config { generation: next, flags, capture_addr, capture_port, _pad: 0 };
    maps.config.set(0, config, 0).map_err(CommitError::Flip)?;

    clear_slot(maps, current.active_slot())?;
    *inactive_clean = true;
    Ok(next)
}
