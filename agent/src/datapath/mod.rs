//! The kernel side as the agent sees it: loading the embedded eBPF object with every map pinned
//! under the pin directory (adopting the pins an earlier run left), committing node states, and
//! attaching programs to workloads.

pub mod attach;
pub mod commit;
pub mod maps;

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSkb, CgroupSockAddr, SchedClassifier, SockOps},
};
use warden_common::names;

pub use self::{
    commit::{CommitError, NodeState},
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
    #[error(transparent)]
    Maps(#[from] maps::MapsError),
}

pub struct Datapath {
    pub pin_dir: PathBuf,
    ebpf: Ebpf,
    pub maps: Maps,
    /// The inactive slot is known to be empty (see `commit::commit`). False after loading: an
    /// earlier agent may have died mid-commit.
    inactive_clean: bool,
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

impl Datapath {
    /// Load the programs and open (or create and pin) the maps under `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Datapath, LoadError> {
        if let Some(root) = pin_dir.ancestors().find(|a| a.parent() == Some(Path::new("/sys/fs"))) {
            ensure_bpffs(root)?;
        }
        fs::create_dir_all(pin_dir.join("links"))
            .map_err(|source| LoadError::PinDir { path: pin_dir.into(), source })?;

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
        load!(CgroupSockAddr, "warden_connect4");
        load!(CgroupSkb, "warden_sock_out");
        load!(SockOps, "warden_sockops");

        let maps = Maps::open(pin_dir)?;
        Ok(Datapath { pin_dir: pin_dir.to_path_buf(), ebpf, maps, inactive_clean: false })
    }

    pub fn commit(&mut self, state: &NodeState) -> Result<u32, CommitError> {
        commit::commit(&mut self.maps, state, &mut self.inactive_clean)
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
