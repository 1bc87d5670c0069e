//! Readiness (`/healthz/ready`, Istio's port 15021): 200 once the agent has committed its first
//! state to the datapath, 503 before. Kubernetes routes nothing to a node agent, but the
//! DaemonSet's rollout waits for it: a node is ready when it enforces.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use super::server::Reply;

/// Istio's readiness path.
pub const READY_PATH: &str = "/healthz/ready";

/// Whether the first state is committed. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn reply(&self, path: &str) -> Reply {
        if path != READY_PATH {
            return Reply::not_found(path);
        }
        if self.is_ready() {
            Reply::text(200, "ready\n")
        } else {
            Reply::text(503, "not ready: no state committed yet\n")
        }
    }
}
