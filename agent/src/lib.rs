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
pub mod services;
pub mod source;
pub mod telemetry;
pub mod workloads;

/// `e` and its causes, each once. Most of warden's errors name their cause in their own message
/// (`creating /sys/fs/bpf/warden: Permission denied`) and also return it as their `source()`;
/// printing every link of the chain would show such a cause twice. Others (aya's system-call
/// errors: "`bpf_map_update_elem` failed") keep what matters, the errno, in their `source()` only.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut parent = out.clone();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !parent.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        parent = text;
        cause = c.source();
    }
    out
}

/// Default directories, overridable on every command.
pub mod defaults {
    pub const PIN_DIR: &str = warden_common::PIN_DIR;
    pub const STATE_DIR: &str = "/run/warden";
    pub const TRUST_DOMAIN: &str = "cluster.local";
    pub const ROOT_NAMESPACE: &str = "istio-system";
    /// Whether the mesh's same-node fast path is on without `--fast-path`/`--no-fast-path`
    /// (decided by `cargo xtask bench mtls`; see docs/mesh.md).
    pub const FAST_PATH: bool = false;
    /// Threads of the agent's async runtime when `--worker-threads` is not given, on a node
    /// with `cpus` CPUs (as many as the process may use): half of them, at least 1 and at most 2
    /// (ztunnel's default). The agent relays for the node's workloads, which need the CPUs as
    /// much as it does: on a 2-CPU node a second runtime thread mostly adds wakeups across
    /// threads. Measured there (`cargo xtask bench mtls`'s cluster, one thread against two,
    /// alternated): 10% less agent CPU per GB and per connection, more connections a second,
    /// a lower p99 (README, Benchmarks).
    pub fn worker_threads(cpus: usize) -> u16 {
        (cpus / 2).clamp(1, 2) as u16
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_runtime_takes_half_the_cpus_between_one_and_two_threads() {
            let threads: Vec<u16> = [0, 1, 2, 3, 4, 5, 8, 64].map(super::worker_threads).to_vec();
            assert_eq!(threads, [1, 1, 1, 1, 2, 2, 2, 2]);
        }
    }
}
