//! BIG TCP for IPv4 on the lab's links (`bench mtls --big-tcp BYTES`): every interface of a
//! network namespace gets `gso_ipv4_max_size` and `gro_ipv4_max_size` (kernel 6.3+), so TCP
//! builds and receives segments up to BYTES instead of 64 KiB, as on a node where Cilium's
//! `enableIPv4BIGTCP` is on. Debian 12's `ip` (iproute2 6.1) predates these attributes, so this
//! sends the `RTM_NEWLINK` itself.

use std::{
    ffi::CStr,
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail};

/// `IFLA_GSO_IPV4_MAX_SIZE` and `IFLA_GRO_IPV4_MAX_SIZE` (`include/uapi/linux/if_link.h`).
const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;
/// The most the kernel accepts for either (`GSO_MAX_SIZE`, 512 KiB less 8).
pub const MAX: u32 = 524_280;

/// Set both sizes to `bytes` on every interface but loopback of the network namespace `netns`
/// (`/run/netns/<netns>`). Returns the interfaces set. Runs on a thread of its own that enters
/// the namespace, since an interface index means something only in its namespace.
pub fn set(netns: &str, bytes: u32) -> anyhow::Result<Vec<String>> {
    if !(65_536..=MAX).contains(&bytes) {
        bail!("--big-tcp {bytes}: between 65536 and {MAX} bytes");
    }
    let ns = File::open(Path::new("/run/netns").join(netns)).with_context(|| format!("network namespace {netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `setns` on this thread only (it ends with the scope); a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            let mut set = Vec::new();
            for (index, name) in interfaces()? {
                if name == "lo" {
                    continue;
                }
                set_link(index, bytes).with_context(|| format!("{netns}: {name}: gso/gro_ipv4_max_size {bytes}"))?;
                set.push(name);
            }
            Ok(set)
        })
        .join()
        .expect("the netlink thread does not panic")
    })
}

/// This thread's namespace's interfaces, by index and name.
fn interfaces() -> anyhow::Result<Vec<(u32, String)>> {
    // SAFETY: returns an array terminated by a zero entry, or null on error; freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(std::io::Error::last_os_error()).context("if_nameindex");
    }
    let mut out = Vec::new();
    let mut at = list;
    // SAFETY: walks the array up to its terminating entry; the names are NUL-terminated.
    unsafe {
        while (*at).if_index != 0 {
            out.push(((*at).if_index, CStr::from_ptr((*at).if_name).to_string_lossy().into_owned()));
            at = at.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(out)
}

/// One `RTM_NEWLINK` for interface `index` with both attributes, and its acknowledgement.
fn set_link(index: u32, bytes: u32) -> anyhow::Result<()> {
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("netlink socket");
    }
    // SAFETY: a descriptor just opened, owned from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    let mut body = Vec::new();
    // struct ifinfomsg: family, pad, type, index, flags, change.
    body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    body.extend_from_slice(&0u16.to_ne_bytes());
    body.extend_from_slice(&(index as i32).to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    for kind in [IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE] {
        // struct nlattr (length includes itself), then the u32 value.
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(&bytes.to_ne_bytes());
    }
    let mut msg = Vec::new();
    // struct nlmsghdr: length, type, flags, sequence, port.
    msg.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    // SAFETY: sends `msg.len()` bytes from a live buffer on an open socket.
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error()).context("netlink send");
    }
    let mut reply = [0u8; 1024];
    // SAFETY: receives into a live buffer of the length passed.
    let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 20 {
        return Err(std::io::Error::last_os_error()).context("netlink reply");
    }
    // NLMSG_ERROR: the header, then the error code (0: acknowledged).
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    let code = i32::from_ne_bytes(reply[16..20].try_into().expect("4 bytes"));
    if kind != libc::NLMSG_ERROR as u16 {
        bail!("netlink: unexpected reply type {kind}");
    }
    if code != 0 {
        return Err(std::io::Error::from_raw_os_error(-code)).context("RTM_NEWLINK");
    }
    Ok(())
}
