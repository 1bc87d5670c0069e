//! The differential test: for thousands of random policy sets, workloads and connections, the
//! engine's L4 decision must equal the datapath's decision — `warden_common::lookup::decide`
//! over the compiled policy entries, with the remote identity found by a longest-prefix-match
//! model of the compiled identity cache — verdict for verdict and deciding policy for deciding
//! policy. Random endpoints are in the mesh: their plaintext view must give the engine's decision
//! for a peer without identity at the same address, and the authenticated view (and everything
//! of the other endpoints) must be what the compiler writes without the mesh.

mod support;

use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use std::time::{Duration, UNIX_EPOCH};
use support::*;
use warden_authz::{CompileInput, Destination, Options, Peer, PolicySet, Request, Verdict, compile, parse_str};
use warden_common::{DropReason, IDENTITY_ANY, PROTO_ANY, PROTO_TCP, PROTO_UDP};

const NAMESPACES: [&str; 3] = ["a", "b", "istio-system"];
const SAS: [&str; 3] = ["s1", "s2", "s3"];
const APPS: [&str; 2] = ["x", "y"];
const CIDRS: [&str; 7] =
    ["10.0.0.0/16", "10.0.1.0/24", "10.0.0.4/30", "10.0.1.3", "192.168.0.0/16", "0.0.0.0/0", "10.0.0.0/8"];
const PORTS: [&str; 3] = ["80", "443", "8080"];
const WORKLOAD_IPS: [&str; 8] =
    ["10.0.0.1", "10.0.0.5", "10.0.0.6", "10.0.1.3", "10.0.1.4", "10.1.0.1", "192.168.3.3", "10.0.0.9"];
const OTHER_IPS: [&str; 6] = ["10.0.0.7", "10.0.1.200", "192.168.1.1", "8.8.8.8", "10.0.200.1", "10.3.3.3"];
const TEST_PORTS: [u16; 5] = [80, 443, 8080, 22, 9090];

fn list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "))
}

fn principal() -> impl Strategy<Value = String> {
    prop_oneof![
        (select(&NAMESPACES[..]), select(&SAS[..])).prop_map(|(n, s)| format!("cluster.local/ns/{n}/sa/{s}")),
        (select(&NAMESPACES[..]), select(&SAS[..])).prop_map(|(n, s)| format!("spiffe://cluster.local/ns/{n}/sa/{s}")),
        select(&NAMESPACES[..]).prop_map(|n| format!("cluster.local/ns/{n}/*")),
        select(&SAS[..]).prop_map(|s| format!("*/sa/{s}")),
        Just("*".to_string()),
    ]
}

fn ns_pattern() -> impl Strategy<Value = String> {
    prop_oneof![select(&NAMESPACES[..]).prop_map(str::to_string), Just("*".to_string()), Just("istio-*".to_string())]
}

fn field(name: &'static str, s: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Option<String>> {
    prop::option::weighted(0.3, prop::collection::vec(s, 1..3))
        .prop_map(move |v| v.map(|v| format!("{name}: {}", list(&v))))
        .boxed()
}

fn source() -> impl Strategy<Value = Option<String>> {
    (
        field("principals", principal()),
        field("notPrincipals", principal()),
        field("namespaces", ns_pattern()),
        field("notNamespaces", ns_pattern()),
        field("ipBlocks", select(&CIDRS[..]).prop_map(str::to_string)),
        field("notIpBlocks", select(&CIDRS[..]).prop_map(str::to_string)),
        prop::option::weighted(
            0.15,
            (select(&NAMESPACES[..]), select(&SAS[..])).prop_map(|(n, s)| format!("serviceAccounts: [\"{n}/{s}\"]")),
        ),
        prop::option::weighted(0.15, Just("requestPrincipals: [\"*\"]".to_string())),
        prop::option::weighted(0.1, Just("remoteIpBlocks: [\"10.0.0.0/8\"]".to_string())),
    )
        .prop_map(|(a, b, c, d, e, f, sa, rp, rip)| {
            let mut fs: Vec<String> = [a, b, c, d, e, f, rp, rip].into_iter().flatten().collect();
            if let Some(sa) = sa
                && !fs.iter().any(|f| f.contains("rincipals:") && !f.starts_with("request") || f.contains("amespaces:"))
            {
                fs.push(sa);
            }
            if fs.is_empty() { None } else { Some(format!("{{source: {{{}}}}}", fs.join(", "))) }
        })
}

fn operation() -> impl Strategy<Value = Option<String>> {
    (
        field("ports", select(&PORTS[..]).prop_map(str::to_string)),
        field("notPorts", select(&PORTS[..]).prop_map(str::to_string)),
        prop::option::weighted(0.2, Just("methods: [\"GET\"]".to_string())),
        prop::option::weighted(0.1, Just("paths: [\"/api/*\"]".to_string())),
    )
        .prop_map(|(a, b, c, d)| {
            let fs: Vec<String> = [a, b, c, d].into_iter().flatten().collect();
            if fs.is_empty() { None } else { Some(format!("{{operation: {{{}}}}}", fs.join(", "))) }
        })
}

fn condition() -> impl Strategy<Value = String> {
    let values = |key: &'static str, s: BoxedStrategy<String>| {
        (prop::collection::vec(s.clone(), 0..3), prop::collection::vec(s, 0..2)).prop_map(move |(v, n)| {
            let (v, n) = if v.is_empty() && n.is_empty() { (vec!["*".to_string()], n) } else { (v, n) };
            let mut parts = vec![format!("key: {key:?}")];
            if !v.is_empty() {
                parts.push(format!("values: {}", list(&v)));
            }
            if !n.is_empty() {
                parts.push(format!("notValues: {}", list(&n)));
            }
            format!("{{{}}}", parts.join(", "))
        })
    };
    prop_oneof![
        values("source.ip", select(&CIDRS[..]).prop_map(str::to_string).boxed()),
        values("source.namespace", ns_pattern().boxed()),
        values("source.principal", principal().boxed()),
        values("destination.port", select(&PORTS[..]).prop_map(str::to_string).boxed()),
        values("destination.ip", prop_oneof![Just("10.0.0.0/16".to_string()), Just("10.0.0.1".to_string())].boxed()),
        values("request.headers[x-a]", Just("v".to_string()).boxed()),
        values(
            "custom.time_of_day",
            prop_oneof![Just("08:00-18:00".to_string()), Just("22:00-06:00".to_string())].boxed()
        ),
        values("custom.day_of_week", prop_oneof![Just("monday".to_string()), Just("sunday".to_string())].boxed()),
    ]
    .prop_map(|c| {
        c.replace("key: \"source.ip\", values: [\"*\"]", "key: \"source.ip\", values: [\"0.0.0.0/0\"]")
            .replace("key: \"destination.port\", values: [\"*\"]", "key: \"destination.port\", values: [\"80\"]")
            .replace("key: \"destination.ip\", values: [\"*\"]", "key: \"destination.ip\", values: [\"10.0.0.0/16\"]")
            .replace(
                "key: \"custom.time_of_day\", values: [\"*\"]",
                "key: \"custom.time_of_day\", values: [\"08:00-18:00\"]",
            )
            .replace(
                "key: \"custom.day_of_week\", values: [\"*\"]",
                "key: \"custom.day_of_week\", values: [\"monday\"]",
            )
    })
}

fn rule() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(source(), 0..3),
        prop::collection::vec(operation(), 0..3),
        prop::collection::vec(condition(), 0..3),
    )
        .prop_map(|(from, to, when)| {
            let from: Vec<String> = from.into_iter().flatten().collect();
            let to: Vec<String> = to.into_iter().flatten().collect();
            let mut parts = Vec::new();
            if !from.is_empty() {
                parts.push(format!("from: [{}]", from.join(", ")));
            }
            if !to.is_empty() {
                parts.push(format!("to: [{}]", to.join(", ")));
            }
            if !when.is_empty() {
                parts.push(format!("when: [{}]", when.join(", ")));
            }
            format!("{{{}}}", parts.join(", "))
        })
}

fn authz_policy(i: usize) -> impl Strategy<Value = String> {
    (
        select(&NAMESPACES[..]),
        prop::option::weighted(0.5, select(&APPS[..])),
        select(&["ALLOW", "ALLOW", "DENY", "DENY", "AUDIT", "CUSTOM"][..]),
        prop::option::weighted(0.1, Just(())),
        prop::option::weighted(0.9, prop::collection::vec(rule(), 0..4)),
    )
        .prop_map(move |(ns, app, action, dry, rules)| {
            let dry = if dry.is_some() && matches!(action, "ALLOW" | "DENY") { ", annotations: {istio.io/dry-run: \"true\"}" } else { "" };
            let sel = app.map(|a| format!("selector: {{matchLabels: {{app: {a}}}}}, ")).unwrap_or_default();
            let provider = if action == "CUSTOM" { "provider: {name: ext}, " } else { "" };
            let rules = match rules {
                None if action == "DENY" || action == "CUSTOM" => "rules: [{}]".to_string(),
                None => String::new(),
                Some(r) => format!("rules: [{}]", r.join(", ")),
            };
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: {ns}{dry}}}\nspec: {{{sel}{provider}action: {action}, {rules}}}\n"
            )
        })
}

fn peer_authentication(i: usize) -> impl Strategy<Value = String> {
    (
        select(&NAMESPACES[..]),
        prop::option::weighted(0.4, select(&APPS[..])),
        select(&["STRICT", "PERMISSIVE", "DISABLE", "UNSET"][..]),
        prop::option::weighted(0.5, (select(&PORTS[..]), select(&["STRICT", "PERMISSIVE", "DISABLE", "UNSET"][..]))),
    )
        .prop_map(move |(ns, app, mode, port)| {
            let (sel, port) = match app {
                Some(a) => (
                    format!("selector: {{matchLabels: {{app: {a}}}}}, "),
                    port.map(|(p, m)| format!(", portLevelMtls: {{{p}: {{mode: {m}}}}}")).unwrap_or_default(),
                ),
                None => (String::new(), String::new()),
            };
            format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa{i}, namespace: {ns}}}\nspec: {{{sel}mtls: {{mode: {mode}}}{port}}}\n")
        })
}

fn policy_docs() -> impl Strategy<Value = Vec<String>> {
    (1usize..7, 0usize..3).prop_flat_map(|(n, m)| {
        let a: Vec<_> = (0..n).map(|i| authz_policy(i).boxed()).collect();
        let p: Vec<_> = (0..m).map(|i| peer_authentication(i).boxed()).collect();
        (a, p).prop_map(|(mut a, p)| {
            a.extend(p);
            a
        })
    })
}

#[derive(Debug, Clone)]
struct W {
    ns: &'static str,
    sa: &'static str,
    app: &'static str,
    ip: &'static str,
}

fn workloads() -> impl Strategy<Value = Vec<W>> {
    subsequence(&WORKLOAD_IPS[..], 2..7).prop_flat_map(|ips| {
        let n = ips.len();
        (Just(ips), prop::collection::vec((select(&NAMESPACES[..2]), select(&SAS[..]), select(&APPS[..])), n)).prop_map(
            |(ips, attrs)| ips.into_iter().zip(attrs).map(|(ip, (ns, sa, app))| W { ns, sa, app, ip }).collect(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, max_shrink_iters: 2000, .. ProptestConfig::default() })]

    #[test]
    fn engine_and_compiled_maps_agree(
        docs in policy_docs(),
        ws in workloads(),
        meshed in prop::collection::vec(any::<bool>(), 0..8),
        hour in 0u64..24,
        day in 0u64..7,
    ) {
        // Keep only the documents that validate (the generator can combine fields Istio forbids).
        let mut resources = Vec::new();
        for d in &docs {
            if let Ok(r) = parse_str(d, "gen.yaml") {
                resources.extend(r);
            }
        }
        let set = PolicySet::from_resources(resources, &Options::default()).unwrap();
        let workloads: Vec<_> = ws.iter().enumerate().map(|(i, w)| workload(w.ns, &format!("w{i}"), w.sa, &[("app", w.app)], w.ip)).collect();
        let local: Vec<(usize, u32)> = (0..workloads.len()).map(|i| (i, i as u32 + 1)).collect();
        // Some endpoints in the mesh; `meshed` may be shorter than `local` (the rest are not).
        let meshed: Vec<bool> = meshed.into_iter().take(local.len()).collect();
        let now = UNIX_EPOCH + Duration::from_secs(1_795_478_400 + day * 86_400 + hour * 3600 + 17 * 60);
        let mut ids = Ids::default();
        let compiled = compile(&CompileInput { policies: &set, workloads: &workloads, local: &local, meshed: &meshed, trust_domain: "cluster.local", now }, &mut ids).unwrap();
        // The mesh only adds plaintext views: without them, the output is the unmeshed one.
        let unmeshed = compile(&CompileInput { policies: &set, workloads: &workloads, local: &local, meshed: &[], trust_domain: "cluster.local", now }, &mut Ids::default()).unwrap();
        let mut authenticated = compiled.clone();
        authenticated.policy.retain(|(k, _)| !k.is_plaintext());
        prop_assert_eq!(&authenticated, &unmeshed);
        let maps = Maps::new(&compiled);
        for (di, dst) in workloads.iter().enumerate() {
            let ep = di as u32 + 1;
            let is_meshed = meshed.get(di).copied().unwrap_or(false);
            let plaintext_entries = maps.view_entries(ep, true);
            prop_assert_eq!(
                plaintext_entries.iter().any(|(k, _)| k.remote_identity == IDENTITY_ANY && k.proto == PROTO_ANY),
                is_meshed,
                "plaintext default of endpoint {} (meshed: {}): {:?}", ep, is_meshed, plaintext_entries
            );
            prop_assert!(is_meshed || plaintext_entries.is_empty());
            let views: &[bool] = if is_meshed { &[false, true] } else { &[false] };
            for src in WORKLOAD_IPS.iter().chain(OTHER_IPS.iter()) {
                let src_ip: std::net::Ipv4Addr = src.parse().unwrap();
                let peer = workloads.iter().find(|w| w.ip == src_ip);
                for &port in &TEST_PORTS {
                    for proto in [PROTO_TCP, PROTO_UDP] {
                        for &plaintext in views {
                            // The plaintext view answers for a peer without identity at `src`.
                            let principal = if plaintext {
                                None
                            } else {
                                peer.map(|w| format!("cluster.local/ns/{}/sa/{}", w.namespace, w.service_account))
                            };
                            let req = Request {
                                source: Peer { principal, namespace: None, ip: Some(src_ip) },
                                destination: Destination {
                                    namespace: dst.namespace.clone(),
                                    labels: dst.labels.clone(),
                                    service_account: Some(dst.service_account.clone()),
                                    ip: Some(dst.ip),
                                    port,
                                    services: vec![],
                                },
                                protocol: proto,
                                sni: None,
                                http: None,
                                time: Some(now),
                            };
                            let e = set.evaluate(&req);
                            let m = maps.decide_view(plaintext, ep, src_ip, proto, port);
                            let ctx = || format!("{src} -> {}:{port}/{proto} (plaintext view: {plaintext})\nengine: {e:?}\nmaps: {m:?} ({:?})\npolicies:\n{}\nentries: {:#?}\nipcache: {:?}",
                                dst.ip, compiled.policy_names.get(&m.policy_id), docs.join("---\n"), compiled.policy, compiled.ipcache);
                            prop_assert_eq!(e.decision == Verdict::Allow, m.is_allow(), "{}", ctx());
                            let engine_name = match (e.action.as_deref(), &e.policy) {
                                (Some("PEER_AUTHENTICATION"), Some(p)) => {
                                    let (ns, name) = p.split_once('/').unwrap();
                                    Some(format!("{ns}/PeerAuthentication/{name}"))
                                }
                                (_, p) => p.clone(),
                            };
                            prop_assert_eq!(engine_name.as_ref(), compiled.policy_names.get(&m.policy_id), "{}", ctx());
                            let want_reason = match (e.decision, e.action.as_deref()) {
                                (Verdict::Allow, _) => DropReason::None,
                                (Verdict::Deny, None) => DropReason::PolicyDefaultDeny,
                                (Verdict::Deny, Some("PEER_AUTHENTICATION")) => DropReason::PlaintextStrict,
                                (Verdict::Deny, Some(_)) => DropReason::PolicyDeny,
                            };
                            prop_assert_eq!(want_reason as u8, m.reason, "{}", ctx());
                        }
                    }
                }
            }
        }
    }
}
