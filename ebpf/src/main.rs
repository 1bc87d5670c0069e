//! warden's eBPF programs. Entry points are thin: each reads its context, calls the shared
//! decision path in [`enforce`], counts, and maps the outcome to the hook's return code. Every
//! error becomes a drop (fail closed).
//!
//! | program          | hook                              | sees                                    |
//! |------------------|-----------------------------------|-----------------------------------------|
//! | `warden_from_wl` | TCX ingress of the host-side veth | packets leaving the workload (egress)   |
//! | `warden_to_wl`   | TCX egress of the host-side veth  | packets entering the workload (ingress) |
//! | `warden_connect4`| cgroup/connect4 on the workload   | `connect()`: EPERM at once when denied  |
//! | `warden_sock_out`| cgroup_skb/egress on the workload | data of a denied flow: EPERM for UDP,   |
//! |                  |                                   | dropped in the workload for TCP         |
//! | `warden_sockops` | sock_ops on a meshed workload and | a captured socket's source port; the    |
//! |                  | on the node agent's own cgroup    | fast path's sockets at ESTABLISHED      |
//! | `warden_fastpath`| sk_msg on `warden_fastpath_socks` | a send: to the peer socket, or TCP      |
#![no_std]
#![no_main]

mod capture;
mod enforce;
mod fastpath;
mod maps;
mod packet;
mod socket;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, sk_msg, sock_ops},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};
use warden_common::{
    Config, Direction, DropReason, EVENT_CLOSED, EVENT_DECIDED, EndpointInfo, HOOK_CONNECT, HOOK_TC, HOOK_TUNNEL,
    MARK_MASK, MARK_TO_AGENT, MARK_TUNNEL, PROTO_TCP, PolicyValue, REMOTE_MESHED, SockAddr,
};

use crate::{
    enforce::{
        Cache, Cached, Flow, Outcome, Traffic, cached, config, count, decide_new, emit, endpoint, mark_closed,
        plaintext_view, policy, remote, take_peer_decided,
    },
    maps::CGROUPS,
    packet::{Direct, L3, Loaded, Tuple, parse_ethernet, parse_ipv4, tcp_has_payload},
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
    let (o, t) = connect4(&ctx);
    count(&o, HOOK_CONNECT, &Traffic { inbound: false, bytes: 0, opened: false, closed: false });
    if !o.value.is_allow() {
        emit(EVENT_DECIDED, HOOK_CONNECT, &t, false, &o);
    }
    o.value.is_allow() as i32
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

/// cgroup_skb/egress on the workload's cgroup: 1 sends, 0 drops (a UDP send then fails with
/// EPERM).
#[cgroup_skb(egress)]
pub fn warden_sock_out(ctx: SkBuffContext) -> i32 {
    // Counted by the TC hook that sees the same packet next; counting here would double it.
    sock_out(&ctx).is_allow() as i32
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
        cached(&cfg, &f, Some(ifindex), dir, marked, node, syn)
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
    let o = decide_new(&cfg, &f, ifindex, &ep, dir, is_reply, tunnel, node, Cache::Write);
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

/// A connect() is allowed when the workload may send to the destination and, if the destination
/// is a workload on this node, that workload may receive from it.
#[inline(always)]
fn connect4(ctx: &SockAddrContext) -> (Outcome, Tuple) {
    // SAFETY: the context pointer is valid for the program's run.
    let (user_ip4, user_port, proto) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.protocol as u8)
    };
    // The source port is not chosen yet at connect().
    let mut key = Tuple {
        saddr: [0; 4],
        daddr: user_ip4.to_ne_bytes(),
        sport: 0,
        dport: u16::from_be(user_port as u16),
        proto,
        tcp_flags: 0,
    };
    let cfg = match config() {
        Ok(c) => c,
        Err(r) => return (Outcome::drop(0, Direction::Egress, r), key),
    };
    let slot = cfg.active_slot();
    // SAFETY (both helpers): no pointer arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    let ep = match ifindex_of_cgroup(id, |l| unsafe { bpf_get_current_ancestor_cgroup_id(l) })
        .and_then(|i| endpoint(slot, i))
    {
        Ok(e) => e,
        Err(r) => return (Outcome::drop(0, Direction::Egress, r), key),
    };
    key.saddr = ep.ip;
    let dst = remote(slot, key.daddr);
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
    let captured = proto == PROTO_TCP && cfg.capture_port != 0 && ep.is_meshed() && dst_meshed && key.daddr != ep.ip;
    // Redirect to the agent; a destination that cannot be filed refuses the connect().
    let redirect = || {
        let orig = SockAddr { addr: key.daddr, port: key.dport, _pad: 0 };
        capture::redirect(ctx, &cfg, ep.endpoint_id, orig)
    };
    if captured && !local {
        if redirect() {
            return (egress, key);
        }
        return (Outcome::drop(ep.endpoint_id, Direction::Egress, DropReason::NoState), key);
    }
    if !local {
        return (egress, key);
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
        (egress, key)
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

/// An IPv4 header without options and the first 14 bytes of a TCP header (ports and flags).
const MIN_L3_L4: usize = 20 + 14;

#[inline(always)]
fn sock_out(ctx: &SkBuffContext) -> PolicyValue {
    let cfg = match config() {
        Ok(c) => c,
        Err(r) => return PolicyValue::deny(0, r),
    };
    // cgroup_skb sees the packet from its IPv4 header on. Direct access first (one bounds check
    // instead of a helper call per field); headers outside the linear part need the helper.
    // SAFETY: the context's skb pointer is valid for the program's run.
    let (data, data_end) = unsafe { ((*ctx.skb.skb).data as usize, (*ctx.skb.skb).data_end as usize) };
    // The minimal header is checked as one range first: the verifier then knows every field of
    // it is inside the packet (a one-byte check at offset 0 compiles to a form it cannot use).
    let direct = if data + MIN_L3_L4 <= data_end {
        parse_ipv4(&Direct { data, data_end }, 0)
    } else {
        Err(DropReason::Malformed)
    };
    let direct_ok = direct.is_ok();
    let t = match direct {
        Ok(t) => t,
        Err(DropReason::Malformed) => match parse_ipv4(&Loaded(ctx), 0) {
            Ok(t) => t,
            Err(r) => return PolicyValue::deny(0, r),
        },
        Err(r) => return PolicyValue::deny(0, r),
    };
    // A connection's first packet: `connect()` was decided a moment ago (EPERM when denied), and
    // TC decides the SYN next, and caches it for the packets that follow; deciding it here too
    // would be a third slow path per connection for no new answer.
    if t.is_syn() {
        return PolicyValue::allow(0);
    }
    // What this hook adds to TC is for data: a denied UDP send fails with EPERM, and a denied TCP
    // segment is dropped before it leaves the workload (TCP keeps it queued; `send()` reports
    // nothing). A TCP segment without data (an ACK, a FIN, an RST) is the stack's own, and TC
    // decides it on the workload's veth next whatever this hook answers: deciding it here too
    // would cost a flow-cache lookup for nothing (all but one segment of a short request, every
    // ACK of a bulk receiver).
    if t.proto == PROTO_TCP {
        let len = ctx.len();
        let data = if direct_ok {
            tcp_has_payload(&Direct { data, data_end }, 0, len)
        } else {
            tcp_has_payload(&Loaded(ctx), 0, len)
        };
        match data {
            Ok(true) => {}
            Ok(false) => return PolicyValue::allow(0),
            Err(r) => return PolicyValue::deny(0, r),
        }
    }
    let tp = socket::long_lived(ctx);
    if let Some(v) = tp.and_then(|tp| socket::cached(&cfg, tp, t.daddr, t.dport)) {
        return v;
    }
    let f = Flow::new(t);
    // The decision cached for the end the packet leaves from, by address: finding the workload's
    // veth first (its cgroup, the cgroup map) would cost more than the rest of the hit. For the
    // workload's own address it is the decision of its own veth; a packet forging another
    // address gets that address's decision here, and is dropped as forged on the workload's veth
    // (TC) whatever this hook answers.
    let value = match cached(&cfg, &f, None, Direction::Egress, false, false, false) {
        Cached::Hit(o, _) => o.value,
        Cached::Miss { is_reply, tunnel, .. } => sock_decide(ctx, &cfg, &f, is_reply, tunnel),
    };
    if let Some(tp) = tp {
        socket::remember(tp, &cfg, t.daddr, t.dport, &value);
    }
    value
}

/// `sock_out`'s slow path: the workload of the socket's cgroup decides, without caching.
#[inline(always)]
fn sock_decide(ctx: &SkBuffContext, cfg: &Config, f: &Flow, is_reply: bool, tunnel: bool) -> PolicyValue {
    // The socket's cgroup, not the current task's: retransmits run in softirq context.
    // SAFETY (both helpers): the context's skb pointer is valid for the program's run.
    let id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let anc = |l| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, l) };
    match ifindex_of_cgroup(id, anc).and_then(|i| endpoint(cfg.active_slot(), i).map(|ep| (i, ep))) {
        Ok((ifindex, ep)) => {
            decide_new(cfg, f, ifindex, &ep, Direction::Egress, is_reply, tunnel, false, Cache::ReadOnly).value
        }
        Err(r) => PolicyValue::deny(0, r),
    }
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
