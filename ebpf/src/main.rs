//! warden's eBPF programs. Entry points are thin: each reads its context, calls the shared
//! decision path in [`enforce`], counts, and maps the outcome to the hook's return code. Every
//! error becomes a drop (fail closed).
//!
//! | program               | hook                                | sees                                    |
//! |-----------------------|-------------------------------------|-----------------------------------------|
//! | `warden_from_wl`      | TCX ingress of the host-side veth   | packets leaving the workload (egress)   |
//! | `warden_to_wl`        | TCX egress of the host-side veth    | packets entering the workload (ingress) |
//! | `warden_connect4`     | cgroup/connect4 on the workload     | `connect()`: EPERM at once when denied; |
//! |                       |                                     | a meshed destination: to the agent; a   |
//! |                       |                                     | Service's pods out of the mesh: their   |
//! |                       |                                     | share, straight (`service`)             |
//! | `warden_sendmsg4`     | cgroup/sendmsg4 on the workload     | a UDP send with an address: EPERM at    |
//! |                       |                                     | once when denied                        |
//! | `warden_getpeername4` | cgroup/getpeername4 on the workload | a captured socket's peer: the original  |
//! |                       |                                     | destination, not the agent's listener   |
//! | `warden_connect6`,    | connect6, getpeername6              | the same for a dual-stack socket and a  |
//! | `warden_getpeername6` |                                     | v4-mapped address (`::ffff:a.b.c.d`)    |
//! | `warden_sockops`      | sock_ops on a meshed workload and   | a captured socket's source port; the    |
//! |                       | on the node agent's own cgroup      | fast path's sockets at ESTABLISHED      |
//! | `warden_fastpath`     | sk_msg on `warden_fastpath_socks`   | a send: to the peer socket, or TCP      |
#![no_std]
#![no_main]

mod capture;
mod enforce;
mod fastpath;
mod maps;
mod packet;
mod service;
mod sock_addr;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::{cgroup_sock_addr, classifier, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};
use warden_common::{
    Direction, DropReason, EVENT_CLOSED, EVENT_DECIDED, EndpointInfo, HOOK_CONNECT, HOOK_TC, HOOK_TUNNEL, MARK_MASK,
    MARK_TO_AGENT, MARK_TUNNEL, PROTO_TCP, PolicyValue, REMOTE_MESHED, REMOTE_SERVICE, RemoteInfo, SockAddr,
};

use crate::{
    enforce::{
        Cache, Cached, Flow, FlowEntry, Outcome, Traffic, config, count, decide_new, decide_peer, emit, endpoint,
        mark_closed, plaintext_view, policy, remote, remote_addr, take_peer_decided,
    },
    maps::CGROUPS,
    packet::{Direct, L3, Tuple, parse_ethernet},
    sock_addr::Family,
};

/// TCX ingress on the host-side veth: packets the workload sends.
#[classifier]
pub fn warden_from_wl(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Direction::Egress)
}

/// TCX egress on the host-side veth: packets delivered to the workload.
#[classifier]
pub fn warden_to_wl(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Direction::Ingress)
}

/// cgroup/connect4 on the workload's cgroup: 1 lets `connect()` proceed, 0 fails it with EPERM.
#[cgroup_sock_addr(connect4)]
pub fn warden_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::Inet)
}

/// cgroup/connect6 on the workload's cgroup: a dual-stack socket's `connect()` to a v4-mapped
/// address, decided and captured as connect4 decides an IPv4 one. Native IPv6 is left to TC.
#[cgroup_sock_addr(connect6)]
pub fn warden_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::Inet6)
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(dst) = sock_addr::get(ctx, family) else { return 1 };
    let (o, t) = connect4(ctx, family, dst);
    count(&o, HOOK_CONNECT, &Traffic { inbound: false, bytes: 0, opened: false, closed: false });
    if !o.value.is_allow() {
        emit(EVENT_DECIDED, HOOK_CONNECT, &t, false, &o);
    }
    o.value.is_allow() as i32
}

/// cgroup/getpeername4 on the workload's cgroup: a captured socket's peer is the destination its
/// `connect()` named (the kernel would answer the agent's capture listener). Always 1.
#[cgroup_sock_addr(getpeername4)]
pub fn warden_getpeername4(ctx: SockAddrContext) -> i32 {
    capture::restore_peer(&ctx, Family::Inet);
    1
}

/// cgroup/getpeername6: the same for a dual-stack socket captured through connect6.
#[cgroup_sock_addr(getpeername6)]
pub fn warden_getpeername6(ctx: SockAddrContext) -> i32 {
    capture::restore_peer(&ctx, Family::Inet6);
    1
}

/// sock_ops on a meshed workload's cgroup and on the node agent's: files a captured connection's
/// original destination under its source port, and the same-node fast path's sockets in its sock
/// hash. Always 1 (no opinion on the socket's options).
#[sock_ops]
pub fn warden_sockops(ctx: SockOpsContext) -> u32 {
    capture::on_sock_op(&ctx);
    fastpath::on_sock_op(&ctx);
    1
}

/// sk_msg on the fast path's sock hash: a send of a filed socket goes to its peer socket's receive
/// queue, or over TCP. Always `SK_PASS`: never drops a send.
#[sk_msg]
pub fn warden_fastpath(ctx: SkMsgContext) -> u32 {
    fastpath::on_msg(&ctx)
}

/// cgroup/sendmsg4 on the workload's cgroup: a UDP send with an address (`sendto`, `sendmsg`).
/// 1 sends, 0 fails it with EPERM, as a denied `connect()` fails. A connected UDP socket's sends
/// were decided at its `connect()`; TC decides every datagram on the veth next either way.
///
/// A dual-stack socket's send to a v4-mapped address comes here too: `udpv6_sendmsg` hands it to
/// `udp_sendmsg` as IPv4 before any IPv6 hook runs.
#[cgroup_sock_addr(sendmsg4)]
pub fn warden_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(to) = sock_addr::get(&ctx, Family::Inet) else { return 1 };
    let (o, t) = sendmsg4(&ctx, to);
    // An allowed send is counted by TC, as its datagram crosses the veth; a refused one never
    // becomes a packet, and is counted as a refused `connect()` is.
    if !o.value.is_allow() {
        count(&o, HOOK_CONNECT, &Traffic { inbound: false, bytes: 0, opened: false, closed: false });
        emit(EVENT_DECIDED, HOOK_CONNECT, &t, false, &o);
    }
    o.value.is_allow() as i32
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, dir: Direction) -> i32 {
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (o, traffic) = match tc(ctx, ifindex, dir) {
        Ok(Some(v)) => v,
        Ok(None) => return TC_ACT_OK,
        Err((endpoint_id, reason)) => {
            let t =
                Traffic { inbound: dir == Direction::Ingress, bytes: ctx.len() as u64, opened: false, closed: false };
            (Outcome::drop(endpoint_id, dir, reason), t)
        }
    };
    count(&o, if o.tunnel { HOOK_TUNNEL } else { HOOK_TC }, &traffic);
    if o.value.is_allow() { TC_ACT_OK } else { TC_ACT_SHOT }
}

/// `Ok(None)`: not subject to policy (ARP). `Err`: drop with the endpoint id known so far.
#[inline(always)]
fn tc(ctx: &TcContext, ifindex: u32, dir: Direction) -> Result<Option<(Outcome, Traffic)>, (u32, DropReason)> {
    let cfg = config().map_err(|r| (0, r))?;
    let t = match parse_ethernet(&Direct { data: ctx.data(), data_end: ctx.data_end() }) {
        Ok(L3::Arp) => return Ok(None),
        Ok(L3::Ipv4(t)) => t,
        // Attribute the drop to the endpoint when there is one.
        Err(r) => return Err((endpoint(cfg.active_slot(), ifindex).map_or(0, |e| e.endpoint_id), r)),
    };
    let f = Flow::new(t);
    let syn = t.is_syn();
    let mut traffic =
        Traffic { inbound: dir == Direction::Ingress, bytes: ctx.len() as u64, opened: syn, closed: false };
    // Only the node agent (CAP_NET_ADMIN in the node's namespace) can mark a packet: a
    // workload's marks are cleared as its packets cross into the node.
    // SAFETY: the context's skb pointer is valid for the program's run.
    let marked = dir == Direction::Ingress && unsafe { (*ctx.skb.skb).mark } & MARK_MASK == MARK_TUNNEL;
    // From the node's own stack (kubelet's probes): a packet the node generated was never received
    // on an interface, so its `skb_iif` (`ingress_ifindex`) is 0; one forwarded from a workload's
    // veth or the wire carries that interface. The agent's last hop is local too, but marked.
    // SAFETY: the context's skb pointer is valid for the program's run.
    let node = dir == Direction::Ingress && !marked && unsafe { (*ctx.skb.skb).ingress_ifindex } == 0;
    // A SYN leaving its workload opens a new connection: always decided afresh (a reused 5-tuple
    // starts clean). One entering a workload may find it decided by its sender's veth.
    let cache = if syn && dir == Direction::Egress {
        Cached::Miss { is_reply: false, tunnel: marked, node }
    } else {
        FlowEntry::lookup(&f).decision(&cfg, &f, ifindex, dir, marked, node, syn)
    };
    let (is_reply, tunnel, node) = match cache {
        Cached::Hit(o, end) => {
            // Decided on the sender's veth: logged here, where the old slow path logged it.
            if take_peer_decided(end) && !o.reply {
                emit(EVENT_DECIDED, HOOK_TC, &t, false, &o);
            }
            traffic.closed = t.is_fin_or_rst() && mark_closed(end);
            if traffic.closed {
                emit(EVENT_CLOSED, HOOK_TC, &t, o.reply, &o);
            }
            to_agent(ctx, &o);
            return Ok(Some((o, traffic)));
        }
        Cached::Miss { is_reply, tunnel, node } => (is_reply, tunnel, node),
    };
    let ep = endpoint(cfg.active_slot(), ifindex).map_err(|r| (0, r))?;
    if dir == Direction::Egress && t.saddr != ep.ip {
        return Err((ep.endpoint_id, DropReason::SourceSpoof));
    }
    let from = remote_addr(&f, dir);
    let dst = if tunnel && dir == Direction::Ingress && from == cfg.capture_addr {
        // The agent's delivery of a workload's connection to itself (through a Service) comes
        // from the capture address (the workload's own address would be a martian): its remote
        // is the workload itself. Only the agent can mark a connection.
        RemoteInfo { identity: ep.identity, local_ifindex: 0, flags: 0 }
    } else {
        remote(cfg.active_slot(), from)
    };
    let o = decide_new(&cfg, &f, ifindex, &ep, dir, is_reply, tunnel, node, Cache::Write, &dst);
    if !is_reply {
        emit(EVENT_DECIDED, HOOK_TC, &t, false, &o);
    }
    // The cached end carries the close (see `decide_new`).
    traffic.closed = t.is_fin_or_rst();
    if traffic.closed {
        emit(EVENT_CLOSED, HOOK_TC, &t, o.reply, &o);
    }
    to_agent(ctx, &o);
    Ok(Some((o, traffic)))
}

/// A workload's reply to the agent's delivery of an mTLS connection goes to the original
/// client's address, which is not on this node: mark it for the policy-routing rule that hands
/// it to the agent's transparent socket.
#[inline(always)]
fn to_agent(ctx: &TcContext, o: &Outcome) {
    if o.tunnel && o.reply && o.direction == Direction::Ingress && o.value.is_allow() {
        // SAFETY: the context's skb pointer is valid for the program's run; TC may write `mark`.
        unsafe {
            let skb = &mut *ctx.skb.skb;
            skb.mark = (skb.mark & !MARK_MASK) | MARK_TO_AGENT;
        }
    }
}

/// Deepest cgroup level searched for a workload's cgroup (a pod's containers sit below it).
const MAX_CGROUP_DEPTH: i32 = 12;

/// The host-veth ifindex of the workload owning cgroup `id`, or the nearest ancestor of it that
/// a workload owns. `ancestor(level)` returns the id at `level` (0 past the cgroup's own depth).
#[inline(always)]
fn ifindex_of_cgroup(id: u64, ancestor: impl Fn(i32) -> u64) -> Result<u32, DropReason> {
    // SAFETY: copied out at once.
    if let Some(ifindex) = unsafe { CGROUPS.get(id) }.copied() {
        return Ok(ifindex);
    }
    for level in 1..MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: copied out at once.
        if let Some(ifindex) = unsafe { CGROUPS.get(id) }.copied() {
            return Ok(ifindex);
        }
    }
    Err(DropReason::UnknownEndpoint)
}

/// The workload of the current task's cgroup (the hook runs in the calling process): its host
/// veth and endpoint.
#[inline(always)]
fn current_endpoint(slot: u8) -> Result<(u32, EndpointInfo), DropReason> {
    // SAFETY (both helpers): no pointer arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    let ifindex = ifindex_of_cgroup(id, |l| unsafe { bpf_get_current_ancestor_cgroup_id(l) })?;
    endpoint(slot, ifindex).map(|ep| (ifindex, ep))
}

/// A workload's connection to its own address: the kernel routes it over the workload's loopback,
/// where no hook of the datapath sees its packets, so it is neither decided nor captured, as Istio
/// ambient leaves a pod's loopback alone (and a sidecar's capture does). Deciding it at connect()
/// by the workload's own ingress policy would refuse a STRICT workload's calls to itself.
#[inline(always)]
fn loopback(ep: &EndpointInfo) -> Outcome {
    Outcome {
        endpoint_id: ep.endpoint_id,
        remote_identity: ep.identity,
        direction: Direction::Egress,
        reply: false,
        tunnel: false,
        value: PolicyValue::allow(0),
    }
}

/// A connect() to `to` is allowed when the workload may send to the destination and, if the
/// destination is a workload on this node, that workload may receive from it; a connect() to the
/// workload's own address is allowed ([`loopback`]). A meshed workload's connect() to a Service
/// whose share falls on a pod out of the mesh ([`service`]) is decided as one to that pod.
#[inline(always)]
fn connect4(ctx: &SockAddrContext, family: Family, to: SockAddr) -> (Outcome, Tuple) {
    // SAFETY: the context pointer is valid for the program's run.
    let proto = unsafe { (*ctx.sock_addr).protocol as u8 };
    // The source port is not chosen yet at connect().
    let mut key = Tuple { saddr: [0; 4], daddr: to.addr, sport: 0, dport: to.port, proto, tcp_flags: 0 };
    let cfg = match config() {
        Ok(c) => c,
        Err(r) => return (Outcome::drop(0, Direction::Egress, r), key),
    };
    let slot = cfg.active_slot();
    let ep = match current_endpoint(slot) {
        Ok((_, e)) => e,
        Err(r) => return (Outcome::drop(0, Direction::Egress, r), key),
    };
    key.saddr = ep.ip;
    if key.daddr == ep.ip {
        return (loopback(&ep), key);
    }
    let mut dst = remote(slot, key.daddr);
    // A Service with pods out of the mesh: this connection may be one of theirs (`service`).
    // From here on it is decided as a connection to that pod, and sent there once allowed.
    let mut share = None;
    if proto == PROTO_TCP
        && cfg.captures()
        && ep.is_meshed()
        && dst.flags & REMOTE_SERVICE != 0
        && let Some(pod) = service::plain_backend(slot, to)
    {
        share = Some(pod);
        (key.daddr, key.dport) = (pod.addr, pod.port);
        dst = remote(slot, pod.addr);
    }
    // The share's pod, once its connection is allowed; a record that cannot be written refuses it.
    let send_share = |o: Outcome, key: Tuple| match share {
        Some(pod) if o.value.is_allow() && !capture::send_to(ctx, family, &cfg, ep.endpoint_id, to, pod) => {
            (Outcome::drop(ep.endpoint_id, Direction::Egress, DropReason::NoState), key)
        }
        _ => (o, key),
    };
    let out = policy(slot, &ep, Direction::Egress, dst.identity, proto, key.dport, false);
    let egress = Outcome {
        endpoint_id: ep.endpoint_id,
        remote_identity: dst.identity,
        direction: Direction::Egress,
        reply: false,
        tunnel: false,
        value: out,
    };
    if !out.is_allow() {
        return (egress, key);
    }
    // (No `Option<EndpointInfo>` here: the verifier rejects reading its uninitialised payload.)
    let local = dst.local_ifindex != 0;
    let peer = if local {
        match endpoint(slot, dst.local_ifindex) {
            Ok(p) => p,
            Err(r) => return (Outcome::drop(ep.endpoint_id, Direction::Egress, r), key),
        }
    } else {
        EndpointInfo::default()
    };
    // Mesh to mesh: the node agent carries the connection over mTLS and authorizes it with the
    // proven identity (and the destination's kernel enforces it again on the last hop).
    let dst_meshed = if local { peer.is_meshed() } else { dst.flags & REMOTE_MESHED != 0 };
    let captured = share.is_none() && proto == PROTO_TCP && cfg.captures() && ep.is_meshed() && dst_meshed;
    // Redirect to the agent; a destination that cannot be filed refuses the connect().
    let redirect = || capture::redirect(ctx, family, &cfg, ep.endpoint_id, to);
    if captured && !local {
        if redirect() {
            return (egress, key);
        }
        return (Outcome::drop(ep.endpoint_id, Direction::Egress, DropReason::NoState), key);
    }
    if !local {
        return send_share(egress, key);
    }
    // A local peer's verdict is known here: a denied connect() fails at once with EPERM, also
    // in the mesh (whose agent would refuse it anyway). Through the agent, the peer decides in
    // its authenticated view; otherwise a meshed peer decides in its plaintext view.
    let plaintext = plaintext_view(&peer, Direction::Ingress, proto, captured);
    let value = policy(slot, &peer, Direction::Ingress, ep.identity, proto, key.dport, plaintext);
    if value.is_allow() {
        if captured && !redirect() {
            return (Outcome::drop(ep.endpoint_id, Direction::Egress, DropReason::NoState), key);
        }
        send_share(egress, key)
    } else {
        // Counted against the workload whose policy refused it.
        (
            Outcome {
                endpoint_id: peer.endpoint_id,
                remote_identity: ep.identity,
                direction: Direction::Ingress,
                reply: false,
                tunnel: false,
                value,
            },
            key,
        )
    }
}

/// A UDP send is decided as [`connect4`] decides a `connect()` (the sender's egress, then a
/// local destination's ingress), unless it answers a flow its peer sent: TC has that flow in the
/// cache, and a reply goes through as a reply.
#[inline(always)]
fn sendmsg4(ctx: &SockAddrContext, to: SockAddr) -> (Outcome, Tuple) {
    // SAFETY: the context pointer is valid for the program's run; `sk` is the sending socket,
    // bound by now (`inet_send_prepare` binds a port before the hook runs).
    let (proto, sport) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.protocol as u8, (*sa.__bindgen_anon_1.sk).src_port as u16)
    };
    let mut t = Tuple { saddr: [0; 4], daddr: to.addr, sport, dport: to.port, proto, tcp_flags: 0 };
    let cfg = match config() {
        Ok(c) => c,
        Err(r) => return (Outcome::drop(0, Direction::Egress, r), t),
    };
    let slot = cfg.active_slot();
    let (ifindex, ep) = match current_endpoint(slot) {
        Ok(v) => v,
        Err(r) => return (Outcome::drop(0, Direction::Egress, r), t),
    };
    t.saddr = ep.ip;
    if t.daddr == ep.ip {
        return (loopback(&ep), t);
    }
    let f = Flow::new(t);
    // One lookup for both ends: the sender's, then a local destination's. The destination's
    // identity-cache entry is looked up once too, and only when a step needs it (not for a reply
    // the cache already allowed).
    let entry = FlowEntry::lookup(&f);
    let (own, dst) = match entry.decision(&cfg, &f, ifindex, Direction::Egress, false, false, false) {
        Cached::Hit(o, _) if o.reply || !o.value.is_allow() => return (o, t),
        Cached::Hit(o, _) => (o, remote(slot, t.daddr)),
        Cached::Miss { is_reply, tunnel, .. } => {
            let dst = remote(slot, t.daddr);
            let o =
                decide_new(&cfg, &f, ifindex, &ep, Direction::Egress, is_reply, tunnel, false, Cache::ReadOnly, &dst);
            (o, dst)
        }
    };
    if own.reply || !own.value.is_allow() {
        return (own, t);
    }
    // A datagram the sender may send must also be one a workload of this node may receive.
    if dst.local_ifindex == 0 {
        return (own, t);
    }
    let peer = match entry.decision(&cfg, &f, dst.local_ifindex, Direction::Ingress, false, false, false) {
        Cached::Hit(o, _) => o,
        Cached::Miss { .. } => match endpoint(slot, dst.local_ifindex) {
            Ok(peer) => decide_peer(slot, &f, &ep, &peer, false),
            // An unknown peer: its own hook drops the datagram.
            Err(_) => return (own, t),
        },
    };
    if peer.value.is_allow() { (own, t) } else { (peer, t) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // A reachable panic loops forever, which the verifier rejects: it can never ship.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
