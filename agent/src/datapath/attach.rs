//! Attaching the programs to a workload, and detaching them, through links pinned under
//! `<pin dir>/links/<namespace>/<name>/<hook>` (bpffs allows no '.' in names). Pinned links outlive the agent: if it dies, the
//! workload stays enforced. A restarted agent replaces the program inside each pinned link
//! without a gap: TCX links are updated in place (`BPF_LINK_UPDATE`); cgroup links are
//! replaced by attaching the new link before the old one is released.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, SockOps, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};

use crate::workloads::Local;

/// The hooks of a workload, named as their pins are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TCX ingress of the host veth (`warden_from_wl`): the workload's egress.
    TcFromWorkload,
    /// TCX egress of the host veth (`warden_to_wl`): the workload's ingress.
    TcToWorkload,
    /// cgroup/connect4 (`warden_connect4`).
    Connect4,
    /// cgroup/connect6 (`warden_connect6`): a dual-stack socket's `connect()` to a v4-mapped
    /// address, decided and captured as connect4 does.
    Connect6,
    /// cgroup/sendmsg4 (`warden_sendmsg4`). The kernel runs it for a dual-stack socket's UDP
    /// send to a v4-mapped address too (`udpv6_sendmsg` hands those to `udp_sendmsg`).
    Sendmsg4,
    /// cgroup/getpeername4 (`warden_getpeername4`): a captured socket's peer as it connected.
    /// On every workload, so a connection captured before the workload left the mesh still
    /// answers its destination.
    Getpeername4,
    /// cgroup/getpeername6 (`warden_getpeername6`): the same for a dual-stack socket.
    Getpeername6,
    /// sock_ops (`warden_sockops`), on meshed workloads only: captured sockets' source ports.
    SockOps,
}

impl Hook {
    pub const ALL: [Hook; 8] = [
        Hook::TcFromWorkload,
        Hook::TcToWorkload,
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Getpeername4,
        Hook::Getpeername6,
        Hook::SockOps,
    ];

    /// The hooks on every workload's cgroup (sock_ops is on meshed ones only).
    pub const SOCK_ADDR: [Hook; 5] =
        [Hook::Connect4, Hook::Connect6, Hook::Sendmsg4, Hook::Getpeername4, Hook::Getpeername6];

    pub const fn pin_name(self) -> &'static str {
        match self {
            Hook::TcFromWorkload => "tc_from_workload",
            Hook::TcToWorkload => "tc_to_workload",
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Getpeername4 => "getpeername4",
            Hook::Getpeername6 => "getpeername6",
            Hook::SockOps => "sock_ops",
        }
    }

    pub const fn program(self) -> &'static str {
        match self {
            Hook::TcFromWorkload => "warden_from_wl",
            Hook::TcToWorkload => "warden_to_wl",
            Hook::Connect4 => "warden_connect4",
            Hook::Connect6 => "warden_connect6",
            Hook::Sendmsg4 => "warden_sendmsg4",
            Hook::Getpeername4 => "warden_getpeername4",
            Hook::Getpeername6 => "warden_getpeername6",
            Hook::SockOps => "warden_sockops",
        }
    }
}

/// Pins of hooks that earlier versions attached and this one does not: released when a workload
/// is attached (an agent adopting an older agent's pins) or detached. `sock_egress` was
/// cgroup_skb/egress, replaced by cgroup/sendmsg4.
const RETIRED_PINS: [&str; 1] = ["sock_egress"];

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{workload}: attaching {hook} to {target}: {source}")]
    Attach { workload: String, hook: &'static str, target: String, source: Box<aya::programs::ProgramError> },
    #[error("{workload}: pinning the {hook} link at {path}: {reason}")]
    Pin { workload: String, hook: &'static str, path: PathBuf, reason: String },
    #[error("{workload}: opening cgroup {path}: {source}")]
    Cgroup { workload: String, path: PathBuf, source: std::io::Error },
    #[error("BUG: program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
}

/// The directory holding a workload's link pins (`key` is `namespace/name`).
pub fn workload_dir(pin_dir: &Path, key: &str) -> PathBuf {
    pin_dir.join("links").join(key)
}

fn subdirs(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect()
}

/// Workload keys that have pinned links (for reconciling after a restart).
pub fn pinned_workloads(pin_dir: &Path) -> Vec<String> {
    let links = pin_dir.join("links");
    subdirs(&links)
        .into_iter()
        .flat_map(|ns| subdirs(&links.join(&ns)).into_iter().map(move |name| format!("{ns}/{name}")))
        .collect()
}

/// Whether the workload's sock_ops link (the mesh's) is pinned.
pub fn has_sock_ops(pin_dir: &Path, key: &str) -> bool {
    workload_dir(pin_dir, key).join(Hook::SockOps.pin_name()).exists()
}

/// Attach (or re-attach after a restart) every hook of a local workload.
pub fn attach(ebpf: &mut Ebpf, pin_dir: &Path, key: &str, local: &Local, meshed: bool) -> Result<(), AttachError> {
    let dir = workload_dir(pin_dir, key);
    fs::create_dir_all(&dir).map_err(|e| AttachError::Pin {
        workload: key.into(),
        hook: "links",
        path: dir.clone(),
        reason: e.to_string(),
    })?;
    attach_tc(ebpf, &dir, key, Hook::TcFromWorkload, TcAttachType::Ingress, &local.veth)?;
    attach_tc(ebpf, &dir, key, Hook::TcToWorkload, TcAttachType::Egress, &local.veth)?;
    match &local.cgroup {
        Some(cg) => {
            let file = fs::File::open(cg).map_err(|source| AttachError::Cgroup {
                workload: key.into(),
                path: cg.clone(),
                source,
            })?;
            for hook in Hook::SOCK_ADDR {
                attach_cgroup(ebpf, &dir, key, hook, &file, cg)?;
            }
            if meshed {
                attach_cgroup(ebpf, &dir, key, Hook::SockOps, &file, cg)?;
            } else {
                release(&dir.join(Hook::SockOps.pin_name()));
            }
        }
        None => {
            // The workload has no cgroup (any more): drop cgroup links it may have had.
            for hook in Hook::SOCK_ADDR.into_iter().chain([Hook::SockOps]) {
                release(&dir.join(hook.pin_name()));
            }
        }
    }
    // Only now, with their successors attached.
    for retired in RETIRED_PINS {
        release(&dir.join(retired));
    }
    Ok(())
}

fn pin_err(key: &str, hook: Hook, path: &Path, e: impl std::fmt::Display) -> AttachError {
    AttachError::Pin { workload: key.into(), hook: hook.pin_name(), path: path.to_path_buf(), reason: e.to_string() }
}

fn attach_tc(
    ebpf: &mut Ebpf,
    dir: &Path,
    key: &str,
    hook: Hook,
    at: TcAttachType,
    veth: &str,
) -> Result<(), AttachError> {
    let path = dir.join(hook.pin_name());
    let prog: &mut SchedClassifier = ebpf
        .program_mut(hook.program())
        .and_then(|p| p.try_into().ok())
        .ok_or(AttachError::MissingProgram(hook.program()))?;
    let attach_err = |source| AttachError::Attach {
        workload: key.into(),
        hook: hook.pin_name(),
        target: veth.into(),
        source: Box::new(source),
    };

    // A pinned link from an earlier run: swap the program inside it, no gap. The kernel refuses
    // (ENOLINK) when the link's device went away; then a fresh link replaces the defunct one.
    if let Ok(old) = PinnedLink::from_pin(&path) {
        let updated = SchedClassifierLink::try_from(FdLink::from(old))
            .map_err(|e| e.to_string())
            .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
        match updated {
            Ok(id) => {
                // The pin keeps the link; forget our handle so dropping the object cannot detach it.
                std::mem::forget(prog.take_link(id).map_err(attach_err)?);
                return Ok(());
            }
            Err(e) => {
                tracing::info!(workload = key, hook = hook.pin_name(), "pinned link not reusable ({e}); attaching anew")
            }
        }
    }
    release(&path);
    let id = prog.attach_with_options(veth, at, TcAttachOptions::TcxOrder(LinkOrder::first())).map_err(attach_err)?;
    let link: FdLink = prog.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(key, hook, &path, e))?;
    link.pin(&path).map_err(|e| pin_err(key, hook, &path, e))?;
    Ok(())
}

fn attach_cgroup(
    ebpf: &mut Ebpf,
    dir: &Path,
    key: &str,
    hook: Hook,
    cgroup: &fs::File,
    cg_path: &Path,
) -> Result<(), AttachError> {
    let path = dir.join(hook.pin_name());
    let attach_err = |source| AttachError::Attach {
        workload: key.into(),
        hook: hook.pin_name(),
        target: cg_path.display().to_string(),
        source: Box::new(source),
    };
    // The hook's program as its type (aya has no common trait for `attach`), attached with `args`.
    macro_rules! link {
        ($ty:ty, $($args:expr),+) => {{
            let prog: &mut $ty = ebpf
                .program_mut(hook.program())
                .and_then(|p| p.try_into().ok())
                .ok_or(AttachError::MissingProgram(hook.program()))?;
            let id = prog.attach($($args),+).map_err(attach_err)?;
            prog.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(key, hook, &path, e))?
        }};
    }
    let new: FdLink = match hook {
        Hook::SockOps => link!(SockOps, cgroup.as_fd(), CgroupAttachMode::default()),
        _ => link!(CgroupSockAddr, cgroup.as_fd(), CgroupAttachMode::default()),
    };
    // The new link is attached; only now release the old one.
    release(&path);
    new.pin(&path).map_err(|e| pin_err(key, hook, &path, e))?;
    Ok(())
}

/// Unpin a link; the kernel detaches it once no one holds it.
fn release(path: &Path) {
    if let Ok(old) = PinnedLink::from_pin(path) {
        let _ = old.unpin();
    } else {
        let _ = fs::remove_file(path);
    }
}

/// Detach every hook of a workload and remove its pins.
pub fn detach(pin_dir: &Path, key: &str) {
    let dir = workload_dir(pin_dir, key);
    for pin in Hook::ALL.map(Hook::pin_name).into_iter().chain(RETIRED_PINS) {
        release(&dir.join(pin));
    }
    let _ = fs::remove_dir(&dir);
    if let Some(ns) = dir.parent() {
        let _ = fs::remove_dir(ns); // only succeeds once the namespace has no workload left
    }
}
