//! The directory source: a workload file and a directory (or file) of Istio resources. Changes
//! are noticed by a fingerprint of paths, sizes and modification times.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{Inputs, Source, SourceError};
use crate::workloads::{self, HostLinks};

pub struct FileSource {
    pub workloads: PathBuf,
    pub policies: PathBuf,
    pub options: warden_authz::Options,
    seen: Vec<(PathBuf, u64, Option<SystemTime>)>,
}

impl FileSource {
    pub fn new(workloads: PathBuf, policies: PathBuf, options: warden_authz::Options) -> FileSource {
        FileSource { workloads, policies, options, seen: Vec::new() }
    }

    fn fingerprint(&self) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
        fn walk(p: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
            match std::fs::metadata(p) {
                Ok(m) if m.is_dir() => {
                    let mut entries: Vec<_> =
                        std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()).collect();
                    entries.sort();
                    for e in entries {
                        walk(&e, out);
                    }
                }
                Ok(m) => out.push((p.to_path_buf(), m.len(), m.modified().ok())),
                Err(_) => out.push((p.to_path_buf(), u64::MAX, None)),
            }
        }
        let mut out = Vec::new();
        walk(&self.workloads, &mut out);
        walk(&self.policies, &mut out);
        out
    }
}

impl Source for FileSource {
    fn changed(&mut self) -> bool {
        self.fingerprint() != self.seen
    }

    fn read(&mut self) -> Result<Inputs, SourceError> {
        // Fingerprint first: a change made while reading is seen by the next poll.
        self.seen = self.fingerprint();
        let workloads::Loaded { workloads, services } = workloads::load(&self.workloads, &HostLinks)?;
        let policies = warden_authz::load_paths_with(&[&self.policies], &self.options)?;
        // Its workloads out of the mesh are workloads (enforced at L4), so they are in `workloads`.
        Ok(Inputs { workloads, services, policies, outside_mesh: Vec::new() })
    }

    fn describe(&self) -> String {
        format!("workloads {} and policies {}", self.workloads.display(), self.policies.display())
    }
}
