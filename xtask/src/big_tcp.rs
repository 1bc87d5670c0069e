//! BIG TCP for IPv4 on the lab's links (`bench mtls --big-tcp BYTES`): every interface of a
//! network namespace gets `gso_ipv4_max_size` and `gro_ipv4_max_size` (kernel 6.3+), so TCP
//! builds and receives segments up to BYTES instead of 64 KiB, as on a node where Cilium's
//! `enableIPv4BIGTCP` is on. Debian 12's `ip` (iproute2 6.1) predates these attributes, so this
//! sends the `RTM_NEWLINK` itself (netlink-packet-route, as the agent's routing does).

use std::{ffi::CStr, fs::File, os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, bail};
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The most the kernel accepts for either (`GSO_MAX_SIZE`, 512 KiB less 8).
pub const MAX: u32 = 524_280;

/// Set both sizes to `bytes` on every interface but loopback of the network namespace `netns`
/// (`/run/netns/<netns>`). Returns the interfaces set. Runs on a thread of its own that enters
/// the namespace, since an interface index means something only in its namespace.
pub fn set(netns: &str, bytes: u32) -> anyhow::Result<Vec<String>> {
    if !(65_536..=MAX).contains(&bytes) {
        bail!("--big-tcp {bytes}: between 65536 and {MAX} bytes");
    }
    in_netns(netns, || {
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
}

/// Run `f` on a thread of its own inside the network namespace `netns` (`/run/netns/<netns>`).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    let ns = File::open(Path::new("/run/netns").join(netns)).with_context(|| format!("network namespace {netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `setns` on this thread only (it ends with the scope); a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            f()
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
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes = vec![LinkAttribute::GsoIpv4MaxSize(bytes), LinkAttribute::GroIpv4MaxSize(bytes)];
    match request(RouteNetlinkMessage::NewLink(link), NLM_F_ACK)? {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())).context("RTM_NEWLINK"),
        },
        other => bail!("netlink: unexpected reply {other:?}"),
    }
}

/// Send one request and read the first message of its answer.
fn request(msg: RouteNetlinkMessage, flags: u16) -> anyhow::Result<NetlinkPayload<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
    socket.bind_auto().context("netlink bind")?;
    socket.connect(&SocketAddr::new(0, 0)).context("netlink connect")?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    msg.finalize();
    let mut out = vec![0; msg.buffer_len()];
    msg.serialize(&mut out);
    socket.send(&out, 0).context("netlink send")?;
    let mut reply = vec![0; 16 * 1024];
    let n = socket.recv(&mut &mut reply[..], 0).context("netlink reply")?;
    Ok(NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n]).context("netlink reply")?.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gso_ipv4_max_size` and `gro_ipv4_max_size` of interface `index`, as the kernel reports
    /// them (`RTM_GETLINK`).
    fn sizes(index: u32) -> anyhow::Result<(Option<u32>, Option<u32>)> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) =
            request(RouteNetlinkMessage::GetLink(link), 0)?
        else {
            bail!("no link {index}");
        };
        let find = |want: fn(&LinkAttribute) -> Option<u32>| link.attributes.iter().find_map(want);
        Ok((
            find(|a| if let LinkAttribute::GsoIpv4MaxSize(v) = a { Some(*v) } else { None }),
            find(|a| if let LinkAttribute::GroIpv4MaxSize(v) = a { Some(*v) } else { None }),
        ))
    }

    #[test]
    fn every_link_of_the_namespace_but_loopback_takes_the_big_tcp_sizes() {
        if !warden_tests::require_root("every_link_of_the_namespace_but_loopback_takes_the_big_tcp_sizes") {
            return;
        }
        let ns = "xtask-bigtcp";
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().unwrap().success();
        ip(&["netns", "del", ns]);
        assert!(ip(&["netns", "add", ns]));
        assert!(ip(&["-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"]));
        let result = set(ns, 185_000);
        let read = in_netns(ns, || {
            interfaces()?.into_iter().map(|(index, name)| Ok((name, sizes(index)?))).collect::<anyhow::Result<Vec<_>>>()
        });
        let refused = set(ns, 1 << 20);
        ip(&["netns", "del", ns]);

        let mut set = result.unwrap();
        set.sort();
        assert_eq!(set, ["d0", "d1"]);
        let read = read.unwrap();
        let size = |name: &str| read.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
        assert_eq!(size("d0"), Some((Some(185_000), Some(185_000))), "{read:?}");
        assert_eq!(size("d1"), Some((Some(185_000), Some(185_000))), "{read:?}");
        assert_ne!(size("lo"), Some((Some(185_000), Some(185_000))), "loopback is left alone: {read:?}");
        assert!(refused.unwrap_err().to_string().contains("between 65536 and 524280"));
    }
}
