//! The directory source: a workload file and a directory (or file) of Istio resources. Changes
//! are noticed by a fingerprint of the files the policy loader looks at (its own walk,
//! [`warden_authz::policy_inputs`]) and the identity, size and modification time of what they
//! resolve to.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{Inputs, Source, SourceError};
use crate::workloads::{self, HostLinks};

pub struct FileSource {
    pub workloads: PathBuf,
    pub policies: PathBuf,
    pub options: warden_authz::Options,
    seen: Vec<Stamp>,
}

/// A file as the change check sees it: its path and, symlinks followed, the (device, inode,
/// size, modification time) of what it resolves to, `None` when unreadable. The inode tells a
/// ConfigMap update: the kubelet swaps `..data`, so a top-level link resolves to a new file.
#[derive(Debug, PartialEq)]
struct Stamp {
    path: PathBuf,
    target: Option<(u64, u64, u64, Option<SystemTime>)>,
}

impl Stamp {
    fn of(path: &Path) -> Stamp {
        let target = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino(), m.len(), m.modified().ok()));
        Stamp { path: path.to_path_buf(), target }
    }
}

impl FileSource {
    pub fn new(workloads: PathBuf, policies: PathBuf, options: warden_authz::Options) -> FileSource {
        FileSource { workloads, policies, options, seen: Vec::new() }
    }

    /// The workload file and every file the policy loader reads or skips, as the loader walks
    /// the directory (symlinks followed, each directory once, hidden entries skipped).
    fn fingerprint(&self) -> Vec<Stamp> {
        let policies = warden_authz::policy_inputs(std::slice::from_ref(&self.policies));
        std::iter::once(&self.workloads).chain(&policies).map(|p| Stamp::of(p)).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh directory with `workloads.yaml` and `policies/`; the source reading them.
    fn source(tag: &str) -> (PathBuf, FileSource) {
        let dir = std::env::temp_dir().join(format!("warden-fingerprint-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("workloads.yaml"), "workloads: []\n").unwrap();
        let source = FileSource::new(dir.join("workloads.yaml"), dir.join("policies"), Default::default());
        (dir, source)
    }

    fn paths(stamps: &[Stamp]) -> Vec<&Path> {
        stamps.iter().map(|s| s.path.as_path()).collect()
    }

    #[test]
    fn symlink_loops_are_entered_once() {
        let (dir, source) = source("loop");
        let policies = dir.join("policies");
        std::fs::write(policies.join("a.yaml"), "a").unwrap();
        for name in ["self", "s1", "s2"] {
            symlink(".", policies.join(name)).unwrap();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(source.fingerprint()));
        let stamps = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the walk did not finish");
        assert_eq!(paths(&stamps), [dir.join("workloads.yaml"), policies.join("a.yaml")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_configmap_update_is_seen_through_the_top_level_links() {
        let (dir, source) = source("configmap");
        let policies = dir.join("policies");
        // The kubelet's update: a new timestamped directory, then `..data` swapped to it atomically.
        let publish = |stamp: &str, text: &str| {
            std::fs::create_dir(policies.join(stamp)).unwrap();
            std::fs::write(policies.join(stamp).join("a.yaml"), text).unwrap();
            symlink(stamp, policies.join("..data_tmp")).unwrap();
            std::fs::rename(policies.join("..data_tmp"), policies.join("..data")).unwrap();
        };
        publish("..2026_01_01_00_00_00.1", "first");
        symlink("..data/a.yaml", policies.join("a.yaml")).unwrap();
        let before = source.fingerprint();
        assert_eq!(paths(&before), [dir.join("workloads.yaml"), policies.join("a.yaml")]);

        // Same size and modification time: only the file the link resolves to differs.
        let old = std::fs::metadata(policies.join("a.yaml")).unwrap().modified().unwrap();
        publish("..2026_01_01_00_01_00.2", "secnd");
        std::fs::File::options().write(true).open(policies.join("a.yaml")).unwrap().set_modified(old).unwrap();
        let after = source.fingerprint();
        assert_eq!(paths(&after), paths(&before));
        assert_ne!(after, before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
