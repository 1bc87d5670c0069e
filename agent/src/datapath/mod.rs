//! The kernel side as the agent sees it: loading the embedded eBPF object with every map pinned
//! under the pin directory (adopting the pins an earlier run left), committing node states, and
//! attaching programs to workloads.

pub mod attach;
pub mod btf;
pub mod commit;
pub mod lock;
pub mod maps;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::SockHash,
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, SkMsg, SockOps, sock_ops::SockOpsLink},
};
use warden_common::{FastpathKernel, SockKey, names};

pub use self::{
    commit::{CapacityError, CommitError, Entries, NodeState},
    maps::Maps,
};

/// The eBPF object built by build.rs from the `ebpf/` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warden"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path} is not a bpffs mount and mounting one failed: {source}")]
    Bpffs { path: PathBuf, source: std::io::Error },
    #[error("creating {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("loading program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("BUG: program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("BUG: map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error(transparent)]
    Maps(#[from] maps::MapsError),
    #[error("attaching the fast path's sk_msg program to {map}: {source}")]
    FastPath { map: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
}

/// Why the fast path cannot bound its redirected queues on this kernel.
#[derive(Debug, thiserror::Error)]
pub enum FastPathKernelError {
    #[error("finding where the kernel keeps a socket's redirected queue: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("{path}: {reason}")]
    TcpRmem { path: PathBuf, reason: String },
    #[error("writing {map}: {source}")]
    Write { map: &'static str, source: aya::maps::MapError },
}

/// What the fast path's sk_msg program needs from this kernel ([`FastpathKernel`]): the offsets
/// of `sock.sk_user_data` and `sk_psock.msg_tot_len` in the BTF at `btf_path`, and the limit of a
/// redirected queue, the largest TCP receive buffer in `tcp_rmem_path`
/// (`/proc/sys/net/ipv4/tcp_rmem`: min, default, max).
pub fn fast_path_kernel(btf_path: &Path, tcp_rmem_path: &Path) -> Result<FastpathKernel, FastPathKernelError> {
    let kernel = btf::KernelBtf::open(btf_path)?;
    let sk_user_data = kernel.member_offset("sock", "sk_user_data")?;
    let psock_queued = kernel.member_offset("sk_psock", "msg_tot_len")?;
    drop(kernel);
    let rmem_err = |reason: String| FastPathKernelError::TcpRmem { path: tcp_rmem_path.into(), reason };
    let text = fs::read_to_string(tcp_rmem_path).map_err(|e| rmem_err(e.to_string()))?;
    let max = text.split_whitespace().nth(2).ok_or_else(|| rmem_err(format!("expected 3 numbers, found {text:?}")))?;
    let limit = max
        .parse::<u32>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| rmem_err(format!("the maximum {max:?} is not a positive 32-bit number")))?;
    Ok(FastpathKernel { sk_user_data, psock_queued, limit, _pad: 0 })
}

/// Why the fast path cannot file the agent's own sockets.
#[derive(Debug, thiserror::Error)]
pub enum AgentCgroupError {
    #[error("reading /proc/self/cgroup: {0}")]
    Read(std::io::Error),
    #[error("the agent is in no cgroup v2 (no `0::` line in /proc/self/cgroup)")]
    NoCgroup,
    #[error("the agent runs in the root cgroup; it needs its own (its pod's) to attach to")]
    Root,
    #[error("opening the agent's cgroup {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("attaching sock_ops to the agent's cgroup {path}: {source}")]
    Attach { path: PathBuf, source: Box<aya::programs::ProgramError> },
}

pub struct Datapath {
    pub pin_dir: PathBuf,
    ebpf: Ebpf,
    pub maps: Maps,
    /// What the committer knows about the slots: whether the inactive one is known to be empty,
    /// what the active one holds, the maps' capacities (see `commit::commit`).
    slots: commit::Slots,
    /// sock_ops on the agent's own cgroup (the fast path), for the process's life: the agent's
    /// sockets die with it, so the link is not pinned.
    agent_sock_ops: Option<SockOpsLink>,
}

/// Mount bpffs at `root` unless it already is one.
pub fn ensure_bpffs(root: &Path) -> Result<(), LoadError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let c = CString::new(root.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: statfs writes only into `st`; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|source| LoadError::Bpffs { path: root.into(), source })?;
    let fstype = CString::new("bpf").unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe { libc::mount(fstype.as_ptr(), c.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(LoadError::Bpffs { path: root.into(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Make the pin directory (and its `links/`) exist on a bpffs mount, mounting one under
/// `/sys/fs/` when needed.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), LoadError> {
    if let Some(root) = pin_dir.ancestors().find(|a| a.parent() == Some(Path::new("/sys/fs"))) {
        ensure_bpffs(root)?;
    }
    fs::create_dir_all(pin_dir.join("links")).map_err(|source| LoadError::PinDir { path: pin_dir.into(), source })
}

impl Datapath {
    /// Load the programs and open (or create and pin) the maps under `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Datapath, LoadError> {
        prepare_pin_dir(pin_dir)?;

        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = names::ALL.iter().map(|n| (*n, pin_dir.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        // Each program as its type (aya has no common trait for `load`).
        macro_rules! load {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let p: &mut $ty =
                    ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(LoadError::MissingProgram(name))?;
                p.load().map_err(|source| LoadError::Program { name, source })?;
            }};
        }
        load!(SchedClassifier, "warden_from_wl");
        load!(SchedClassifier, "warden_to_wl");
        for hook in attach::Hook::SOCK_ADDR {
            load!(CgroupSockAddr, hook.program());
        }
        load!(SockOps, "warden_sockops");
        load!(SkMsg, "warden_fastpath");
        attach_fast_path(&mut ebpf)?;

        // An earlier version's maps, now unused: their pins go (programs still attached to an
        // older link keep their map until the link is replaced).
        for retired in names::RETIRED {
            let _ = fs::remove_file(pin_dir.join(retired));
        }

        let maps = Maps::open(pin_dir)?;
        let slots = commit::Slots::new(maps.capacity());
        Ok(Datapath { pin_dir: pin_dir.to_path_buf(), ebpf, maps, slots, agent_sock_ops: None })
    }

    /// Attach sock_ops to the agent's own cgroup (from `/proc/self/cgroup`, under `cgroup_root`),
    /// so the fast path files the agent's sockets at ESTABLISHED, as the kernel files the
    /// workloads'. Refuses the root cgroup (it would see every socket of the node). Returns the
    /// cgroup.
    pub fn attach_agent(&mut self, cgroup_root: &Path) -> Result<PathBuf, AgentCgroupError> {
        let text = fs::read_to_string("/proc/self/cgroup").map_err(AgentCgroupError::Read)?;
        let rel = own_cgroup(&text).ok_or(AgentCgroupError::NoCgroup)?;
        if rel.is_empty() {
            return Err(AgentCgroupError::Root);
        }
        let path = cgroup_root.join(rel);
        let file = fs::File::open(&path).map_err(|source| AgentCgroupError::Open { path: path.clone(), source })?;
        let attach_err = |e| AgentCgroupError::Attach { path: path.clone(), source: Box::new(e) };
        let prog: &mut SockOps =
            self.ebpf.program_mut("warden_sockops").and_then(|p| p.try_into().ok()).expect("loaded in Datapath::load");
        let id = prog.attach(&file, CgroupAttachMode::default()).map_err(attach_err)?;
        self.agent_sock_ops = Some(prog.take_link(id).map_err(attach_err)?);
        Ok(path)
    }

    /// Give the fast path's sk_msg program what it needs to bound the redirected queues
    /// ([`fast_path_kernel`]). Until this is written, no send is redirected.
    pub fn set_fast_path_kernel(&mut self, kernel: FastpathKernel) -> Result<(), FastPathKernelError> {
        self.maps
            .fastpath_kernel
            .set(0, kernel, 0)
            .map_err(|source| FastPathKernelError::Write { map: names::FASTPATH_KERNEL, source })
    }

    /// Whether `state` fits the maps beside the running state (`commit::check`), before
    /// anything is touched; `policy_names` name the policies with the most entries if it does not.
    pub fn check(&mut self, state: &NodeState, policy_names: &BTreeMap<u32, String>) -> Result<(), CapacityError> {
        commit::check(&self.maps, state, policy_names, &mut self.slots)
    }

    /// Commit `state` atomically (checked first, see [`Datapath::check`]); the new generation.
    pub fn commit(&mut self, state: &NodeState, policy_names: &BTreeMap<u32, String>) -> Result<u32, CommitError> {
        commit::commit(&mut self.maps, state, policy_names, &mut self.slots)
    }

    pub fn attach(
        &mut self,
        key: &str,
        local: &crate::workloads::Local,
        meshed: bool,
    ) -> Result<(), attach::AttachError> {
        attach::attach(&mut self.ebpf, &self.pin_dir, key, local, meshed)
    }

    pub fn detach(&self, key: &str) {
        attach::detach(&self.pin_dir, key)
    }

    /// Record that processes in `cgroup` belong to the endpoint on `ifindex`.
    pub fn set_cgroup(&mut self, cgroup: &Path, ifindex: u32) -> std::io::Result<u64> {
        let id = cgroup_id(cgroup)?;
        self.maps.cgroups.insert(id, ifindex, 0).map_err(std::io::Error::other)?;
        Ok(id)
    }

    pub fn clear_cgroup(&mut self, id: u64) {
        let _ = self.maps.cgroups.remove(&id);
    }
}

/// Attach the fast path's sk_msg program to its sock hash. The attachment belongs to the (pinned)
/// map, not to this process: a restarted agent's program replaces it in place.
fn attach_fast_path(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let name = names::FASTPATH_SOCKS;
    let err = |source: Box<dyn std::error::Error + Send + Sync>| LoadError::FastPath { map: name, source };
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    let socks: SockHash<_, SockKey> = map.try_into().map_err(|e: aya::maps::MapError| err(Box::new(e)))?;
    let prog: &mut SkMsg = ebpf
        .program_mut("warden_fastpath")
        .and_then(|p| p.try_into().ok())
        .ok_or(LoadError::MissingProgram("warden_fastpath"))?;
    let id = prog.attach(socks.fd()).map_err(|e| err(Box::new(e)))?;
    // Dropping the link would detach the program; the map keeps it for as long as it exists.
    std::mem::forget(prog.take_link(id).map_err(|e| err(Box::new(e)))?);
    Ok(())
}

/// The process's cgroup v2 path (relative, without the leading '/') from `/proc/self/cgroup`;
/// empty for the root cgroup.
fn own_cgroup(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().trim_start_matches('/'))
}

/// A cgroup v2 directory's id is its inode number.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path)?.ino())
}

/// Remove every pin warden made under `pin_dir` (links first, so programs detach).
pub fn remove_pins(pin_dir: &Path) {
    for key in attach::pinned_workloads(pin_dir) {
        attach::detach(pin_dir, &key);
    }
    let _ = fs::remove_dir(pin_dir.join("links"));
    // Every map pin, including those of an older layout version (`warden_*_v<N>`).
    if let Ok(entries) = fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("warden_") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_dir(pin_dir);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{btf::VMLINUX, fast_path_kernel, own_cgroup};

    /// The bound comes from tcp_rmem's maximum; a file that does not give one is named with why.
    #[test]
    fn fast_path_kernel_takes_tcp_rmems_maximum_and_names_a_bad_file() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("SKIPPING fast_path_kernel_takes_tcp_rmems_maximum_and_names_a_bad_file: no {VMLINUX}");
            return;
        }
        let path = std::env::temp_dir().join(format!("warden-tcp-rmem-test-{}", std::process::id()));
        let with = |text: &str| {
            std::fs::write(&path, text).unwrap();
            fast_path_kernel(Path::new(VMLINUX), &path)
        };
        let k = with("4096\t131072\t6291456\n").unwrap();
        assert_eq!(k.limit, 6_291_456);
        assert!(k.sk_user_data > 0 && k.psock_queued > 0, "{k:?}");
        let shown = path.display();
        assert_eq!(
            with("4096 131072\n").unwrap_err().to_string(),
            format!("{shown}: expected 3 numbers, found \"4096 131072\\n\"")
        );
        assert_eq!(
            with("4096 131072 lots\n").unwrap_err().to_string(),
            format!("{shown}: the maximum \"lots\" is not a positive 32-bit number")
        );
        let _ = std::fs::remove_file(&path);
        let missing = Path::new("/nonexistent/btf");
        let err = fast_path_kernel(missing, &path).unwrap_err().to_string();
        assert!(
            err.starts_with("finding where the kernel keeps a socket's redirected queue: /nonexistent/btf: "),
            "{err}"
        );
    }

    #[test]
    fn own_cgroup_reads_the_unified_line() {
        let hybrid = "12:pids:/user.slice\n1:name=systemd:/user.slice/x.scope\n0::/warden-mx1/node-agent\n";
        assert_eq!(own_cgroup(hybrid), Some("warden-mx1/node-agent"));
        assert_eq!(own_cgroup("0::/\n"), Some(""), "the root cgroup");
        assert_eq!(own_cgroup("3:cpu:/a\n"), None, "cgroup v1 only");
    }
}
