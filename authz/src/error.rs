//! Errors of loading/validation and of compilation. Every load error names its file, document,
//! resource and field, so an operator can fix a policy without guessing.

use std::fmt;

/// One problem with one resource (or one file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// File name (or the origin passed to [`crate::parse_str`]).
    pub origin: String,
    /// 1-based index of the YAML document in the file, when the error concerns one document.
    pub document: Option<usize>,
    /// `namespace/name` of the resource when known.
    pub resource: Option<String>,
    /// Field path such as `spec.rules[0].from[0].source.ipBlocks[1]`; empty for file-level errors.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
            if let Some(r) = &self.resource {
                write!(f, " ({r})")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every error found while loading; loading is all-or-nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

impl LoadErrors {
    pub fn iter(&self) -> impl Iterator<Item = &LoadError> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A compilation that cannot produce a consistent state. The agent keeps the previous state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// `local` names a workload index outside `workloads`.
    #[error("local endpoint {endpoint_id} refers to workload index {index}, but only {len} workloads are known")]
    LocalIndexOutOfRange { endpoint_id: u32, index: usize, len: usize },
    /// `meshed` has more entries than `local` (it is parallel to it).
    #[error("meshed has {meshed} entries but local has only {local}: meshed must be parallel to local")]
    MeshedLength { meshed: usize, local: usize },
    /// Two local entries carry the same endpoint id.
    #[error("endpoint id {endpoint_id} is used by two local workloads ({first} and {second})")]
    DuplicateEndpoint { endpoint_id: u32, first: String, second: String },
    /// The allocator returned a reserved number.
    #[error("the id allocator returned reserved {what} id {id} for {name}")]
    ReservedId { what: &'static str, id: u32, name: String },
    /// The allocator returned one numeric identity for two different identities.
    #[error("the id allocator returned identity {id} for both {first} and {second}")]
    IdentityCollision { id: u32, first: String, second: String },
    /// The allocator returned one policy id for two different policies.
    #[error("the id allocator returned policy id {id} for both {first} and {second}")]
    PolicyIdCollision { id: u32, first: String, second: String },
}
