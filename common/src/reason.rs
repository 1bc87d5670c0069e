//! Numbered drop reasons, shared with userspace. A number is never reused: retire a reason by
//! leaving its number unassigned.

/// Why a packet or a `connect()` was refused. `None` (0) marks an allowed flow in counters.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not dropped.
    None = 0,
    /// A DENY policy matched.
    PolicyDeny = 1,
    /// ALLOW policies select the workload and none of them matched.
    PolicyDefaultDeny = 2,
    /// The packet arrived on an interface, or from a cgroup, that has no endpoint in the active
    /// state (a workload being removed, or a link left behind).
    UnknownEndpoint = 3,
    /// The IPv4/L4 header could not be read.
    Malformed = 4,
    /// Not IPv4 (warden enforces IPv4; other L3 protocols are refused, except ARP).
    UnsupportedL3 = 5,
    /// A non-first IPv4 fragment: it carries no ports, so no policy can be decided.
    Fragment = 6,
    /// The active state had no entry where one must exist (no config, no default entry): the
    /// agent has not committed a state, or a map is damaged. Fail closed.
    NoState = 7,
    /// Plaintext to a workload whose PeerAuthentication is STRICT (the mTLS data plane).
    PlaintextStrict = 8,
    /// A packet leaving a workload with a source address that is not the workload's own: a
    /// forged source would otherwise borrow another workload's identity.
    SourceSpoof = 9,
}

impl DropReason {
    /// Every reason, in number order.
    pub const ALL: [DropReason; 10] = [
        DropReason::None,
        DropReason::PolicyDeny,
        DropReason::PolicyDefaultDeny,
        DropReason::UnknownEndpoint,
        DropReason::Malformed,
        DropReason::UnsupportedL3,
        DropReason::Fragment,
        DropReason::NoState,
        DropReason::PlaintextStrict,
        DropReason::SourceSpoof,
    ];

    pub const fn from_u8(v: u8) -> Option<DropReason> {
        if (v as usize) < Self::ALL.len() { Some(Self::ALL[v as usize]) } else { None }
    }

    /// The stable name shown by `warden maps` and in metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::None => "none",
            DropReason::PolicyDeny => "policy_deny",
            DropReason::PolicyDefaultDeny => "policy_default_deny",
            DropReason::UnknownEndpoint => "unknown_endpoint",
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedL3 => "unsupported_l3",
            DropReason::Fragment => "fragment",
            DropReason::NoState => "no_state",
            DropReason::PlaintextStrict => "plaintext_strict",
            DropReason::SourceSpoof => "source_spoof",
        }
    }
}
