//! A meshed client's connections to a Service whose pods are not all in the mesh.
//!
//! The agent carries a captured connection to one of the Service's meshed pods over the mesh;
//! it has no way to reach the others with the client's own address. So `connect4` shares the
//! connections itself, as ztunnel's choice among all of a Service's endpoints would: of every
//! `meshed + plain` connections to a Service port, `meshed` are captured (the agent picks the
//! meshed pod), and each of the others is sent straight to one of the pods out of the mesh,
//! from the client's own socket, in plaintext, as the Service proxy would have sent it
//! (`warden_services_v2`, written by the agent at each commit). The socket keeps the Service as
//! its peer for `getpeername()` ([`crate::capture::send_to`]).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use warden_common::{SERVICE_PLAIN_MAX, ServiceKey, SockAddr};

use crate::maps::SERVICES;

/// For a meshed client's `connect()` to Service port `to`: the pod out of the mesh this
/// connection goes to, or `None` when it goes to the agent (the Service has no such pods on that
/// port, or the draw fell on the meshed ones).
#[inline(always)]
pub fn plain_backend(slot: u8, to: SockAddr) -> Option<SockAddr> {
    let key = ServiceKey { addr: to.addr, port: to.port, slot, _pad: 0 };
    // SAFETY: read through at once; the agent replaces entries only in the inactive slot.
    let split = unsafe { SERVICES.get(key) }?;
    let (meshed, plain) = (split.meshed as u32, split.plain as u32);
    if plain == 0 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let draw = unsafe { bpf_get_prandom_u32() } % (meshed + plain);
    if draw < meshed {
        return None;
    }
    let i = (draw - meshed) as usize;
    // Bounds the index for the verifier too; the agent never writes more.
    if i >= SERVICE_PLAIN_MAX {
        return None;
    }
    Some(split.plain_backends[i])
}
