//! `warden certs` against a running agent: the agent holds a SPIFFE certificate for each local
//! workload identity (in-process CA here), serves them on its admin endpoint, and releases an
//! identity when its workload leaves the node.

use std::{
    fs,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use warden_tests::{Lab, Spec, require_root, warden_bin, write_policies};

/// `warden certs -o json` run inside the lab's node namespace (where the agent's loopback is).
fn certs(lab: &Lab) -> Option<serde_json::Value> {
    lab.certs()
}

fn identities(v: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = v["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["identity"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

fn wait_for(lab: &Lab, want: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = certs(lab) {
            if identities(&v) == want {
                return v;
            }
            assert!(Instant::now() < deadline, "identities {:?}, want {want:?}: {v}", identities(&v));
        }
        assert!(
            Instant::now() < deadline,
            "warden certs never answered:\n{}",
            fs::read_to_string(lab.agent_log()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agent_holds_workload_certificates_and_warden_certs_shows_them() {
    if !require_root("agent_holds_workload_certificates_and_warden_certs_shows_them") {
        return;
    }
    let ip = |d| Ipv4Addr::new(10, 67, 0, d);
    let mut lab =
        Lab::up("certs", &[Spec::new("team", "a", ip(2), &[8080]), Spec::new("shop", "b", ip(3), &[8080])]).unwrap();
    let policies = lab.dir.join("policies");
    write_policies(&policies, &[]).unwrap();
    fs::write(lab.workloads_path(), lab.workload_file()).unwrap();
    let ca = lab.dir.join("ca");
    let args: Vec<String> = [
        "--workloads",
        lab.workloads_path().to_str().unwrap(),
        "--policies",
        policies.to_str().unwrap(),
        "--ca-dir",
        ca.to_str().unwrap(),
        "--metrics-addr",
        "127.0.0.1:15020",
        "--ready-addr",
        "127.0.0.1:15021",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    lab.start_agent_with(&args).unwrap();

    let v = wait_for(&lab, &["spiffe://cluster.local/ns/shop/sa/b", "spiffe://cluster.local/ns/team/sa/a"]);
    for c in v["certificates"].as_array().unwrap() {
        assert_eq!(c["state"], "VALID", "{c}");
        assert!(c["serial"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        assert!(c["chain"].as_array().is_some_and(|ch| !ch.is_empty()), "a chain: {c}");
        assert!(c["not_after"].is_string() || c["not_after"].is_number(), "{c}");
    }
    // The CA the agent initialised is a real one: its files are there, the key private.
    let mode = fs::metadata(ca.join("ca-key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    // The text view (like `istioctl proxy-config secret`).
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node))
        .arg("--")
        .arg(warden_bin())
        .args(["certs", "--admin-url", "http://127.0.0.1:15000/certs"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("spiffe://cluster.local/ns/team/sa/a"), "{text}");

    // The agent's metrics endpoint carries the certificate expiry per identity, in seconds since
    // the epoch, so `(expiry - time()) / 86400 < 7` works as an alert.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node))
        .args(["--", "curl", "-sf", "http://127.0.0.1:15020/stats/prometheus"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    let expiry = metrics
        .lines()
        .find(|l| l.starts_with("warden_identity_cert_expiration_timestamp_seconds") && l.contains("ns/team/sa/a"))
        .unwrap_or_else(|| panic!("no expiry gauge for a:\n{metrics}"));
    let secs: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(secs > now + 3600.0 && secs < now + 2.0 * 86400.0, "a 24 h certificate: {expiry}");

    // Revoke a's certificate with the CLI: the CRL the agent watches now lists it.
    let serial = v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/team/sa/a")
        .unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    let out =
        Command::new(warden_bin()).args(["ca", "revoke", &serial, "--dir", ca.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(fs::metadata(ca.join("ca-crl.pem")).unwrap().len() > 0);

    // b leaves the node: its identity is released.
    let before = lab.generation();
    let wl = fs::read_to_string(lab.workloads_path()).unwrap();
    let kept: String = wl.split("  - name: ").filter(|s| !s.starts_with("b\n")).collect::<Vec<_>>().join("  - name: ");
    fs::write(lab.workloads_path(), kept).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).unwrap();
    wait_for(&lab, &["spiffe://cluster.local/ns/team/sa/a"]);
}

#[test]
fn a_broken_ca_directory_stops_the_agent_naming_the_file() {
    if !require_root("a_broken_ca_directory_stops_the_agent_naming_the_file") {
        return;
    }
    let mut lab = Lab::up("certbad", &[Spec::new("team", "a", Ipv4Addr::new(10, 68, 0, 2), &[8080])]).unwrap();
    let policies = lab.dir.join("policies");
    write_policies(&policies, &[]).unwrap();
    let ca = lab.dir.join("ca");
    fs::create_dir_all(&ca).unwrap();
    fs::write(ca.join("ca-cert.pem"), "not a certificate").unwrap();
    fs::write(lab.workloads_path(), lab.workload_file()).unwrap();
    let args: Vec<String> = [
        "--workloads",
        lab.workloads_path().to_str().unwrap(),
        "--policies",
        policies.to_str().unwrap(),
        "--ca-dir",
        ca.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let err = lab.start_agent_with(&args).unwrap_err().to_string();
    assert!(err.contains("ca-cert.pem"), "the error names the file: {err}");
    assert!(!lab.pin_dir.join("links").exists(), "nothing was attached");
}
