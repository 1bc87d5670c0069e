//! The node record: what the agent last committed, kept in `<state dir>/state.json`.
//!
//! It makes ids stable (a policy, identity or endpoint keeps its number across recompiles and
//! agent restarts, so counters and cached flows stay meaningful) and lets `warden maps` name
//! every number it prints, even while the agent is down. Written atomically (temp + rename).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub id: u32,
    pub veth: String,
    pub ifindex: u32,
    pub ip: String,
    pub identity: u32,
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The generation last committed by this agent.
    pub generation: u32,
    /// `namespace/name` -> policy id.
    pub policy_ids: BTreeMap<String, u32>,
    /// Canonical identity -> numeric identity.
    pub identity_ids: BTreeMap<String, u32>,
    /// Numeric identity -> human name, as of the last commit.
    pub identity_names: BTreeMap<u32, String>,
    /// Policy id -> `namespace/name`, as of the last commit.
    pub policy_names: BTreeMap<u32, String>,
    /// Workload key (`namespace/name`) -> endpoint, for local workloads.
    pub endpoints: BTreeMap<String, EndpointRecord>,
    /// Workload key -> endpoint id, for the workloads attached.
    pub endpoint_ids: BTreeMap<String, u32>,
    /// The highest id ever given, per kind. Ids are never reused: one pruned when its policy,
    /// identity or workload went away cannot come to name something else while a counter or a
    /// cached flow of the old one is still about. (Absent in records of earlier agents: the
    /// highest id in use then.)
    #[serde(default)]
    pub last_ids: LastIds,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastIds {
    pub policy: u32,
    pub identity: u32,
    pub endpoint: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid node record: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The next id of a kind: above every id in use and every id given before (`last`).
fn next_id<'a>(last: &mut u32, used: impl Iterator<Item = &'a u32>) -> u32 {
    let id = used.max().copied().unwrap_or(0).max(*last).checked_add(1).expect("id space exhausted");
    *last = id;
    id
}

impl NodeRecord {
    /// Load the record of `state_dir`, or an empty one on first start.
    pub fn load(state_dir: &Path) -> Result<NodeRecord, RecordError> {
        let path = state_dir.join(STATE_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| RecordError::Parse { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeRecord::default()),
            Err(source) => Err(RecordError::Read { path, source }),
        }
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), RecordError> {
        let path = state_dir.join(STATE_FILE);
        let tmp = state_dir.join(format!(".{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(state_dir)?;
            fs::write(&tmp, serde_json::to_vec_pretty(self).expect("record serializes"))?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| RecordError::Write { path, source })
    }

    /// Records a commit's names and forgets the ids nothing in the kernel can hold any more:
    /// policies and identities in neither this commit nor the previous one (whose entries the
    /// other slot still holds), and endpoints no longer attached. Without it the record grew with
    /// every policy and pod the node ever saw, and was rewritten whole at every commit.
    pub fn committed(&mut self, identity_names: BTreeMap<u32, String>, policy_names: BTreeMap<u32, String>) {
        let keep = |old: &BTreeMap<u32, String>, new: &BTreeMap<u32, String>, id: &u32| {
            old.contains_key(id) || new.contains_key(id)
        };
        self.policy_ids.retain(|_, id| keep(&self.policy_names, &policy_names, id));
        self.identity_ids.retain(|_, id| keep(&self.identity_names, &identity_names, id));
        let attached = &self.endpoints;
        self.endpoint_ids.retain(|key, _| attached.contains_key(key));
        self.identity_names = identity_names;
        self.policy_names = policy_names;
    }

    pub fn endpoint_id(&mut self, key: &str) -> u32 {
        if let Some(id) = self.endpoint_ids.get(key) {
            return *id;
        }
        let id = next_id(&mut self.last_ids.endpoint, self.endpoint_ids.values());
        self.endpoint_ids.insert(key.to_string(), id);
        id
    }
}

impl warden_authz::IdAllocator for NodeRecord {
    fn policy_id(&mut self, namespace: &str, name: &str) -> u32 {
        let key = format!("{namespace}/{name}");
        if let Some(id) = self.policy_ids.get(&key) {
            return *id;
        }
        let id = next_id(&mut self.last_ids.policy, self.policy_ids.values());
        self.policy_ids.insert(key, id);
        id
    }

    fn identity_id(&mut self, canonical: &str) -> u32 {
        if let Some(id) = self.identity_ids.get(canonical) {
            return *id;
        }
        let id = next_id(&mut self.last_ids.identity, self.identity_ids.values());
        assert!(id != u32::MAX, "identity space exhausted");
        self.identity_ids.insert(canonical.to_string(), id);
        id
    }
}

#[cfg(test)]
mod tests {
    use warden_authz::IdAllocator;

    use super::*;

    #[test]
    fn ids_are_stable_across_save_and_load() {
        let dir = std::env::temp_dir().join(format!("warden-record-{}", std::process::id()));
        let mut r = NodeRecord::default();
        let p = r.policy_id("ns", "a");
        let q = r.policy_id("ns", "b");
        let i = r.identity_id("spiffe://cluster.local/ns/ns/sa/x");
        let e = r.endpoint_id("ns/w");
        assert!(p != 0 && q != 0 && p != q && i != 0 && e != 0);
        r.save(&dir).unwrap();
        let mut r2 = NodeRecord::load(&dir).unwrap();
        assert_eq!(r2.policy_id("ns", "b"), q);
        assert_eq!(r2.identity_id("spiffe://cluster.local/ns/ns/sa/x"), i);
        assert_eq!(r2.endpoint_id("ns/w"), e);
        assert!(r2.policy_id("ns", "c") > q);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ids_of_what_went_away_are_pruned_and_never_reused() {
        let mut r = NodeRecord::default();
        let names = |ids: &[(u32, &str)]| ids.iter().map(|(i, n)| (*i, n.to_string())).collect::<BTreeMap<_, _>>();
        let a = r.policy_id("ns", "a");
        let b = r.policy_id("ns", "b");
        let x = r.identity_id("spiffe://cluster.local/ns/ns/sa/x");
        let w = r.endpoint_id("ns/w");
        r.endpoints.insert("ns/w".into(), EndpointRecord { id: w, ..Default::default() });
        r.committed(names(&[(x, "ns/x")]), names(&[(a, "ns/a"), (b, "ns/b")]));
        // b leaves: its id stays one more commit (the other slot still holds its entries).
        r.committed(names(&[(x, "ns/x")]), names(&[(a, "ns/a")]));
        assert!(r.policy_ids.contains_key("ns/b"));
        r.endpoints.clear();
        r.committed(BTreeMap::new(), names(&[(a, "ns/a")]));
        assert_eq!(r.policy_ids.keys().collect::<Vec<_>>(), ["ns/a"]);
        assert!(r.identity_ids.values().any(|i| *i == x), "x was in the previous commit");
        r.committed(BTreeMap::new(), names(&[(a, "ns/a")]));
        assert!(r.identity_ids.is_empty() && r.endpoint_ids.is_empty());
        // New ones never take an old number, even the highest one given.
        assert!(r.policy_id("ns", "c") > b);
        assert!(r.identity_id("spiffe://cluster.local/ns/ns/sa/y") > x);
        assert!(r.endpoint_id("ns/v") > w);
    }

    #[test]
    fn a_record_of_an_earlier_agent_continues_above_its_ids() {
        let mut r: NodeRecord = serde_json::from_str(r#"{"generation": 3, "policy_ids": {"ns/a": 7}, "identity_ids": {}, "identity_names": {}, "policy_names": {}, "endpoints": {}, "endpoint_ids": {}}"#).unwrap();
        assert_eq!(r.policy_id("ns", "b"), 8);
    }

    #[test]
    fn a_damaged_record_names_its_file() {
        let dir = std::env::temp_dir().join(format!("warden-record-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(STATE_FILE), "{not json").unwrap();
        let e = NodeRecord::load(&dir).unwrap_err().to_string();
        assert!(e.contains("state.json is not a valid node record"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
