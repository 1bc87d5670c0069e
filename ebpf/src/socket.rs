//! The per-socket verdict cache of the cgroup_skb hook.
//!
//! A connected TCP socket talks to one peer for its life, so the decision for its packets is a
//! property of the socket. Once a socket has proved long-lived ([`LONG_LIVED_SEGMENTS`] segments
//! sent), the slow path stores its verdict in socket-local storage, and every later
//! packet costs one socket-local lookup instead of a flow-cache lookup (on a bulk transfer, about
//! 115 ns per packet instead of 410 when this came in). Short connections never pay for the
//! storage: allocating it costs more (about 850 ns, plus an RCU free when the socket goes) than
//! the handful of packets it would speed up (`cargo xtask bench l4`), and their packets do not
//! even look for it.
//!
//! The entry is trusted only while the committed generation and the packet's destination are the
//! ones it was decided for. Other sockets (UDP, which may send anywhere) take the full path.

use core::ptr::{self, NonNull};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_tcp_sock},
    helpers::{bpf_tcp_sock, generated::bpf_sk_storage_get},
    programs::SkBuffContext,
};
use warden_common::{Config, PolicyValue, SockVerdict};

use crate::maps::SOCKETS;

/// Segments (data or not: a receiver sends ACKs only) a socket must have sent before its verdict
/// is cached.
pub const LONG_LIVED_SEGMENTS: u32 = 16;

#[inline(always)]
fn map() -> *mut core::ffi::c_void {
    ptr::from_ref(&SOCKETS).cast_mut().cast()
}

/// The TCP socket that sent `ctx`'s packet, once it has proved long-lived: only such a socket
/// has (or gets) a cached verdict. One helper call tells both, so a short connection's packets
/// pay no socket-storage lookup that could only miss. (`NonNull`: `None` is the null pointer
/// itself; an `Option` of a plain pointer leaves an uninitialised payload the verifier rejects.)
#[inline(always)]
pub fn long_lived(ctx: &SkBuffContext) -> Option<NonNull<bpf_tcp_sock>> {
    // SAFETY: the context's skb pointer is valid for the program's run; `sk` may be null.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the skb's socket pointer, checked non-null; the helper answers null for
    // anything but a full TCP socket.
    let tp = unsafe { bpf_tcp_sock(sk) };
    let tp = NonNull::new(tp)?;
    // SAFETY: a valid pointer for the program's run.
    (unsafe { tp.as_ref() }.segs_out >= LONG_LIVED_SEGMENTS).then_some(tp)
}

/// The cached verdict of socket `tp` for its packets to `(daddr, dport)`, when it is still valid.
#[inline(always)]
pub fn cached(cfg: &Config, tp: NonNull<bpf_tcp_sock>, daddr: [u8; 4], dport: u16) -> Option<PolicyValue> {
    // SAFETY: `tp` is a full TCP socket, which the helper takes as a socket; no value pointer, no
    // flags: a lookup only.
    let v = unsafe { bpf_sk_storage_get(map(), tp.as_ptr().cast(), ptr::null_mut(), 0) } as *const SockVerdict;
    if v.is_null() {
        return None;
    }
    // SAFETY: a valid pointer into the socket's storage, read at once.
    let v = unsafe { *v };
    (v.generation == cfg.generation && v.daddr == daddr && v.dport == dport).then_some(PolicyValue {
        policy_id: 0,
        verdict: v.verdict,
        reason: v.reason,
        _pad: [0; 2],
    })
}

/// Remember the verdict for socket `tp`'s packets to `(daddr, dport)`.
#[inline(always)]
pub fn remember(tp: NonNull<bpf_tcp_sock>, cfg: &Config, daddr: [u8; 4], dport: u16, value: &PolicyValue) {
    let create = BPF_SK_STORAGE_GET_F_CREATE as u64;
    // SAFETY: `tp` is a full TCP socket; create a zeroed entry when there is none.
    let slot = unsafe { bpf_sk_storage_get(map(), tp.as_ptr().cast(), ptr::null_mut(), create) } as *mut SockVerdict;
    if slot.is_null() {
        // No memory for the storage: the next packet decides again.
        return;
    }
    // SAFETY: a valid pointer into the socket's storage.
    unsafe {
        *slot = SockVerdict { generation: cfg.generation, daddr, dport, verdict: value.verdict, reason: value.reason }
    };
}
