//! What the agent committed to the datapath, fed by its main loop.
//!
//! | metric | type |
//! | --- | --- |
//! | `warden_commit_generation` | gauge: the generation of the state committed last |
//! | `warden_commit_last_success_timestamp_seconds` | gauge: when that was (Unix seconds) |
//! | `warden_commit_failures_total` | counter: applies that failed (the last committed state kept enforcing) |

use std::{
    sync::atomic::AtomicU64,
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use super::metrics::WARDEN_PREFIX;

/// The commit metrics. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct CommitMetrics {
    generation: Gauge,
    last_success: Gauge<f64, AtomicU64>,
    failures: Counter,
}

impl CommitMetrics {
    /// Create the metrics and register them under [`WARDEN_PREFIX`].
    pub fn new(registry: &mut Registry) -> CommitMetrics {
        let m = CommitMetrics::default();
        let warden = registry.sub_registry_with_prefix(WARDEN_PREFIX);
        warden.register(
            "commit_generation",
            "Generation of the node state the agent committed last (0 before the first commit)",
            m.generation.clone(),
        );
        warden.register(
            "commit_last_success_timestamp_seconds",
            "When the agent last committed a node state (Unix time; 0 before the first commit)",
            m.last_success.clone(),
        );
        warden.register(
            "commit_failures",
            "Node states that failed to apply; the last committed state kept enforcing",
            m.failures.clone(),
        );
        m
    }

    /// `generation` was committed at `at`.
    pub fn succeeded(&self, generation: u32, at: SystemTime) {
        self.generation.set(i64::from(generation));
        self.last_success.set(at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
    }

    /// An apply failed; the last committed state keeps enforcing.
    pub fn failed(&self) {
        self.failures.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::telemetry::render;

    #[test]
    fn commits_set_the_generation_and_time_and_failures_are_counted() {
        let mut registry = Registry::default();
        let m = CommitMetrics::new(&mut registry);
        let text = render(&registry);
        assert!(text.contains("warden_commit_generation 0\n"), "{text}");
        assert!(text.contains("warden_commit_failures_total 0\n"), "{text}");
        m.succeeded(7, UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        m.failed();
        m.failed();
        let text = render(&registry);
        assert!(text.contains("# TYPE warden_commit_generation gauge\n"), "{text}");
        assert!(text.contains("warden_commit_generation 7\n"), "{text}");
        assert!(text.contains("warden_commit_last_success_timestamp_seconds 1700000000.5\n"), "{text}");
        assert!(text.contains("# TYPE warden_commit_failures counter\n"), "{text}");
        assert!(text.contains("warden_commit_failures_total 2\n"), "{text}");
    }
}
