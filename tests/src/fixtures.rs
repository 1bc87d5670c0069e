//! What the root tests share: the three workloads `a`, `b`, `c` of namespace `team` and the
//! policies they are tested with.

use std::net::Ipv4Addr;

use crate::Spec;

/// `a`, `b` and `c` in namespace `team` at `10.<net>.0.2/3/4`; `b` serves `b_ports`, the others 8080.
pub fn team(net: u8, b_ports: &[u16]) -> Vec<Spec> {
    let ip = |d| Ipv4Addr::new(10, net, 0, d);
    vec![
        Spec::new("team", "a", ip(2), &[8080]),
        Spec::new("team", "b", ip(3), b_ports),
        Spec::new("team", "c", ip(4), &[8080]),
    ]
}

/// `team/b-access`: only `a` may reach `b`, on 8080.
pub const ALLOW_A_TO_B_8080: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-access, namespace: team}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/team/sa/a]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

/// `team/a-deny-c`: `c` may not reach `a`.
pub const DENY_C_TO_A: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-deny-c, namespace: team}
spec:
  selector: {matchLabels: {app: a}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/team/sa/c]}}]
";
