//! The policy lookup, shared verbatim by the eBPF programs and userspace.
//!
//! The kernel calls [`decide`] with an adapter over the BPF policy map; the policy compiler's
//! differential test calls it with an adapter over the compiled entries. Both therefore run the
//! same algorithm, and a compiler bug cannot hide behind a model that differs from the datapath.
//!
//! # Lookup order (most specific first; the first hit decides)
//! 1. `(remote identity, proto, port)`
//! 2. `(remote identity, any proto, any port)`
//! 3. `(any identity, proto, port)`
//! 4. `(any identity, any proto, any port)`: the endpoint's default for the direction. The compiler
//!    writes it for every endpoint and direction; its absence means no state, and denies.
//!
//! When the agent has flagged the endpoint's direction as default-only
//! ([`crate::EP_INGRESS_DEFAULT_ONLY`]), keys 1-3 cannot exist and [`decide_default`] reads key 4
//! at once: the same answer for one lookup instead of four.
//!
//! # What the compiler must guarantee ("closure")
//! For every query, the first key that exists must hold the true decision. When both a
//! `(R, *)` and a `(*, P)` entry exist, the compiler therefore also writes `(R, P)` with the
//! decision for that combination (for example a DENY on port P for everyone beats an ALLOW
//! for R on every port). Otherwise entry 2 would wrongly shadow entry 3.

use crate::{
    maps::{Direction, IDENTITY_ANY, PROTO_ANY, PolicyKey, PolicyValue},
    reason::DropReason,
};

/// Read access to a policy map (the BPF map in the kernel, a hash map in userspace).
pub trait PolicyLookup {
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue>;
}

/// One connection attempt or packet, from the local endpoint's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub slot: u8,
    pub endpoint_id: u32,
    pub direction: Direction,
    pub remote_identity: u32,
    pub proto: u8,
    pub dport: u16,
    /// Look in the plaintext view (see [`PolicyKey`]).
    pub plaintext: bool,
}

/// Decide a query. Never fails open: a missing default entry yields a deny with
/// [`DropReason::NoState`].
#[inline(always)]
pub fn decide<M: PolicyLookup>(maps: &M, q: &Query) -> PolicyValue {
    let key = |identity: u32, proto: u8, dport: u16| {
        PolicyKey::new(q.slot, q.endpoint_id, q.direction, identity, proto, dport).with_plaintext(q.plaintext)
    };
    if let Some(v) = maps.policy(&key(q.remote_identity, q.proto, q.dport)) {
        return v;
    }
    if let Some(v) = maps.policy(&key(q.remote_identity, PROTO_ANY, 0)) {
        return v;
    }
    if let Some(v) = maps.policy(&key(IDENTITY_ANY, q.proto, q.dport)) {
        return v;
    }
    if let Some(v) = maps.policy(&key(IDENTITY_ANY, PROTO_ANY, 0)) {
        return v;
    }
    PolicyValue::deny(0, DropReason::NoState)
}

/// [`decide`] for an endpoint direction whose only entry is the default `(*, *)` (the endpoint
/// flag says so): one lookup. Fails closed like [`decide`].
#[inline(always)]
pub fn decide_default<M: PolicyLookup>(
    maps: &M,
    slot: u8,
    endpoint_id: u32,
    direction: Direction,
    plaintext: bool,
) -> PolicyValue {
    let key = PolicyKey::new(slot, endpoint_id, direction, IDENTITY_ANY, PROTO_ANY, 0).with_plaintext(plaintext);
    match maps.policy(&key) {
        Some(v) => v,
        None => PolicyValue::deny(0, DropReason::NoState),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::PROTO_TCP;

    struct Entries<'a>(&'a [(PolicyKey, PolicyValue)]);
    impl PolicyLookup for Entries<'_> {
        fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
            self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
        }
    }

    fn q(identity: u32, port: u16) -> Query {
        Query {
            slot: 0,
            endpoint_id: 1,
            direction: Direction::Ingress,
            remote_identity: identity,
            proto: PROTO_TCP,
            dport: port,
            plaintext: false,
        }
    }

    #[test]
    fn most_specific_entry_wins_and_default_applies() {
        let k = |id, proto, port| PolicyKey::new(0, 1, Direction::Ingress, id, proto, port);
        let entries = [
            (k(7, PROTO_TCP, 8443), PolicyValue::allow(10)),
            (k(7, PROTO_ANY, 0), PolicyValue::deny(11, DropReason::PolicyDeny)),
            (k(IDENTITY_ANY, PROTO_TCP, 22), PolicyValue::deny(12, DropReason::PolicyDeny)),
            (k(IDENTITY_ANY, PROTO_ANY, 0), PolicyValue::deny(0, DropReason::PolicyDefaultDeny)),
        ];
        let m = Entries(&entries);
        assert_eq!(decide(&m, &q(7, 8443)), PolicyValue::allow(10));
        assert_eq!(decide(&m, &q(7, 80)).policy_id, 11);
        assert_eq!(decide(&m, &q(8, 22)).policy_id, 12);
        assert_eq!(decide(&m, &q(8, 80)), PolicyValue::deny(0, DropReason::PolicyDefaultDeny));
    }

    #[test]
    fn no_default_entry_fails_closed() {
        let m = Entries(&[]);
        let v = decide(&m, &q(1, 1));
        assert!(!v.is_allow());
        assert_eq!(v.reason, DropReason::NoState as u8);
    }

    #[test]
    fn default_only_lookup_reads_the_default() {
        let k = |id, proto, port| PolicyKey::new(0, 1, Direction::Egress, id, proto, port);
        let entries = [(k(IDENTITY_ANY, PROTO_ANY, 0), PolicyValue::allow(0))];
        let m = Entries(&entries);
        let full = decide(&m, &Query { direction: Direction::Egress, ..q(9, 80) });
        assert_eq!(decide_default(&m, 0, 1, Direction::Egress, false), full);
        let v = decide_default(&Entries(&[]), 0, 1, Direction::Egress, false);
        assert_eq!(v.reason, DropReason::NoState as u8);
    }

    #[test]
    fn plaintext_view_is_a_separate_keyspace() {
        let k = |id, proto, port| PolicyKey::new(0, 1, Direction::Ingress, id, proto, port);
        let entries = [
            (k(IDENTITY_ANY, PROTO_ANY, 0), PolicyValue::allow(0)),
            (k(IDENTITY_ANY, PROTO_ANY, 0).with_plaintext(true), PolicyValue::deny(5, DropReason::PlaintextStrict)),
        ];
        let m = Entries(&entries);
        assert!(decide(&m, &q(3, 80)).is_allow());
        let v = decide(&m, &Query { plaintext: true, ..q(3, 80) });
        assert_eq!(v, PolicyValue::deny(5, DropReason::PlaintextStrict));
    }

    #[test]
    fn other_slot_is_invisible() {
        let entries = [(PolicyKey::new(1, 1, Direction::Ingress, IDENTITY_ANY, PROTO_ANY, 0), PolicyValue::allow(0))];
        let v = decide(&Entries(&entries), &q(1, 1));
        assert_eq!(v.reason, DropReason::NoState as u8);
    }
}
