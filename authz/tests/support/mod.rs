//! Shared test helpers: an id allocator, a userspace model of the identity cache (LPM) and an
//! adapter that runs the datapath's own `lookup::decide` over compiled entries.
#![allow(dead_code)]

use ipnet::Ipv4Net;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use warden_authz::{Compiled, IdAllocator, Workload};
use warden_common::lookup::{PolicyLookup, Query, decide};
use warden_common::{Direction, IDENTITY_WORLD, PolicyKey, PolicyValue};

#[derive(Default)]
pub struct Ids {
    pub policies: HashMap<(String, String), u32>,
    pub identities: HashMap<String, u32>,
    next_policy: u32,
    next_identity: u32,
}

impl IdAllocator for Ids {
    fn policy_id(&mut self, namespace: &str, name: &str) -> u32 {
        let n = &mut self.next_policy;
        *self.policies.entry((namespace.to_string(), name.to_string())).or_insert_with(|| {
            *n += 1;
            *n
        })
    }
    fn identity_id(&mut self, canonical: &str) -> u32 {
        let n = &mut self.next_identity;
        *self.identities.entry(canonical.to_string()).or_insert_with(|| {
            *n += 1;
            // Spread ids out so tests do not depend on small numbers.
            *n * 7 + 100
        })
    }
}

pub struct Maps {
    pub entries: HashMap<PolicyKey, PolicyValue>,
    pub ipcache: Vec<(Ipv4Net, u32)>,
}

impl Maps {
    pub fn new(c: &Compiled) -> Maps {
        let mut entries = HashMap::new();
        for (k, v) in &c.policy {
            assert_eq!(k.slot(), 0, "compiled keys carry slot 0");
            assert!(entries.insert(*k, *v).is_none(), "duplicate key {k:?}");
        }
        Maps { entries, ipcache: c.ipcache.clone() }
    }
    /// Longest-prefix match, as the kernel's LPM trie does.
    pub fn identity(&self, a: Ipv4Addr) -> u32 {
        self.ipcache
            .iter()
            .filter(|(n, _)| n.contains(&a))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(IDENTITY_WORLD)
    }
    /// Ingress in the authenticated view (every endpoint has it).
    pub fn decide(&self, endpoint_id: u32, src: Ipv4Addr, proto: u8, port: u16) -> PolicyValue {
        self.decide_view(false, endpoint_id, src, proto, port)
    }
    /// Ingress in the plaintext view (a meshed endpoint's connections that did not come through
    /// the node agent).
    pub fn decide_plaintext(&self, endpoint_id: u32, src: Ipv4Addr, proto: u8, port: u16) -> PolicyValue {
        self.decide_view(true, endpoint_id, src, proto, port)
    }
    pub fn decide_view(&self, plaintext: bool, endpoint_id: u32, src: Ipv4Addr, proto: u8, port: u16) -> PolicyValue {
        let q = Query {
            slot: 0,
            endpoint_id,
            direction: Direction::Ingress,
            remote_identity: self.identity(src),
            proto,
            dport: port,
            plaintext,
        };
        decide(self, &q)
    }
    /// The entries of one endpoint's ingress in one view.
    pub fn view_entries(&self, endpoint_id: u32, plaintext: bool) -> Vec<(PolicyKey, PolicyValue)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter(|(k, _)| {
                k.endpoint_id == endpoint_id
                    && k.direction() == Some(Direction::Ingress)
                    && k.is_plaintext() == plaintext
            })
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

impl PolicyLookup for Maps {
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        self.entries.get(key).copied()
    }
}

pub fn workload(ns: &str, name: &str, sa: &str, labels: &[(&str, &str)], ip: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        ip: ip.parse().unwrap(),
        services: Vec::new(),
    }
}
