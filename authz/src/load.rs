//! Loading: files and directories of multi-document YAML -> validated resources. All or nothing.

use crate::error::{LoadError, LoadErrors};
use crate::model::Resource;
use crate::set::{Options, PolicySet};
use crate::validate::{self, Ctx};
use serde::Deserialize;
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
        let value = match serde_yaml::Value::deserialize(de) {
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

fn collect_files(path: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<LoadError>) {
    let file_err = |reason: String| LoadError {
        origin: path.display().to_string(),
        document: None,
        resource: None,
        field: String::new(),
        reason,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            errors.push(file_err(format!("cannot read: {e}")));
            return;
        }
    };
    if meta.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) => {
            errors.push(file_err(format!("cannot list directory: {e}")));
            return;
        }
    };
    let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    children.sort();
    for c in children {
        if c.is_dir() {
            collect_files(&c, out, errors);
        } else if matches!(c.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(c);
        }
    }
}

/// Reads every resource under `paths` (files, or directories searched recursively for
/// `*.yaml`/`*.yml`) with the given options.
pub fn load_paths_with(paths: &[impl AsRef<Path>], options: &Options) -> Result<PolicySet, LoadErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        collect_files(p.as_ref(), &mut files, &mut errors);
    }
    let mut resources = Vec::new();
    let mut warnings = Vec::new();
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
