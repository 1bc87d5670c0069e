//! Numbered drop (and allow) reasons, shared with userspace. A number is never reused: retire a
//! reason by leaving its number unassigned.

/// Why a packet or a `connect()` was refused. `None` (0) marks a flow the policy allowed in
/// counters; [`DropReason::NodeLocal`] marks one allowed without policy (an exemption).
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
    /// Not a drop: an allow without policy. A TCP connection from the node's own network stack
    /// (kubelet's probes, any hostNetwork process) to a workload of the node, while the agent
    /// exempts them (`warden agent --node-probes allow`, `CONFIG_NODE_EXEMPT`). Counted so the
    /// exemption is visible, never hidden in the policy's allows.
    NodeLocal = 10,
}

impl DropReason {
    /// Every reason, in number order.
    pub const ALL: [DropReason; 11] = [
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
        DropReason::NodeLocal,
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
            DropReason::NodeLocal => "node_local",
        }
    }

    /// Whether the reason marks an allowed flow (no reason, or an exemption) rather than a drop.
    pub const fn is_allow(self) -> bool {
        matches!(self, DropReason::None | DropReason::NodeLocal)
    }
}

#[cfg(test)]
mod tests {
    use super::DropReason;

    #[test]
    fn every_reason_is_at_its_number_and_named_once() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} is out of order", r.name());
            assert_eq!(DropReason::from_u8(i as u8), Some(*r));
        }
        for a in DropReason::ALL {
            let same = DropReason::ALL.iter().filter(|b| b.name() == a.name()).count();
            assert_eq!(same, 1, "{} names two reasons", a.name());
        }
        assert_eq!(DropReason::from_u8(DropReason::ALL.len() as u8), None);
        assert!(DropReason::NodeLocal.is_allow() && DropReason::None.is_allow());
        assert!(!DropReason::PlaintextStrict.is_allow());
    }
}
