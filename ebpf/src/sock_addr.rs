//! The IPv4 address a sock_addr hook's context carries, for both kinds of socket: an `AF_INET`
//! socket's (`user_ip4`, the IPv4 hooks) and a dual-stack `AF_INET6` socket's v4-mapped one
//! (`::ffff:a.b.c.d` in `user_ip6`), for which the kernel runs the IPv6 hooks connect6 and
//! getpeername6 although the packets are IPv4 (a UDP send it converts first, and runs sendmsg4).
//! Java opens such sockets by default, as does any runtime that prefers IPv6; warden decides and
//! captures them as IPv4.

use aya_ebpf::programs::SockAddrContext;
use warden_common::SockAddr;

/// Which hook family runs: the context fields it may read and write differ.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// connect4, sendmsg4, getpeername4: `user_ip4`.
    Inet,
    /// connect6, getpeername6: `user_ip6`, IPv4 only when v4-mapped.
    Inet6,
}

/// `user_ip6[2]` of a v4-mapped address (`::ffff:0:0/96`), network order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The context's IPv4 address and port; `None` for a native IPv6 address, which warden does not
/// decide (TC drops what it cannot parse).
#[inline(always)]
pub fn get(ctx: &SockAddrContext, family: Family) -> Option<SockAddr> {
    // SAFETY: the context pointer is valid for the program's run; each hook reads only the fields
    // of its family.
    let (addr, port) = unsafe {
        let sa = &*ctx.sock_addr;
        match family {
            Family::Inet => (sa.user_ip4, sa.user_port),
            Family::Inet6 => {
                if sa.user_ip6[0] != 0 || sa.user_ip6[1] != 0 || sa.user_ip6[2] != V4_MAPPED {
                    return None;
                }
                (sa.user_ip6[3], sa.user_port)
            }
        }
    };
    Some(SockAddr { addr: addr.to_ne_bytes(), port: u16::from_be(port as u16), _pad: 0 })
}

/// Rewrite the context's IPv4 address and port (in an `AF_INET6` context, keeping it v4-mapped).
#[inline(always)]
pub fn set(ctx: &SockAddrContext, family: Family, to: SockAddr) {
    // SAFETY: the context pointer is valid for the program's run; connect and getpeername hooks
    // may write these fields.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        match family {
            Family::Inet => sa.user_ip4 = u32::from_ne_bytes(to.addr),
            Family::Inet6 => sa.user_ip6[3] = u32::from_ne_bytes(to.addr),
        }
        sa.user_port = u32::from(to.port.to_be());
    }
}
