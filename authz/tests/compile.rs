//! Compilation to the datapath's maps: fixed scenarios checked through the datapath's lookup.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;
use warden_authz::{CompileInput, Options, PolicySet, compile, parse_str};
use warden_common::{DropReason, IDENTITY_ANY, PROTO_ANY, PROTO_TCP, PROTO_UDP, PolicyValue};

fn set(yaml: &str) -> PolicySet {
    PolicySet::from_resources(parse_str(yaml, "test.yaml").unwrap(), &Options::default()).unwrap()
}

const PAYMENTS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-orders, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"]}}]
    to: [{operation: {ports: ["8443"]}}]
  - from: [{source: {ipBlocks: ["10.9.0.0/16"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ssh, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["22"]}}]
"#;

fn workloads() -> Vec<warden_authz::Workload> {
    vec![
        workload("shop", "payments-1", "payments", &[("app", "payments")], "10.1.0.10"),
        workload("shop", "orders-1", "orders", &[("app", "orders")], "10.1.0.20"),
        workload("shop", "orders-2", "orders", &[("app", "orders")], "10.9.0.21"),
        workload("other", "x", "x", &[], "10.2.0.5"),
    ]
}

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_790_000_000)
}

#[test]
fn compiled_maps_follow_the_policies() {
    let s = set(PAYMENTS);
    let w = workloads();
    let mut ids = Ids::default();
    let c = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 11), (1, 12)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut ids,
    )
    .unwrap();
    let m = Maps::new(&c);
    let allow = ids.policies[&("shop".into(), "allow-orders".into())];
    let deny = ids.policies[&("shop".into(), "deny-ssh".into())];
    let ip = |s: &str| s.parse().unwrap();
    // payments (endpoint 11): orders may reach 8443 only.
    assert_eq!(m.decide(11, ip("10.1.0.20"), PROTO_TCP, 8443), PolicyValue::allow(allow));
    assert_eq!(m.decide(11, ip("10.1.0.20"), PROTO_TCP, 80), PolicyValue::deny(0, DropReason::PolicyDefaultDeny));
    // The 10.9/16 block may reach any port but 22 (DENY first).
    assert_eq!(m.decide(11, ip("10.9.0.21"), PROTO_TCP, 80), PolicyValue::allow(allow));
    assert_eq!(m.decide(11, ip("10.9.0.21"), PROTO_UDP, 53), PolicyValue::allow(allow));
    assert_eq!(m.decide(11, ip("10.9.0.21"), PROTO_TCP, 22), PolicyValue::deny(deny, DropReason::PolicyDeny));
    assert_eq!(m.decide(11, ip("10.9.200.1"), PROTO_TCP, 1234), PolicyValue::allow(allow));
    // The world is denied by default.
    assert_eq!(m.decide(11, ip("192.0.2.1"), PROTO_TCP, 8443), PolicyValue::deny(0, DropReason::PolicyDefaultDeny));
    // orders (endpoint 12): no ALLOW policy applies: allowed, except the DENY on 22.
    assert_eq!(m.decide(12, ip("192.0.2.1"), PROTO_TCP, 80), PolicyValue::allow(0));
    assert_eq!(m.decide(12, ip("192.0.2.1"), PROTO_TCP, 22), PolicyValue::deny(deny, DropReason::PolicyDeny));
    // Both orders workloads have one principal but the CIDR separates them.
    assert_ne!(m.identity(ip("10.1.0.20")), m.identity(ip("10.9.0.21")));
    assert_eq!(c.identities[&m.identity(ip("10.1.0.20"))], "shop/orders");
    assert_eq!(c.identities[&m.identity(ip("10.9.0.21"))], "shop/orders in 10.9.0.0/16");
    assert_eq!(c.identities[&m.identity(ip("10.9.1.1"))], "cidr 10.9.0.0/16");
    assert_eq!(c.policy_names[&allow], "shop/allow-orders");
    // Defaults exist for both directions of every endpoint.
    for ep in [11, 12] {
        for dir in [warden_common::Direction::Ingress, warden_common::Direction::Egress] {
            let k = warden_common::PolicyKey::new(0, ep, dir, IDENTITY_ANY, PROTO_ANY, 0);
            assert!(m.entries.contains_key(&k), "default entry missing for {ep} {dir:?}");
        }
    }
    assert_eq!(c.valid_until, None);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn l7_rules_are_reported_as_compile_warnings() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: http-only, namespace: shop}
spec:
  rules:
  - to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bots, namespace: shop}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[user-agent]", values: ["sqlmap*"]}]
"#;
    let s = set(yaml);
    let w = workloads();
    let mut ids = Ids::default();
    let c = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 1)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut ids,
    )
    .unwrap();
    assert_eq!(
        c.warnings,
        vec![
            "shop/bots rule 0: DENY rule with only L7 attributes denies every connection in the kernel (L4)"
                .to_string(),
            "shop/http-only rule 0: ALLOW rule with L7 attributes never matches in the kernel (L4)".to_string(),
        ]
    );
    let m = Maps::new(&c);
    let bots = ids.policies[&("shop".into(), "bots".into())];
    assert_eq!(
        m.decide(1, "10.1.0.20".parse().unwrap(), PROTO_TCP, 8443),
        PolicyValue::deny(bots, DropReason::PolicyDeny)
    );
}

#[test]
fn dry_run_and_audit_change_nothing() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
"#;
    let s = set(yaml);
    let w = workloads();
    let c = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 1)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut Ids::default(),
    )
    .unwrap();
    let m = Maps::new(&c);
    assert_eq!(m.decide(1, "10.1.0.20".parse().unwrap(), PROTO_TCP, 80), PolicyValue::allow(0));
    assert_eq!(c.policy.len(), 2, "only the two defaults: {:?}", c.policy);
}

#[test]
fn time_windows_set_valid_until() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hours, namespace: shop}
spec:
  rules:
  - when: [{key: custom.time_of_day, values: ["08:00-18:00"]}]
"#;
    let s = set(yaml);
    let w = workloads();
    // 2026-11-24T10:00:00Z is inside the window; the next change is at 18:00.
    let ten = UNIX_EPOCH + Duration::from_secs(1_795_514_400);
    let c = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 1)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: ten,
        },
        &mut Ids::default(),
    )
    .unwrap();
    let m = Maps::new(&c);
    assert!(m.decide(1, "192.0.2.1".parse().unwrap(), PROTO_TCP, 80).is_allow());
    assert_eq!(c.valid_until, Some(ten + Duration::from_secs(8 * 3600)));
    let night = ten + Duration::from_secs(10 * 3600);
    let c = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 1)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: night,
        },
        &mut Ids::default(),
    )
    .unwrap();
    let m = Maps::new(&c);
    assert_eq!(
        m.decide(1, "192.0.2.1".parse().unwrap(), PROTO_TCP, 80),
        PolicyValue::deny(0, DropReason::PolicyDefaultDeny)
    );
    // 20:00 -> next boundary 08:00 the next day.
    assert_eq!(c.valid_until, Some(night + Duration::from_secs(12 * 3600)));
}

#[test]
fn strict_mtls_refuses_non_workload_sources() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: payments, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: STRICT}
  portLevelMtls: {9090: {mode: DISABLE}}
"#;
    let s = set(yaml);
    let w = workloads();
    let mut ids = Ids::default();
    let c = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 1), (1, 2)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut ids,
    )
    .unwrap();
    let m = Maps::new(&c);
    let world = "192.0.2.1".parse().unwrap();
    let v = m.decide(1, world, PROTO_TCP, 8443);
    assert_eq!(v.reason, DropReason::PlaintextStrict as u8);
    assert_eq!(c.policy_names[&v.policy_id], "shop/PeerAuthentication/payments");
    assert!(m.decide(1, world, PROTO_TCP, 9090).is_allow());
    assert!(m.decide(1, "10.1.0.20".parse().unwrap(), PROTO_TCP, 8443).is_allow());
    let v = m.decide(2, world, PROTO_TCP, 9090);
    assert_eq!(c.policy_names[&v.policy_id], "istio-system/PeerAuthentication/default");
}

#[test]
fn compile_errors_are_reported() {
    let s = set(PAYMENTS);
    let w = workloads();
    let e = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(9, 1)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut Ids::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("workload index 9"), "{e}");
    let e = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 1), (1, 1)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut Ids::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("endpoint id 1 is used by two"), "{e}");
    struct Zero;
    impl warden_authz::IdAllocator for Zero {
        fn policy_id(&mut self, _: &str, _: &str) -> u32 {
            0
        }
        fn identity_id(&mut self, _: &str) -> u32 {
            5
        }
    }
    let e = compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 1)],
            meshed: &[],
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut Zero,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            warden_authz::CompileError::IdentityCollision { .. } | warden_authz::CompileError::ReservedId { .. }
        ),
        "{e}"
    );
}

/// A scenario that exercises every kind of entry: CIDR and workload identities, ALLOW and DENY by
/// principal, namespace, `notNamespaces`, ipBlocks and `source.ip`, port-level STRICT/DISABLE.
const GOLDEN: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: payments, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {9000: {mode: STRICT}, 9090: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-other, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: ["shop", "istio-system"]}}]
    to: [{operation: {ports: ["7000"]}}]
  - from: [{source: {namespaces: ["other"]}}]
    to: [{operation: {ports: ["7001"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lan, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - when: [{key: source.ip, values: ["10.1.0.0/16"], notValues: ["10.1.0.10"]}]
"#;

/// Renders entries with their numbers and their names, one a line.
fn render(c: &warden_authz::Compiled) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for (k, v) in &c.policy {
        let remote =
            if k.remote_identity == IDENTITY_ANY { "*".to_string() } else { c.identities[&k.remote_identity].clone() };
        let port = if k.proto == PROTO_ANY { "*".to_string() } else { format!("{}/{}", k.dport, k.proto) };
        let policy = c.policy_names.get(&v.policy_id).map_or("-", String::as_str);
        let reason = DropReason::from_u8(v.reason).map_or("?", DropReason::name);
        writeln!(
            s,
            "({} {} {} {} {:#04x}) -> ({} {} {}) | ep {} {} {} {remote} {port}: {} {reason} {policy}",
            k.endpoint_id,
            k.remote_identity,
            k.dport,
            k.proto,
            k.dir_slot,
            v.policy_id,
            v.verdict,
            v.reason,
            k.endpoint_id,
            k.direction().map_or("?", |d| d.name()),
            if k.is_plaintext() { "plaintext" } else { "authenticated" },
            if v.is_allow() { "ALLOW" } else { "DENY" },
        )
        .unwrap();
    }
    s
}

fn golden_compile(meshed: &[bool]) -> warden_authz::Compiled {
    let s = set(&format!("{PAYMENTS}---{GOLDEN}"));
    let w = workloads();
    compile(
        &CompileInput {
            policies: &s,
            workloads: &w,
            local: &[(0, 11), (1, 12), (3, 13)],
            meshed,
            trust_domain: "cluster.local",
            now: t0(),
        },
        &mut Ids::default(),
    )
    .unwrap()
}

/// The entries of endpoints outside the mesh are those the compiler wrote before the plaintext
/// view existed, byte for byte (`golden/unmeshed.txt` was written by that compiler; set
/// `WARDEN_BLESS=1` to rewrite it after an intended change).
#[test]
fn unmeshed_entries_match_the_golden_file() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/unmeshed.txt");
    let got = render(&golden_compile(&[]));
    if std::env::var_os("WARDEN_BLESS").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert!(got == want, "entries differ from {}:\n--- got\n{got}\n--- want\n{want}", path.display());
}

/// Meshing endpoints adds their plaintext view and changes nothing else: the authenticated view
/// of every endpoint, and everything of the endpoint left outside the mesh, stay as golden.
#[test]
fn meshing_endpoints_only_adds_their_plaintext_view() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/unmeshed.txt");
    let mut c = golden_compile(&[true, true, false]);
    let plaintext: Vec<_> = c.policy.iter().filter(|(k, _)| k.is_plaintext()).copied().collect();
    assert!(plaintext.iter().all(|(k, _)| k.endpoint_id != 13), "{plaintext:?}");
    for ep in [11, 12] {
        let default =
            warden_common::PolicyKey::new(0, ep, warden_common::Direction::Ingress, IDENTITY_ANY, PROTO_ANY, 0)
                .with_plaintext(true);
        assert!(plaintext.iter().any(|(k, _)| *k == default), "no plaintext default for {ep}");
    }
    c.policy.retain(|(k, _)| !k.is_plaintext());
    assert_eq!(render(&c), std::fs::read_to_string(&path).unwrap());
}

#[test]
fn cluster_local_principals_compile_for_the_nodes_trust_domain() {
    // The usual Istio form of a policy, in a mesh whose trust domain is not cluster.local: the
    // kernel's map must still let orders reach 8443, and nothing else.
    let options = Options { trust_domain: "corp.example".into(), ..Options::default() };
    let s = PolicySet::from_resources(parse_str(PAYMENTS, "test.yaml").unwrap(), &options).unwrap();
    let w = workloads();
    let mut ids = Ids::default();
    let input = CompileInput {
        policies: &s,
        workloads: &w,
        local: &[(0, 11)],
        meshed: &[],
        trust_domain: "corp.example",
        now: t0(),
    };
    let c = compile(&input, &mut ids).unwrap();
    let m = Maps::new(&c);
    let allow = ids.policies[&("shop".into(), "allow-orders".into())];
    let ip = |s: &str| s.parse().unwrap();
    assert_eq!(m.decide(11, ip("10.1.0.20"), PROTO_TCP, 8443), PolicyValue::allow(allow));
    assert_eq!(m.decide(11, ip("10.2.0.5"), PROTO_TCP, 8443), PolicyValue::deny(0, DropReason::PolicyDefaultDeny));
}
