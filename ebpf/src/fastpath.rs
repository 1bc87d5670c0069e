//! The same-node fast path: bytes between a workload's socket and the node agent's socket at the
//! other end of the same connection skip TCP/IP and the veth, as Merbridge and Kmesh do it.
//!
//! On one node a meshed connection is two TCP connections the agent relays between:
//! - the workload's captured socket (remote: the capture address) and the agent's accepted
//!   socket on the capture port;
//! - the agent's last-hop socket (`MARK_TUNNEL`, bound to the client's address, remote: a
//!   workload of this node) and the destination workload's accepted socket.
//!
//! sock_ops files both ends of each pair in `FASTPATH_SOCKS` under their own 4-tuple when they
//! reach ESTABLISHED (the active end first, then the passive end, which is added only when its
//! reversed tuple is an active end filed just before it). The sk_msg program on that map then
//! moves a send into the receive queue of the socket filed under the reversed tuple
//! (`bpf_msg_redirect_hash(.., BPF_F_INGRESS)`). The agent still reads, authorizes, counts and
//! relays; only the kernel's path between the sockets is shorter. SYNs, FINs and RSTs still take
//! TCP: connect4, TC and the tunnel mark decide every connection exactly as without the fast
//! path.
//!
//! # No reordering
//! A receiving socket's `recvmsg` reads the redirected queue before the TCP receive queue. Bytes
//! sent over TCP first and redirected later could therefore be read out of order; bytes redirected
//! first and sent over TCP later cannot (the redirected ones are queued synchronously in the
//! sender's `sendmsg`, before any later segment exists). So each sending socket decides once, at
//! its first send, and keeps to it: [`FASTPATH_REDIRECT`] while it lasts, [`FASTPATH_PASS`] for
//! good. A redirecting socket may fall back to TCP at any later send (never the other way):
//! when a new generation is committed (the kernel then decides the flow again on TC, as it does
//! for every flow after a policy change), when the switch is turned off, or when its peer has gone.
//!
//! # Backpressure
//! A redirected send leaves the sender's buffer at once and is charged to the receiving socket,
//! so nothing makes a sender wait for a slow reader, as TCP's window does: the reader's queue
//! would grow until the node's TCP memory ran out and the kernel failed the send with `ENOMEM`.
//! So before each redirect the program reads the peer's queue length (`sk_psock.msg_tot_len`,
//! through the peer's `struct sock *` in `FASTPATH_PEERS` and the offsets the agent found in the
//! kernel's BTF, `FASTPATH_KERNEL`), and a send that would take it past the limit (the node's
//! largest TCP receive buffer) takes TCP instead, for the socket's life, as any fallback does.
//! The reads are `bpf_probe_read_kernel`: a peer freed meanwhile reads as garbage or fails, and
//! the worst either can do is a fallback to TCP, which is always safe.

use core::ptr;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock, sk_action::SK_PASS,
    },
    helpers::{bpf_probe_read_kernel, generated::bpf_sk_storage_get},
    programs::{SkMsgContext, SockOpsContext},
};
use warden_common::{
    Config, FASTPATH_PASS, FASTPATH_REDIRECT, FASTPATH_UNDECIDED, FastpathCounter, FastpathSock, MARK_MASK,
    MARK_TUNNEL, SK_USER_DATA_FLAGS, SockKey,
};

use crate::{
    enforce::{config, remote},
    maps::{FASTPATH_ACTIVE, FASTPATH_COUNTERS, FASTPATH_KERNEL, FASTPATH_PEERS, FASTPATH_SOCKS, FASTPATH_STATE},
};

/// A port as the context's `remote_port` holds it (network order, in the upper half on
/// little-endian hosts), in host order.
#[inline(always)]
fn remote_port(v: u32) -> u16 {
    let be = if v > 0xffff { (v >> 16) as u16 } else { v as u16 };
    u16::from_be(be)
}

#[inline(always)]
fn state_map() -> *mut core::ffi::c_void {
    ptr::from_ref(&FASTPATH_STATE).cast_mut().cast()
}

#[inline(always)]
fn counted(f: impl FnOnce(&mut FastpathCounter)) {
    if let Some(c) = FASTPATH_COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; programs do not migrate while running.
        f(unsafe { &mut *c });
    }
}

/// sock_ops: file a socket of a same-node pair when it reaches ESTABLISHED.
#[inline(always)]
pub fn on_sock_op(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return;
    }
    let Ok(cfg) = config() else { return };
    if !cfg.fast_path() || ctx.family() != 2 {
        return;
    }
    let key = SockKey {
        local_addr: ctx.local_ip4().to_ne_bytes(),
        remote_addr: ctx.remote_ip4().to_ne_bytes(),
        local_port: ctx.local_port() as u16,
        remote_port: remote_port(ctx.remote_port()),
    };
    // SAFETY: the context pointer is valid for the program's run; `sk` may be null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if !is_active_end(&cfg, &key, sk) {
            return;
        }
        if add(ctx, sk, &key, &cfg) {
            // A failed insert leaves the passive end out, and this socket finds no peer: TCP.
            let _ = FASTPATH_ACTIVE.insert(&key, &cfg.generation, 0);
        }
    } else {
        // The passive end of a pair whose active end was filed just before (its ESTABLISHED
        // callback runs when the SYN-ACK arrives, before the ACK that establishes this one).
        let peer = key.reversed();
        // SAFETY: only tested for presence.
        if unsafe { FASTPATH_ACTIVE.get(&peer) }.is_none() {
            return;
        }
        let _ = FASTPATH_ACTIVE.remove(&peer);
        add(ctx, sk, &key, &cfg);
    }
}

/// Whether an active socket is one end of a same-node pair: a workload's captured connection
/// (to the capture address), or the agent's last hop (marked `MARK_TUNNEL`, to a workload of
/// this node).
#[inline(always)]
fn is_active_end(cfg: &Config, key: &SockKey, sk: *mut bpf_sock) -> bool {
    if cfg.is_capture_listener(key.remote_addr, key.remote_port) {
        return true;
    }
    // SAFETY: a non-null socket pointer from the context, valid for the program's run.
    let mark = unsafe { (*sk).mark };
    mark & MARK_MASK == MARK_TUNNEL && remote(cfg.active_slot(), key.remote_addr).local_ifindex != 0
}

/// Create the socket's fast-path state, then file the socket. Without state the socket is never
/// filed, so the sk_msg program always finds its state. True when filed.
#[inline(always)]
fn add(ctx: &SockOpsContext, sk: *mut bpf_sock, key: &SockKey, cfg: &Config) -> bool {
    // SAFETY: `sk` is a full socket from the context; create a zeroed entry when there is none.
    let state =
        unsafe { bpf_sk_storage_get(state_map(), sk.cast(), ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE as u64) }
            as *mut FastpathSock;
    if state.is_null() {
        return false;
    }
    // SAFETY: a valid pointer into the socket's storage.
    unsafe { *state = FastpathSock { generation: cfg.generation, decision: FASTPATH_UNDECIDED, _pad: [0; 3] } };
    // Where its peer's sends find its queue (before it can receive any).
    if FASTPATH_PEERS.insert(key, &(sk as u64), 0).is_err() {
        return false;
    }
    let mut key = *key;
    // SAFETY: the context pointer is valid for the program's run.
    let ops = unsafe { &mut *ctx.ops };
    if FASTPATH_SOCKS.update(&mut key, ops, BPF_ANY as u64).is_err() {
        return false;
    }
    counted(|c| c.sockets += 1);
    true
}

/// How many more bytes the redirected queue of the socket filed under `peer` may take before it
/// passes the limit. None when the queue cannot be read (no offsets, no address filed, the socket
/// not in a sock map, a failed read): the sender then takes TCP, as when it has no peer.
#[inline(always)]
fn peer_room(peer: &SockKey) -> Option<u64> {
    let k = FASTPATH_KERNEL.get(0)?;
    if k.sk_user_data == 0 || k.psock_queued == 0 {
        return None;
    }
    // SAFETY: a value of the map, copied out at once.
    let sk = *unsafe { FASTPATH_PEERS.get(peer) }?;
    // SAFETY: probe reads never fault: a freed or reused socket reads as garbage or fails, and
    // either only sends this socket to TCP.
    let user_data = unsafe { bpf_probe_read_kernel((sk + u64::from(k.sk_user_data)) as *const u64) }.ok()?;
    let psock = user_data & !SK_USER_DATA_FLAGS;
    if psock == 0 {
        return None;
    }
    // SAFETY: as above.
    let queued = unsafe { bpf_probe_read_kernel((psock + u64::from(k.psock_queued)) as *const u32) }.ok()?;
    Some(u64::from(k.limit).saturating_sub(u64::from(queued)))
}

/// sk_msg on `FASTPATH_SOCKS`: redirect a send to the peer socket's receive queue, or let it take
/// TCP. Always `SK_PASS` (a send is never dropped here).
#[inline(always)]
pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run; `sk` is the sending socket.
    let (sk, size) = unsafe { ((*ctx.msg).__bindgen_anon_3.sk, (*ctx.msg).size) };
    // SAFETY: `sk` is a full socket; no value, no flags: a lookup only.
    let state = unsafe { bpf_sk_storage_get(state_map(), sk.cast(), ptr::null_mut(), 0) } as *mut FastpathSock;
    if state.is_null() {
        return SK_PASS;
    }
    // SAFETY: a valid pointer into the socket's storage, for the program's run.
    let state = unsafe { &mut *state };
    if state.decision == FASTPATH_PASS {
        counted(|c| c.passed_msgs += 1);
        return SK_PASS;
    }
    let live = match config() {
        Ok(cfg) => cfg.fast_path() && cfg.generation == state.generation,
        Err(_) => false,
    };
    let undecided = state.decision == FASTPATH_UNDECIDED;
    if live {
        // SAFETY: the context pointer is valid for the program's run.
        let m = unsafe { &*ctx.msg };
        let mut peer = SockKey {
            local_addr: m.remote_ip4.to_ne_bytes(),
            remote_addr: m.local_ip4.to_ne_bytes(),
            local_port: remote_port(m.remote_port),
            remote_port: m.local_port as u16,
        };
        match peer_room(&peer) {
            Some(room) if u64::from(size) > room => {
                // The reader is behind by the limit: TCP from here on, whose window makes this
                // sender wait for it.
                state.decision = FASTPATH_PASS;
                counted(|c| {
                    c.backlog_fallbacks += 1;
                    c.passed_msgs += 1;
                });
                return SK_PASS;
            }
            Some(_) if FASTPATH_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 => {
                state.decision = FASTPATH_REDIRECT;
                counted(|c| {
                    c.redirected_msgs += 1;
                    c.redirected_bytes += u64::from(size);
                });
                return SK_PASS;
            }
            _ => {}
        }
    }
    // TCP from here on, for good.
    state.decision = FASTPATH_PASS;
    counted(|c| {
        if undecided {
            c.no_peer += 1;
        } else {
            c.fallbacks += 1;
        }
        c.passed_msgs += 1;
    });
    SK_PASS
}
