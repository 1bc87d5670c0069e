//! Readiness (`/healthz/ready`, Istio's port 15021): 200 once the agent has committed its first
//! state to the datapath and while it follows its inputs; 503 before the first commit, and while a
//! watch of the cluster has been out of sync for longer than [`OUT_OF_SYNC_LIMIT`] (the body
//! names the watches, since when, and their last error). Kubernetes routes nothing to a node
//! agent, but the DaemonSet's rollout waits for it and the pod's Ready condition shows it.
//!
//! Readiness is a report, never a switch: whatever it says, the pinned state keeps enforcing.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    server::Reply,
    watches::{OutOfSync, Watches},
};

/// Istio's readiness path.
pub const READY_PATH: &str = "/healthz/ready";

/// How long a watch may be out of sync before readiness reports it: longer than an API-server
/// restart or a routine re-list takes (the watches retry every 2 s at most), short enough that
/// an agent that stopped following the cluster is seen within a minute or two.
pub const OUT_OF_SYNC_LIMIT: Duration = Duration::from_secs(60);

/// Whether the first state is committed, and the watches whose sync it reports. Cheap to clone.
#[derive(Clone, Default)]
pub struct Readiness {
    committed: Arc<AtomicBool>,
    watches: Watches,
    limit: Duration,
}

impl Readiness {
    /// Readiness reporting on `watches`' sync, with `limit` ([`OUT_OF_SYNC_LIMIT`]).
    pub fn new(watches: Watches, limit: Duration) -> Readiness {
        Readiness { committed: Arc::default(), watches, limit }
    }

    pub fn set_ready(&self) {
        self.committed.store(true, Ordering::Release);
    }

    /// Whether the first state is committed.
    pub fn is_ready(&self) -> bool {
        self.committed.load(Ordering::Acquire)
    }

    pub fn reply(&self, path: &str) -> Reply {
        self.reply_at(path, Instant::now())
    }

    /// As [`Readiness::reply`], at `now`.
    pub fn reply_at(&self, path: &str, now: Instant) -> Reply {
        if path != READY_PATH {
            return Reply::not_found(path);
        }
        if !self.is_ready() {
            return Reply::text(503, "not ready: no state committed yet\n");
        }
        let stale = self.watches.out_of_sync_at(self.limit, now);
        if stale.is_empty() { Reply::text(200, "ready\n") } else { Reply::text(503, describe(&stale, self.limit)) }
    }
}

/// The 503 body: one line per watch out of sync.
fn describe(stale: &[OutOfSync], limit: Duration) -> String {
    let mut body = format!(
        "not ready: out of sync with the API server for more than {}s (the last committed state keeps enforcing):\n",
        limit.as_secs()
    );
    for s in stale {
        let _ = write!(body, "  {}: since {} ({}s)", s.what, super::access_log::rfc3339(s.since), s.duration.as_secs());
        if let Some(e) = &s.error {
            let mut e = e.replace('\n', " ");
            if e.len() > 300 {
                let mut cut = 300;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
                e.push_str("...");
            }
            let _ = write!(body, ": {e}");
        }
        body.push('\n');
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_out_of_sync_longer_than_the_limit_makes_the_agent_not_ready_and_is_named() {
        let watches = Watches::default();
        let r = Readiness::new(watches.clone(), OUT_OF_SYNC_LIMIT);
        watches.register("namespaces", "namespaces");
        watches.register("pods_local", "pods on this node");
        let now = Instant::now();
        let after = |s| now + Duration::from_secs(s);
        assert_eq!(r.reply_at(READY_PATH, now), Reply::text(503, "not ready: no state committed yet\n"));
        assert_eq!(r.reply_at("/ready", now).status, 404);
        watches.synced("namespaces");
        watches.synced("pods_local");
        r.set_ready();
        assert_eq!(r.reply_at(READY_PATH, after(3600)), Reply::text(200, "ready\n"));

        // An API-server restart: the watch fails and recovers within the limit; still ready.
        watches.failed("pods_local", "failed to start watching object: client error (Connect)");
        assert_eq!(r.reply_at(READY_PATH, after(30)).status, 200);
        assert_eq!(r.reply_at(READY_PATH, after(60)).status, 200, "60 s is not more than the limit");
        watches.synced("pods_local");
        assert_eq!(r.reply_at(READY_PATH, after(3600)).status, 200);

        // It cannot list any more: not ready once it has been out of sync for longer.
        watches.failed("pods_local", "failed to perform initial object list: pods is forbidden");
        assert_eq!(r.reply_at(READY_PATH, after(59)).status, 200);
        let reply = r.reply_at(READY_PATH, after(61));
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(
            reply.body.starts_with("not ready: out of sync with the API server for more than 60s (the last committed state keeps enforcing):\n  pods on this node: since 20"),
            "{}",
            reply.body
        );
        assert!(
            reply.body.ends_with("s): failed to perform initial object list: pods is forbidden\n"),
            "{}",
            reply.body
        );
        assert!(!reply.body.contains("namespaces"), "{}", reply.body);
        // Recovered: ready again.
        watches.synced("pods_local");
        assert_eq!(r.reply_at(READY_PATH, after(61)).status, 200);
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let stale = [OutOfSync {
            what: "services",
            since: std::time::UNIX_EPOCH,
            duration: Duration::from_secs(61),
            error: Some(format!("{}\nsecond line", "é".repeat(400))),
        }];
        let body = describe(&stale, OUT_OF_SYNC_LIMIT);
        assert!(body.contains("  services: since 1970-01-01T00:00:00"), "{body}");
        assert!(body.ends_with("...\n") && body.lines().count() == 2 && body.len() < 500, "{body}");
    }
}
