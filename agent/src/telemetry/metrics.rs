//! Traffic metrics derived from the kernel's per-CPU counters (`warden_counters_v2`), read at
//! scrape time.
//!
//! | metric | labels |
//! | --- | --- |
//! | `istio_tcp_connections_opened_total` | [`TcpLabels`] |
//! | `istio_tcp_connections_closed_total` | [`TcpLabels`] |
//! | `istio_tcp_received_bytes_total` | [`TcpLabels`]: request direction, source -> destination |
//! | `istio_tcp_sent_bytes_total` | [`TcpLabels`]: response direction, destination -> source |
//! | `warden_policy_denials_total` | [`DenialLabels`]: refusals attributed to the policy by name |
//! | `warden_drops_total` | [`DropLabels`]: every refusal, by reason |
//! | `warden_exemptions_total` | [`DropLabels`]: connections allowed without policy, by reason |
//!
//! Each counter key is one (workload, remote identity, policy, verdict, reason, direction, hook).
//! Several keys can land in one label set, and names can change between commits, so the series
//! are not recomputed from totals: each scrape adds the growth of every key since the previous
//! read to the series its key names now. Series therefore only ever grow, whatever the maps or
//! the names do; after an agent restart they start again from the kernel's totals.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter as PromCounter, family::Family},
    registry::Registry,
};
use warden_common::{Counter, CounterKey, Direction, DropReason, HOOK_CONNECT, HOOK_TUNNEL, Verdict};

use super::names::Names;

/// Prefix of Istio's standard metrics.
pub const ISTIO_PREFIX: &str = "istio";
/// Prefix of warden's own metrics.
pub const WARDEN_PREFIX: &str = "warden";

/// `response_flags` of an allowed flow (Istio: no flag).
pub const FLAGS_NONE: &str = "-";
/// `response_flags` of a flow refused by the enforcer.
pub const FLAGS_DENY: &str = "DENY";

/// How the traffic the kernel counts is protected: Istio's `connection_security_policy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// Plaintext L4: what the kernel path enforces today.
    #[default]
    None,
    /// Mutual TLS (HBONE), once the mTLS data plane carries the flows.
    MutualTls,
}

impl SecurityPolicy {
    pub const fn label(self) -> &'static str {
        match self {
            SecurityPolicy::None => "none",
            SecurityPolicy::MutualTls => "mutual_tls",
        }
    }
}

/// Istio's standard TCP labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `destination` for flows the remote initiated, `source` for flows the workload initiated.
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// The Service the connection counts against (`<name>.<namespace>.svc.cluster.local`), its
    /// name and namespace, or `unknown` (see `ServiceRef::for_destination`).
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub connection_security_policy: String,
    /// [`FLAGS_NONE`] or [`FLAGS_DENY`].
    pub response_flags: String,
}

impl TcpLabels {
    /// `destination_service`, `destination_service_name`, `destination_service_namespace` of
    /// `service`, or `unknown`.
    pub fn service_labels(service: Option<&crate::services::ServiceRef>) -> [String; 3] {
        match service {
            Some(s) => [s.hostname(), s.name.clone(), s.namespace.clone()],
            None => [super::names::UNKNOWN.into(), super::names::UNKNOWN.into(), super::names::UNKNOWN.into()],
        }
    }
}

/// Labels of `warden_policy_denials_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// `namespace/name` of the deciding policy, or `default-deny`.
    pub policy: String,
    /// The local workload whose policy refused the flow, and its namespace.
    pub workload: String,
    pub namespace: String,
    /// The flow's direction relative to that workload: `ingress` or `egress`.
    pub direction: String,
    pub reason: String,
}

/// Labels of `warden_drops_total`, and of `warden_exemptions_total` (the reason is then an
/// exemption's, e.g. `node_local`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
    pub workload: String,
    pub namespace: String,
    pub direction: String,
}

/// What one counter key (or its growth) contributes to the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    pub tcp: Option<(TcpLabels, TcpTotals)>,
    /// Refusals (denied packets at TC, denied `connect()` calls) attributed to a policy.
    pub denial: Option<(DenialLabels, u64)>,
    /// Every refusal, whatever refused it.
    pub drop: Option<(DropLabels, u64)>,
    /// Connections allowed without policy (the node's own, [`DropReason::NodeLocal`]).
    pub exemption: Option<(DropLabels, u64)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpTotals {
    pub opened: u64,
    pub closed: u64,
    /// Istio's received bytes: the request direction (source -> destination).
    pub received_bytes: u64,
    /// Istio's sent bytes: the response direction (destination -> source).
    pub sent_bytes: u64,
}

/// Reasons a policy decided (attributed in `warden_policy_denials_total`); the others are the
/// enforcer's own refusals (no state, spoofing, malformed packets ...), in `warden_drops_total`.
fn is_policy_reason(r: Option<DropReason>) -> bool {
    matches!(r, Some(DropReason::PolicyDeny | DropReason::PolicyDefaultDeny | DropReason::PlaintextStrict))
}

/// The metrics one counter key contributes, given its (growth of) counts.
///
/// - Reporter and peers: for an ingress flow the local workload is the destination and reports
///   as `destination`; for an egress flow it is the source and reports as `source`. Both ends of
///   a flow between two workloads of the node report, as in Istio.
/// - Bytes: `bytes_in` is what was delivered into the workload, so for an ingress flow it is the
///   request direction (Istio's received) and for an egress flow the response (Istio's sent).
/// - Allowed `connect()` calls contribute nothing: the TC hook counts the same connection.
/// - A connection the kernel allowed without policy (an exemption: the node's own, kubelet's
///   probes) is counted in `warden_exemptions_total` only, not in Istio's series: Istio ambient
///   never sees probes (istio-cni steers them around ztunnel), and a STRICT mesh's mTLS coverage
///   and `WardenNonMtlsTraffic` would otherwise count every probe as plaintext.
/// - A refused flow is a connection opened and closed at once with `response_flags="DENY"` and no
///   bytes: denied SYNs at TC (TCP), denied `connect()` calls (any protocol), refused UDP
///   sends (sendmsg4).
pub fn derive(key: &CounterKey, c: &Counter, names: &Names, security: SecurityPolicy) -> Contribution {
    let direction = Direction::from_u8(key.direction).unwrap_or(Direction::Ingress);
    // The mesh's flows: the last hop of an mTLS connection is reported as mutual TLS; a captured
    // connection's first hop (to the agent) is left to the agent, which knows its destination.
    let security = if key.hook == HOOK_TUNNEL { SecurityPolicy::MutualTls } else { security };
    let allowed = key.verdict == Verdict::Allow as u8;
    // The agent reports both sides of the connections it carries, with the workloads it knows
    // (a tunnel's source is the workload of the proven identity that owns the forwarded address,
    // which the kernel, counting by identity, cannot name): a captured connection's hop to the
    // agent and its delivery to the workload add nothing here. The kernel's refusals of a
    // delivery stay, as the agent cannot see them.
    if key.hook == HOOK_TUNNEL && (direction == Direction::Egress || allowed) {
        return Contribution::default();
    }
    let local = names.local(key.endpoint_id);
    let remote = names.remote(key.remote_identity);
    let connect = key.hook == HOOK_CONNECT;
    let (reporter, src, dst) = match direction {
        Direction::Ingress => ("destination", &remote, &local),
        Direction::Egress => ("source", &local, &remote),
    };
    // The kernel's counters name identities, not Services.
    let [destination_service, destination_service_name, destination_service_namespace] =
        TcpLabels::service_labels(None);
    let labels = |flags: &str| TcpLabels {
        reporter: reporter.into(),
        source_workload: src.workload.clone(),
        source_workload_namespace: src.namespace.clone(),
        source_principal: src.principal.clone(),
        destination_workload: dst.workload.clone(),
        destination_workload_namespace: dst.namespace.clone(),
        destination_principal: dst.principal.clone(),
        destination_service: destination_service.clone(),
        destination_service_name: destination_service_name.clone(),
        destination_service_namespace: destination_service_namespace.clone(),
        connection_security_policy: security.label().into(),
        response_flags: flags.into(),
    };
    if allowed {
        if connect {
            return Contribution::default();
        }
        if let Some(r) = DropReason::from_u8(key.reason).filter(|r| *r != DropReason::None) {
            let l = DropLabels {
                reason: r.name().into(),
                workload: local.workload.clone(),
                namespace: local.namespace.clone(),
                direction: direction.name().into(),
            };
            return Contribution { exemption: Some((l, c.opened)), ..Default::default() };
        }
        let (request, response) = match direction {
            Direction::Ingress => (c.bytes_in, c.bytes_out),
            Direction::Egress => (c.bytes_out, c.bytes_in),
        };
        let t = TcpTotals { opened: c.opened, closed: c.closed, received_bytes: request, sent_bytes: response };
        return Contribution { tcp: Some((labels(FLAGS_NONE), t)), ..Default::default() };
    }
    // For the connect hook `packets_out` counts calls.
    let refusals = if connect { c.packets_out } else { c.packets_in + c.packets_out };
    let attempts = if connect { c.packets_out } else { c.opened };
    let reason = DropReason::from_u8(key.reason);
    let reason_name = reason.map_or("unknown", DropReason::name).to_string();
    let drop = DropLabels {
        reason: reason_name.clone(),
        workload: local.workload.clone(),
        namespace: local.namespace.clone(),
        direction: direction.name().into(),
    };
    let denial = is_policy_reason(reason).then(|| {
        let l = DenialLabels {
            policy: names.policy(key.policy_id),
            workload: local.workload.clone(),
            namespace: local.namespace.clone(),
            direction: direction.name().into(),
            reason: reason_name,
        };
        (l, refusals)
    });
    let t = TcpTotals { opened: attempts, closed: attempts, received_bytes: 0, sent_bytes: 0 };
    Contribution { tcp: Some((labels(FLAGS_DENY), t)), denial, drop: Some((drop, refusals)), exemption: None }
}

/// Growth of a counter since `last`; a counter that shrank was recreated and counts from zero.
fn growth(now: &Counter, last: &Counter) -> Counter {
    let shrank = now.packets_in < last.packets_in
        || now.bytes_in < last.bytes_in
        || now.packets_out < last.packets_out
        || now.bytes_out < last.bytes_out
        || now.opened < last.opened
        || now.closed < last.closed;
    if shrank {
        return *now;
    }
    Counter {
        packets_in: now.packets_in - last.packets_in,
        bytes_in: now.bytes_in - last.bytes_in,
        packets_out: now.packets_out - last.packets_out,
        bytes_out: now.bytes_out - last.bytes_out,
        opened: now.opened - last.opened,
        closed: now.closed - last.closed,
    }
}

/// The traffic metrics, registered in a registry, fed from counter snapshots.
pub struct TrafficMetrics {
    security: SecurityPolicy,
    /// Istio's TCP series and the policy denials, shared with the mesh's recorder.
    tcp: TcpRecorder,
    drops: Family<DropLabels, PromCounter>,
    exemptions: Family<DropLabels, PromCounter>,
    /// Each key's totals at the previous read.
    last: Mutex<HashMap<CounterKey, Counter>>,
}

fn add<L: Clone + std::hash::Hash + Eq>(f: &Family<L, PromCounter>, l: &L, v: u64) {
    if v > 0 {
        f.get_or_create(l).inc_by(v);
    }
}

/// A source of live counts, polled before every scrape is encoded.
type LiveSource = Arc<dyn Fn() + Send + Sync>;

/// Istio's TCP series and the policy denials. The kernel's counters feed them through
/// [`TrafficMetrics::update`]; the mesh records the connections the agent carries itself through
/// a clone ([`TrafficMetrics::recorder`]), into the same series, and may register live sources
/// ([`TcpRecorder::on_scrape`]) that bring open connections' counts up to date at each scrape.
#[derive(Clone, Default)]
pub struct TcpRecorder {
    opened: Family<TcpLabels, PromCounter>,
    closed: Family<TcpLabels, PromCounter>,
    received: Family<TcpLabels, PromCounter>,
    sent: Family<TcpLabels, PromCounter>,
    denials: Family<DenialLabels, PromCounter>,
    live: Arc<Mutex<Vec<LiveSource>>>,
}

impl TcpRecorder {
    /// A finished (or refused) connection.
    pub fn connection(&self, labels: &TcpLabels, t: &TcpTotals) {
        add(&self.opened, labels, t.opened);
        add(&self.closed, labels, t.closed);
        add(&self.received, labels, t.received_bytes);
        add(&self.sent, labels, t.sent_bytes);
    }
    /// `n` refusals attributed to the deciding policy.
    pub fn denials(&self, labels: &DenialLabels, n: u64) {
        add(&self.denials, labels, n);
    }
    /// Call `poll` before every scrape is encoded (it adds the growth of open connections).
    pub fn on_scrape(&self, poll: impl Fn() + Send + Sync + 'static) {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::new(poll));
    }
    /// The closed connections counted under `labels` so far.
    #[cfg(test)]
    pub fn closed_total(&self, labels: &TcpLabels) -> u64 {
        self.closed.get_or_create(labels).get()
    }
    /// The request and response bytes counted under `labels` so far.
    #[cfg(test)]
    pub fn bytes_total(&self, labels: &TcpLabels) -> (u64, u64) {
        (self.received.get_or_create(labels).get(), self.sent.get_or_create(labels).get())
    }
    /// Run the live sources.
    pub fn poll_live(&self) {
        let sources = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for poll in sources {
            poll();
        }
    }
}

impl TrafficMetrics {
    /// A recorder writing into these metrics' series.
    pub fn recorder(&self) -> TcpRecorder {
        self.tcp.clone()
    }

    /// Bring the live sources' series up to date (before a scrape is encoded).
    pub fn poll_live(&self) {
        self.tcp.poll_live();
    }

    /// Create the metrics and register them under [`ISTIO_PREFIX`] and [`WARDEN_PREFIX`].
    pub fn new(registry: &mut Registry, security: SecurityPolicy) -> TrafficMetrics {
        let m = TrafficMetrics {
            security,
            tcp: TcpRecorder::default(),
            drops: Family::default(),
            exemptions: Family::default(),
            last: Mutex::default(),
        };
        let istio = registry.sub_registry_with_prefix(ISTIO_PREFIX);
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened (refused attempts carry response_flags=\"DENY\")",
            m.tcp.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed (refused attempts carry response_flags=\"DENY\")",
            m.tcp.closed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes of the request direction (source to destination), L2 frame lengths",
            m.tcp.received.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes of the response direction (destination to source), L2 frame lengths",
            m.tcp.sent.clone(),
        );
        let warden = registry.sub_registry_with_prefix(WARDEN_PREFIX);
        warden.register(
            "policy_denials",
            "Packets and connect() calls refused by policy, attributed to the deciding policy",
            m.tcp.denials.clone(),
        );
        warden.register("drops", "Packets and connect() calls refused by the enforcer, by reason", m.drops.clone());
        warden.register(
            "exemptions",
            "Connections allowed without policy, by reason (node_local: opened by the node's own network stack)",
            m.exemptions.clone(),
        );
        m
    }

    /// Fold a snapshot of the counter map (per-CPU values already summed) into the metrics.
    pub fn update(&self, snapshot: impl IntoIterator<Item = (CounterKey, Counter)>, names: &Names) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = HashMap::with_capacity(last.len());
        for (key, now) in snapshot {
            let g = match last.get(&key) {
                Some(prev) => growth(&now, prev),
                None => now,
            };
            seen.insert(key, now);
            let c = derive(&key, &g, names, self.security);
            if let Some((l, t)) = c.tcp {
                self.tcp.connection(&l, &t);
            }
            if let Some((l, n)) = c.denial {
                self.tcp.denials(&l, n);
            }
            if let Some((l, n)) = c.drop {
                add(&self.drops, &l, n);
            }
            if let Some((l, n)) = c.exemption {
                add(&self.exemptions, &l, n);
            }
        }
        // Keys no longer in the map are forgotten: if one comes back it counts from zero.
        *last = seen;
    }
}

#[cfg(test)]
mod tests {
    use warden_common::{POLICY_ID_NONE, Verdict};

    use super::*;
    use crate::telemetry::names::{DEFAULT_DENY, UNKNOWN, tests::record};
    use crate::telemetry::render;

    fn names() -> Names {
        Names::from_record(&record())
    }

    fn key(
        endpoint_id: u32,
        remote_identity: u32,
        direction: Direction,
        verdict: Verdict,
        reason: DropReason,
        policy_id: u32,
        hook: u8,
    ) -> CounterKey {
        CounterKey {
            endpoint_id,
            remote_identity,
            policy_id,
            verdict: verdict as u8,
            reason: reason as u8,
            direction: direction as u8,
            hook,
        }
    }

    const TC: u8 = warden_common::HOOK_TC;
    const A: &str = "spiffe://cluster.local/ns/team/sa/a";
    const B: &str = "spiffe://cluster.local/ns/team/sa/b";

    fn traffic() -> Counter {
        Counter { packets_in: 5, bytes_in: 500, packets_out: 4, bytes_out: 4000, opened: 1, closed: 1 }
    }

    #[test]
    fn the_server_side_reports_as_destination_and_receives_the_request() {
        // b (endpoint 2) accepted a flow from a (identity 2): 500 bytes in (request), 4000 out.
        let k = key(2, 2, Direction::Ingress, Verdict::Allow, DropReason::None, 1, TC);
        let c = derive(&k, &traffic(), &names(), SecurityPolicy::None);
        let (l, t) = c.tcp.unwrap();
        assert_eq!(l.reporter, "destination");
        assert_eq!(
            (l.source_workload.as_str(), l.source_workload_namespace.as_str(), l.source_principal.as_str()),
            ("a", "team", A)
        );
        assert_eq!(
            (
                l.destination_workload.as_str(),
                l.destination_workload_namespace.as_str(),
                l.destination_principal.as_str()
            ),
            ("b", "team", B)
        );
        assert_eq!((l.connection_security_policy.as_str(), l.response_flags.as_str()), ("none", "-"));
        assert_eq!(t, TcpTotals { opened: 1, closed: 1, received_bytes: 500, sent_bytes: 4000 });
        assert_eq!((c.denial, c.drop), (None, None));
    }

    #[test]
    fn the_client_side_reports_as_source_and_its_outbound_bytes_are_the_request() {
        // a (endpoint 1) opened a flow to b (identity 3): 4000 bytes out (request), 500 in.
        let k = key(1, 3, Direction::Egress, Verdict::Allow, DropReason::None, 0, TC);
        let (l, t) = derive(&k, &traffic(), &names(), SecurityPolicy::MutualTls).tcp.unwrap();
        assert_eq!(l.reporter, "source");
        assert_eq!((l.source_workload.as_str(), l.source_principal.as_str()), ("a", A));
        assert_eq!((l.destination_workload.as_str(), l.destination_principal.as_str()), ("b", B));
        assert_eq!(l.connection_security_policy, "mutual_tls");
        assert_eq!(t, TcpTotals { opened: 1, closed: 1, received_bytes: 4000, sent_bytes: 500 });
    }

    #[test]
    fn the_world_is_unknown() {
        let k = key(2, warden_common::IDENTITY_WORLD, Direction::Ingress, Verdict::Allow, DropReason::None, 1, TC);
        let (l, _) = derive(&k, &traffic(), &names(), SecurityPolicy::None).tcp.unwrap();
        assert_eq!(
            (l.source_workload.as_str(), l.source_workload_namespace.as_str(), l.source_principal.as_str()),
            (UNKNOWN, UNKNOWN, UNKNOWN)
        );
    }

    #[test]
    fn a_denial_is_attributed_to_its_policy_and_counted_as_a_refused_connection() {
        // b's policy team/b-access (id 1) denied 3 SYNs from a.
        let k = key(2, 2, Direction::Ingress, Verdict::Deny, DropReason::PolicyDeny, 1, TC);
        let c = derive(
            &k,
            &Counter { packets_in: 3, bytes_in: 180, opened: 3, ..Default::default() },
            &names(),
            SecurityPolicy::None,
        );
        let (l, t) = c.tcp.unwrap();
        assert_eq!((l.reporter.as_str(), l.response_flags.as_str()), ("destination", "DENY"));
        assert_eq!(t, TcpTotals { opened: 3, closed: 3, received_bytes: 0, sent_bytes: 0 });
        let (d, n) = c.denial.unwrap();
        assert_eq!(
            d,
            DenialLabels {
                policy: "team/b-access".into(),
                workload: "b".into(),
                namespace: "team".into(),
                direction: "ingress".into(),
                reason: "policy_deny".into()
            }
        );
        assert_eq!(n, 3);
        assert_eq!(
            c.drop.unwrap(),
            (
                DropLabels {
                    reason: "policy_deny".into(),
                    workload: "b".into(),
                    namespace: "team".into(),
                    direction: "ingress".into()
                },
                3
            )
        );
    }

    #[test]
    fn a_denied_connect_counts_calls_and_default_deny_is_named() {
        let k =
            key(1, 3, Direction::Egress, Verdict::Deny, DropReason::PolicyDefaultDeny, POLICY_ID_NONE, HOOK_CONNECT);
        let c = derive(&k, &Counter { packets_out: 2, ..Default::default() }, &names(), SecurityPolicy::None);
        let (l, t) = c.tcp.unwrap();
        assert_eq!(
            (l.reporter.as_str(), l.source_workload.as_str(), l.destination_workload.as_str()),
            ("source", "a", "b")
        );
        assert_eq!((t.opened, t.closed), (2, 2));
        assert_eq!(c.denial.unwrap().0.policy, DEFAULT_DENY);
    }

    #[test]
    fn a_node_probe_is_an_exemption_not_an_istio_connection() {
        // b (endpoint 2) accepted 2 probes from the node (the world), allowed without policy.
        let k = CounterKey {
            reason: DropReason::NodeLocal as u8,
            ..key(2, warden_common::IDENTITY_WORLD, Direction::Ingress, Verdict::Allow, DropReason::None, 0, TC)
        };
        let c = derive(&k, &Counter { opened: 2, closed: 2, ..traffic() }, &names(), SecurityPolicy::MutualTls);
        assert_eq!((c.tcp, c.denial, c.drop), (None, None, None), "no Istio series, no refusal");
        assert_eq!(
            c.exemption,
            Some((
                DropLabels {
                    reason: "node_local".into(),
                    workload: "b".into(),
                    namespace: "team".into(),
                    direction: "ingress".into()
                },
                2
            ))
        );
    }

    #[test]
    fn allowed_connects_are_left_to_the_tc_hook() {
        let k = key(1, 3, Direction::Egress, Verdict::Allow, DropReason::None, 0, HOOK_CONNECT);
        assert_eq!(
            derive(&k, &Counter { packets_out: 2, ..Default::default() }, &names(), SecurityPolicy::None),
            Contribution::default()
        );
    }

    #[test]
    fn enforcer_drops_are_not_policy_denials() {
        let k = key(0, 0, Direction::Egress, Verdict::Deny, DropReason::NoState, 0, TC);
        let c = derive(
            &k,
            &Counter { packets_out: 4, bytes_out: 240, ..Default::default() },
            &names(),
            SecurityPolicy::None,
        );
        assert_eq!(c.denial, None);
        assert_eq!(
            c.drop.unwrap(),
            (
                DropLabels {
                    reason: "no_state".into(),
                    workload: UNKNOWN.into(),
                    namespace: UNKNOWN.into(),
                    direction: "egress".into()
                },
                4
            )
        );
    }

    fn value(text: &str, metric: &str, needle: &str) -> u64 {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains(needle))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    #[test]
    fn series_grow_across_rereads_renames_and_recreated_keys() {
        let mut registry = Registry::default();
        let m = TrafficMetrics::new(&mut registry, SecurityPolicy::None);
        let k = key(2, 2, Direction::Ingress, Verdict::Allow, DropReason::None, 1, TC);
        let mut n = names();
        m.update([(k, traffic())], &n);
        m.update([(k, traffic())], &n);
        let text = render(&registry);
        assert!(text.contains("# TYPE istio_tcp_connections_opened counter"), "{text}");
        let opened = "istio_tcp_connections_opened_total{";
        assert_eq!(
            value(&text, opened, "destination_workload=\"b\""),
            1,
            "a re-read of unchanged counters adds nothing:\n{text}"
        );
        assert_eq!(value(&text, "istio_tcp_received_bytes_total{", "reporter=\"destination\""), 500);

        // The workload is renamed: the old series keeps its value, growth goes to the new name.
        let mut r = record();
        r.endpoint_ids.remove("team/b");
        r.endpoint_ids.insert("team/b2".into(), 2);
        n = Names::from_record(&r);
        let mut more = traffic();
        more.opened = 3;
        m.update([(k, more)], &n);
        let text = render(&registry);
        assert_eq!(value(&text, opened, "destination_workload=\"b\""), 1, "{text}");
        assert_eq!(value(&text, opened, "destination_workload=\"b2\""), 2, "{text}");

        // The key vanished and came back smaller (map recreated): counted from zero, no decrease.
        m.update([], &n);
        m.update([(k, Counter { opened: 1, ..Default::default() })], &n);
        assert_eq!(value(&render(&registry), opened, "destination_workload=\"b2\""), 3);
        // Shrinking in place also counts as recreated.
        m.update([(k, Counter { opened: 5, ..Default::default() })], &n);
        m.update([(k, Counter { opened: 2, ..Default::default() })], &n);
        assert_eq!(value(&render(&registry), opened, "destination_workload=\"b2\""), 9);
    }

    #[test]
    fn keys_sharing_a_label_set_add_up_and_denials_are_exposed() {
        let mut registry = Registry::default();
        let m = TrafficMetrics::new(&mut registry, SecurityPolicy::None);
        let n = names();
        let deny_tc = key(2, 4, Direction::Ingress, Verdict::Deny, DropReason::PolicyDefaultDeny, POLICY_ID_NONE, TC);
        let deny_connect =
            key(2, 4, Direction::Ingress, Verdict::Deny, DropReason::PolicyDefaultDeny, POLICY_ID_NONE, HOOK_CONNECT);
        m.update(
            [
                (deny_tc, Counter { packets_in: 2, bytes_in: 120, opened: 2, ..Default::default() }),
                (deny_connect, Counter { packets_out: 3, ..Default::default() }),
            ],
            &n,
        );
        let text = render(&registry);
        assert!(text.contains(
            "warden_policy_denials_total{policy=\"default-deny\",workload=\"b\",namespace=\"team\",direction=\"ingress\",reason=\"policy_default_deny\"} 5"
        ), "{text}");
        assert!(text.contains("warden_drops_total{reason=\"policy_default_deny\",workload=\"b\",namespace=\"team\",direction=\"ingress\"} 5"), "{text}");
        assert_eq!(value(&text, "istio_tcp_connections_opened_total{", "response_flags=\"DENY\""), 5, "{text}");
        assert!(!text.contains("istio_tcp_sent_bytes_total{"), "refused flows carry no bytes: {text}");
    }
}
