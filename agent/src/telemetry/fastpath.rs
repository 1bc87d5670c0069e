//! `warden_fastpath_*`: what the same-node fast path did (`ebpf/src/fastpath.rs`), from its
//! per-CPU counters (`warden_fastpath_counters_v2`), read at each scrape. All zero while the fast
//! path is off.
//!
//! The kernel's counters are totals since their map was created; each scrape adds their growth
//! since the last one, so the series stay monotonic across an agent restart (the map is pinned
//! and outlives the agent) and start again from the new totals if the map is ever recreated.

use std::sync::Mutex;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use warden_common::FastpathCounter;

/// `warden_fastpath_fallbacks_total`'s labels: why a socket's sends took TCP for good. `no_peer`:
/// at its first send (no peer filed, the fast path off, or a newer generation committed);
/// `changed`: while redirecting (a commit, the switch turned off, or its peer gone); `backlog`:
/// while redirecting, its peer's redirected queue would have passed the bound (a reader behind
/// by a TCP receive buffer).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub reason: &'static str,
}

pub struct FastPathMetrics {
    sockets: Counter,
    redirected_messages: Counter,
    redirected_bytes: Counter,
    tcp_messages: Counter,
    fallbacks: Family<FallbackLabels, Counter>,
    last: Mutex<FastpathCounter>,
}

impl FastPathMetrics {
    /// Create the series and register them in `registry` (under `warden_`).
    pub fn new(registry: &mut Registry) -> FastPathMetrics {
        let m = FastPathMetrics {
            sockets: Counter::default(),
            redirected_messages: Counter::default(),
            redirected_bytes: Counter::default(),
            tcp_messages: Counter::default(),
            fallbacks: Family::default(),
            last: Mutex::default(),
        };
        let r = registry.sub_registry_with_prefix("warden_fastpath");
        r.register("sockets", "Sockets filed in the fast path's sock hash at ESTABLISHED", m.sockets.clone());
        r.register(
            "redirected_messages",
            "Sends handed to the peer socket's receive queue instead of TCP",
            m.redirected_messages.clone(),
        );
        r.register("redirected_bytes", "Bytes of the redirected sends", m.redirected_bytes.clone());
        r.register("tcp_messages", "Sends of filed sockets that took TCP", m.tcp_messages.clone());
        r.register(
            "fallbacks",
            "Sockets whose sends took TCP for good, by reason (no_peer: at the first send; changed: a commit, \
             the switch off, or the peer gone; backlog: the peer's redirected queue was full)",
            m.fallbacks.clone(),
        );
        m
    }

    /// Add the growth of the kernel's totals `now` since the last update.
    pub fn update(&self, now: FastpathCounter) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // A total below the last one: the map was recreated, and its totals start again.
        let reset = now.sockets < last.sockets || now.redirected_bytes < last.redirected_bytes;
        let base = if reset { FastpathCounter::default() } else { *last };
        let grew = |now: u64, then: u64| now.saturating_sub(then);
        self.sockets.inc_by(grew(now.sockets, base.sockets));
        self.redirected_messages.inc_by(grew(now.redirected_msgs, base.redirected_msgs));
        self.redirected_bytes.inc_by(grew(now.redirected_bytes, base.redirected_bytes));
        self.tcp_messages.inc_by(grew(now.passed_msgs, base.passed_msgs));
        for (reason, n) in [
            ("no_peer", grew(now.no_peer, base.no_peer)),
            ("changed", grew(now.fallbacks, base.fallbacks)),
            ("backlog", grew(now.backlog_fallbacks, base.backlog_fallbacks)),
        ] {
            self.fallbacks.get_or_create(&FallbackLabels { reason }).inc_by(n);
        }
        *last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::render;

    #[test]
    fn growth_is_added_once_and_a_recreated_map_starts_again() {
        let mut registry = Registry::default();
        let m = FastPathMetrics::new(&mut registry);
        let c = |sockets, bytes, backlog| FastpathCounter {
            sockets,
            redirected_msgs: sockets * 10,
            redirected_bytes: bytes,
            backlog_fallbacks: backlog,
            ..FastpathCounter::default()
        };
        m.update(c(4, 1000, 1));
        m.update(c(4, 1000, 1));
        let body = render(&registry);
        assert!(body.contains("warden_fastpath_sockets_total 4\n"), "{body}");
        assert!(body.contains("warden_fastpath_redirected_bytes_total 1000\n"), "{body}");
        assert!(body.contains("warden_fastpath_redirected_messages_total 40\n"), "{body}");
        assert!(body.contains("warden_fastpath_fallbacks_total{reason=\"backlog\"} 1\n"), "{body}");
        assert!(body.contains("warden_fastpath_fallbacks_total{reason=\"no_peer\"} 0\n"), "{body}");

        m.update(c(6, 1500, 1));
        let body = render(&registry);
        assert!(body.contains("warden_fastpath_sockets_total 6\n"), "{body}");
        assert!(body.contains("warden_fastpath_redirected_bytes_total 1500\n"), "{body}");

        // The map recreated (an upgrade): its new totals are all growth.
        m.update(c(2, 100, 0));
        let body = render(&registry);
        assert!(body.contains("warden_fastpath_sockets_total 8\n"), "{body}");
        assert!(body.contains("warden_fastpath_redirected_bytes_total 1600\n"), "{body}");
        assert!(body.contains("warden_fastpath_fallbacks_total{reason=\"backlog\"} 1\n"), "{body}");
    }
}
