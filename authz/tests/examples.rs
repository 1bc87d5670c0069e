//! `policies/examples/`: every scenario's policy validates through `warden policy validate`,
//! and every request case next to it gets its expected decision through `warden authz check`
//! (run in-process). Where the guide's form is not valid, `guide-form/` holds a minimal
//! reproduction and the validator's expected messages.

use clap::Parser;
use std::path::{Path, PathBuf};
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

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples")
}

fn sorted_dir(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// The scenarios the zero-trust guide walks through; each must have its own example.
const SCENARIOS: [&str; 9] = [
    "fintech-payment-access",
    "fintech-refund-limits",
    "fintech-admin-hours",
    "trading-platform-controls",
    "security-baseline-deny",
    "namespace-isolation",
    "ecommerce-segmentation",
    "require-jwt",
    "peer-authentication-rollout",
];

#[test]
fn every_guide_scenario_has_an_example() {
    for s in SCENARIOS {
        let d = examples_dir().join(s);
        assert!(d.join("policy").is_dir(), "missing example {s}");
        let n = sorted_dir(&d.join("requests")).len();
        assert!(n >= 2, "{s} has {n} request case(s); want at least an allowed and a denied one");
    }
}

#[test]
fn examples_validate_and_request_cases_get_their_expected_decision() {
    let mut checked = 0;
    for dir in sorted_dir(&examples_dir()).into_iter().filter(|d| d.is_dir()) {
        let policy = dir.join("policy");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let cli = PolicyCli::try_parse_from(["policy", "validate", policy.to_str().unwrap()]).unwrap();
        let code = run_policy_to(cli.cmd, &mut out, &mut err);
        assert_eq!(code, 0, "{}: {}", dir.display(), String::from_utf8_lossy(&err));
        let mut saw = [false, false];
        for req in sorted_dir(&dir.join("requests")) {
            let text = std::fs::read_to_string(&req).unwrap();
            let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            let expect = doc.get("expect").unwrap_or_else(|| panic!("{}: no expect block", req.display()));
            let cli = CheckCli::try_parse_from([
                "check",
                "--policies",
                policy.to_str().unwrap(),
                "--request",
                req.to_str().unwrap(),
                "--output",
                "json",
            ])
            .unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = run_authz_check_to(cli.args, &mut out, &mut err);
            let ctx = format!("{}: {}{}", req.display(), String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
            let got: serde_json::Value = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let want = expect["decision"].as_str().unwrap();
            assert_eq!(got["decision"], want, "{ctx}");
            assert_eq!(code, if want == "ALLOW" { 0 } else { 1 }, "{ctx}");
            saw[(want == "DENY") as usize] = true;
            for k in ["policy", "rule", "action", "layer"] {
                if let Some(v) = expect.get(k) {
                    let v: serde_json::Value = serde_json::to_value(v).unwrap();
                    assert_eq!(got[k], v, "{k} in {ctx}");
                }
            }
            checked += 1;
        }
        assert!(saw[0] && saw[1], "{}: request cases must show both an ALLOW and a DENY", dir.display());
        let guide = dir.join("guide-form");
        if guide.is_dir() {
            check_guide_form(&guide);
        }
    }
    assert!(checked >= 30, "only {checked} request cases");
}

/// `guide-form/policy.yaml` reproduces what the guide wrote; `guide-form/expected.txt` lists
/// the validator's messages for it (each line must appear in the validator's output).
fn check_guide_form(guide: &Path) {
    let cli = PolicyCli::try_parse_from(["policy", "validate", guide.join("policy.yaml").to_str().unwrap()]).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_policy_to(cli.cmd, &mut out, &mut err);
    let text = format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    let expected = std::fs::read_to_string(guide.join("expected.txt")).unwrap();
    let mut lines = expected.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#'));
    let first = lines.next().unwrap();
    let want_code: u8 = first.strip_prefix("exit ").unwrap().parse().unwrap();
    assert_eq!(code, want_code, "{}: {text}", guide.display());
    for l in lines {
        let l = l.replace("{dir}", guide.to_str().unwrap());
        assert!(text.lines().any(|t| t == l), "{}: expected line\n  {l}\nin output:\n{text}", guide.display());
    }
}
