//! The plaintext view of a meshed endpoint's ingress: connections that did not come through the
//! node agent, evaluated as a peer without identity (Istio's plaintext peer). Each scenario is
//! checked through the datapath's own lookup in both views, and every decision asked of the maps
//! is also asked of the engine, which must agree.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, UNIX_EPOCH};
use support::*;
use warden_authz::{
    CompileError, CompileInput, Compiled, Destination, Options, Peer, PolicySet, Request, Verdict, Workload, compile,
    parse_str,
};
use warden_common::{DropReason, IDENTITY_ANY, PROTO_ANY, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue};

const PAYMENTS_IP: &str = "10.1.0.10";
const ORDERS_IP: &str = "10.1.0.20";
const ORDERS_2_IP: &str = "10.9.0.21";
const OTHER_IP: &str = "10.2.0.5";
const CIDR_IP: &str = "10.9.1.1";
const WORLD_IP: &str = "192.0.2.1";
/// Every kind of source: two workloads, a workload inside a policy CIDR, another namespace's
/// workload, an address of a policy CIDR (when the scenario has one), the world.
const SOURCES: [&str; 6] = [PAYMENTS_IP, ORDERS_IP, ORDERS_2_IP, OTHER_IP, CIDR_IP, WORLD_IP];

/// Endpoint 1 is `shop/payments-1`.
const PAYMENTS: u32 = 1;

fn workloads() -> Vec<Workload> {
    vec![
        workload("shop", "payments-1", "payments", &[("app", "payments")], PAYMENTS_IP),
        workload("shop", "orders-1", "orders", &[("app", "orders")], ORDERS_IP),
        workload("shop", "orders-2", "orders", &[("app", "orders")], ORDERS_2_IP),
        workload("other", "x", "x", &[], OTHER_IP),
    ]
}

const ALLOW_ORDERS_8443: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-orders, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"]}}]
    to: [{operation: {ports: ["8443"]}}]
"#;

struct Case {
    set: PolicySet,
    workloads: Vec<Workload>,
    local: Vec<(usize, u32)>,
    compiled: Compiled,
    maps: Maps,
    ids: Ids,
}

/// Compiles `yaml` with `shop/payments-1` (endpoint 1, meshed) and `shop/orders-1` (endpoint 2,
/// not meshed) local.
fn case(yaml: &str) -> Case {
    case_with(yaml, &[true, false])
}

fn case_with(yaml: &str, meshed: &[bool]) -> Case {
    let set = PolicySet::from_resources(parse_str(yaml, "test.yaml").unwrap(), &Options::default()).unwrap();
    let workloads = workloads();
    let local = vec![(0, PAYMENTS), (1, 2)];
    let mut ids = Ids::default();
    let compiled = compile(
        &CompileInput {
            policies: &set,
            workloads: &workloads,
            local: &local,
            meshed,
            trust_domain: "cluster.local",
            now: UNIX_EPOCH + Duration::from_secs(1_790_000_000),
        },
        &mut ids,
    )
    .unwrap();
    let maps = Maps::new(&compiled);
    Case { set, workloads, local, compiled, maps, ids }
}

impl Case {
    fn policy(&self, ns: &str, name: &str) -> u32 {
        self.ids.policies[&(ns.to_string(), name.to_string())]
    }
    fn peer_authentication(&self, ns: &str, name: &str) -> u32 {
        self.policy(ns, &format!("PeerAuthentication/{name}"))
    }

    /// The maps' decision for a connection from `src` to endpoint `ep` in one view; the engine,
    /// asked about the same connection (from the workload at `src` with its principal in the
    /// authenticated view, from a peer without identity in the plaintext one), must agree.
    fn decide(&self, plaintext: bool, ep: u32, src: &str, proto: u8, port: u16) -> PolicyValue {
        let src: Ipv4Addr = src.parse().unwrap();
        let got = self.maps.decide_view(plaintext, ep, src, proto, port);
        let (di, _) = self.local.iter().find(|(_, e)| *e == ep).unwrap();
        let dst = &self.workloads[*di];
        let principal = self
            .workloads
            .iter()
            .find(|w| w.ip == src && !plaintext)
            .map(|w| format!("cluster.local/ns/{}/sa/{}", w.namespace, w.service_account));
        let req = Request {
            source: Peer { principal, namespace: None, ip: Some(src) },
            destination: Destination {
                namespace: dst.namespace.clone(),
                labels: dst.labels.clone(),
                service_account: Some(dst.service_account.clone()),
                ip: Some(dst.ip),
                port,
                services: vec![],
            },
            protocol: proto,
            ..Request::default()
        };
        let e = self.set.evaluate(&req);
        assert_eq!(
            e.decision == Verdict::Allow,
            got.is_allow(),
            "{src} -> endpoint {ep} {port}/{proto} (plaintext: {plaintext}): engine {e:?}, maps {got:?}"
        );
        got
    }
    fn plaintext(&self, ep: u32, src: &str, port: u16) -> PolicyValue {
        self.decide(true, ep, src, PROTO_TCP, port)
    }
    fn authenticated(&self, ep: u32, src: &str, port: u16) -> PolicyValue {
        self.decide(false, ep, src, PROTO_TCP, port)
    }
    /// Every source, on these TCP ports, on UDP, in the plaintext view of endpoint 1.
    fn every_plaintext(&self, ports: &[u16]) -> Vec<PolicyValue> {
        let mut v = Vec::new();
        for src in SOURCES {
            for &p in ports {
                v.push(self.plaintext(PAYMENTS, src, p));
            }
            v.push(self.decide(true, PAYMENTS, src, PROTO_UDP, 53));
        }
        v
    }
    fn plaintext_default(&self, ep: u32) -> Option<PolicyValue> {
        let k =
            PolicyKey::new(0, ep, warden_common::Direction::Ingress, IDENTITY_ANY, PROTO_ANY, 0).with_plaintext(true);
        self.maps.entries.get(&k).copied()
    }
}

fn default_deny() -> PolicyValue {
    PolicyValue::deny(0, DropReason::PolicyDefaultDeny)
}

#[test]
fn strict_namespace_refuses_plaintext_on_every_port_while_the_principal_is_allowed_over_mtls() {
    let c = case(&format!(
        "{ALLOW_ORDERS_8443}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: shop}}
spec: {{mtls: {{mode: STRICT}}}}
"
    ));
    let strict = PolicyValue::deny(c.peer_authentication("shop", "strict"), DropReason::PlaintextStrict);
    for v in c.every_plaintext(&[8443, 80, 22]) {
        assert_eq!(v, strict);
    }
    // One entry says it all: the plaintext default.
    assert_eq!(
        c.maps.view_entries(PAYMENTS, true),
        vec![(
            PolicyKey::new(0, PAYMENTS, warden_common::Direction::Ingress, IDENTITY_ANY, PROTO_ANY, 0)
                .with_plaintext(true),
            strict
        )]
    );
    // Over mTLS, orders reaches 8443 and nothing else; the world is still refused as plaintext.
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_IP, 8443), PolicyValue::allow(c.policy("shop", "allow-orders")));
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_2_IP, 8443), PolicyValue::allow(c.policy("shop", "allow-orders")));
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_IP, 80), default_deny());
    assert_eq!(c.authenticated(PAYMENTS, OTHER_IP, 8443), default_deny());
    assert_eq!(c.authenticated(PAYMENTS, WORLD_IP, 8443), strict);
}

#[test]
fn port_level_permissive_under_a_strict_workload_evaluates_the_plaintext_peer() {
    let c = case(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: payments, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
"#,
    );
    let strict = PolicyValue::deny(c.peer_authentication("shop", "payments"), DropReason::PlaintextStrict);
    for src in SOURCES {
        // No ALLOW policy selects payments: a plaintext peer is allowed where mTLS is not STRICT.
        assert_eq!(c.plaintext(PAYMENTS, src, 8080), PolicyValue::allow(0), "{src}");
        assert_eq!(c.plaintext(PAYMENTS, src, 80), strict, "{src}");
        assert_eq!(c.decide(true, PAYMENTS, src, PROTO_UDP, 8080), strict, "{src}: 8080 is a TCP port");
    }
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_IP, 80), PolicyValue::allow(0));
    assert_eq!(c.plaintext_default(PAYMENTS), Some(strict));
}

#[test]
fn port_level_strict_under_a_permissive_workload_refuses_plaintext_on_that_port_only() {
    let c = case(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: payments, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {9000: {mode: STRICT}}
"#,
    );
    let strict = PolicyValue::deny(c.peer_authentication("shop", "payments"), DropReason::PlaintextStrict);
    for src in SOURCES {
        assert_eq!(c.plaintext(PAYMENTS, src, 9000), strict, "{src}");
        assert_eq!(c.plaintext(PAYMENTS, src, 80), PolicyValue::allow(0), "{src}");
    }
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_IP, 9000), PolicyValue::allow(0));
    assert_eq!(c.plaintext_default(PAYMENTS), Some(PolicyValue::allow(0)));
}

#[test]
fn permissive_allow_by_principal_denies_the_plaintext_peer_and_allow_by_ip_block_admits_it() {
    let c = case(&format!(
        "{ALLOW_ORDERS_8443}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-lan, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: payments}}}}
  rules:
  - from: [{{source: {{ipBlocks: [\"10.9.0.0/16\"]}}}}]
    to: [{{operation: {{ports: [\"9443\"]}}}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: permissive, namespace: shop}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
"
    ));
    let allow_orders = PolicyValue::allow(c.policy("shop", "allow-orders"));
    let allow_lan = PolicyValue::allow(c.policy("shop", "allow-lan"));
    // Orders' address without its certificate is nobody: an ALLOW applies, none matches.
    assert_eq!(c.plaintext(PAYMENTS, ORDERS_IP, 8443), default_deny());
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_IP, 8443), allow_orders);
    // The block matches by address, with or without identity.
    for src in [ORDERS_2_IP, CIDR_IP] {
        assert_eq!(c.plaintext(PAYMENTS, src, 9443), allow_lan, "{src}");
        assert_eq!(c.plaintext(PAYMENTS, src, 8443), default_deny(), "{src}");
    }
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_2_IP, 8443), allow_orders);
    assert_eq!(c.plaintext(PAYMENTS, WORLD_IP, 9443), default_deny());
    assert_eq!(c.plaintext(PAYMENTS, ORDERS_IP, 9443), default_deny());
}

#[test]
fn disable_compiles_as_permissive() {
    let with = |mode: &str| {
        case(&format!(
            "{ALLOW_ORDERS_8443}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: mode, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: payments, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: payments}}}}
  mtls: {{mode: {mode}}}
  portLevelMtls: {{9000: {{mode: STRICT}}, 9090: {{mode: {mode}}}}}
"
        ))
    };
    let (disable, permissive) = (with("DISABLE"), with("PERMISSIVE"));
    assert_eq!(disable.compiled.policy, permissive.compiled.policy);
    assert_eq!(disable.plaintext(PAYMENTS, WORLD_IP, 8443), default_deny());
    assert_eq!(disable.plaintext(PAYMENTS, WORLD_IP, 9090), default_deny());
    let strict = PolicyValue::deny(disable.peer_authentication("shop", "payments"), DropReason::PlaintextStrict);
    assert_eq!(disable.plaintext(PAYMENTS, WORLD_IP, 9000), strict);
    // Not a vacuous comparison: STRICT compiles differently.
    assert_ne!(with("STRICT").compiled.policy, permissive.compiled.policy);
}

#[test]
fn deny_by_namespace_misses_the_plaintext_peer_and_deny_by_not_namespaces_matches_it() {
    let c = case(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["other"]}}]
    to: [{operation: {ports: ["7001"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-not-shop, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: ["shop"]}}]
    to: [{operation: {ports: ["7000"]}}]
"#,
    );
    let deny_other = PolicyValue::deny(c.policy("shop", "deny-other"), DropReason::PolicyDeny);
    let deny_not_shop = PolicyValue::deny(c.policy("shop", "deny-not-shop"), DropReason::PolicyDeny);
    // other/x over mTLS is in namespace "other"; without identity it is in no namespace.
    assert_eq!(c.authenticated(PAYMENTS, OTHER_IP, 7001), deny_other);
    assert_eq!(c.plaintext(PAYMENTS, OTHER_IP, 7001), PolicyValue::allow(0));
    // A peer without identity is not in "shop" either, whichever address it uses.
    for src in SOURCES {
        assert_eq!(c.plaintext(PAYMENTS, src, 7000), deny_not_shop, "{src}");
    }
    assert_eq!(c.authenticated(PAYMENTS, ORDERS_IP, 7000), PolicyValue::allow(0));
    assert_eq!(c.authenticated(PAYMENTS, OTHER_IP, 7000), deny_not_shop);
}

#[test]
fn only_meshed_endpoints_get_a_plaintext_view_and_it_always_has_its_default() {
    let c = case(ALLOW_ORDERS_8443);
    // Endpoint 1 is meshed, without PeerAuthentication: PERMISSIVE, and the ALLOW names a
    // principal only, so the plaintext view is the default deny alone.
    assert_eq!(c.plaintext_default(PAYMENTS), Some(default_deny()));
    assert_eq!(c.maps.view_entries(PAYMENTS, true).len(), 1);
    for v in c.every_plaintext(&[8443, 80]) {
        assert_eq!(v, default_deny());
    }
    // Endpoint 2 is not: no plaintext entry at all (the kernel must not look there; it would
    // find no state and deny).
    assert!(c.maps.view_entries(2, true).is_empty());
    assert_eq!(
        c.maps.decide_plaintext(2, WORLD_IP.parse().unwrap(), PROTO_TCP, 80),
        PolicyValue::deny(0, DropReason::NoState)
    );
    // A `meshed` shorter than `local` leaves the rest outside the mesh.
    let short = case_with(ALLOW_ORDERS_8443, &[true]);
    assert_eq!(short.compiled.policy, c.compiled.policy);
    // The authenticated view is the same whether the endpoint is meshed or not.
    let unmeshed = case_with(ALLOW_ORDERS_8443, &[]);
    let authenticated: Vec<_> = c.compiled.policy.iter().filter(|(k, _)| !k.is_plaintext()).copied().collect();
    assert_eq!(authenticated, unmeshed.compiled.policy);
}

#[test]
fn meshed_longer_than_local_is_an_error() {
    let set = PolicySet::from_resources(parse_str(ALLOW_ORDERS_8443, "t.yaml").unwrap(), &Options::default()).unwrap();
    let w = workloads();
    let e = compile(
        &CompileInput {
            policies: &set,
            workloads: &w,
            local: &[(0, 1)],
            meshed: &[true, true],
            trust_domain: "cluster.local",
            now: UNIX_EPOCH,
        },
        &mut Ids::default(),
    )
    .unwrap_err();
    assert!(matches!(e, CompileError::MeshedLength { meshed: 2, local: 1 }), "{e}");
}
