//! `warden policy validate` and `warden authz check`, parsed with clap and run in-process.

use clap::Parser;
use std::path::PathBuf;
use warden_authz::cli::{AuthzCheckArgs, PolicyCommand, run_authz_check_to, run_policy_to};

#[derive(Parser)]
struct PolicyCli {
    #[command(subcommand)]
    cmd: PolicyCommand,
}

#[derive(Parser)]
struct CheckCli {
    #[command(flatten)]
    args: AuthzCheckArgs,
}

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("warden-authz-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn validate(args: &[&str]) -> (u8, String, String) {
    let mut argv = vec!["policy", "validate"];
    argv.extend_from_slice(args);
    let cli = PolicyCli::try_parse_from(argv).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_policy_to(cli.cmd, &mut out, &mut err);
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

fn check(args: &[&str]) -> (u8, String, String) {
    let mut argv = vec!["check"];
    argv.extend_from_slice(args);
    let cli = CheckCli::try_parse_from(argv).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_authz_check_to(cli.args, &mut out, &mut err);
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-orders, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/orders]}}]
    to: [{operation: {ports: [\"8443\"]}}]
";

#[test]
fn validate_exit_codes_and_messages() {
    let t = Tmp::new("validate");
    let good = t.write("good.yaml", POLICY);
    let (code, out, err) = validate(&[&good]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "valid: 1 AuthorizationPolicy, 0 PeerAuthentication, 0 RequestAuthentication (0 warning(s))\n");
    let bad = t
        .write("bad.yaml", &POLICY.replace("\"8443\"", "\"84430\"").replace("cluster.local/ns/shop/sa/orders", "\"\""));
    let (code, out, err) = validate(&[&good, &bad]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert_eq!(
        err,
        format!(
            "error: {bad}: document 1 (shop/allow-orders): spec.rules[0].from[0].source.principals[0]: empty value not allowed\n\
             error: {bad}: document 1 (shop/allow-orders): spec.rules[0].to[0].operation.ports[0]: \"84430\" is not a port number in range 1..65535\n\
             2 error(s); nothing loaded\n"
        )
    );
    let ext = t.write(
        "ext.yaml",
        &POLICY
            .replace("to: [{operation: {ports: [\"8443\"]}}]", "when: [{key: custom.day_of_week, values: [friday]}]"),
    );
    let (code, _, err) = validate(&["--root-namespace", "mesh", &ext]);
    assert_eq!(code, 0);
    assert!(err.contains("custom.day_of_week is a warden extension, not portable to Istio"), "{err}");
    assert!(PolicyCli::try_parse_from(["policy", "validate"]).is_err(), "a path is required");
}

#[test]
fn check_outputs_and_exit_codes() {
    let t = Tmp::new("check");
    let pol = t.write("policy.yaml", POLICY);
    let allowed = t.write(
        "allowed.yaml",
        "source: {principal: cluster.local/ns/shop/sa/orders, ip: 10.0.2.3}\n\
         destination: {namespace: shop, labels: {app: payments}, serviceAccount: payments, ip: 10.0.1.5, port: 8443}\n\
         time: 2026-11-24T10:00:00Z\n",
    );
    let (code, out, err) = check(&["--policies", &pol, "--request", &allowed, "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"decision": "ALLOW", "policy": "shop/allow-orders", "action": "ALLOW", "rule": 0, "layer": "L4",
            "reason": "ALLOW policy shop/allow-orders rule 0 matched"})
    );
    let denied = t.write(
        "denied.yaml",
        "source: {ip: 10.0.2.3}\n\
         destination: {namespace: shop, labels: {app: payments}, port: 8443}\n\
         http: {method: GET, path: /, headers: {X-Request-Id: abc}}\n",
    );
    let (code, out, _) = check(&["--policies", &pol, "--request", &denied]);
    assert_eq!(code, 1);
    assert!(
        out.starts_with("DENY (L7) by default\nreason: ALLOW policies apply to the workload and none matched"),
        "{out}"
    );
    let (code, out, _) = check(&["--policies", &pol, "--request", &denied, "--output", "json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy"], serde_json::Value::Null);
    assert_eq!(v["rule"], serde_json::Value::Null);
    assert_eq!(v["action"], serde_json::Value::Null);
    assert_eq!(v["layer"], "L7");
}

#[test]
fn check_invalid_input_exits_2() {
    let t = Tmp::new("invalid");
    let pol = t.write("policy.yaml", POLICY);
    let cases = [
        ("no-port.yaml", "destination: {namespace: shop}\n", "destination: missing field `port`"),
        (
            "bad-ip.yaml",
            "source: {ip: 10.0.0.300}\ndestination: {namespace: shop, port: 80}\n",
            "source.ip: \"10.0.0.300\" is not an IPv4 address",
        ),
        (
            "plaintext-ns.yaml",
            "source: {namespace: shop}\ndestination: {namespace: shop, port: 80}\n",
            "source.namespace: a plaintext peer",
        ),
        (
            "ns-mismatch.yaml",
            "source: {principal: cluster.local/ns/a/sa/b, namespace: c}\ndestination: {namespace: shop, port: 80}\n",
            "contradicts the principal's namespace",
        ),
        (
            "bad-time.yaml",
            "destination: {namespace: shop, port: 80}\ntime: yesterday\n",
            "time: \"yesterday\" is not an RFC 3339 time",
        ),
        ("port-0.yaml", "destination: {namespace: shop, port: 0}\n", "destination.port: 0 is not in range 1..65535"),
        ("typo.yaml", "destination: {namespace: shop, port: 80}\nhttp: {verb: GET}\n", "unknown field `verb`"),
    ];
    for (name, text, want) in cases {
        let req = t.write(name, text);
        let (code, out, err) = check(&["--policies", &pol, "--request", &req]);
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(err.contains(&req), "{name}: the error names the file: {err}");
    }
    let bad_pol = t.write("bad-policy.yaml", "kind: AuthorizationPolicy\n");
    let req = t.write("ok.yaml", "destination: {namespace: shop, port: 80}\n");
    let (code, _, err) = check(&["--policies", &bad_pol, "--request", &req]);
    assert_eq!(code, 2, "{err}");
    let missing = t.0.join("missing.yaml");
    let (code, _, err) = check(&["--policies", &pol, "--request", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.yaml: cannot read"), "{err}");
}

/// An L4 default deny mentions L7 rules only when an ALLOW policy that applies has one.
#[test]
fn an_l4_default_deny_blames_l7_rules_only_when_there_are_some() {
    let t = Tmp::new("l7note");
    let plaintext = t.write(
        "plaintext.yaml",
        "source: {ip: 10.0.2.3}\ndestination: {namespace: shop, labels: {app: payments}, port: 8443}\n",
    );
    let l4_only = t.write("l4.yaml", POLICY);
    let (code, out, _) = check(&["--policies", &l4_only, "--request", &plaintext]);
    assert_eq!(code, 1);
    assert_eq!(
        out.lines().nth(1),
        Some("reason: ALLOW policies apply to the workload and none matched: denied by default"),
        "{out}"
    );
    let with_l7 = t.write(
        "l7.yaml",
        &format!(
            "{POLICY}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: allow-reads, namespace: shop}}\n\
             spec:\n  rules:\n  - to: [{{operation: {{methods: [GET]}}}}]\n"
        ),
    );
    let (code, out, _) = check(&["--policies", &with_l7, "--request", &plaintext]);
    assert_eq!(code, 1);
    assert!(out.contains("none matched (ALLOW rules with L7 attributes never match at L4)"), "{out}");
}
