//! Root integration tests of the kernel datapath and the agent: each test builds its own
//! network-namespace lab (own tag, pin directory and state directory) and drives real traffic.
//! Without root or BTF they print a loud SKIPPING line (never a silent pass).

use std::{
    fs,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use warden_common::{CONFIG_EVENTS, CONFIG_NODE_EXEMPT, Direction, FLOW_PEER_DECIDED, names};
use warden_tests::{
    Lab, Probe,
    fixtures::{ALLOW_A_TO_B_8080, DENY_C_TO_A, team},
    probe_bin, require_root, run, write_policies,
};

/// Workloads `a` and `c` (clients) and `b` (a server on 8080 and 9090), all in namespace `team`.
fn trio(tag: &str) -> Lab {
    Lab::up(tag, &team(66, &[8080, 9090])).expect("lab up")
}

fn policies(lab: &Lab, files: &[(&str, &str)]) -> PathBuf {
    let dir = lab.dir.join("policies");
    write_policies(&dir, files).unwrap();
    dir
}

/// Replace the policy directory's content and wait until the agent commits it.
fn change_policies(lab: &mut Lab, dir: &PathBuf, files: &[(&str, &str)]) -> u32 {
    let before = lab.generation();
    for e in fs::read_dir(dir).unwrap().flatten() {
        fs::remove_file(e.path()).unwrap();
    }
    for (name, yaml) in files {
        fs::write(dir.join(name), yaml).unwrap();
    }
    lab.wait_generation_change(before, Duration::from_secs(10)).expect("agent commits the change")
}

/// A connection from `from` to `to` that exchanges a line every 50 ms for `seconds`; returns once
/// it is established. `finish` collects the outcome.
fn hold(lab: &Lab, from: &str, to: &str, seconds: u64) -> std::process::Child {
    let addr = format!("{}:8080", lab.member(to).spec.ip);
    let mut child = lab
        .command_in(
            from,
            &probe_bin(),
            &["hold".into(), addr, "--seconds".into(), seconds.to_string(), "--interval-ms".into(), "50".into()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "established", "{from} -> {to} could not connect");
    child
}

fn finish(hold: std::process::Child) -> Probe {
    serde_json::from_slice(&hold.wait_with_output().unwrap().stdout).unwrap()
}

fn assert_result(p: &Probe, want: &str, what: &str) {
    assert_eq!(p.result, want, "{what}: {p:?}");
}

/// Counter totals of one workload as `warden maps` reports them: (direction, hook, verdict) -> packets.
fn counters(lab: &Lab, workload: &str) -> Vec<(String, String, String, String, u64)> {
    lab.counters_of(workload)
        .into_iter()
        .map(|c| {
            (
                c["direction"].as_str().unwrap().to_string(),
                c["hook"].as_str().unwrap().to_string(),
                c["verdict"].as_str().unwrap().to_string(),
                c["policy"].as_str().unwrap().to_string(),
                c["packets"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn count(lab: &Lab, workload: &str, direction: &str, hook: &str, verdict: &str) -> u64 {
    counters(lab, workload).iter().filter(|c| c.0 == direction && c.1 == hook && c.2 == verdict).map(|c| c.4).sum()
}

/// A process in `from`'s network namespace but outside its cgroup: only the TC programs see it.
fn probe_outside_cgroup(lab: &Lab, from: &str, to: &str, port: u16) -> Probe {
    lab.probe_uncaged(from, lab.member(to).spec.ip, port)
}

#[test]
fn allowed_flow_passes_denied_flow_gets_eperm_and_tc_drop() {
    if !require_root("allowed_flow_passes_denied_flow_gets_eperm_and_tc_drop") {
        return;
    }
    let mut lab = trio("dpbasic");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    lab.start_agent(&dir).unwrap();
    // Without --worker-threads, the runtime is sized to the machine (half its CPUs, 1 to 2). (Its
    // threads cannot be counted: tokio names its blocking-pool threads as its workers.)
    let cpus = std::thread::available_parallelism().unwrap().get();
    let sized = format!("async runtime worker_threads={} cpus={cpus}", warden_agent::defaults::worker_threads(cpus));
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(log.contains(&sized), "expected {sized:?} in the agent's log:\n{log}");

    assert_result(&lab.probe("a", "b", 8080), "allowed", "a -> b:8080 is allowed by b-access");
    // Counted per remote identity: one connection opened and closed, bytes both ways, attributed
    // to the deciding policy.
    let v: serde_json::Value = serde_json::from_str(&lab.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
    let b = v["endpoints"].as_array().unwrap().iter().find(|e| e["workload"] == "team/b").unwrap();
    let c = b["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["hook"] == "tc" && c["remote"] == "team/a" && c["direction"] == "ingress")
        .expect("a counter for a's flows into b");
    assert_eq!((c["opened"].as_u64(), c["closed"].as_u64()), (Some(1), Some(1)), "{c}");
    assert!(c["bytes_in"].as_u64().unwrap() > 0 && c["bytes_out"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(c["policy"], "team/b-access");
    // Denied at connect(): EPERM at once, not a timeout.
    let p = lab.probe("c", "b", 8080);
    assert_result(&p, "eperm", "c -> b:8080 (no ALLOW matches)");
    assert!(p.ms < 200, "EPERM must be immediate, took {} ms", p.ms);
    assert_result(&lab.probe("a", "b", 9090), "eperm", "a -> b:9090 (port not allowed)");
    // A dual-stack client (AF_INET6 to b's v4-mapped address: cgroup/connect6) is decided alike.
    let p = lab.probe_dual_stack("connect", "c", "b", 8080);
    assert_result(&p, "eperm", "c -> b:8080 from a dual-stack socket");
    assert!(p.ms < 200, "EPERM must be immediate, took {} ms", p.ms);
    assert_result(&lab.probe_dual_stack("connect", "a", "b", 8080), "allowed", "a -> b:8080, dual-stack");
    // b is selected by an ALLOW policy; a and c are not, so they accept anything.
    assert_result(&lab.probe("b", "a", 8080), "allowed", "b -> a (a has no ALLOW policy)");

    // The same denied flow from outside the workload's cgroup: dropped at TC.
    let drops_before = count(&lab, "team/b", "ingress", "tc", "DENY");
    let p = probe_outside_cgroup(&lab, "c", "b", 8080);
    assert_result(&p, "timeout", "c -> b:8080 outside the cgroup is dropped on the veth");
    let drops_after = count(&lab, "team/b", "ingress", "tc", "DENY");
    assert!(drops_after > drops_before, "the TC drop is counted ({drops_before} -> {drops_after})");
    // And the counter names the reason: the default deny of an ALLOW-selected workload.
    assert!(
        counters(&lab, "team/b")
            .iter()
            .any(|c| c.0 == "ingress" && c.1 == "tc" && c.2 == "DENY" && c.3.contains("no ALLOW policy matched")),
        "{:?}",
        counters(&lab, "team/b")
    );
    // An allowed flow outside the cgroup passes TC too.
    assert_result(&probe_outside_cgroup(&lab, "a", "b", 8080), "allowed", "a -> b:8080 outside the cgroup");
    assert!(count(&lab, "team/b", "ingress", "tc", "ALLOW") > 0);
}

/// UDP has no `connect()` to refuse when sent with `sendto`: the cgroup/sendmsg4 hook fails a denied
/// send with EPERM, and TC drops it from a process outside the cgroup. An allowed datagram gets
/// its echo.
#[test]
fn denied_udp_send_gets_eperm_and_tc_drop() {
    if !require_root("denied_udp_send_gets_eperm_and_tc_drop") {
        return;
    }
    let mut lab = trio("dpudp");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080), ("a.yaml", DENY_C_TO_A)]);
    lab.start_agent(&dir).unwrap();

    // b's ALLOW names TCP/8080 only (Istio's ports are TCP ports): UDP from a is refused.
    let p = lab.probe_udp("a", "b", 8080);
    assert_result(&p, "eperm", "a -> b udp/8080 (b's ALLOW names TCP ports)");
    assert!(p.ms < 200, "EPERM must be immediate, took {} ms", p.ms);
    // A DENY without ports refuses every protocol.
    assert_result(&lab.probe_udp("c", "a", 8080), "eperm", "c -> a udp (a-deny-c)");
    // The same from dual-stack sockets (AF_INET6 to a v4-mapped address, which the kernel sends
    // as IPv4, through cgroup/sendmsg4).
    assert_result(&lab.probe_dual_stack("udp", "a", "b", 8080), "eperm", "a -> b udp, dual-stack");
    assert_result(&lab.probe_dual_stack("udp", "c", "a", 8080), "eperm", "c -> a udp, dual-stack");
    assert_result(&lab.probe_dual_stack("udp", "b", "c", 8080), "allowed", "b -> c udp, dual-stack");
    // c is selected by no policy and a's DENY names only c: b -> c and b -> a pass, both ways.
    assert_result(&lab.probe_udp("b", "c", 8080), "allowed", "b -> c udp");
    assert_result(&lab.probe_udp("b", "a", 8080), "allowed", "b -> a udp");
    assert!(count(&lab, "team/a", "ingress", "tc", "ALLOW") > 0, "{:?}", counters(&lab, "team/a"));

    // Outside the cgroup, the same denied datagram leaves the socket and is dropped on the veth.
    let drops = count(&lab, "team/a", "ingress", "tc", "DENY");
    assert_result(&lab.probe_udp_uncaged("c", "a", 8080), "timeout", "c -> a udp outside the cgroup");
    let after = count(&lab, "team/a", "ingress", "tc", "DENY");
    assert!(after > drops, "the TC drop is counted ({drops} -> {after})");
}

/// The flow-cache entries of flows between `x` and `y` (addresses), as bpftool dumps them.
fn flow_entries(lab: &Lab, x: &str, y: &str) -> Vec<serde_json::Value> {
    let pin = lab.pin_dir.join(names::FLOWS).display().to_string();
    let dump: serde_json::Value =
        serde_json::from_str(&run(&["bpftool", "map", "dump", "pinned", &pin, "-j"]).unwrap()).unwrap();
    let addr = |a: &str| a.parse::<std::net::Ipv4Addr>().unwrap().octets().map(|o| serde_json::json!(o)).to_vec();
    let ends = [addr(x), addr(y)];
    dump.as_array()
        .unwrap()
        .iter()
        .map(|e| e["formatted"].clone())
        .filter(|e| {
            let k = (e["key"]["addr_lo"].as_array().unwrap(), e["key"]["addr_hi"].as_array().unwrap());
            (k.0 == &ends[0] && k.1 == &ends[1]) || (k.0 == &ends[1] && k.1 == &ends[0])
        })
        .collect()
}

#[test]
fn same_node_flow_is_decided_once_for_both_veths_and_logged_at_both() {
    if !require_root("same_node_flow_is_decided_once_for_both_veths_and_logged_at_both") {
        return;
    }
    let mut lab = trio("dponce");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    lab.start_agent(&dir).unwrap();
    let maps: serde_json::Value = serde_json::from_str(&lab.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
    let ifindex = |w: &str| {
        maps["endpoints"].as_array().unwrap().iter().find(|e| e["workload"] == w).unwrap()["ifindex"].as_u64().unwrap()
    };
    let (a_ip, b_ip) = (lab.member("a").spec.ip.to_string(), lab.member("b").spec.ip.to_string());

    let held = hold(&lab, "a", "b", 2);
    // One entry for the connection, holding both ends' decisions: a's egress on a's veth, decided
    // by its SYN there, and b's ingress on b's veth, decided on a's veth for the same SYN and taken
    // into use by b's veth when the SYN arrived (no flag left).
    let entries = flow_entries(&lab, &a_ip, &b_ip);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let ends = entries[0]["value"]["ends"].as_array().unwrap();
    let end = |w: &str| {
        ends.iter()
            .find(|e| e["ifindex"].as_u64() == Some(ifindex(w)))
            .unwrap_or_else(|| panic!("no end of {w}: {ends:?}"))
    };
    let (a, b) = (end("team/a"), end("team/b"));
    assert_eq!((a["direction"].as_u64(), a["verdict"].as_u64()), (Some(Direction::Egress as u64), Some(1)), "{a}");
    assert_eq!((b["direction"].as_u64(), b["verdict"].as_u64()), (Some(Direction::Ingress as u64), Some(1)), "{b}");
    assert_ne!(b["policy_id"].as_u64(), Some(0), "b's end names the ALLOW policy: {b}");
    assert_eq!(b["flags"].as_u64().unwrap() & u64::from(FLOW_PEER_DECIDED), 0, "b's veth took it into use: {b}");
    assert_result(&finish(held), "allowed", "a -> b held");

    // Both ends' decisions are logged, as when each veth decided its own.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = fs::read_to_string(lab.agent_log()).unwrap();
        let open = |reporter: &str| {
            log.lines().any(|l| {
                l.contains("event=open")
                    && l.contains(&format!("reporter={reporter}"))
                    && l.contains("hook=tc")
                    && l.contains(&format!("dst={b_ip}:8080"))
            })
        };
        if open("source") && open("destination") {
            assert_eq!(
                log.lines().filter(|l| l.contains("event=open") && l.contains("reporter=destination")).count(),
                1,
                "{log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "both ends' open lines:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A deny on b's side, decided on c's veth (outside c's cgroup, so no connect() refusal), is
    // still dropped on b's veth and counted there with b's reason.
    let drops = count(&lab, "team/b", "ingress", "tc", "DENY");
    assert_result(&probe_outside_cgroup(&lab, "c", "b", 8080), "timeout", "c -> b:8080 is dropped");
    assert!(count(&lab, "team/b", "ingress", "tc", "DENY") > drops);
    assert_eq!(count(&lab, "team/c", "egress", "tc", "DENY"), 0, "c's egress is allowed: the drop is b's");
}

/// A Python script that connects from `src` to `dst`:8080 (addresses) and prints "allowed" or
/// "blocked <why>".
fn connect_script(src: &str, dst: &str) -> String {
    format!(
        "import socket\ns=socket.socket(); s.settimeout(0.7); s.bind(('{src}',0))\ntry:\n s.connect(('{dst}',8080)); print('allowed')\nexcept Exception as e: print('blocked', e)"
    )
}

fn output_of(c: &mut std::process::Command) -> String {
    let out = c.output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn forged_source_address_is_dropped() {
    if !require_root("forged_source_address_is_dropped") {
        return;
    }
    let mut lab = trio("dpspoof");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    lab.start_agent(&dir).unwrap();
    let spoofed = |lab: &Lab| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&lab.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
        v["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["counters"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["reason"] == "source_spoof")
            .map(|c| c["packets"].as_u64().unwrap())
            .sum()
    };
    // c takes a's address as a second address and connects from it: it would borrow a's
    // identity, which b allows. The veth program sees a source that is not c's and drops it.
    let c = lab.member("c").netns.clone();
    run(&["ip", "netns", "exec", &c, "ip", "addr", "add", "10.66.0.2/32", "dev", "eth0"]).unwrap();
    // Outside c's cgroup, so only the veth program can stop it; b must never see the packet.
    let reached_b = count(&lab, "team/b", "ingress", "tc", "ALLOW");
    let text = output_of(std::process::Command::new("nsenter").arg(format!("--net=/run/netns/{c}")).args([
        "--",
        "python3",
        "-c",
        &connect_script("10.66.0.2", "10.66.0.3"),
    ]));
    assert!(text.starts_with("blocked"), "a forged source must not pass: {text}");
    let before = spoofed(&lab);
    assert!(before > 0, "the drop is counted with reason source_spoof");
    assert_eq!(count(&lab, "team/b", "ingress", "tc", "ALLOW"), reached_b, "the forged packet never reached b's veth");

    // Inside c's cgroup, from b's address to a (which accepts anyone): connect() is decided for
    // c's identity and allowed, so only the veth stops the forged source.
    run(&["ip", "netns", "exec", &c, "ip", "addr", "del", "10.66.0.2/32", "dev", "eth0"]).unwrap();
    run(&["ip", "netns", "exec", &c, "ip", "addr", "add", "10.66.0.3/32", "dev", "eth0"]).unwrap();
    let script = connect_script("10.66.0.3", "10.66.0.2");
    let text = output_of(&mut lab.command_in("c", "python3".as_ref(), &["-c".into(), script]));
    assert!(text.starts_with("blocked timed out"), "a forged source must not pass: {text}");
    assert!(spoofed(&lab) > before, "dropped at c's veth as forged");
}

#[test]
fn policy_change_is_enforced_live_and_established_flows_survive_unrelated_changes() {
    if !require_root("policy_change_is_enforced_live_and_established_flows_survive_unrelated_changes") {
        return;
    }
    let mut lab = trio("dplive");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    lab.start_agent(&dir).unwrap();
    assert_result(&lab.probe("c", "b", 8080), "eperm", "before the change");

    // An established a -> b connection, held across an unrelated change.
    let held = hold(&lab, "a", "b", 3);

    // Live: allow c too (a new rule; a's entry is untouched).
    let allow_c = ALLOW_A_TO_B_8080
        .replace("[cluster.local/ns/team/sa/a]", "[cluster.local/ns/team/sa/a, cluster.local/ns/team/sa/c]");
    change_policies(&mut lab, &dir, &[("b.yaml", &allow_c)]);
    assert_result(&lab.probe("c", "b", 8080), "allowed", "after allowing c");
    // An unrelated DENY elsewhere.
    change_policies(&mut lab, &dir, &[("b.yaml", &allow_c), ("a.yaml", DENY_C_TO_A)]);
    assert_result(&lab.probe("c", "a", 8080), "eperm", "the new DENY is enforced");

    let p = finish(held);
    assert_eq!(p.result, "allowed", "the established connection survived two policy changes: {p:?}");
    assert!(p.round_trips.unwrap() >= 20, "it kept exchanging data: {p:?}");

    // Revoking access also cuts established connections: every cached flow is re-decided once
    // after a change (unlike a sidecar, which only checks at connection time).
    let held = hold(&lab, "c", "b", 4);
    change_policies(&mut lab, &dir, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    let p = finish(held);
    assert_ne!(p.result, "allowed", "revoked access stops the established flow: {p:?}");
}

#[test]
fn workload_changes_apply_live() {
    if !require_root("workload_changes_apply_live") {
        return;
    }
    let mut lab = trio("dpwork");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    lab.start_agent(&dir).unwrap();
    assert_result(&lab.probe("a", "b", 8080), "allowed", "a is a/a");
    // Relabel: a's service account becomes "intruder"; the policy names sa a only.
    let before = lab.generation();
    let wl = fs::read_to_string(lab.workloads_path()).unwrap().replacen(
        "serviceAccount: a\n",
        "serviceAccount: intruder\n",
        1,
    );
    fs::write(lab.workloads_path(), wl).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).unwrap();
    assert_result(&lab.probe("a", "b", 8080), "eperm", "a no longer carries the allowed identity");
    // Remove c from the node: its programs are detached and its pins removed.
    let before = lab.generation();
    let wl = fs::read_to_string(lab.workloads_path()).unwrap();
    let kept: String = wl.split("  - name: ").filter(|s| !s.starts_with("c\n")).collect::<Vec<_>>().join("  - name: ");
    fs::write(lab.workloads_path(), kept).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).unwrap();
    assert!(!lab.pin_dir.join("links/team/c").exists(), "c's link pins are gone");
    assert!(lab.pin_dir.join("links/team/b/tc_to_workload").exists());
    // c is unmanaged now: its own traffic is no longer hooked, but b still refuses it (c's
    // address is the world to b, and no ALLOW matches the world).
    assert_result(&lab.probe("c", "b", 8080), "timeout", "c -> b is dropped at b's veth");
}

#[test]
fn bpftool_reads_pinned_maps_with_field_names() {
    if !require_root("bpftool_reads_pinned_maps_with_field_names") {
        return;
    }
    let mut lab = trio("dpbtf");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    lab.start_agent(&dir).unwrap();
    lab.probe("a", "b", 8080);
    let pin_dir = lab.pin_dir.clone();
    let pin = |m: &str| pin_dir.join(m).display().to_string();
    let policy = run(&["bpftool", "map", "dump", "pinned", &pin(names::POLICY)]).unwrap();
    for field in ["\"endpoint_id\"", "\"remote_identity\"", "\"dport\"", "\"verdict\"", "\"policy_id\""] {
        assert!(policy.contains(field), "policy map dump lacks {field}:\n{policy}");
    }
    let ipcache = run(&["bpftool", "map", "dump", "pinned", &pin(names::IPCACHE)]).unwrap();
    assert!(
        ipcache.contains("\"prefix_len\"") && ipcache.contains("\"identity\"") && ipcache.contains("\"local_ifindex\""),
        "{ipcache}"
    );
    let counters = run(&["bpftool", "map", "dump", "pinned", &pin(names::COUNTERS)]).unwrap();
    assert!(
        counters.contains("\"packets_in\"")
            && counters.contains("\"bytes_out\"")
            && counters.contains("\"opened\"")
            && counters.contains("\"remote_identity\""),
        "{counters}"
    );
    let flows = run(&["bpftool", "map", "dump", "pinned", &pin(names::FLOWS)]).unwrap();
    assert!(flows.contains("\"addr_lo\"") && flows.contains("\"generation\""), "{flows}");
    // The kernel writes flow events while the access log (on by default) reads them, and only then;
    // the node's own TCP is exempt by default (`--node-probes allow`).
    let config = || run(&["bpftool", "map", "dump", "pinned", &pin(names::CONFIG)]).unwrap();
    let flags = CONFIG_EVENTS | CONFIG_NODE_EXEMPT;
    assert!(config().contains(&format!("\"flags\": {flags}")), "{}", config());
    // The text view names what the numbers mean.
    let text = lab.warden(&["maps"]).unwrap();
    assert!(
        text.contains("team/b")
            && text.contains("team/a")
            && text.contains("8080/tcp")
            && text.contains("team/b-access"),
        "{text}"
    );
    lab.kill_agent(libc::SIGTERM);
    let path = |p: &std::path::Path| p.display().to_string();
    let (workloads, policies) = (path(&lab.workloads_path()), path(&dir));
    lab.start_agent_with(
        &["--workloads", &workloads, "--policies", &policies, "--access-log", "off", "--node-probes", "deny"]
            .map(String::from),
    )
    .unwrap();
    assert!(config().contains("\"flags\": 0"), "{}", config());
}

#[test]
fn killed_agent_keeps_enforcing_and_restart_adopts_without_gap() {
    if !require_root("killed_agent_keeps_enforcing_and_restart_adopts_without_gap") {
        return;
    }
    let mut lab = trio("dpkill");
    let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
    lab.start_agent(&dir).unwrap();

    let held = hold(&lab, "a", "b", 6);

    lab.kill_agent(libc::SIGKILL);
    assert!(!lab.agent_running());
    // Dead agent: the pinned programs and maps keep enforcing both ways.
    assert_result(&lab.probe("c", "b", 8080), "eperm", "denied with the agent dead");
    assert_result(&probe_outside_cgroup(&lab, "c", "b", 8080), "timeout", "dropped at TC with the agent dead");
    assert_result(&lab.probe("a", "b", 8080), "allowed", "allowed with the agent dead");

    // Restart while a prober hammers the denied flow: not one connection may get through.
    let stop = Instant::now() + Duration::from_secs(3);
    let prober = {
        let c_ns = lab.member("c").netns.clone();
        let probe = probe_bin();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while Instant::now() < stop {
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{c_ns}"))
                    .arg("--")
                    .arg(&probe)
                    .args(["connect", "10.66.0.3:8080", "--timeout-ms", "200"])
                    .output()
                    .unwrap();
                results.push(serde_json::from_slice::<Probe>(&out.stdout).unwrap().result);
            }
            results
        })
    };
    // A pin of a hook an older agent attached and this one retired (cgroup_skb/egress, pinned as
    // `sock_egress`) is released when the workload is adopted.
    let retired = lab.pin_dir.join("links/team/c/sock_egress");
    let config_pin = lab.pin_dir.join(names::CONFIG);
    run(&["bpftool", "map", "pin", "pinned", &config_pin.display().to_string(), &retired.display().to_string()])
        .unwrap();
    assert!(retired.exists());
    // Likewise a map an older agent pinned and this one no longer uses.
    let retired_map = lab.pin_dir.join(names::RETIRED[0]);
    run(&["bpftool", "map", "pin", "pinned", &config_pin.display().to_string(), &retired_map.display().to_string()])
        .unwrap();
    assert!(retired_map.exists());
    std::thread::sleep(Duration::from_millis(300));
    lab.start_agent(&dir).unwrap();
    assert!(!retired.exists(), "the retired hook's pin is released on adoption");
    assert!(!retired_map.exists(), "the retired map's pin is removed at load");
    assert!(config_pin.exists(), "only the retired pin goes");
    let results = prober.join().unwrap();
    assert!(!results.is_empty());
    assert!(results.iter().all(|r| r != "allowed"), "a denied flow got through around the restart: {results:?}");

    let p = finish(held);
    assert_eq!(p.result, "allowed", "the connection held across kill and restart: {p:?}");

    // Adopted, not duplicated: one connect() is counted once (a second attachment would count twice).
    let before = count(&lab, "team/a", "egress", "connect", "ALLOW");
    assert_result(&lab.probe("a", "b", 8080), "allowed", "after restart");
    assert_eq!(count(&lab, "team/a", "egress", "connect", "ALLOW"), before + 1, "exactly one connect4 program runs");
    assert_result(&lab.probe("c", "b", 8080), "eperm", "after restart");
}

#[test]
fn bad_input_is_refused_with_file_and_field_and_the_last_good_state_keeps_running() {
    if !require_root("bad_input_is_refused_with_file_and_field_and_the_last_good_state_keeps_running") {
        return;
    }
    let mut lab = trio("dpbad");
    let good = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);

    // At start: a missing veth and a malformed policy each stop the agent with a clear error.
    fs::write(lab.workloads_path(), lab.workload_file().replace("veth: dpbadw2", "veth: nosuchveth")).unwrap();
    let mut a = lab.spawn_agent(&good).unwrap();
    assert!(a.wait_exit(Duration::from_secs(10)).is_some_and(|s| !s.success()), "the agent must refuse to start");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(log.contains("workloads.yaml: workloads[2].veth: no interface \"nosuchveth\" on this node"), "{log}");
    assert!(!log.contains('\u{1b}'), "a log that is not a terminal has no colour codes:\n{log}");
    assert!(!lab.pin_dir.join("links").exists(), "nothing was attached");
    fs::write(lab.workloads_path(), lab.workload_file()).unwrap();

    let bad_dir = lab.dir.join("bad-policies");
    write_policies(&bad_dir, &[("b.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: team\nspec: {}\n")]).unwrap();
    let mut a = lab.spawn_agent(&bad_dir).unwrap();
    assert!(a.wait_exit(Duration::from_secs(10)).is_some_and(|s| !s.success()));
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(log.contains("bad-policies/b.yaml"), "the error names the file:\n{log}");

    // Running: the good state.
    lab.start_agent(&good).unwrap();
    let generation = lab.generation();
    assert_result(&lab.probe("a", "b", 8080), "allowed", "good state");
    assert_result(&lab.probe("c", "b", 8080), "eperm", "good state");

    // A change with one valid new policy and one bad CIDR: nothing of it is applied.
    let allow_c = ALLOW_A_TO_B_8080.replace("b-access", "b-access-c").replace("sa/a]", "sa/c]");
    let bad_cidr = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-cidr, namespace: team}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}]}]
";
    fs::write(good.join("c.yaml"), &allow_c).unwrap();
    fs::write(good.join("bad.yaml"), bad_cidr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = fs::read_to_string(lab.agent_log()).unwrap();
        if log.contains("ignoring invalid input") {
            assert!(log.contains("bad.yaml"), "{log}");
            assert!(
                log.contains("ipBlocks[1]") && log.contains("10.0.0.0/33"),
                "the error names field and value:\n{log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not report the bad input:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.generation(), generation, "nothing was committed");
    assert_result(&lab.probe("c", "b", 8080), "eperm", "the valid half of the bad change was not applied");
    assert_result(&lab.probe("a", "b", 8080), "allowed", "the last good state keeps running");
    assert!(lab.agent_running(), "the agent stays up");

    // A broken workload file at runtime is refused the same way.
    fs::remove_file(good.join("bad.yaml")).unwrap();
    lab.wait_generation_change(generation, Duration::from_secs(10)).unwrap();
    assert_result(&lab.probe("c", "b", 8080), "allowed", "the fixed change applies");

    // A change of the inputs that leaves the node's state as it was (a file the walk skips, a
    // policy rewritten with the same rules) commits nothing: the generation stays, and with it
    // every flow the kernel has cached. The policies' own warnings (the skipped file) and the
    // compiler's (an ALLOW rule with L7 attributes) are logged when they first appear, and not
    // again at later builds and commits.
    let skipped = format!("{}: skipped: not a .yaml or .yml file", good.join("README.txt").display());
    let generation = lab.generation();
    fs::write(good.join("README.txt"), "notes\n").unwrap();
    wait_log(&lab, &skipped);
    fs::write(good.join("c.yaml"), format!("# the same rules\n{allow_c}")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(lab.generation(), generation, "nothing the node enforces changed: no commit");
    assert_result(&lab.probe("c", "b", 8080), "allowed", "the same state keeps running");
    let l7 = ALLOW_A_TO_B_8080.replace("b-access", "b-l7").replace("ports: [\"8080\"]", "paths: [/admin]");
    let l7_warning = "team/b-l7 rule 0: ALLOW rule with L7 attributes never matches in the kernel (L4)";
    fs::write(good.join("l7.yaml"), l7).unwrap();
    wait_log(&lab, l7_warning);
    std::thread::sleep(Duration::from_millis(500)); // its commit (a new policy's name) is done
    // A change that does change the state commits.
    let generation = lab.generation();
    fs::remove_file(good.join("c.yaml")).unwrap();
    lab.wait_generation_change(generation, Duration::from_secs(10)).unwrap();
    assert_result(&lab.probe("c", "b", 8080), "eperm", "c's access went with c.yaml");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert_eq!(log.matches(&skipped).count(), 1, "logged once:\n{log}");
    assert_eq!(log.matches(l7_warning).count(), 1, "logged once:\n{log}");
    let generation = lab.generation();
    fs::write(lab.workloads_path(), "workloads:\n  - {name: a, namespace: team, serviceAccount: a, ip: 10.66.0.999}\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(lab.generation(), generation);
    assert!(
        fs::read_to_string(lab.agent_log())
            .unwrap()
            .contains("workloads[0].ip: \"10.66.0.999\" is not an IPv4 address")
    );
    assert_result(&lab.probe("a", "b", 8080), "allowed", "still the last good state");
}

/// Wait until the agent's log has `text`.
fn wait_log(lab: &Lab, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = fs::read_to_string(lab.agent_log()).unwrap();
        if log.contains(text) {
            return;
        }
        assert!(Instant::now() < deadline, "the agent did not log {text:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn lab_twice_in_a_row_and_down_leaves_nothing() {
    if !require_root("lab_twice_in_a_row_and_down_leaves_nothing") {
        return;
    }
    for _ in 0..2 {
        let mut lab = trio("dptwice");
        let dir = policies(&lab, &[("b.yaml", ALLOW_A_TO_B_8080)]);
        lab.start_agent(&dir).unwrap();
        assert_result(&lab.probe("a", "b", 8080), "allowed", "fresh lab");
        std::mem::forget(lab); // as `cargo xtask lab` leaves it
    }
    Lab::down_by_tag("dptwice");
    let netns = run(&["ip", "netns", "list"]).unwrap();
    assert!(!netns.contains("dptwice-"), "{netns}");
    assert!(!Lab::pin_dir_for("dptwice").exists());
    assert!(!warden_tests::cgroup_root().join("warden-dptwice").exists());
    assert!(!Lab::dir_for("dptwice").exists());
}
