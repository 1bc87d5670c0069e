//! `cargo xtask lab`: one node running the payments mesh of the zero-trust guides, enforced by
//! the agent with the policies in `policies/lab/`, and a matrix of which flows pass.

use std::{net::Ipv4Addr, path::PathBuf};

use warden_common::names;
use warden_tests::{Lab, Spec, probe_bin};

pub const TAG: &str = "lab";

/// The payments mesh: five workloads in `fintech-core`, one untrusted workload in `staging`.
pub fn mesh() -> Vec<Spec> {
    let ip = |d| Ipv4Addr::new(10, 77, 1, d);
    vec![
        Spec::new("fintech-core", "order-service", ip(10), &[8080]),
        Spec::new("fintech-core", "checkout-service", ip(11), &[8080]),
        Spec::new("fintech-core", "refund-service", ip(12), &[8080]),
        Spec::new("fintech-core", "payment-processor", ip(13), &[8443, 9090]),
        Spec::new("fintech-core", "admin-console", ip(14), &[8080]),
        Spec::new("staging", "untrusted-debug", Ipv4Addr::new(10, 77, 2, 10), &[8080]),
    ]
}

fn short(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

pub fn up() -> anyhow::Result<()> {
    let policies = warden_tests::workspace_root().join("policies/lab");
    let specs = mesh();
    eprintln!("lab: creating node {TAG}-node with {} workloads", specs.len());
    let mut lab = Lab::up(TAG, &specs)?;
    let generation = lab.start_agent(&policies)?;
    eprintln!("lab: agent committed generation {generation}; probing every flow\n");

    let columns: Vec<(String, u16)> =
        specs.iter().flat_map(|s| s.ports.iter().map(move |p| (s.name.clone(), *p))).collect();
    let width = 14;
    print!("{:<18}", "FROM \\ TO");
    for (to, port) in &columns {
        print!("{:<width$}", format!("{}:{}", short(to), port));
    }
    println!();
    let mut denied = 0;
    for from in &specs {
        print!("{:<18}", from.name);
        for (to, port) in &columns {
            let cell = if *to == from.name {
                "-".to_string()
            } else {
                let p = lab.probe(&from.name, to, *port);
                match p.result.as_str() {
                    "allowed" => "pass".into(),
                    "eperm" => {
                        denied += 1;
                        "DENY(eperm)".into()
                    }
                    "timeout" => {
                        denied += 1;
                        "DROP(tc)".into()
                    }
                    other => other.to_string(),
                }
            };
            print!("{cell:<width$}");
        }
        println!();
    }

    // The same denied flow from a process outside the workload's cgroup: no connect() hook sees
    // it, so the TC program on the veth drops it.
    let untrusted = lab.member("untrusted-debug");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &untrusted.netns])
        .arg(probe_bin())
        .args(["connect", "10.77.1.13:8443", "--timeout-ms", "700"])
        .output()?;
    println!(
        "\nuntrusted-debug -> payment-processor:8443 from outside its cgroup (TC only): {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    println!("\n{denied} flows refused. pass = connected and answered; DENY(eperm) = connect() refused by the");
    println!("workload's cgroup hook; DROP(tc) = dropped on the veth (the client timed out).\n");

    let warden = warden_tests::warden_bin();
    let pin = lab.pin_dir.display().to_string();
    let state = lab.state_dir.display().to_string();
    println!("Inspect the running node:");
    println!("  {} maps --state-dir {state}", warden.display());
    println!("  {} maps --state-dir {state} --output json", warden.display());
    for map in [names::POLICY, names::IPCACHE, names::COUNTERS, names::FLOWS] {
        println!("  bpftool map dump pinned {pin}/{map}");
    }
    println!("  bpftool link show; bpftool prog show name warden_from_wl");
    println!("  agent log: {}", lab.agent_log().display());
    println!("  edit {} or {} : the agent applies changes live", policies.display(), lab.workloads_path().display());
    println!("  probe a flow: ip netns exec lab-5 {} connect 10.77.1.13:8443", probe_bin().display());
    println!("Tear down: cargo xtask lab down");

    // Leave the lab running for inspection.
    std::mem::forget(lab);
    Ok(())
}

pub fn down() -> anyhow::Result<()> {
    Lab::down_by_tag(TAG);
    let leftovers: Vec<PathBuf> =
        [Lab::pin_dir_for(TAG), Lab::dir_for(TAG), warden_tests::cgroup_root().join(format!("warden-{TAG}"))]
            .into_iter()
            .filter(|p| p.exists())
            .collect();
    if !leftovers.is_empty() {
        anyhow::bail!("lab down left {leftovers:?}");
    }
    eprintln!("lab: removed");
    Ok(())
}
