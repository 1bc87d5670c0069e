//! The ABI between warden's eBPF programs and its userspace agent.
//!
//! Every type that crosses the kernel/user boundary lives here, once: map keys and values
//! (`#[repr(C)]`, explicit padding, no `bool`), the numbered drop reasons, the pinned map names,
//! and [`lookup::decide`], the policy lookup algorithm itself. The kernel runs `decide` against
//! BPF maps; the agent and the policy compiler's differential test run the very same function
//! against in-memory maps, so the userspace model cannot drift from the datapath.
//!
//! # Double-buffered policy state
//! All policy state (identity cache, endpoints, policy entries) is keyed by a *slot* (0 or 1).
//! The agent writes a complete new state into the inactive slot, then flips
//! [`Config::generation`] (whose low bit selects the active slot) with one 4-byte write, then
//! deletes the old slot's entries. A packet therefore sees either the old or the new state, never
//! a mix: a policy change is atomic from the datapath's point of view. The flow cache records the
//! generation a flow was decided under, so every cached flow is re-decided once after a change.
#![no_std]
// The only unsafe code is the `aya::Pod` impls (feature `user`), each justified where it stands.
#![deny(unsafe_code)]

pub mod lookup;
pub mod maps;
pub mod reason;

pub use maps::*;
pub use reason::DropReason;
