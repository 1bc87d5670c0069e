//! The per-socket verdict cache of the cgroup_skb hook.
//!
//! A connected TCP socket talks to one peer for its life, so the decision for its packets is a
//! property of the socket. Once a socket has proved long-lived ([`LONG_LIVED_SEGMENTS`] segments
//! sent), the slow path stores its verdict in socket-local storage, and every later
//! packet costs one socket-local lookup instead of a cgroup lookup, a packet parse and a
//! flow-cache lookup (about 115 ns instead of 410 on a bulk transfer). Short connections never
//! pay for the storage: allocating it costs more (about 850 ns, plus an RCU free when the socket
//! goes) than the handful of packets it would speed up (`cargo xtask bench l4`).
//!
//! The entry is trusted only while the committed generation and the socket's peer are the ones
//! it was decided for. Other sockets (UDP, which may send anywhere) take the full path.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::{bpf_sk_fullsock, bpf_tcp_sock, generated::bpf_sk_storage_get},
    programs::SkBuffContext,
};
use warden_common::{Config, PROTO_TCP, PolicyValue, SockVerdict};

use crate::maps::SOCKETS;

/// Segments (data or not: a receiver sends ACKs only) a socket must have sent before its verdict
/// is cached.
pub const LONG_LIVED_SEGMENTS: u32 = 16;

#[inline(always)]
fn map() -> *mut core::ffi::c_void {
    ptr::from_ref(&SOCKETS).cast_mut().cast()
}

/// The full TCP socket that sent `ctx`'s packet, if any.
#[inline(always)]
pub fn tcp_socket(ctx: &SkBuffContext) -> Option<*mut bpf_sock> {
    // SAFETY: the context's skb pointer is valid for the program's run; `sk` may be null, which
    // the helper accepts and answers with null.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the skb's socket pointer, checked non-null.
    let full = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: a full socket pointer returned by the helper, valid for the program's run.
    (!full.is_null() && unsafe { (*full).protocol } == PROTO_TCP as u32).then_some(full)
}

/// The cached verdict of socket `sk`, when it is still valid.
#[inline(always)]
pub fn cached(cfg: &Config, sk: *mut bpf_sock) -> Option<PolicyValue> {
    // SAFETY: `sk` is a full socket; no value pointer, no flags: a lookup only.
    let v = unsafe { bpf_sk_storage_get(map(), sk.cast(), ptr::null_mut(), 0) } as *const SockVerdict;
    if v.is_null() {
        return None;
    }
    // SAFETY: a valid pointer into the socket's storage, read at once; `sk` is a full socket.
    let (v, daddr, dport) = unsafe { (*v, (*sk).dst_ip4, (*sk).dst_port) };
    (v.generation == cfg.generation && v.daddr == daddr.to_ne_bytes() && v.dport == u16::from_be(dport as u16))
        .then_some(PolicyValue { policy_id: 0, verdict: v.verdict, reason: v.reason, _pad: [0; 2] })
}

/// Remember the verdict for socket `sk`'s packets to `(daddr, dport)`, once the socket has
/// proved long-lived.
#[inline(always)]
pub fn remember(sk: *mut bpf_sock, cfg: &Config, daddr: [u8; 4], dport: u16, value: &PolicyValue) {
    // SAFETY: `sk` is a full TCP socket; the helper answers null for anything else.
    let tp = unsafe { bpf_tcp_sock(sk) };
    // SAFETY: checked non-null; valid for the program's run.
    if tp.is_null() || unsafe { (*tp).segs_out } < LONG_LIVED_SEGMENTS {
        return;
    }
    // SAFETY: `sk` is a full socket; create a zeroed entry when there is none.
    let slot = unsafe { bpf_sk_storage_get(map(), sk.cast(), ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE as u64) }
        as *mut SockVerdict;
    if slot.is_null() {
        // No memory for the storage: the next packet decides again.
        return;
    }
    // SAFETY: a valid pointer into the socket's storage.
    unsafe {
        *slot = SockVerdict { generation: cfg.generation, daddr, dport, verdict: value.verdict, reason: value.reason }
    };
}
