//! Table-driven evaluation tests (in the manner of ztunnel's `rbac_test!`): every source and
//! operation field and its `not` form, every `when` key, the evaluation order, the empty cases,
//! scoping, PeerAuthentication, at L4 (no `http`) and L7.
//!
//! Expectations read `"ALLOW"` / `"DENY"` (a default verdict) or `"ALLOW p#0"` /
//! `"DENY p#1"` (decided by policy `t/p`, rule 0 / 1; `"DENY root/p#0"` names another namespace).

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};
use warden_authz::{Destination, Http, Jwt, Layer, Options, Peer, PolicySet, Request, Verdict, parse_str};

fn set(yaml: &str) -> PolicySet {
    let mut docs = Vec::new();
    for d in yaml.split("\n---\n") {
        docs.extend(parse_str(d, "t.yaml").unwrap_or_else(|e| panic!("{e}")));
    }
    PolicySet::from_resources(docs, &Options { root_namespace: "root".into(), ..Options::default() }).unwrap()
}

#[derive(Clone)]
struct R(Request);

fn conn() -> R {
    R(Request {
        source: Peer {
            principal: Some("cluster.local/ns/t/sa/client".into()),
            namespace: None,
            ip: Some("10.0.0.1".parse().unwrap()),
        },
        destination: Destination {
            namespace: "t".into(),
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
            service_account: Some("web".into()),
            ip: Some("10.0.0.100".parse().unwrap()),
            port: 80,
            services: vec!["web-svc".into()],
        },
        protocol: 0,
        sni: None,
        http: None,
        // Tuesday 2026-11-24 10:00 UTC.
        time: Some(UNIX_EPOCH + Duration::from_secs(1_795_514_400)),
    })
}

impl R {
    fn from(mut self, p: &str) -> R {
        self.0.source.principal = Some(p.into());
        self
    }
    fn plaintext(mut self) -> R {
        self.0.source.principal = None;
        self
    }
    fn ip(mut self, ip: &str) -> R {
        self.0.source.ip = Some(ip.parse().unwrap());
        self
    }
    fn port(mut self, p: u16) -> R {
        self.0.destination.port = p;
        self
    }
    fn udp(mut self) -> R {
        self.0.protocol = 17;
        self
    }
    fn dest_ns(mut self, ns: &str) -> R {
        self.0.destination.namespace = ns.into();
        self
    }
    fn dest_ip(mut self, ip: &str) -> R {
        self.0.destination.ip = Some(ip.parse().unwrap());
        self
    }
    fn label(mut self, k: &str, v: &str) -> R {
        self.0.destination.labels.insert(k.into(), v.into());
        self
    }
    fn services(mut self, s: &[&str]) -> R {
        self.0.destination.services = s.iter().map(|s| s.to_string()).collect();
        self
    }
    fn http(mut self, method: &str, path: &str) -> R {
        self.0.http = Some(Http {
            method: method.into(),
            path: path.into(),
            host: "web.t.svc.cluster.local".into(),
            ..Http::default()
        });
        self
    }
    fn h(&mut self) -> &mut Http {
        if self.0.http.is_none() {
            self.0.http = Some(Http { method: "GET".into(), path: "/".into(), ..Http::default() });
        }
        self.0.http.as_mut().unwrap()
    }
    fn host(mut self, host: &str) -> R {
        self.h().host = host.into();
        self
    }
    fn header(mut self, k: &str, v: &str) -> R {
        self.h().headers.insert(k.to_ascii_lowercase(), v.into());
        self
    }
    fn remote(mut self, ip: &str) -> R {
        self.h().remote_ip = Some(ip.parse().unwrap());
        self
    }
    fn jwt(mut self, iss: &str, sub: &str, aud: &[&str], azp: Option<&str>, claims: serde_json::Value) -> R {
        let claims = claims.as_object().cloned().unwrap_or_default();
        self.h().jwt = Some(Jwt {
            iss: Some(iss.into()),
            sub: Some(sub.into()),
            aud: aud.iter().map(|s| s.to_string()).collect(),
            azp: azp.map(Into::into),
            claims,
        });
        self
    }
    fn sni(mut self, s: &str) -> R {
        self.0.sni = Some(s.into());
        self
    }
    fn at(mut self, rfc3339: &str) -> R {
        let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).unwrap();
        self.0.time = Some(UNIX_EPOCH + Duration::from_secs(t.unix_timestamp() as u64));
        self
    }
}

fn check(set: &PolicySet, r: &R, want: &str, what: &str) {
    let d = set.evaluate(&r.0);
    let mut it = want.split(' ');
    let verdict = it.next().unwrap();
    let got_v = match d.decision {
        Verdict::Allow => "ALLOW",
        Verdict::Deny => "DENY",
    };
    let ctx = format!("{what}\n  want {want}\n  got {d:#?}");
    assert_eq!(got_v, verdict, "{ctx}");
    match it.next() {
        None => assert_eq!(d.policy, None, "{ctx}"),
        Some(p) => {
            let (name, rule) = p.split_once('#').unwrap_or((p, ""));
            let name = if name.contains('/') { name.to_string() } else { format!("t/{name}") };
            assert_eq!(d.policy.as_deref(), Some(name.as_str()), "{ctx}");
            if !rule.is_empty() {
                assert_eq!(d.rule, Some(rule.parse().unwrap()), "{ctx}");
            }
        }
    }
    assert_eq!(d.layer, if r.0.http.is_some() { Layer::L7 } else { Layer::L4 }, "{ctx}");
}

macro_rules! authz_test {
    ($name:ident, $policy:expr, $( $req:expr => $want:expr ),+ $(,)?) => {
        #[test]
        fn $name() {
            let s = set($policy);
            $( check(&s, &$req, $want, stringify!($req)); )+
        }
    };
}

fn allow(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: t}}\nspec:\n  rules: {rules}\n"
    )
}
fn deny(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: d, namespace: t}}\nspec:\n  action: DENY\n  rules: {rules}\n"
    )
}

/// `policy` with a RequestAuthentication for every workload of `t` whose one JWT rule has no
/// issuer (keys from `jwksUri`), so it accepts a token of any issuer: the policies see the
/// request's token only when a RequestAuthentication applies.
fn with_jwt_rules(policy: &str) -> String {
    format!(
        "{policy}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: any-issuer, namespace: t}}\nspec:\n  jwtRules: [{{jwksUri: https://keys.example/jwks}}]\n"
    )
}

// ------------------------------------------------------------------ empty cases

authz_test!(no_policy_allows, "",
    conn() => "ALLOW", conn().http("GET", "/") => "ALLOW");
authz_test!(empty_spec_allow_denies_everything,
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: t}\nspec: {}\n",
    conn() => "DENY", conn().http("GET", "/") => "DENY", conn().plaintext() => "DENY");
authz_test!(empty_rules_list_denies_everything, &allow("[]"),
    conn() => "DENY", conn().http("GET", "/") => "DENY");
authz_test!(empty_rule_allows_everything, &allow("[{}]"),
    conn() => "ALLOW p#0", conn().plaintext().udp() => "ALLOW p#0", conn().http("DELETE", "/x") => "ALLOW p#0");
authz_test!(deny_empty_rule_denies_everything, &deny("[{}]"),
    conn() => "DENY d#0", conn().http("GET", "/") => "DENY d#0");

// ------------------------------------------------------------------ source fields

authz_test!(principals_exact_prefix_suffix_presence,
    &allow(r#"[{from: [{source: {principals: ["cluster.local/ns/t/sa/a"]}}]}, {from: [{source: {principals: ["cluster.local/ns/u/*"]}}]}, {from: [{source: {principals: ["*/sa/b"]}}]}, {from: [{source: {principals: ["spiffe://cluster.local/ns/v/sa/c"]}}]}]"#),
    conn().from("cluster.local/ns/t/sa/a") => "ALLOW p#0",
    conn().from("spiffe://cluster.local/ns/t/sa/a") => "ALLOW p#0",
    conn().from("cluster.local/ns/u/sa/zz") => "ALLOW p#1",
    conn().from("other.domain/ns/w/sa/b") => "ALLOW p#2",
    conn().from("cluster.local/ns/v/sa/c") => "ALLOW p#3",
    conn().from("cluster.local/ns/t/sa/x") => "DENY",
    conn().plaintext() => "DENY",
    conn().from("cluster.local/ns/t/sa/a").http("GET", "/") => "ALLOW p#0");
authz_test!(principal_presence_requires_a_principal, &allow(r#"[{from: [{source: {principals: ["*"]}}]}]"#),
    conn() => "ALLOW p#0", conn().plaintext() => "DENY");
authz_test!(not_principals_match_plaintext, &allow(r#"[{from: [{source: {notPrincipals: ["cluster.local/ns/t/sa/bad"]}}]}]"#),
    conn() => "ALLOW p#0", conn().from("cluster.local/ns/t/sa/bad") => "DENY", conn().plaintext() => "ALLOW p#0");
authz_test!(namespaces_and_not_namespaces,
    &allow(r#"[{from: [{source: {namespaces: ["t", "prod-*"], notNamespaces: ["prod-legacy"]}}]}]"#),
    conn() => "ALLOW p#0", conn().from("cluster.local/ns/prod-eu/sa/x") => "ALLOW p#0",
    conn().from("cluster.local/ns/prod-legacy/sa/x") => "DENY", conn().from("cluster.local/ns/dev/sa/x") => "DENY",
    conn().plaintext() => "DENY", conn().from("cluster.local/ns/t/sa/x").http("GET", "/") => "ALLOW p#0");
authz_test!(service_accounts_with_and_without_namespace,
    &allow(r#"[{from: [{source: {serviceAccounts: ["client", "other/robot"]}}]}, {from: [{source: {notServiceAccounts: ["t/client"]}}]}]"#),
    conn() => "ALLOW p#0", conn().from("example.org/ns/other/sa/robot") => "ALLOW p#0",
    conn().from("cluster.local/ns/x/sa/client") => "ALLOW p#1", conn().plaintext() => "ALLOW p#1");
authz_test!(ip_blocks_and_not_ip_blocks,
    &allow(r#"[{from: [{source: {ipBlocks: ["10.0.0.0/16", "192.168.1.7"], notIpBlocks: ["10.0.9.0/24"]}}]}]"#),
    conn() => "ALLOW p#0", conn().ip("192.168.1.7") => "ALLOW p#0", conn().ip("192.168.1.8") => "DENY",
    conn().ip("10.0.9.9") => "DENY", conn().ip("10.0.9.9").http("GET", "/") => "DENY", conn().http("GET", "/") => "ALLOW p#0");
authz_test!(request_principals_are_l7,
    &with_jwt_rules(&allow(r#"[{from: [{source: {requestPrincipals: ["https://issuer/*"], notRequestPrincipals: ["https://issuer/mallory"]}}]}]"#)),
    conn().jwt("https://issuer", "alice", &[], None, serde_json::json!({})) => "ALLOW p#0",
    conn().jwt("https://issuer", "mallory", &[], None, serde_json::json!({})) => "DENY",
    conn().jwt("https://other", "alice", &[], None, serde_json::json!({})) => "DENY",
    conn().http("GET", "/") => "DENY",
    // At L4 an ALLOW rule with an L7 attribute never matches.
    conn() => "DENY");
authz_test!(remote_ip_blocks_use_the_forwarded_address,
    &allow(r#"[{from: [{source: {remoteIpBlocks: ["203.0.113.0/24"], notRemoteIpBlocks: ["203.0.113.66"]}}]}]"#),
    conn().remote("203.0.113.5") => "ALLOW p#0", conn().remote("203.0.113.66") => "DENY",
    conn().http("GET", "/") => "DENY", conn().ip("203.0.113.9").http("GET", "/") => "ALLOW p#0", conn().ip("203.0.113.9") => "DENY");

// ------------------------------------------------------------------ operation fields

// `ports` name TCP ports; `notPorts` excludes TCP ports, so UDP 80 is "not TCP 80".
authz_test!(ports_and_not_ports_are_tcp_ports,
    &allow(r#"[{to: [{operation: {ports: ["80", "8080"]}}]}, {to: [{operation: {notPorts: ["80", "22", "8080"]}}]}]"#),
    conn() => "ALLOW p#0", conn().port(8080) => "ALLOW p#0", conn().port(443) => "ALLOW p#1", conn().port(22) => "DENY",
    conn().port(80).udp() => "ALLOW p#1", conn().port(53).udp() => "ALLOW p#1", conn().port(8080).http("GET", "/") => "ALLOW p#0");
authz_test!(hosts_and_not_hosts_ignore_case,
    &allow(r#"[{to: [{operation: {hosts: ["*.example.com", "API.internal"], notHosts: ["admin.example.com"]}}]}]"#),
    conn().host("shop.example.com") => "ALLOW p#0", conn().host("Shop.Example.COM") => "ALLOW p#0",
    conn().host("api.internal") => "ALLOW p#0", conn().host("admin.example.com") => "DENY", conn().host("x.org") => "DENY",
    conn() => "DENY");
authz_test!(methods_and_not_methods,
    &allow(r#"[{to: [{operation: {methods: ["GET", "HEAD"]}}]}, {to: [{operation: {notMethods: ["DELETE", "GET", "HEAD"]}}]}]"#),
    conn().http("GET", "/") => "ALLOW p#0", conn().http("POST", "/") => "ALLOW p#1", conn().http("DELETE", "/") => "DENY",
    conn() => "DENY");
authz_test!(paths_not_paths_and_templates,
    &allow(r#"[{to: [{operation: {paths: ["/api/*", "*.css", "/exact", "/items/{*}/detail", "/files/{**}"], notPaths: ["/api/internal*"]}}]}]"#),
    conn().http("GET", "/api/v1") => "ALLOW p#0", conn().http("GET", "/static/a.css") => "ALLOW p#0",
    conn().http("GET", "/exact") => "ALLOW p#0", conn().http("GET", "/exact/") => "DENY",
    conn().http("GET", "/items/42/detail") => "ALLOW p#0", conn().http("GET", "/items/42/43/detail") => "DENY",
    conn().http("GET", "/files/a/b/c") => "ALLOW p#0", conn().http("GET", "/api/internal/x") => "DENY",
    conn().http("GET", "/api/v1?x=/api/internal") => "ALLOW p#0");
authz_test!(literal_star_inside_path, &allow(r#"[{to: [{operation: {paths: ["/a*b"]}}]}]"#),
    conn().http("GET", "/a*b") => "ALLOW p#0", conn().http("GET", "/axb") => "DENY");
authz_test!(from_to_when_and_and_lists_or,
    &allow(r#"[{from: [{source: {principals: ["cluster.local/ns/t/sa/a"]}}, {source: {namespaces: ["n2"]}}], to: [{operation: {ports: ["80"]}}, {operation: {ports: ["81"]}}], when: [{key: source.ip, values: ["10.0.0.0/8"]}]}]"#),
    conn().from("cluster.local/ns/t/sa/a") => "ALLOW p#0", conn().from("cluster.local/ns/n2/sa/z").port(81) => "ALLOW p#0",
    conn().from("cluster.local/ns/t/sa/a").port(82) => "DENY", conn().from("cluster.local/ns/t/sa/a").ip("11.0.0.1") => "DENY",
    conn().from("cluster.local/ns/t/sa/b") => "DENY");

// ------------------------------------------------------------------ when keys

authz_test!(when_source_ip, &allow(r#"[{when: [{key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.0.0.1"]}]}]"#),
    conn().ip("10.2.3.4") => "ALLOW p#0", conn() => "DENY", conn().ip("11.0.0.1") => "DENY", conn().ip("10.2.3.4").http("GET", "/") => "ALLOW p#0");
authz_test!(when_source_namespace, &allow(r#"[{when: [{key: source.namespace, values: ["t", "u"], notValues: ["u"]}]}]"#),
    conn() => "ALLOW p#0", conn().from("cluster.local/ns/u/sa/a") => "DENY", conn().plaintext() => "DENY");
authz_test!(when_source_principal, &allow(r#"[{when: [{key: source.principal, values: ["spiffe://cluster.local/ns/t/*"]}]}]"#),
    conn() => "ALLOW p#0", conn().from("cluster.local/ns/x/sa/client") => "DENY", conn().plaintext() => "DENY");
authz_test!(when_destination_ip, &allow(r#"[{when: [{key: destination.ip, values: ["10.0.0.0/24"], notValues: ["10.0.0.5"]}]}]"#),
    conn() => "ALLOW p#0", conn().dest_ip("10.0.0.5") => "DENY", conn().dest_ip("10.9.0.5") => "DENY");
authz_test!(when_destination_port, &allow(r#"[{when: [{key: destination.port, values: ["80", "443"], notValues: ["443"]}]}]"#),
    conn() => "ALLOW p#0", conn().port(443) => "DENY", conn().port(8080) => "DENY", conn().udp() => "DENY");
authz_test!(when_remote_ip, &allow(r#"[{when: [{key: remote.ip, values: ["203.0.113.0/24"]}]}]"#),
    conn().remote("203.0.113.7") => "ALLOW p#0", conn().remote("198.51.100.1") => "DENY", conn() => "DENY");
authz_test!(when_connection_sni, &allow(r#"[{when: [{key: connection.sni, values: ["*.svc.cluster.local"]}]}]"#),
    conn().sni("web.t.svc.cluster.local").http("GET", "/") => "ALLOW p#0", conn().sni("evil.com").http("GET", "/") => "DENY",
    conn().http("GET", "/") => "DENY", conn().sni("web.t.svc.cluster.local") => "DENY");
authz_test!(when_source_service_account,
    &allow(r#"[{when: [{key: source.serviceAccount, values: ["client", "u/batch"], notValues: ["u/batch-old"]}]}]"#),
    conn() => "ALLOW p#0", conn().from("spiffe://corp.example/ns/u/sa/batch") => "ALLOW p#0",
    conn().from("cluster.local/ns/u/sa/client") => "DENY", conn().from("cluster.local/ns/u/sa/batch-old") => "DENY",
    conn().plaintext() => "DENY");
authz_test!(when_source_service_account_not_values_only,
    &deny(r#"[{when: [{key: source.serviceAccount, notValues: ["t/client"]}]}]"#),
    conn() => "ALLOW", conn().from("cluster.local/ns/t/sa/other") => "DENY d#0", conn().plaintext() => "DENY d#0");
authz_test!(when_request_headers, &allow(r#"[{when: [{key: "request.headers[X-Env]", values: ["prod*"], notValues: ["prod-legacy"]}]}]"#),
    conn().header("x-env", "prod-eu") => "ALLOW p#0", conn().header("X-ENV", "prod-eu") => "ALLOW p#0",
    conn().header("x-env", "prod-legacy") => "DENY", conn().header("x-other", "prod") => "DENY", conn() => "DENY");
authz_test!(when_header_presence_and_absence,
    &deny(r#"[{when: [{key: "request.headers[x-request-id]", notValues: ["*"]}]}]"#),
    conn().header("x-request-id", "r1") => "ALLOW", conn().http("GET", "/") => "DENY d#0");
authz_test!(when_header_numeric_extension,
    &allow(r#"[{when: [{key: "request.headers[amount]", values: [">=10"], notValues: [">1000"]}]}]"#),
    conn().header("amount", "10") => "ALLOW p#0", conn().header("amount", "999.99") => "ALLOW p#0",
    conn().header("amount", "1000.01") => "DENY", conn().header("amount", "9") => "DENY", conn().header("amount", "lots") => "DENY",
    conn().http("GET", "/") => "DENY");
authz_test!(when_numeric_not_value_absent_header_passes,
    &allow(r#"[{when: [{key: "request.headers[amount]", notValues: [">100"]}]}]"#),
    conn().http("GET", "/") => "ALLOW p#0", conn().header("amount", "abc") => "ALLOW p#0", conn().header("amount", "101") => "DENY");
authz_test!(when_request_auth_principal, &with_jwt_rules(&allow(r#"[{when: [{key: request.auth.principal, values: ["https://iss/alice"]}]}]"#)),
    conn().jwt("https://iss", "alice", &[], None, serde_json::json!({})) => "ALLOW p#0",
    conn().jwt("https://iss", "bob", &[], None, serde_json::json!({})) => "DENY", conn().http("GET", "/") => "DENY");
authz_test!(when_request_auth_audiences, &with_jwt_rules(&allow(r#"[{when: [{key: request.auth.audiences, values: ["api"], notValues: ["legacy"]}]}]"#)),
    conn().jwt("i", "s", &["web", "api"], None, serde_json::json!({})) => "ALLOW p#0",
    conn().jwt("i", "s", &["api", "legacy"], None, serde_json::json!({})) => "DENY",
    conn().jwt("i", "s", &["web"], None, serde_json::json!({})) => "DENY");
authz_test!(when_request_auth_presenter, &with_jwt_rules(&allow(r#"[{when: [{key: request.auth.presenter, values: ["mobile-app"]}]}]"#)),
    conn().jwt("i", "s", &[], Some("mobile-app"), serde_json::json!({})) => "ALLOW p#0",
    conn().jwt("i", "s", &[], Some("cli"), serde_json::json!({})) => "DENY", conn().jwt("i", "s", &[], None, serde_json::json!({})) => "DENY");
authz_test!(when_request_auth_claims_nested_and_lists,
    &with_jwt_rules(&allow(r#"[{when: [{key: "request.auth.claims[groups]", values: ["admins"]}, {key: "request.auth.claims[org][unit]", values: ["payments"], notValues: ["payments-test"]}]}]"#)),
    conn().jwt("i", "s", &[], None, serde_json::json!({"groups": ["dev", "admins"], "org": {"unit": "payments"}})) => "ALLOW p#0",
    conn().jwt("i", "s", &[], None, serde_json::json!({"groups": "admins", "org": {"unit": "payments"}})) => "ALLOW p#0",
    conn().jwt("i", "s", &[], None, serde_json::json!({"groups": ["dev"], "org": {"unit": "payments"}})) => "DENY",
    conn().jwt("i", "s", &[], None, serde_json::json!({"groups": ["admins"], "org": {"unit": "payments-test"}})) => "DENY",
    conn().jwt("i", "s", &[], None, serde_json::json!({"groups": ["admins"]})) => "DENY");
authz_test!(when_experimental_key_never_matches_values,
    &allow(r#"[{when: [{key: "experimental.envoy.filters.network.mysql_proxy[db.table]", values: ["[update]"]}]}, {when: [{key: "experimental.envoy.filters.x[y]", notValues: ["z"]}]}]"#),
    conn().http("GET", "/") => "ALLOW p#1");
authz_test!(when_time_of_day_windows_and_midnight,
    &allow(r#"[{when: [{key: custom.time_of_day, values: ["08:00-12:00", "22:00-02:00"], notValues: ["11:00-11:30"]}]}]"#),
    conn().at("2026-11-24T08:00:00Z") => "ALLOW p#0", conn().at("2026-11-24T11:15:00Z") => "DENY",
    conn().at("2026-11-24T12:00:00Z") => "DENY", conn().at("2026-11-24T23:30:00Z") => "ALLOW p#0",
    conn().at("2026-11-25T01:59:59Z") => "ALLOW p#0", conn().at("2026-11-25T02:00:00Z") => "DENY",
    conn().at("2026-11-24T09:00:00Z").http("GET", "/") => "ALLOW p#0");
authz_test!(when_day_of_week, &allow(r#"[{when: [{key: custom.day_of_week, values: ["monday", "tue", "Saturday"], notValues: ["saturday"]}]}]"#),
    conn().at("2026-11-23T10:00:00Z") => "ALLOW p#0", conn().at("2026-11-24T23:59:00Z") => "ALLOW p#0",
    conn().at("2026-11-25T00:00:00Z") => "DENY", conn().at("2026-11-28T10:00:00Z") => "DENY");

#[test]
fn time_conditions_honour_the_configured_offset() {
    let docs =
        parse_str(&allow(r#"[{when: [{key: custom.time_of_day, values: ["09:00-17:00"]}]}]"#), "t.yaml").unwrap();
    let s = PolicySet::from_resources(
        docs,
        &Options { root_namespace: "root".into(), utc_offset_minutes: -5 * 60, ..Options::default() },
    )
    .unwrap();
    // 10:00 UTC is 05:00 at UTC-5: outside; 15:00 UTC is 10:00: inside.
    check(&s, &conn().at("2026-11-24T10:00:00Z"), "DENY", "10:00Z at -05:00");
    check(&s, &conn().at("2026-11-24T15:00:00Z"), "ALLOW p#0", "15:00Z at -05:00");
}

// ------------------------------------------------------------------ evaluation order

const ORDER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-allow, namespace: t}
spec:
  rules: [{from: [{source: {principals: [cluster.local/ns/t/sa/client]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: z-deny, namespace: t}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: [\"22\"]}}]}, {to: [{operation: {ports: [\"23\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-deny, namespace: t}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: [\"23\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: t}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {ports: [\"24\", \"23\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: t}
spec:
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry, namespace: t, annotations: {istio.io/dry-run: \"true\"}}
spec:
  action: DENY
  rules: [{}]
";

authz_test!(custom_then_deny_then_allow_and_audit_never_decides, ORDER,
    conn() => "ALLOW a-allow#0",
    conn().port(22) => "DENY z-deny#0",
    conn().port(23) => "DENY ext#0",
    conn().port(24).http("GET", "/") => "DENY ext#0",
    conn().from("cluster.local/ns/t/sa/other") => "DENY",
    conn().from("cluster.local/ns/t/sa/other").port(22) => "DENY z-deny#0");

#[test]
fn first_deny_by_name_is_reported_and_shadow_policies_are_noted() {
    let s = set(&ORDER.replace(
        "action: CUSTOM\n  provider: {name: opa}\n  rules: [{to: [{operation: {ports: [\"24\", \"23\"]}}]}]",
        "action: AUDIT\n  rules: [{}]",
    ));
    check(&s, &conn().port(23), "DENY b-deny#0", "two DENY policies match port 23");
    let d = s.evaluate(&conn().0);
    assert!(d.shadow.iter().any(|x| x.contains("AUDIT policy t/audit rule 0 matched")), "{:?}", d.shadow);
    assert!(d.shadow.iter().any(|x| x.contains("dry-run DENY policy t/dry rule 0 matched")), "{:?}", d.shadow);
    assert_eq!(d.decision, Verdict::Allow);
}

// ------------------------------------------------------------------ L4 fail-safe rules

authz_test!(allow_with_l7_never_matches_at_l4_and_denies_by_default,
    &allow(r#"[{from: [{source: {principals: ["cluster.local/ns/t/sa/client"]}}], to: [{operation: {methods: ["GET"]}}]}]"#),
    conn() => "DENY", conn().http("GET", "/") => "ALLOW p#0", conn().http("POST", "/") => "DENY");
authz_test!(deny_keeps_its_l4_part_at_l4,
    &deny(r#"[{from: [{source: {namespaces: ["untrusted"]}}], to: [{operation: {ports: ["8080"], methods: ["DELETE"]}}]}]"#),
    conn().from("cluster.local/ns/untrusted/sa/x").port(8080) => "DENY d#0",
    conn().from("cluster.local/ns/untrusted/sa/x").port(9090) => "ALLOW",
    conn().from("cluster.local/ns/t/sa/x").port(8080) => "ALLOW",
    conn().from("cluster.local/ns/untrusted/sa/x").port(8080).http("GET", "/") => "ALLOW",
    conn().from("cluster.local/ns/untrusted/sa/x").port(8080).http("DELETE", "/") => "DENY d#0");
authz_test!(deny_with_only_l7_clauses_denies_every_connection_at_l4,
    &deny(r#"[{when: [{key: "request.headers[user-agent]", values: ["sqlmap*"]}]}]"#),
    conn() => "DENY d#0", conn().plaintext().port(5432) => "DENY d#0",
    conn().header("user-agent", "curl/8") => "ALLOW", conn().header("user-agent", "sqlmap/1.7") => "DENY d#0");
authz_test!(custom_at_l4_denies_on_its_l4_part,
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: c, namespace: t}\nspec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules: [{to: [{operation: {ports: [\"8443\"], paths: [\"/admin*\"]}}]}]\n",
    conn().port(8443) => "DENY c#0", conn().port(80) => "ALLOW",
    conn().port(8443).http("GET", "/public") => "ALLOW", conn().port(8443).http("GET", "/admin/x") => "DENY c#0");

// ------------------------------------------------------------------ scope

const SCOPE: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: root}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: [\"23\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-selected, namespace: root}
spec:
  selector: {matchLabels: {tier: db}}
  action: DENY
  rules: [{to: [{operation: {ports: [\"5432\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-ns, namespace: elsewhere}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc, namespace: t}
spec:
  targetRefs: [{kind: Service, group: \"\", name: payments}]
  action: DENY
  rules: [{to: [{operation: {ports: [\"81\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: t}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: edge}]
  action: DENY
  rules: [{to: [{operation: {ports: [\"82\"]}}]}]
";

authz_test!(root_namespace_namespace_selector_and_target_refs, SCOPE,
    conn().port(23) => "DENY root/mesh-deny#0", conn().dest_ns("any").port(23) => "DENY root/mesh-deny#0",
    conn().port(5432) => "ALLOW", conn().dest_ns("any").label("tier", "db").port(5432) => "DENY root/root-selected#0",
    conn().dest_ns("elsewhere") => "DENY", conn() => "ALLOW",
    conn().port(81) => "ALLOW", conn().services(&["payments"]).port(81) => "DENY svc#0",
    conn().port(82) => "ALLOW", conn().label("gateway.networking.k8s.io/gateway-name", "edge").port(82) => "DENY gw#0");

// A policy bound with targetRefs applies to its targets in its own namespace only, even from the
// root namespace (Istio resolves a Service or Gateway by name in the policy's namespace).
const ROOT_TARGET_REFS: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-svc, namespace: root}
spec:
  targetRefs: [{kind: Service, group: \"\", name: web-svc}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-gw, namespace: root}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: edge}]
  rules: [{from: [{source: {principals: [\"cluster.local/ns/t/sa/admin\"]}}]}]
";

authz_test!(root_namespace_target_refs_stay_in_the_root_namespace, ROOT_TARGET_REFS,
    conn() => "ALLOW",
    conn().label("gateway.networking.k8s.io/gateway-name", "edge") => "ALLOW",
    conn().dest_ns("root") => "DENY root/root-svc#0",
    conn().dest_ns("root").services(&["other"]).label("gateway.networking.k8s.io/gateway-name", "edge") => "DENY",
    conn().dest_ns("root").services(&["other"]).label("gateway.networking.k8s.io/gateway-name", "edge").from("cluster.local/ns/t/sa/admin") => "ALLOW root/root-gw#0");

// `targetRefs: []` is no targetRefs (an empty repeated field): the DENY covers the namespace.
authz_test!(empty_target_refs_is_namespace_wide,
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: t}\nspec:\n  targetRefs: []\n  action: DENY\n  rules: [{}]\n",
    conn() => "DENY d#0", conn().services(&[]) => "DENY d#0", conn().dest_ns("u") => "ALLOW");

#[test]
fn audit_rules_with_l7_attributes_are_reported_at_l4() {
    // Istio widens AUDIT as it widens DENY: at L4 the rule keeps its L4 part.
    let s = set(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit, namespace: t}\nspec:\n  action: AUDIT\n  rules: [{to: [{operation: {ports: [\"80\"], methods: [GET]}}]}]\n",
    );
    let d = s.evaluate(&conn().0);
    assert!(d.shadow.iter().any(|x| x.contains("AUDIT policy t/audit rule 0 matched")), "{:?}", d.shadow);
    assert!(s.evaluate(&conn().port(81).0).shadow.is_empty());
    assert!(s.evaluate(&conn().http("POST", "/").0).shadow.is_empty());
}

#[test]
fn cluster_local_principals_name_the_configured_trust_domain() {
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: t}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principals: [\"cluster.local/ns/foo/sa/bar\"]}}]}, {when: [{key: source.principal, values: [\"cluster.local/ns/foo/sa/*\"], notValues: [\"cluster.local/ns/foo/sa/bar\"]}]}]\n";
    let docs = parse_str(policy, "t.yaml").unwrap();
    let corp = Options { root_namespace: "root".into(), trust_domain: "corp.example".into(), ..Options::default() };
    let s = PolicySet::from_resources(docs.clone(), &corp).unwrap();
    check(&s, &conn().from("corp.example/ns/foo/sa/bar"), "DENY d#0", "cluster.local in `principals`");
    check(&s, &conn().from("spiffe://corp.example/ns/foo/sa/baz"), "DENY d#1", "cluster.local in `source.principal`");
    check(
        &s,
        &conn().from("cluster.local/ns/foo/sa/baz"),
        "ALLOW",
        "the literal cluster.local is another trust domain now",
    );
    check(&s, &conn().from("other.example/ns/foo/sa/bar"), "ALLOW", "another trust domain");
    // With the default trust domain nothing changes.
    let s = set(policy);
    check(&s, &conn().from("cluster.local/ns/foo/sa/bar"), "DENY d#0", "default trust domain");
    check(&s, &conn().from("corp.example/ns/foo/sa/bar"), "ALLOW", "default trust domain, other identity");
}

// ------------------------------------------------------------------ PeerAuthentication

const PEER: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: root}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: t}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: t}
spec:
  selector: {matchLabels: {tier: db}}
  mtls: {mode: STRICT}
  portLevelMtls: {9187: {mode: DISABLE}, 5433: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: inherit, namespace: u}
spec: {mtls: {mode: UNSET}}
";

// A PeerAuthentication with a selector in the root namespace is ignored (Istio takes a selector
// as workload-level only outside the root namespace), even for the root namespace's own pods.
authz_test!(root_namespace_peer_authentication_with_a_selector_is_ignored,
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: w, namespace: root}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n",
    conn().plaintext() => "ALLOW", conn().plaintext().dest_ns("root") => "ALLOW");

authz_test!(peer_authentication_precedence_and_ports, PEER,
    conn().plaintext() => "ALLOW",
    conn().plaintext().label("tier", "db").port(5432) => "DENY t/db",
    conn().plaintext().label("tier", "db").port(5433) => "DENY t/db",
    conn().plaintext().label("tier", "db").port(9187) => "ALLOW",
    conn().label("tier", "db").port(5432) => "ALLOW",
    conn().plaintext().dest_ns("u") => "DENY root/mesh",
    conn().plaintext().dest_ns("v") => "DENY root/mesh",
    conn().dest_ns("v") => "ALLOW",
    conn().plaintext().label("tier", "db").port(5432).http("GET", "/") => "DENY t/db");

// ------------------------------------------------------------------ RequestAuthentication

const JWT: &str = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: t}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules:
  - {issuer: https://issuer, jwksUri: https://issuer/jwks, audiences: [api]}
  - {issuer: https://other, jwksUri: https://other/jwks}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: t}
spec:
  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]
";

authz_test!(request_authentication_issuer_and_audiences, JWT,
    conn().jwt("https://issuer", "a", &["api"], None, serde_json::json!({})) => "ALLOW p#0",
    conn().jwt("https://other", "a", &[], None, serde_json::json!({})) => "ALLOW p#0",
    conn().jwt("https://issuer", "a", &["web"], None, serde_json::json!({})) => "DENY t/jwt",
    conn().jwt("https://evil", "a", &["api"], None, serde_json::json!({})) => "DENY t/jwt",
    conn().http("GET", "/") => "DENY",
    // A workload no RequestAuthentication selects: nothing validates the token, so the policies
    // do not see it (`request.auth.*` is empty) and `requestPrincipals: ["*"]` cannot match.
    conn().jwt("https://evil", "a", &[], None, serde_json::json!({})).label("app", "other") => "DENY",
    conn().jwt("https://issuer", "a", &["api"], None, serde_json::json!({})).label("app", "other") => "DENY");
