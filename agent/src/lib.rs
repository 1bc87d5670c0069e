//! warden's node agent: the `warden` binary's library.
//!
//! | module       | concern                                                                 |
//! |--------------|-------------------------------------------------------------------------|
//! | `workloads`  | the workload file: parsing and validation                               |
//! | `datapath`   | loading the eBPF object, pinned maps, the atomic commit, attachments    |
//! | `record`     | the node record: stable ids and names, persisted                        |
//! | `source`     | where inputs come from: the directory source (default), a cluster       |
//! | `agent`      | build (validate + compile) and apply; the live reconcile loop           |
//! | `inspect`    | `warden maps`: the live maps in human terms                             |
//! | `certs`      | workload certificates (via warden-identity) and the admin `/certs`      |
//! | `kubeca`     | `warden ca serve --kubernetes`: TokenReview, pods, the root's Secret/ConfigMap |
//! | `telemetry`  | Istio-compatible metrics, readiness, access logs (`docs/observability.md`) |

pub mod agent;
pub mod certs;
pub mod datapath;
pub mod inspect;
pub mod kubeca;
pub mod memory;
pub mod mesh;
pub mod record;
pub mod source;
pub mod telemetry;
pub mod workloads;

/// Default directories, overridable on every command.
pub mod defaults {
    pub const PIN_DIR: &str = warden_common::PIN_DIR;
    pub const STATE_DIR: &str = "/run/warden";
    pub const TRUST_DOMAIN: &str = "cluster.local";
    pub const ROOT_NAMESPACE: &str = "istio-system";
    /// Whether the mesh's same-node fast path is on without `--fast-path`/`--no-fast-path`
    /// (decided by `cargo xtask bench mtls`; see docs/mesh.md).
    pub const FAST_PATH: bool = false;
    /// Threads of the agent's async runtime (ztunnel's default is 2 as well).
    pub const WORKER_THREADS: u16 = 2;
}
