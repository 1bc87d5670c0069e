//! Whether the agent's watches of the cluster are in sync: per watched resource, whether its last
//! list completed and no failure came since. The cluster source reports to the agent's
//! [`Watches`] (`TelemetryConfig::watches`, shared with it); the metrics and `/healthz/ready` read
//! it.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `warden_kube_watch_in_sync` | gauge, 1 or 0 | `resource` |
//! | `warden_kube_watch_failures_total` | counter | `resource` |
//!
//! A watch is out of sync from its registration until its first list completes, from a failure
//! until it has recovered (a new list completed, or a watch event arrived after the completed
//! list), and while it re-lists (a new list is under way, e.g. after the server's `410 Gone`).
//! Readiness turns 503 once one has been out of sync for longer than
//! [`super::ready::OUT_OF_SYNC_LIMIT`]; enforcement never depends on it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::metrics::WARDEN_PREFIX;

/// Labels of the watch metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// The watch: the API resource (`namespaces`, `services`, `authorizationpolicies`, ...), or
    /// `pods_local` / `pods_remote` for the two Pod watches (this node's, the other nodes').
    pub resource: String,
}

#[derive(Clone, Debug)]
struct WatchState {
    /// What the logs and readiness call it (`pods on this node`).
    what: &'static str,
    /// Since when it is out of sync; none while in sync.
    out_since: Option<(Instant, SystemTime)>,
    /// The last failure of the current out-of-sync period.
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    watches: Mutex<BTreeMap<&'static str, WatchState>>,
    in_sync: Family<WatchLabels, Gauge>,
    failures: Family<WatchLabels, Counter>,
}

/// The watches' sync state. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct Watches {
    inner: Arc<Inner>,
}

/// A watch that has been out of sync for a while, as readiness names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfSync {
    /// What it watches (`pods on this node`).
    pub what: &'static str,
    pub since: SystemTime,
    pub duration: Duration,
    /// Its last failure, if it failed (a re-list under way has none).
    pub error: Option<String>,
}

fn labels(resource: &str) -> WatchLabels {
    WatchLabels { resource: resource.to_string() }
}

impl Watches {
    /// Register the metrics in `registry` (under [`WARDEN_PREFIX`]).
    pub fn register_metrics(&self, registry: &mut Registry) {
        let warden = registry.sub_registry_with_prefix(WARDEN_PREFIX);
        warden.register(
            "kube_watch_in_sync",
            "Whether the watch of this resource is in sync with the API server: its last list completed and no failure since (1), or not (0)",
            self.inner.in_sync.clone(),
        );
        warden.register(
            "kube_watch_failures",
            "Failed list and watch requests of this resource (a 410 Gone, which only asks for a new list, is not one)",
            self.inner.failures.clone(),
        );
    }

    fn update(&self, resource: &'static str, f: impl FnOnce(&mut WatchState)) {
        let mut watches = self.inner.watches.lock().unwrap_or_else(|e| e.into_inner());
        let w = watches.entry(resource).or_insert_with(|| WatchState {
            what: resource,
            out_since: Some((Instant::now(), SystemTime::now())),
            error: None,
        });
        f(w);
        self.inner.in_sync.get_or_create(&labels(resource)).set(i64::from(w.out_since.is_none()));
    }

    /// A new watch, out of sync until its first list completes. Its series exist from now on.
    pub fn register(&self, resource: &'static str, what: &'static str) {
        self.update(resource, |w| {
            w.what = what;
            w.out_since = Some((Instant::now(), SystemTime::now()));
            w.error = None;
        });
        let _ = self.inner.failures.get_or_create(&labels(resource));
    }

    /// A new list started: out of sync (since the earlier failure if there was one) until it
    /// completes.
    pub fn resyncing(&self, resource: &'static str) {
        self.update(resource, |w| {
            w.out_since.get_or_insert_with(|| (Instant::now(), SystemTime::now()));
        });
    }

    /// A list or watch request failed: out of sync (since the first failure of the period).
    pub fn failed(&self, resource: &'static str, error: &str) {
        self.update(resource, |w| {
            w.out_since.get_or_insert_with(|| (Instant::now(), SystemTime::now()));
            w.error = Some(error.to_string());
        });
        self.inner.failures.get_or_create(&labels(resource)).inc();
    }

    /// A list completed, or a watch event arrived after a completed list: in sync.
    pub fn synced(&self, resource: &'static str) {
        self.update(resource, |w| {
            w.out_since = None;
            w.error = None;
        });
    }

    /// Whether `resource` is in sync (unknown resources are).
    pub fn is_in_sync(&self, resource: &str) -> bool {
        let watches = self.inner.watches.lock().unwrap_or_else(|e| e.into_inner());
        watches.get(resource).is_none_or(|w| w.out_since.is_none())
    }

    /// The watches out of sync for longer than `limit`.
    pub fn out_of_sync_longer_than(&self, limit: Duration) -> Vec<OutOfSync> {
        self.out_of_sync_at(limit, Instant::now())
    }

    /// As [`Watches::out_of_sync_longer_than`], at `now`.
    pub fn out_of_sync_at(&self, limit: Duration, now: Instant) -> Vec<OutOfSync> {
        let watches = self.inner.watches.lock().unwrap_or_else(|e| e.into_inner());
        watches
            .values()
            .filter_map(|w| {
                let (at, since) = w.out_since?;
                let duration = now.saturating_duration_since(at);
                (duration > limit).then(|| OutOfSync { what: w.what, since, duration, error: w.error.clone() })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::render;

    #[test]
    fn a_watch_is_in_sync_from_its_completed_list_until_a_failure_and_again_once_it_recovers() {
        let w = Watches::default();
        let mut registry = Registry::default();
        w.register_metrics(&mut registry);
        w.register("pods_local", "pods on this node");
        w.register("services", "services");
        let text = render(&registry);
        assert!(text.contains("warden_kube_watch_in_sync{resource=\"pods_local\"} 0"), "{text}");
        assert!(text.contains("warden_kube_watch_failures_total{resource=\"pods_local\"} 0"), "{text}");
        assert!(!w.is_in_sync("pods_local"), "not listed yet");

        w.synced("pods_local");
        w.synced("services");
        assert!(w.is_in_sync("pods_local") && w.is_in_sync("services"));
        assert!(render(&registry).contains("warden_kube_watch_in_sync{resource=\"pods_local\"} 1"));
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(w.out_of_sync_at(Duration::ZERO, later), []);

        // Failures: out of sync since the first one, the last error kept, each one counted.
        let before = SystemTime::now();
        w.failed("pods_local", "connection refused");
        w.failed("pods_local", "pods is forbidden");
        let text = render(&registry);
        assert!(text.contains("warden_kube_watch_in_sync{resource=\"pods_local\"} 0"), "{text}");
        assert!(text.contains("warden_kube_watch_failures_total{resource=\"pods_local\"} 2"), "{text}");
        assert!(text.contains("warden_kube_watch_in_sync{resource=\"services\"} 1"), "{text}");
        let out = w.out_of_sync_at(Duration::from_secs(60), Instant::now() + Duration::from_secs(61));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!((out[0].what, out[0].error.as_deref()), ("pods on this node", Some("pods is forbidden")));
        assert!(out[0].since >= before && out[0].duration >= Duration::from_secs(61), "{out:?}");
        assert_eq!(w.out_of_sync_at(Duration::from_secs(60), Instant::now()), [], "not for longer than the limit yet");

        // A re-list keeps the period's start; its completion ends the period.
        w.resyncing("pods_local");
        assert_eq!(
            w.out_of_sync_at(Duration::from_secs(60), Instant::now() + Duration::from_secs(61))[0].since,
            out[0].since
        );
        w.synced("pods_local");
        assert!(w.is_in_sync("pods_local"));
        assert_eq!(w.out_of_sync_at(Duration::ZERO, later), []);
        assert!(
            render(&registry).contains("warden_kube_watch_failures_total{resource=\"pods_local\"} 2"),
            "counters never go back"
        );

        // A re-list without a failure (410 Gone) is out of sync too, with no error.
        w.resyncing("services");
        let out = w.out_of_sync_at(Duration::ZERO, later);
        assert_eq!((out.len(), out[0].what, out[0].error.as_deref()), (1, "services", None));
    }
}
