//! Where the agent's inputs come from: the workloads of this node and the Istio security
//! resources. The directory source (`files`) is the embedded default; a cluster source feeds the
//! same two things from a Kubernetes API.

pub mod files;
pub mod kube;

use crate::workloads::Workload;

/// A complete, validated snapshot of the inputs.
pub struct Inputs {
    pub workloads: Vec<Workload>,
    pub services: Vec<crate::services::Service>,
    pub policies: warden_authz::PolicySet,
    /// Pods a Service selects that are not workloads: opted out of the mesh where the source
    /// leaves such pods alone (the Kubernetes source). Never enforced; a meshed client's
    /// connections to their Service are shared with them (`services::splits`).
    pub outside_mesh: Vec<Workload>,
}

/// Why a snapshot could not be taken. Nothing is applied; the last good state keeps running.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Workloads(#[from] crate::workloads::WorkloadErrors),
    #[error("{0}")]
    Policies(#[from] warden_authz::LoadErrors),
    #[error("{0}")]
    Other(String),
}

/// A source of inputs, polled by the agent.
pub trait Source: Send {
    /// True when the inputs may have changed since the last `read` (cheap; polled often).
    fn changed(&mut self) -> bool;
    /// Read a complete snapshot. All-or-nothing.
    fn read(&mut self) -> Result<Inputs, SourceError>;
    /// What this source reads, for logs.
    fn describe(&self) -> String;
}
