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
    /// Workload key -> endpoint id, kept for workloads that come and go.
    pub endpoint_ids: BTreeMap<String, u32>,
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

fn next_free<'a>(used: impl Iterator<Item = &'a u32>) -> u32 {
    used.max().copied().unwrap_or(0).checked_add(1).expect("id space exhausted")
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

    pub fn endpoint_id(&mut self, key: &str) -> u32 {
        if let Some(id) = self.endpoint_ids.get(key) {
            return *id;
        }
        let id = next_free(self.endpoint_ids.values());
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
        let id = next_free(self.policy_ids.values());
        self.policy_ids.insert(key, id);
        id
    }

    fn identity_id(&mut self, canonical: &str) -> u32 {
        if let Some(id) = self.identity_ids.get(canonical) {
            return *id;
        }
        let id = next_free(self.identity_ids.values());
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
    fn a_damaged_record_names_its_file() {
        let dir = std::env::temp_dir().join(format!("warden-record-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(STATE_FILE), "{not json").unwrap();
        let e = NodeRecord::load(&dir).unwrap_err().to_string();
        assert!(e.contains("state.json is not a valid node record"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
