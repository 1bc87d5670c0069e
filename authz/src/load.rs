//! Loading: files and directories of multi-document YAML -> validated resources. All or nothing.

use crate::error::{LoadError, LoadErrors};
use crate::model::Resource;
use crate::set::{Options, PolicySet};
use crate::validate::{self, Ctx};
use serde::Deserialize;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Resources of one YAML text, with the validator's warnings.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    pub resources: Vec<Resource>,
    pub warnings: Vec<String>,
}

/// Parses and validates every document of `yaml`; `origin` names it in messages.
pub fn parse_str(yaml: &str, origin: &str) -> Result<Vec<Resource>, LoadErrors> {
    parse_str_with_warnings(yaml, origin).map(|p| p.resources)
}

/// As [`parse_str`], keeping the warnings.
pub fn parse_str_with_warnings(yaml: &str, origin: &str) -> Result<Parsed, LoadErrors> {
    let mut out = Parsed::default();
    let mut errors = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let document = i + 1;
        // Merge keys (`<<: *defaults`) are resolved as kubectl resolves them.
        let value = match serde_yaml::Value::deserialize(de).and_then(|mut v| v.apply_merge().map(|()| v)) {
            Ok(v) => v,
            Err(e) => {
                errors.push(LoadError {
                    origin: origin.to_string(),
                    document: Some(document),
                    resource: None,
                    field: String::new(),
                    reason: format!("invalid YAML: {e}"),
                });
                break;
            }
        };
        let mut ctx = Ctx::new(origin, document);
        let r = validate::document(&mut ctx, value);
        if ctx.errors.is_empty() {
            out.warnings.extend(ctx.warnings);
            out.resources.extend(r);
        } else {
            errors.extend(ctx.errors);
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(LoadErrors(errors)) }
}

/// What a walk of the named paths found: the policy files to read, errors and warnings.
#[derive(Default)]
struct Walk {
    files: Vec<PathBuf>,
    /// Entries skipped with a warning (not `*.yaml`/`*.yml`).
    skipped: Vec<PathBuf>,
    errors: Vec<LoadError>,
    warnings: Vec<String>,
    /// (device, inode) of each directory entered and file taken: symlinks are followed, but a
    /// directory or file reached again (a loop, a second link) is not read twice.
    seen: HashSet<(u64, u64)>,
}

/// Collects `path`, following symlinks: a regular file whatever its name (a path the user names
/// is read even if hidden), or a directory whose entries go through [`collect_entry`].
fn collect_files(path: &Path, walk: &mut Walk) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return walk.errors.push(file_error(path, format!("cannot read: {e}"))),
    };
    if !walk.seen.insert((meta.dev(), meta.ino())) {
        return; // reached before, through another link
    }
    if meta.is_dir() {
        collect_dir(path, walk);
    } else if meta.is_file() {
        walk.files.push(path.to_path_buf());
    } else {
        walk.errors.push(file_error(path, "not a regular file or directory".into()));
    }
}

/// Collects the entries of the directory `path`, in name order.
fn collect_dir(path: &Path, walk: &mut Walk) {
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) => return walk.errors.push(file_error(path, format!("cannot list directory: {e}"))),
    };
    let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    children.sort();
    for c in children {
        collect_entry(&c, walk);
    }
}

/// An entry of a walked directory. Hidden entries are skipped silently, as kubectl and Istio
/// do: a ConfigMap volume's `..data` and timestamped directories hold the files its top-level
/// links point to. Other files than `*.yaml`/`*.yml` are skipped with a warning.
fn collect_entry(path: &Path, walk: &mut Walk) {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    if name.starts_with('.') {
        return;
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    if !matches!(ext.as_deref(), Some("yaml" | "yml")) && !path.is_dir() {
        walk.skipped.push(path.to_path_buf());
        return walk.warnings.push(format!("warning: {}: skipped: not a .yaml or .yml file", path.display()));
    }
    collect_files(path, walk);
}

fn file_error(path: &Path, reason: String) -> LoadError {
    LoadError { origin: path.display().to_string(), document: None, resource: None, field: String::new(), reason }
}

/// Every path the loader looks at under `paths`, by the same walk as [`load_paths_with`]: the
/// files it reads and those it skips with a warning, in walk order. A change to any of them (or
/// to this list) is a change to what loading gives; the agent's change check stamps them.
pub fn policy_inputs(paths: &[impl AsRef<Path>]) -> Vec<PathBuf> {
    let mut walk = Walk::default();
    for p in paths {
        collect_files(p.as_ref(), &mut walk);
    }
    let mut inputs = walk.files;
    inputs.extend(walk.skipped);
    inputs
}

/// Reads every resource under `paths` (files, or directories searched recursively for
/// `*.yaml`/`*.yml`, any case, skipping hidden entries) with the given options.
pub fn load_paths_with(paths: &[impl AsRef<Path>], options: &Options) -> Result<PolicySet, LoadErrors> {
    let mut walk = Walk::default();
    for p in paths {
        collect_files(p.as_ref(), &mut walk);
    }
    let Walk { files, mut errors, mut warnings, .. } = walk;
    let mut resources = Vec::new();
    for f in &files {
        let origin = f.display().to_string();
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                errors.push(LoadError {
                    origin,
                    document: None,
                    resource: None,
                    field: String::new(),
                    reason: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse_str_with_warnings(&text, &origin) {
            Ok(p) => {
                resources.extend(p.resources);
                warnings.extend(p.warnings);
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    let mut set = PolicySet::from_resources(resources, options)?;
    set.add_warnings(warnings);
    Ok(set)
}

/// [`load_paths_with`] with default [`Options`] (root namespace `istio-system`, UTC).
pub fn load_paths(paths: &[impl AsRef<Path>]) -> Result<PolicySet, LoadErrors> {
    load_paths_with(paths, &Options::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: NAME, namespace: ns}\nspec: {}\n";

    /// A fresh directory holding `NAME.yaml` files, each an AuthorizationPolicy named NAME.
    fn dir_with(tag: &str, names: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warden-load-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            std::fs::write(dir.join(format!("{n}.yaml")), POLICY.replace("NAME", n)).unwrap();
        }
        dir
    }

    /// Loads `paths` on a thread, failing the test instead of hanging if the walk never ends.
    fn load(paths: &[PathBuf]) -> Result<PolicySet, LoadErrors> {
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = paths.to_vec();
        std::thread::spawn(move || {
            let _ = tx.send(load_paths(&paths));
        });
        rx.recv_timeout(Duration::from_secs(20)).expect("the walk did not finish")
    }

    fn names(set: &PolicySet) -> Vec<&str> {
        set.authorization_policies().iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn symlink_loops_end_and_each_file_is_read_once() {
        let dir = dir_with("loop", &["a"]);
        symlink(".", dir.join("self")).unwrap();
        symlink(".", dir.join("s1")).unwrap();
        symlink(".", dir.join("s2")).unwrap();
        symlink("a.yaml", dir.join("again.yaml")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        symlink("..", dir.join("sub/up")).unwrap();
        let set = load(&[dir.clone(), dir.join("a.yaml")]).unwrap();
        assert_eq!(names(&set), ["a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_configmap_volume_loads_each_policy_once_across_an_update() {
        // The kubelet's layout: DIR/..TIMESTAMP/a.yaml, DIR/..data -> ..TIMESTAMP, DIR/a.yaml -> ..data/a.yaml.
        let dir = dir_with("configmap", &[]);
        let publish = |stamp: &str, name: &str| {
            std::fs::create_dir(dir.join(stamp)).unwrap();
            std::fs::write(dir.join(stamp).join("a.yaml"), POLICY.replace("NAME", name)).unwrap();
            symlink(stamp, dir.join("..data_tmp")).unwrap();
            std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        };
        publish("..2026_01_01_00_00_00.1", "first");
        symlink("..data/a.yaml", dir.join("a.yaml")).unwrap();
        assert_eq!(names(&load(std::slice::from_ref(&dir)).unwrap()), ["first"]);
        publish("..2026_01_01_00_01_00.2", "second");
        std::fs::remove_dir_all(dir.join("..2026_01_01_00_00_00.1")).unwrap();
        assert_eq!(names(&load(std::slice::from_ref(&dir)).unwrap()), ["second"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hidden_entries_are_skipped_unless_named() {
        let dir = dir_with("hidden", &["a"]);
        std::fs::write(dir.join(".a.yaml.swp"), "not yaml: [").unwrap();
        std::fs::create_dir(dir.join(".git")).unwrap();
        std::fs::write(dir.join(".git/b.yaml"), POLICY.replace("NAME", "b")).unwrap();
        let set = load(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(names(&set), ["a"]);
        assert!(set.warnings().is_empty(), "{:?}", set.warnings());
        assert_eq!(names(&load(&[dir.join(".git")]).unwrap()), ["b"]);
        let e = load(&[dir.join(".a.yaml.swp")]).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{}: document 1: invalid YAML", dir.join(".a.yaml.swp").display())));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_is_an_error_naming_it_not_a_hang() {
        let dir = dir_with("fifo", &["a"]);
        let fifo = dir.join("p.yaml");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = load(std::slice::from_ref(&dir)).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: not a regular file or directory", fifo.display()));
        let e = load(&[fifo]).unwrap_err();
        assert!(e.to_string().ends_with("p.yaml: not a regular file or directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn yaml_merge_keys_are_resolved() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: ns}\nspec:\n  rules:\n  - &base {to: [{operation: {ports: [\"80\"]}}]}\n  - <<: *base\n    from: [{source: {namespaces: [x]}}]\n";
        let r = parse_str(yaml, "m.yaml").unwrap_or_else(|e| panic!("{e}"));
        let crate::model::Resource::AuthorizationPolicy(p) = &r[0] else { panic!("{r:?}") };
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[1].to, p.rules[0].to);
        assert_eq!(p.rules[1].from.len(), 1);
        let e = parse_str("a: &x 1\nb: {<<: *x}\n", "m.yaml").unwrap_err();
        assert!(e.to_string().starts_with("m.yaml: document 1: invalid YAML: "), "{e}");
    }

    #[test]
    fn a_named_path_neither_file_nor_directory_says_so() {
        let e = load(&["/dev/null".into()]).unwrap_err();
        assert_eq!(e.to_string(), "/dev/null: not a regular file or directory");
    }

    #[test]
    fn extensions_are_matched_in_any_case_and_other_files_warned_about() {
        let dir = dir_with("ext", &["a"]);
        std::fs::write(dir.join("d.YAML"), POLICY.replace("NAME", "d")).unwrap();
        std::fs::write(dir.join("e.Yml"), POLICY.replace("NAME", "e")).unwrap();
        std::fs::write(dir.join("c.json"), "{}").unwrap();
        let set = load(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(names(&set), ["a", "d", "e"]);
        let skipped = format!("warning: {}: skipped: not a .yaml or .yml file", dir.join("c.json").display());
        assert_eq!(set.warnings(), [skipped]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
