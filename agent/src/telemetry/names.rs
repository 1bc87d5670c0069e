//! Names for telemetry: the kernel's numbers (endpoint ids, numeric identities, policy ids) in
//! Istio's terms (workload, namespace, SPIFFE principal) and policy names, through the node
//! record. The record is re-read when the agent rewrites it, so the metrics server and the
//! access log always name things as of the last commit, and `warden maps` agrees with them.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use warden_common::{IDENTITY_WORLD, POLICY_ID_NONE};

use crate::record::{NodeRecord, STATE_FILE};

/// Istio's value for anything the reporter cannot name (the outside world, a CIDR, a workload
/// on another node).
pub const UNKNOWN: &str = "unknown";
/// `policy` label of a denial no policy made: ALLOW policies select the workload and none of
/// them matched (or no state). Cannot collide with a policy name, which is `namespace/name`.
pub const DEFAULT_DENY: &str = "default-deny";

/// One side of a flow, as Istio's `source_*`/`destination_*` labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, or [`UNKNOWN`].
    pub principal: String,
}

impl Peer {
    pub fn unknown() -> Peer {
        Peer { workload: UNKNOWN.into(), namespace: UNKNOWN.into(), principal: UNKNOWN.into() }
    }
}

/// The principal and namespace of a canonical identity from the node record
/// (`spiffe://td/ns/N/sa/S`, optionally followed by `|cidr:...`); `None` for CIDR identities.
fn principal_of(canonical: &str) -> Option<(String, String)> {
    let principal = canonical.split('|').next()?;
    let path = principal.strip_prefix("spiffe://")?;
    let (_trust_domain, rest) = path.split_once('/')?;
    let mut segs = rest.split('/');
    match (segs.next(), segs.next(), segs.next(), segs.next(), segs.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(_sa), None) if !ns.is_empty() => {
            Some((principal.to_string(), ns.to_string()))
        }
        _ => None,
    }
}

/// A snapshot of every name the telemetry needs.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// endpoint id -> (the local workload, its address).
    endpoints: HashMap<u32, (Peer, Option<Ipv4Addr>)>,
    /// numeric identity -> how a peer with that identity is named.
    identities: HashMap<u32, Peer>,
    policies: BTreeMap<u32, String>,
}

impl Names {
    pub fn from_record(r: &NodeRecord) -> Names {
        let mut identities: HashMap<u32, Peer> = HashMap::new();
        for (canonical, id) in &r.identity_ids {
            if let Some((principal, namespace)) = principal_of(canonical) {
                identities.insert(*id, Peer { workload: UNKNOWN.into(), namespace, principal });
            }
        }
        // A remote identity is named after a workload only when exactly one local workload has
        // it (identities are per service account, and several workloads may share one).
        let mut holders: HashMap<u32, Vec<&str>> = HashMap::new();
        for (key, e) in &r.endpoints {
            holders.entry(e.identity).or_default().push(key);
        }
        for (id, keys) in &holders {
            if let ([key], Some(p)) = (keys.as_slice(), identities.get_mut(id)) {
                p.workload = key.split_once('/').map_or(*key, |(_, n)| n).to_string();
            }
        }
        let mut endpoints = HashMap::new();
        for (key, id) in &r.endpoint_ids {
            let (namespace, workload) = key.split_once('/').unwrap_or((UNKNOWN, key));
            let current = r.endpoints.get(key);
            let principal = current
                .and_then(|e| identities.get(&e.identity))
                .map_or_else(|| UNKNOWN.to_string(), |p| p.principal.clone());
            let ip = current.and_then(|e| e.ip.parse().ok());
            endpoints.insert(*id, (Peer { workload: workload.into(), namespace: namespace.into(), principal }, ip));
        }
        Names { endpoints, identities, policies: r.policy_names.clone() }
    }

    /// The local workload of `endpoint_id`.
    pub fn local(&self, endpoint_id: u32) -> Peer {
        self.endpoints.get(&endpoint_id).map_or_else(Peer::unknown, |(p, _)| p.clone())
    }

    /// The local workload's address, when it is still on the node.
    pub fn local_ip(&self, endpoint_id: u32) -> Option<Ipv4Addr> {
        self.endpoints.get(&endpoint_id).and_then(|(_, ip)| *ip)
    }

    /// A remote peer by numeric identity (the world and CIDRs are [`Peer::unknown`]).
    pub fn remote(&self, identity: u32) -> Peer {
        if identity == IDENTITY_WORLD {
            return Peer::unknown();
        }
        self.identities.get(&identity).cloned().unwrap_or_else(Peer::unknown)
    }

    /// `namespace/name` of a policy, [`DEFAULT_DENY`] for no policy.
    pub fn policy(&self, id: u32) -> String {
        if id == POLICY_ID_NONE {
            return DEFAULT_DENY.into();
        }
        self.policies.get(&id).cloned().unwrap_or_else(|| format!("policy-{id}"))
    }
}

/// When and which file (mtime, inode) the cached names were read from.
type Stamp = Option<(SystemTime, u64)>;

/// [`Names`] of the record in a state directory, reloaded when the agent replaces the file.
pub struct RecordNames {
    path: PathBuf,
    state_dir: PathBuf,
    cached: Mutex<(Stamp, Arc<Names>)>,
}

impl RecordNames {
    pub fn new(state_dir: &Path) -> RecordNames {
        RecordNames {
            path: state_dir.join(STATE_FILE),
            state_dir: state_dir.into(),
            cached: Mutex::new((None, Arc::default())),
        }
    }

    /// The names as of the record on disk now. A record that cannot be read keeps the last
    /// names (and says so once per change).
    pub fn get(&self) -> Arc<Names> {
        use std::os::unix::fs::MetadataExt;
        let stamp = std::fs::metadata(&self.path).ok().and_then(|m| Some((m.modified().ok()?, m.ino())));
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if stamp.is_some() && stamp != c.0 {
            match NodeRecord::load(&self.state_dir) {
                Ok(r) => *c = (stamp, Arc::new(Names::from_record(&r))),
                Err(e) => {
                    tracing::warn!("telemetry keeps the previous names: {e}");
                    c.0 = stamp;
                }
            }
        }
        c.1.clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::EndpointRecord;

    /// A node with local workloads team/a (sa a), team/b (sa b), and two workloads sharing sa
    /// `shared`; identity 9 is a CIDR; policy 1 is team/b-access.
    pub fn record() -> NodeRecord {
        let mut r = NodeRecord::default();
        let td = "spiffe://cluster.local";
        r.identity_ids.insert("cidr:192.0.2.0/24".into(), 9);
        for (i, sa) in [(2, "a"), (3, "b"), (4, "shared")] {
            r.identity_ids.insert(format!("{td}/ns/team/sa/{sa}"), i);
        }
        r.identity_ids.insert(format!("{td}/ns/far/sa/x|cidr:10.9.0.0/16"), 5);
        r.policy_names.insert(1, "team/b-access".into());
        for (id, name, identity) in [(1, "a", 2), (2, "b", 3), (3, "s1", 4), (4, "s2", 4)] {
            let key = format!("team/{name}");
            r.endpoint_ids.insert(key.clone(), id);
            r.endpoints
                .insert(key, EndpointRecord { id, identity, ip: format!("10.66.0.{}", id + 1), ..Default::default() });
        }
        r.endpoint_ids.insert("gone/old".into(), 7);
        r
    }

    #[test]
    fn peers_are_named_like_istio() {
        let n = Names::from_record(&record());
        assert_eq!(
            n.local(1),
            Peer {
                workload: "a".into(),
                namespace: "team".into(),
                principal: "spiffe://cluster.local/ns/team/sa/a".into()
            }
        );
        assert_eq!(n.local_ip(2), Some(Ipv4Addr::new(10, 66, 0, 3)));
        // A removed workload keeps its name; its principal is no longer known.
        assert_eq!(
            (n.local(7).workload.as_str(), n.local(7).namespace.as_str(), n.local(7).principal.as_str()),
            ("old", "gone", UNKNOWN)
        );
        assert_eq!(n.local(99), Peer::unknown());
        assert_eq!(n.remote(3).workload, "b");
        // Two workloads share the identity: the workload is not guessed, the principal is known.
        assert_eq!(
            n.remote(4),
            Peer {
                workload: UNKNOWN.into(),
                namespace: "team".into(),
                principal: "spiffe://cluster.local/ns/team/sa/shared".into()
            }
        );
        // A workload identity narrowed by a CIDR keeps its principal.
        assert_eq!(n.remote(5).principal, "spiffe://cluster.local/ns/far/sa/x");
        assert_eq!(n.remote(5).namespace, "far");
        assert_eq!(n.remote(9), Peer::unknown());
        assert_eq!(n.remote(IDENTITY_WORLD), Peer::unknown());
        assert_eq!(n.policy(1), "team/b-access");
        assert_eq!(n.policy(POLICY_ID_NONE), DEFAULT_DENY);
    }

    #[test]
    fn the_record_is_reloaded_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("warden-names-{}", std::process::id()));
        let names = RecordNames::new(&dir);
        assert_eq!(names.get().local(1), Peer::unknown(), "no record yet");
        let mut r = record();
        r.save(&dir).unwrap();
        assert_eq!(names.get().local(1).workload, "a");
        r.endpoint_ids.insert("team/z".into(), 1);
        r.endpoint_ids.remove("team/a");
        r.save(&dir).unwrap();
        assert_eq!(names.get().local(1).workload, "z");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
