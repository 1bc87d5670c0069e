//! Finding a local pod on this node: its host-side veth from the routing table, its cgroup from
//! the pod UID under the cgroup root (kubelet's naming conventions).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::workloads::{HostLinks, Links};

/// How deep below the cgroup root a pod's cgroup is searched (kubelet puts it at depth 2-4:
/// `kubepods/<qos>/pod<uid>` or `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`).
pub const CGROUP_SEARCH_DEPTH: usize = 6;

/// The cgroup v2 hierarchy to search by default: the unified mount of a hybrid setup when it
/// holds `cgroup.procs`, else `/sys/fs/cgroup`.
pub fn default_cgroup_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").is_file() { unified.into() } else { "/sys/fs/cgroup".into() }
}

/// Where a local pod is enforced. A seam so the cluster state is tested without a node.
pub trait Locator: Send {
    /// A new round of lookups begins (the node may have changed since the last).
    fn refresh(&mut self) {}
    /// The host-side interface routing to `ip` (a per-pod `/32` route) and its ifindex.
    fn veth(&mut self, ip: Ipv4Addr) -> Option<(String, u32)>;
    /// The pod's cgroup v2 directory, by pod UID.
    fn cgroup(&mut self, uid: &str) -> Option<PathBuf>;
}

/// This node: `/proc/net/route` of the agent's network namespace and the cgroup filesystem.
pub struct NodeLocator {
    pub cgroup_root: PathBuf,
    found: HashMap<String, PathBuf>,
    /// `/proc/net/route`, read once per round.
    routes: String,
}

impl NodeLocator {
    pub fn new(cgroup_root: PathBuf) -> NodeLocator {
        NodeLocator { cgroup_root, found: HashMap::new(), routes: String::new() }
    }
}

impl Locator for NodeLocator {
    fn refresh(&mut self) {
        self.routes = std::fs::read_to_string("/proc/net/route").unwrap_or_else(|e| {
            tracing::warn!("cannot read /proc/net/route: {e}");
            String::new()
        });
    }

    fn veth(&mut self, ip: Ipv4Addr) -> Option<(String, u32)> {
        let dev = host_route(&self.routes, ip)?;
        let ifindex = HostLinks.ifindex(&dev)?;
        Some((dev, ifindex))
    }

    fn cgroup(&mut self, uid: &str) -> Option<PathBuf> {
        if let Some(p) = self.found.get(uid)
            && p.join("cgroup.procs").is_file()
        {
            return Some(p.clone());
        }
        let p = find_pod_cgroup(&self.cgroup_root, uid, CGROUP_SEARCH_DEPTH)?;
        self.found.insert(uid.to_string(), p.clone());
        Some(p)
    }
}

/// The interface of the `/32` route to `ip` in a `/proc/net/route` table. Pods reached through a
/// wider route (a bridge CNI) have no veth of their own to enforce on: `None`.
pub fn host_route(table: &str, ip: Ipv4Addr) -> Option<String> {
    let want = u32::from_ne_bytes(ip.octets());
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
        if f.len() < 8 {
            continue;
        }
        let (Ok(dest), Ok(mask), Ok(flags)) =
            (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16), u16::from_str_radix(f[3], 16))
        else {
            continue;
        };
        // RTF_UP, and a host route (all-ones mask) to exactly this address.
        if flags & 0x1 != 0 && mask == u32::MAX && dest == want {
            return Some(f[0].to_string());
        }
    }
    None
}

/// Whether a cgroup directory name is kubelet's for the pod `uid`: cgroupfs driver `pod<uid>`,
/// systemd driver `kubepods-<qos>-pod<uid with '-' as '_'>.slice`.
pub fn is_pod_cgroup(name: &str, uid: &str) -> bool {
    if name == format!("pod{uid}") {
        return true;
    }
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    name.ends_with(&systemd) && (name.len() == systemd.len() || name[..name.len() - systemd.len()].ends_with('-'))
}

/// Breadth-first search of `root` for the pod's cgroup (a directory holding `cgroup.procs`).
pub fn find_pod_cgroup(root: &Path, uid: &str, max_depth: usize) -> Option<PathBuf> {
    if uid.is_empty() {
        return None;
    }
    let mut level = vec![root.to_path_buf()];
    for _ in 0..max_depth {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name();
                let name = name.to_string_lossy();
                if is_pod_cgroup(&name, uid) && e.path().join("cgroup.procs").is_file() {
                    return Some(e.path());
                }
                next.push(e.path());
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
cni0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
cali1\t050042A0\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    #[test]
    fn finds_the_host_route_of_a_pod() {
        // 0x050042A0 little-endian is 160.66.0.5.
        assert_eq!(host_route(TABLE, Ipv4Addr::new(160, 66, 0, 5)).as_deref(), Some("cali1"));
        // Only reachable through the bridge's /16 or the default route: no veth of its own.
        assert_eq!(host_route(TABLE, Ipv4Addr::new(10, 244, 0, 7)), None);
        assert_eq!(host_route(TABLE, Ipv4Addr::new(160, 66, 0, 6)), None);
    }

    #[test]
    fn recognises_both_kubelet_cgroup_drivers() {
        let uid = "6b1c0f7e-3a52-4b8e-9c1d-0e2f4a6b8c9d";
        assert!(is_pod_cgroup("pod6b1c0f7e-3a52-4b8e-9c1d-0e2f4a6b8c9d", uid));
        assert!(is_pod_cgroup("kubepods-besteffort-pod6b1c0f7e_3a52_4b8e_9c1d_0e2f4a6b8c9d.slice", uid));
        assert!(is_pod_cgroup("kubepods-pod6b1c0f7e_3a52_4b8e_9c1d_0e2f4a6b8c9d.slice", uid));
        assert!(!is_pod_cgroup("pod6b1c0f7e-3a52-4b8e-9c1d-0e2f4a6b8c9e", uid));
        assert!(!is_pod_cgroup("kubepods-xpod6b1c0f7e_3a52_4b8e_9c1d_0e2f4a6b8c9d.slice.bak", uid));
        assert!(!is_pod_cgroup("kubepods-besteffort.slice", uid));
    }

    #[test]
    fn searches_the_tree_breadth_first() {
        let root = std::env::temp_dir().join(format!("warden-cg-{}", std::process::id()));
        let uid = "0000-11";
        let deep = root.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0000_11.slice");
        std::fs::create_dir_all(&deep).unwrap();
        // Not a cgroup until it holds cgroup.procs.
        assert_eq!(find_pod_cgroup(&root, uid, 6), None);
        std::fs::write(deep.join("cgroup.procs"), "").unwrap();
        assert_eq!(find_pod_cgroup(&root, uid, 6), Some(deep.clone()));
        assert_eq!(find_pod_cgroup(&root, uid, 2), None, "beyond the depth limit");
        assert_eq!(find_pod_cgroup(&root, "", 6), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
