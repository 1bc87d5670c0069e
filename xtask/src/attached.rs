//! How many programs the kernel has attached to a hook, asked with `BPF_PROG_QUERY`: the
//! benchmarks check where warden's programs are before they compare enforced with bare.
//! (Debian 12's bpftool 7.1 does not list TCX attachments.)

use std::{ffi::CString, fs::File, os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, bail};

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_TCX_INGRESS: u32 = 46;

/// `union bpf_attr`'s `query` member, whole: the kernel writes `revision`, its last field, back
/// for TCX.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    /// `target_fd` (a cgroup directory) or `target_ifindex` (TCX).
    target: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

fn query(target: u32, attach_type: u32) -> anyhow::Result<u32> {
    let mut attr = QueryAttr { target, attach_type, ..Default::default() };
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix of the size passed; with no
    // `prog_ids` buffer the kernel only writes the count.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &raw mut attr, size_of::<QueryAttr>() as libc::c_uint) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_QUERY");
    }
    Ok(attr.prog_cnt)
}

/// Programs attached at TCX ingress of interface `ifname` in the network namespace `netns`
/// (`/run/netns/<netns>`). The query runs on a thread of its own that enters the namespace, since
/// an interface index means something only in its namespace.
pub fn tcx_ingress(netns: &str, ifname: &str) -> anyhow::Result<u32> {
    let ns = File::open(Path::new("/run/netns").join(netns)).with_context(|| format!("network namespace {netns}"))?;
    let name = CString::new(ifname)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `setns` on this thread only (it ends with the scope); a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {ifname} in {netns}");
            }
            query(ifindex, BPF_TCX_INGRESS)
        })
        .join()
        .expect("the query thread does not panic")
    })
}

/// Programs attached to cgroup `dir` for `connect()` (IPv4).
pub fn cgroup_connect4(dir: &Path) -> anyhow::Result<u32> {
    let f = File::open(dir).with_context(|| format!("cgroup {}", dir.display()))?;
    query(f.as_raw_fd() as u32, BPF_CGROUP_INET4_CONNECT)
}
