//! Transparent capture of meshed workloads' outbound TCP, without iptables.
//!
//! `connect4` rewrites the destination of a meshed workload's `connect()` to a meshed
//! destination into the node agent's outbound listener (ztunnel's 15001) and records the
//! original destination under the socket's cookie. The socket has no source port yet, so the
//! sock_ops hook moves the record, once `connect()` has chosen one, to the key the agent can see
//! when it accepts: the workload's (address, source port). The agent's own sockets are never in
//! a workload's cgroup, so they are never captured.

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::bpf_get_socket_cookie,
    programs::{SockAddrContext, SockOpsContext},
};
use warden_common::{Config, OrigDst, SockAddr};

use crate::maps::{CAPTURED, ORIG_DST};

/// Redirect the `connect()` of `ctx` to the agent, remembering `dst`. False when the record
/// cannot be written: the caller then refuses the connection (fail closed).
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, cfg: &Config, endpoint_id: u32, dst: SockAddr) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst { dst, endpoint_id, generation: cfg.generation };
    if CAPTURED.insert(&cookie, &orig, 0).is_err() {
        return false;
    }
    // SAFETY: the context pointer is valid for the program's run; these fields are writable in
    // connect4.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip4 = u32::from_ne_bytes(cfg.capture_addr);
        sa.user_port = u32::from(cfg.capture_port.to_be());
    }
    true
}

/// sock_ops: when a captured socket has its source port (`TCP_CONNECT_CB`, just before the SYN),
/// file its original destination under (address, source port) for the agent.
#[inline(always)]
pub fn on_sock_op(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { CAPTURED.get(&cookie) }).copied() else {
        return;
    };
    let src = SockAddr { addr: ctx.local_ip4().to_ne_bytes(), port: ctx.local_port() as u16, _pad: 0 };
    // A failed insert leaves the agent without the destination: it refuses the connection.
    let _ = ORIG_DST.insert(&src, &orig, 0);
    let _ = CAPTURED.remove(&cookie);
}
