//! Transparent capture of meshed workloads' outbound TCP, without iptables.
//!
//! `connect4` rewrites the destination of a meshed workload's `connect()` to a meshed
//! destination into the node agent's outbound listener (ztunnel's 15001) and records the
//! original destination in the socket's storage (`warden_captured_v2`), which lives and dies with
//! the socket. The socket has no source port yet, so the sock_ops hook files the record, once
//! `connect()` has chosen one, under the key the agent can see when it accepts: the workload's
//! (address, source port). `getpeername4` reads the record back, so the application sees the peer
//! it connected to, not the agent (as with a NAT redirect, and as Cilium's socket load balancer
//! answers). The agent's own sockets are never in a workload's cgroup, so they are never captured.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::generated::bpf_sk_storage_get,
    programs::{SockAddrContext, SockOpsContext},
};
use warden_common::{Captured, Config, OrigDst, SockAddr};

use crate::{
    maps::{CAPTURED, ORIG_DST},
    sock_addr::{self, Family},
};

#[inline(always)]
fn captured_map() -> *mut core::ffi::c_void {
    ptr::from_ref(&CAPTURED).cast_mut().cast()
}

/// The record of a captured socket; `create` makes an empty one if there is none. Null when
/// there is none (or it cannot be created).
///
/// # Safety
/// `sk` is a full socket taken from the running program's context.
#[inline(always)]
unsafe fn record<S>(sk: *mut S, create: bool) -> *mut Captured {
    let flags = if create { BPF_SK_STORAGE_GET_F_CREATE as u64 } else { 0 };
    // SAFETY: per the caller, a full socket; no initial value.
    unsafe { bpf_sk_storage_get(captured_map(), sk.cast(), ptr::null_mut(), flags) }.cast()
}

/// Redirect the `connect()` of `ctx` to the agent, remembering `dst`. False when the record
/// cannot be written: the caller then refuses the connection (fail closed).
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, family: Family, cfg: &Config, endpoint_id: u32, dst: SockAddr) -> bool {
    let via = SockAddr { addr: cfg.capture_addr, port: cfg.capture_port, _pad: 0 };
    send_to(ctx, family, cfg, endpoint_id, dst, via)
}

/// Send the `connect()` of `ctx` to `via` instead of `dst`, remembering `dst` for
/// `getpeername()`: the agent's capture listener ([`redirect`]), or a Service's pod out of the
/// mesh. sock_ops files for the agent only sockets sent to the capture listener. False when the
/// record cannot be written: the caller then refuses the connection (fail closed; the socket
/// would name `via` as its peer).
#[inline(always)]
pub fn send_to(
    ctx: &SockAddrContext,
    family: Family,
    cfg: &Config,
    endpoint_id: u32,
    dst: SockAddr,
    via: SockAddr,
) -> bool {
    // SAFETY: the context pointer is valid for the program's run; connect4's socket is a full one.
    let rec = unsafe { record((*ctx.sock_addr).__bindgen_anon_1.sk, true) };
    if rec.is_null() {
        return false;
    }
    // SAFETY: a valid pointer into the socket's storage. A socket that connects again (after a
    // failed attempt) has its record overwritten.
    unsafe { *rec = Captured { orig: OrigDst { dst, endpoint_id, generation: cfg.generation }, via } };
    sock_addr::set(ctx, family, via);
    true
}

/// sock_ops: when a captured socket has its source port (`TCP_CONNECT_CB`, just before the SYN),
/// file its original destination under (address, source port) for the agent. The socket keeps
/// its record for `getpeername()`.
#[inline(always)]
pub fn on_sock_op(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: at TCP_CONNECT_CB the context's socket is a full one; copied out at once.
    let rec = unsafe { record(sk, false) };
    if rec.is_null() {
        return;
    }
    // SAFETY: a valid pointer into the socket's storage.
    let Captured { orig, via } = unsafe { *rec };
    // A socket `send_to` sent to a Service's pod is not the agent's to accept.
    match crate::enforce::config() {
        Ok(cfg) if cfg.is_capture_listener(via.addr, via.port) => {}
        _ => return,
    }
    let src = SockAddr { addr: ctx.local_ip4().to_ne_bytes(), port: ctx.local_port() as u16, _pad: 0 };
    // A failed insert leaves the agent without the destination: it refuses the connection.
    let _ = ORIG_DST.insert(&src, &orig, 0);
}

/// getpeername4/6: a captured socket's peer is the destination its `connect()` named. Any other
/// socket's answer is left as the kernel gave it.
#[inline(always)]
pub fn restore_peer(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the context pointer is valid for the program's run; a getpeername socket is a full
    // one.
    let rec = unsafe { record((*ctx.sock_addr).__bindgen_anon_1.sk, false) };
    if rec.is_null() {
        return;
    }
    // SAFETY: a valid pointer into the socket's storage.
    let Captured { orig, via } = unsafe { *rec };
    if sock_addr::get(ctx, family) == Some(via) {
        sock_addr::set(ctx, family, orig.dst);
    }
}
