//! Criterion benchmarks for the targets:
//! - one L4 decision with 10,000 policies in a namespace (10k DENY policies x 10 rules, as
//!   ztunnel's RBAC benchmark) — target median <= 1 µs;
//! - compiling 10,000 policies into map entries — target <= 200 ms (with and without every local
//!   endpoint in the mesh, which adds the plaintext view of their ingress).
//!
//! Run: `CARGO_TARGET_DIR=target-authz cargo bench -p warden-authz --bench authz`

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, UNIX_EPOCH};
use warden_authz::{
    CompileInput, Destination, IdAllocator, Options, Peer, PolicySet, Request, Workload, compile, parse_str,
};

/// 10,000 namespace-wide DENY policies, each with 10 rules naming a principal and a port.
fn deny_policies() -> PolicySet {
    let mut yaml = String::new();
    for i in 0..10_000 {
        yaml.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-{i}, namespace: bench}}\nspec:\n  action: DENY\n  rules:\n"
        ));
        for j in 0..10 {
            yaml.push_str(&format!(
                "  - from: [{{source: {{principals: [\"cluster.local/ns/ns-{}/sa/sa-{j}\"]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n",
                i % 500,
                8000 + (i + j) % 100
            ));
        }
    }
    PolicySet::from_resources(parse_str(&yaml, "bench.yaml").unwrap(), &Options::default()).unwrap()
}

fn request(principal: &str, port: u16) -> Request {
    Request {
        source: Peer { principal: Some(principal.into()), namespace: None, ip: Some(Ipv4Addr::new(10, 0, 0, 1)) },
        destination: Destination {
            namespace: "bench".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            service_account: Some("web".into()),
            ip: Some(Ipv4Addr::new(10, 0, 0, 2)),
            port,
            services: vec![],
        },
        protocol: 0,
        sni: None,
        http: None,
        time: Some(UNIX_EPOCH + Duration::from_secs(1_795_514_400)),
    }
}

fn l4_decision(c: &mut Criterion) {
    let set = deny_policies();
    let mut g = c.benchmark_group("l4_decision_10k_deny_policies_x10_rules");
    // A peer named by 20 policies' rules (checked, no match on this port): the common case.
    let named = request("cluster.local/ns/ns-7/sa/sa-3", 443);
    assert_eq!(set.evaluate(&named).decision, warden_authz::Verdict::Allow);
    g.bench_function("named_peer_allowed", |b| b.iter(|| black_box(set.evaluate(black_box(&named)))));
    // The same peer on a denied port.
    let denied = request("cluster.local/ns/ns-7/sa/sa-3", 8010);
    assert_eq!(set.evaluate(&denied).decision, warden_authz::Verdict::Deny);
    g.bench_function("named_peer_denied", |b| b.iter(|| black_box(set.evaluate(black_box(&denied)))));
    // A peer no rule names.
    let other = request("cluster.local/ns/elsewhere/sa/x", 8010);
    g.bench_function("unnamed_peer", |b| b.iter(|| black_box(set.evaluate(black_box(&other)))));
    g.finish();
}

/// 10,000 ALLOW policies in one namespace, each selecting one of 10,000 apps, with 10 rules
/// that name no peer (ports and IP blocks only): indexed by selector, not by peer.
fn allow_selector_policies() -> PolicySet {
    let mut yaml = String::new();
    for i in 0..10_000 {
        yaml.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{i}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: app-{i}}}}}\n  rules:\n"
        ));
        for j in 0..10 {
            yaml.push_str(&format!(
                "  - from: [{{source: {{ipBlocks: [\"10.{j}.0.0/16\"]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n",
                8000 + (i + j) % 100
            ));
        }
    }
    PolicySet::from_resources(parse_str(&yaml, "bench.yaml").unwrap(), &Options::default()).unwrap()
}

fn l4_decision_selectors(c: &mut Criterion) {
    let set = allow_selector_policies();
    let mut g = c.benchmark_group("l4_decision_10k_allow_policies_by_selector");
    let mut req = request("cluster.local/ns/x/sa/y", 8000 + (4242 + 3) % 100);
    req.destination.labels = BTreeMap::from([("app".into(), "app-4242".into()), ("version".into(), "v1".into())]);
    req.source.ip = Some(Ipv4Addr::new(10, 3, 1, 1));
    assert_eq!(set.evaluate(&req).decision, warden_authz::Verdict::Allow);
    g.bench_function("allowed", |b| b.iter(|| black_box(set.evaluate(black_box(&req)))));
    req.destination.port = 9999;
    assert_eq!(set.evaluate(&req).decision, warden_authz::Verdict::Deny);
    g.bench_function("default_deny", |b| b.iter(|| black_box(set.evaluate(black_box(&req)))));
    g.finish();
}

#[derive(Default)]
struct Ids {
    p: HashMap<(String, String), u32>,
    i: HashMap<String, u32>,
}
impl IdAllocator for Ids {
    fn policy_id(&mut self, ns: &str, name: &str) -> u32 {
        let n = self.p.len() as u32 + 1;
        *self.p.entry((ns.into(), name.into())).or_insert(n)
    }
    fn identity_id(&mut self, c: &str) -> u32 {
        let n = self.i.len() as u32 + 1;
        *self.i.entry(c.into()).or_insert(n)
    }
}

/// 10,000 policies across 10 namespaces: ALLOW and DENY, selecting one of 50 apps, naming
/// principals from 10 namespaces x 20 service accounts, ports, some ipBlocks.
fn mixed_policies() -> (PolicySet, Vec<Workload>, Vec<(usize, u32)>) {
    let mut yaml = String::new();
    for i in 0..10_000 {
        let action = if i % 4 == 0 { "DENY" } else { "ALLOW" };
        yaml.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{i}, namespace: ns-{}}}\nspec:\n  action: {action}\n  selector: {{matchLabels: {{app: app-{}}}}}\n  rules:\n",
            i % 10,
            i % 50
        ));
        for j in 0..3 {
            yaml.push_str(&format!(
                "  - from: [{{source: {{principals: [\"cluster.local/ns/ns-{}/sa/sa-{}\"]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n",
                (i + j) % 10,
                (i * 7 + j) % 20,
                8000 + (i + j) % 20
            ));
        }
        if i % 10 == 0 {
            yaml.push_str(&format!("  - from: [{{source: {{ipBlocks: [\"10.{}.0.0/16\"]}}}}]\n", i % 200));
        }
    }
    let set = PolicySet::from_resources(parse_str(&yaml, "bench.yaml").unwrap(), &Options::default()).unwrap();
    let workloads: Vec<Workload> = (0..1000)
        .map(|k| Workload {
            name: format!("w-{k}"),
            namespace: format!("ns-{}", k % 10),
            service_account: format!("sa-{}", k % 17),
            labels: BTreeMap::from([("app".into(), format!("app-{}", k % 50))]),
            ip: Ipv4Addr::new(10, (k / 250) as u8, (k % 250) as u8, 10),
            services: vec![],
        })
        .collect();
    // 20 local endpoints, one per (namespace, app) pair that policies select.
    let local: Vec<(usize, u32)> = (0..20).map(|k| (k * 50 + k % 10, k as u32 + 1)).collect();
    (set, workloads, local)
}

fn compile_10k(c: &mut Criterion) {
    let (set, workloads, local) = mixed_policies();
    let now = UNIX_EPOCH + Duration::from_secs(1_795_514_400);
    // Every local endpoint in the mesh (no PeerAuthentication: PERMISSIVE), so each also gets
    // the plaintext view of its ingress.
    let all_meshed = vec![true; local.len()];
    let mut g = c.benchmark_group("compile_10k_policies");
    g.sample_size(20);
    for (name, meshed) in [("1000_workloads_20_local", &[][..]), ("1000_workloads_20_local_meshed", &all_meshed[..])] {
        let input = CompileInput {
            policies: &set,
            workloads: &workloads,
            local: &local,
            meshed,
            trust_domain: "cluster.local",
            now,
        };
        let out = compile(&input, &mut Ids::default()).unwrap();
        eprintln!(
            "compile_10k {name}: {} ipcache entries, {} policy entries ({} plaintext), {} identities",
            out.ipcache.len(),
            out.policy.len(),
            out.policy.iter().filter(|(k, _)| k.is_plaintext()).count(),
            out.identities.len()
        );
        g.bench_function(name, |b| {
            b.iter_batched(
                Ids::default,
                |mut ids| black_box(compile(black_box(&input), &mut ids).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, l4_decision, l4_decision_selectors, compile_10k);
criterion_main!(benches);
