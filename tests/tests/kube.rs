//! Root integration tests of the cluster source against a real kube-apiserver (1.20.2, built by
//! `../shared/kube-apiserver/setup.sh`; `cargo xtask test` passes its path in
//! `WARDEN_KUBE_APISERVER`). Pods never run there: the tests create Pod objects, set their
//! status through the status subresource, and build matching workloads in the lab (same IPs,
//! `/32` routes to their veths, cgroups named `pod<uid>` as kubelet names them). The agent reads
//! the cluster as the DaemonSet's service account (impersonated), so deploy/'s RBAC is tested too.
//! Without root or BTF they print a loud SKIPPING line.

use std::{
    fs,
    net::Ipv4Addr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use warden_tests::{
    Lab, Spec,
    fixtures::{ALLOW_A_TO_B_8080, team},
    kapi::{ApiServer, CaProcess},
    require_root,
};

/// Policy changes must reach the maps within this (issue 6).
const MAPS_LATENCY: Duration = Duration::from_secs(1);

fn maps(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&lab.warden(&["maps", "--output", "json"]).unwrap()).unwrap()
}

/// The policies with entries in `workload`'s map (not the defaults, shown in parentheses).
fn policies_of(v: &serde_json::Value, workload: &str) -> Vec<String> {
    let mut p: Vec<String> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["workload"] == workload)
        .flat_map(|e| e["policy"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["policy"].as_str().map(String::from))
        .filter(|p| !p.is_empty() && !p.starts_with('('))
        .collect();
    p.sort();
    p.dedup();
    p
}

fn endpoints(v: &serde_json::Value) -> Vec<String> {
    // Counters of a departed endpoint stay readable as "endpoint N (removed)".
    let mut e: Vec<String> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["workload"].as_str().unwrap().to_string())
        .filter(|w| !w.ends_with("(removed)"))
        .collect();
    e.sort();
    e
}

/// Poll the maps until `pred` holds; how long it took.
fn wait_maps(lab: &Lab, what: &str, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let v = maps(lab);
        if pred(&v) {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!(
                "{what}: not in the maps within {timeout:?}: {v:#}\nagent log:\n{}",
                fs::read_to_string(lab.agent_log()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_probe(lab: &Lab, from: &str, to: &str, port: u16, want: &str) {
    let p = lab.probe(from, to, port);
    assert_eq!(p.result, want, "{from} -> {to}:{port}: {p:?}");
}

/// b-access broken: an address that is not one.
const B_ACCESS_INVALID: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-access, namespace: team}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from: [{source: {ipBlocks: [10.0.0.300/8]}}]
";

/// v1beta1, through the Service selecting c (targetRefs): deny a on 8080.
const C_DENY_A: &str = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: c-deny-a, namespace: team}
spec:
  targetRefs: [{kind: Service, group: \"\", name: c-svc}]
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/team/sa/a]}}]
";

fn ambient_namespace(api: &ApiServer, ns: &str) {
    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
    ))
    .unwrap();
}

/// Lab workloads a, b, c on `node` in namespace team, with their pods; c is selected by c-svc.
/// The API server listens in the lab's node namespace, where the agent runs.
fn cluster_lab(tag: &str, port: u16, node: &str, net: u8) -> (Lab, ApiServer) {
    let ip = |d| Ipv4Addr::new(10, net, 0, d);
    let mut lab = Lab::up(tag, &team(net, &[8080, 9090])).expect("lab up");
    let api = ApiServer::start_in(tag, port, port - 4064, Some(&lab.node));
    api.install();
    ambient_namespace(&api, "team");
    for (name, d) in [("a", 2), ("b", 3), ("c", 4)] {
        let uid = api.pod("team", name, node, ip(d), &[("app", name)]);
        assert!(!uid.is_empty());
        lab.move_cgroup(name, &format!("pod{uid}")).unwrap();
    }
    api.apply("apiVersion: v1\nkind: Service\nmetadata: {name: c-svc, namespace: team}\nspec: {selector: {app: c}, ports: [{port: 8080}]}\n").unwrap();
    (lab, api)
}

/// [`cluster_lab`] with `team/b-access` applied and the agent enforcing it.
fn enforcing_b_access(tag: &str, port: u16, node: &str, net: u8) -> (Lab, ApiServer) {
    let (mut lab, api) = cluster_lab(tag, port, node, net);
    api.apply(ALLOW_A_TO_B_8080).unwrap();
    lab.start_agent_with(&agent_args(&api, node)).unwrap();
    wait_maps(&lab, "b-access", Duration::from_secs(5), |v| policies_of(v, "team/b") == ["team/b-access"]);
    (lab, api)
}

/// The capabilities deploy/daemonset.yaml grants the agent (setpriv's names).
const DAEMONSET_CAPABILITIES: [&str; 3] = ["bpf", "net_admin", "perfmon"];

/// The agent in the lab's node namespace as root limited to `caps` (its bounding set, as a
/// container's capability list does); killed on drop.
struct CappedAgent(std::process::Child);

impl CappedAgent {
    fn spawn(lab: &Lab, caps: &[&str], args: &[String]) -> CappedAgent {
        let log = fs::OpenOptions::new().create(true).append(true).open(lab.agent_log()).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.node))
            .args(["--", "setpriv", &format!("--bounding-set=-all,+{}", caps.join(",+")), "--inh-caps=-all", "--"])
            .arg(warden_tests::warden_bin())
            .arg("agent")
            .args(args)
            .arg("--pin-dir")
            .arg(&lab.pin_dir)
            .arg("--state-dir")
            .arg(&lab.state_dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        CappedAgent(child)
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from the agent's port `port` in the lab's node namespace: (status, body).
fn agent_get(lab: &Lab, port: u16, path: &str) -> (u16, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node))
        .args(["--", "curl", "-s", "-m", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// The agent's readiness: (status, body).
fn readiness(lab: &Lab) -> (u16, String) {
    agent_get(lab, 15021, "/healthz/ready")
}

/// The value of the series `series` (name and labels, exactly as exposed) on the agent's metrics.
fn metric(lab: &Lab, series: &str) -> Option<f64> {
    let (status, body) = agent_get(lab, 15020, "/stats/prometheus");
    assert_eq!(status, 200, "{body}");
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The `resource` labels of the agent's watches.
const WATCHES: [&str; 7] = [
    "namespaces",
    "pods_local",
    "pods_remote",
    "services",
    "authorizationpolicies",
    "peerauthentications",
    "requestauthentications",
];

fn in_sync(lab: &Lab, resource: &str) -> Option<f64> {
    metric(lab, &format!("warden_kube_watch_in_sync{{resource=\"{resource}\"}}"))
}

/// Poll until every watch reports in sync.
fn wait_in_sync(lab: &Lab, what: &str, timeout: Duration) {
    let start = Instant::now();
    while !WATCHES.iter().all(|r| in_sync(lab, r) == Some(1.0)) {
        assert!(
            start.elapsed() < timeout,
            "{what}: not every watch in sync within {timeout:?}: {:?}\nagent log:\n{}",
            WATCHES.map(|r| (r, in_sync(lab, r))),
            fs::read_to_string(lab.agent_log()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn agent_args(api: &ApiServer, node: &str) -> Vec<String> {
    vec![
        "--kubeconfig".into(),
        api.agent_kubeconfig().display().to_string(),
        "--node-name".into(),
        node.into(),
        "--cgroup-root".into(),
        warden_tests::cgroup_root().display().to_string(),
    ]
}

#[test]
fn cluster_resources_reach_the_maps_within_a_second() {
    if !require_root("cluster_resources_reach_the_maps_within_a_second") {
        return;
    }
    let node = "node-kpol";
    let (mut lab, api) = cluster_lab("kpol", 16543, node, 67);
    // A pod elsewhere (an identity only), a pod of a namespace that is not enrolled, and one
    // opted out: none of them is enforced here.
    api.pod("team", "remote", "node-other", Ipv4Addr::new(10, 67, 9, 9), &[("app", "remote")]);
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n").unwrap();
    api.pod("plain", "p", node, Ipv4Addr::new(10, 67, 9, 10), &[("app", "p")]);

    // With exactly the capabilities deploy/daemonset.yaml grants.
    let before = lab.generation();
    let mut agent = CappedAgent::spawn(&lab, &DAEMONSET_CAPABILITIES, &agent_args(&api, node));
    lab.wait_generation_change(before, Duration::from_secs(60)).unwrap();
    let v = maps(&lab);
    assert_eq!(endpoints(&v), ["team/a", "team/b", "team/c"], "{v:#}");
    let ipcache = v["ipcache"].to_string();
    assert!(
        ipcache.contains("10.67.9.9/32") && ipcache.contains("team/remote"),
        "the remote pod is an identity: {ipcache}"
    );
    assert!(
        !ipcache.contains("10.67.9.10"),
        "pods of namespaces without the ambient label are not workloads: {ipcache}"
    );
    let record = fs::read_to_string(lab.state_dir.join("state.json")).unwrap();
    assert!(record.contains(&format!("{}/pod", lab.cgroup_dir.display())), "cgroups found by pod UID: {record}");
    assert_probe(&lab, "c", "b", 8080, "allowed");

    // Apply -> maps within a second -> enforced.
    let t = Instant::now();
    api.apply(ALLOW_A_TO_B_8080).unwrap();
    let kubectl_ms = t.elapsed();
    let took = wait_maps(&lab, "b-access", Duration::from_secs(5), |v| policies_of(v, "team/b") == ["team/b-access"]);
    eprintln!("kubectl apply returned in {kubectl_ms:?}; b-access reached the maps {took:?} later");
    assert!(took < MAPS_LATENCY, "b-access took {took:?}");
    assert_probe(&lab, "a", "b", 8080, "allowed");
    assert_probe(&lab, "c", "b", 8080, "eperm");
    assert_probe(&lab, "a", "b", 9090, "eperm");

    // v1beta1 and targetRefs through a Service.
    api.apply(C_DENY_A).unwrap();
    let took = wait_maps(&lab, "c-deny-a", Duration::from_secs(5), |v| policies_of(v, "team/c") == ["team/c-deny-a"]);
    assert!(took < MAPS_LATENCY, "c-deny-a took {took:?}");
    assert_probe(&lab, "a", "c", 8080, "eperm");
    assert_probe(&lab, "b", "c", 8080, "allowed");

    // An invalid version: reported by name (log, Event, status), ignored; the last good version
    // of b-access stays in force and the other policies are untouched.
    let generation = lab.generation();
    api.apply(B_ACCESS_INVALID).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (event, status) = loop {
        let events = api
            .kubectl(&["get", "events", "-n", "team", "--field-selector", "involvedObject.name=b-access", "-o", "json"])
            .unwrap();
        let status = api
            .kubectl(&[
                "get",
                "authorizationpolicies.security.istio.io",
                "b-access",
                "-n",
                "team",
                "-o",
                "jsonpath={.status}",
            ])
            .unwrap();
        if events.contains("InvalidResource") && status.contains("WDN0001") {
            break (events, status);
        }
        assert!(
            Instant::now() < deadline,
            "no event/status for the invalid b-access: {events}\n{status}\n{}",
            fs::read_to_string(lab.agent_log()).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let field = "spec.rules[0].from[0].source.ipBlocks[0]";
    assert!(event.contains(field) && event.contains("previous version stays in force"), "{event}");
    assert!(status.contains(field) && status.contains("\"Accepted\""), "{status}");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(
        log.contains("AuthorizationPolicy team/b-access") && log.contains(field),
        "the log names the resource and field:\n{log}"
    );
    // The same message as `warden policy validate` gives for the file.
    let file = lab.dir.join("b-access-invalid.yaml");
    fs::write(&file, B_ACCESS_INVALID).unwrap();
    let validate = Command::new(warden_tests::warden_bin()).args(["policy", "validate"]).arg(&file).output().unwrap();
    let validate = String::from_utf8_lossy(&validate.stdout).to_string() + &String::from_utf8_lossy(&validate.stderr);
    let reason = validate
        .split(&format!("{field}: "))
        .nth(1)
        .and_then(|r| r.lines().next())
        .unwrap_or_else(|| panic!("{validate}"));
    let message: serde_json::Value = serde_json::from_str(&status).unwrap();
    let message = message["validationMessages"][0]["message"].as_str().unwrap_or_default().to_string();
    assert_eq!(message, format!("{field}: {}", reason.trim()), "the status says what `warden policy validate` says");
    assert_eq!(policies_of(&maps(&lab), "team/b"), ["team/b-access"]);
    assert_probe(&lab, "a", "b", 8080, "allowed");
    assert_probe(&lab, "c", "b", 8080, "eperm");
    assert_probe(&lab, "a", "c", 8080, "eperm");
    // While b-access is invalid, other changes still apply.
    let opened = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b-9090, namespace: team}\nspec:\n  selector: {matchLabels: {app: b}}\n  action: ALLOW\n  rules: [{to: [{operation: {ports: [\"9090\"]}}]}]\n";
    api.apply(opened).unwrap();
    wait_maps(&lab, "b-9090", Duration::from_secs(5), |v| policies_of(v, "team/b") == ["team/b-9090", "team/b-access"]);
    assert!(lab.generation() != generation);
    assert_probe(&lab, "c", "b", 9090, "allowed");
    assert_probe(&lab, "c", "b", 8080, "eperm");

    // Fixed again: the status says so.
    api.apply(ALLOW_A_TO_B_8080).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api
        .kubectl(&[
            "get",
            "authorizationpolicies.security.istio.io",
            "b-access",
            "-n",
            "team",
            "-o",
            "jsonpath={.status.conditions[0].status}",
        ])
        .unwrap()
        .contains("True")
    {
        assert!(Instant::now() < deadline, "the fixed b-access still shows as invalid");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Delete -> entries gone within a second.
    let t = Instant::now();
    api.kubectl(&[
        "delete",
        "authorizationpolicies.security.istio.io",
        "b-access",
        "b-9090",
        "-n",
        "team",
        "--wait=false",
    ])
    .unwrap();
    let took = wait_maps(&lab, "b's policies gone", Duration::from_secs(5), |v| policies_of(v, "team/b").is_empty());
    eprintln!("delete: kubectl {:?}, maps {took:?}", t.elapsed() - took);
    assert!(took < MAPS_LATENCY, "deletion took {took:?}");
    assert_probe(&lab, "c", "b", 8080, "allowed");

    // A pod opting out, then a deleted pod: their endpoints leave the maps.
    api.kubectl(&["label", "pod", "c", "-n", "team", "istio.io/dataplane-mode=none"]).unwrap();
    let took = wait_maps(&lab, "c opted out", Duration::from_secs(5), |v| endpoints(v) == ["team/a", "team/b"]);
    assert!(took < MAPS_LATENCY, "opt-out took {took:?}");
    assert_probe(&lab, "a", "c", 8080, "allowed");
    // A local pod whose veth is not wired yet: an identity only, no commits while it waits, and
    // enforced within a retry period once its /32 route appears (here: on c's free veth).
    let generation = lab.generation();
    api.pod("team", "d", node, Ipv4Addr::new(10, 67, 0, 5), &[("app", "d")]);
    wait_maps(&lab, "d as an identity", Duration::from_secs(5), |v| v["ipcache"].to_string().contains("team/d"));
    assert_eq!(endpoints(&maps(&lab)), ["team/a", "team/b"]);
    let waiting = lab.generation();
    assert_ne!(waiting, generation);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(lab.generation(), waiting, "no commits while d waits for its route");
    let veth = lab.member("c").veth.clone();
    warden_tests::run(&["ip", "netns", "exec", &lab.node, "ip", "route", "add", "10.67.0.5/32", "dev", &veth]).unwrap();
    let took =
        wait_maps(&lab, "d enforced", Duration::from_secs(5), |v| endpoints(v) == ["team/a", "team/b", "team/d"]);
    assert!(took < Duration::from_secs(2), "d took {took:?} after its route appeared");
    assert!(fs::read_to_string(lab.agent_log()).unwrap().contains("team/d: no /32 route to 10.67.0.5 on this node"));

    api.kubectl(&["delete", "pod", "a", "-n", "team", "--wait=false", "--grace-period=0", "--force"]).unwrap();
    let took = wait_maps(&lab, "a deleted", Duration::from_secs(5), |v| endpoints(v) == ["team/b", "team/d"]);
    assert!(took < MAPS_LATENCY, "pod deletion took {took:?}");
    // Un-enrolling the namespace releases every workload of it.
    api.kubectl(&["label", "namespace", "team", "istio.io/dataplane-mode-"]).unwrap();
    wait_maps(&lab, "namespace left", Duration::from_secs(5), |v| endpoints(v).is_empty());
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent exited:\n{}",
        fs::read_to_string(lab.agent_log()).unwrap()
    );
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(!log.contains("Operation not permitted"), "a capability is missing from the DaemonSet's set:\n{log}");
}

#[test]
fn an_api_server_restart_never_lapses_enforcement() {
    if !require_root("an_api_server_restart_never_lapses_enforcement") {
        return;
    }
    let node = "node-krst";
    let (lab, api) = enforcing_b_access("krst", 16553, node, 68);

    // Probe both ways continuously, across the restart.
    let lab = Arc::new(lab);
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (lab, stop) = (lab.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                for (from, want) in [("a", "allowed"), ("c", "eperm")] {
                    let p = lab.probe(from, "b", 8080);
                    if p.result != want {
                        bad.push(format!("{from} -> b:8080 at probe {n}: {p:?}"));
                    }
                }
                n += 1;
            }
            (n, bad)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    api.stop();
    // Down for a while: the watches fail and retry; the committed state keeps enforcing.
    std::thread::sleep(Duration::from_secs(3));
    api.launch();
    // Back: the watchers resume (or re-list when their resource version is gone) while the
    // committed state keeps enforcing.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let (n, bad) = prober.join().unwrap();
    assert!(n >= 5, "only {n} probe rounds");
    assert!(bad.is_empty(), "enforcement lapsed across the restart:\n{}", bad.join("\n"));

    // Reconnected: a change made after the restart reaches the maps.
    api.kubectl(&["delete", "authorizationpolicies.security.istio.io", "b-access", "-n", "team"]).unwrap();
    let took = wait_maps(&lab, "b-access deleted after the restart", Duration::from_secs(20), |v| {
        policies_of(v, "team/b").is_empty()
    });
    assert_probe(&lab, "c", "b", 8080, "allowed");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(log.contains("failed, retrying") && log.contains("recovered"), "{log}");
    // A restart far shorter than the readiness limit: every watch is back in sync, still ready.
    wait_in_sync(&lab, "after the restart", Duration::from_secs(20));
    assert_eq!(readiness(&lab), (200, "ready\n".to_string()));
    assert!(metric(&lab, "warden_kube_watch_failures_total{resource=\"pods_local\"}").is_some_and(|n| n >= 1.0));
    assert_eq!(metric(&lab, "warden_commit_generation"), Some(f64::from(lab.generation())));
    if std::env::var_os("RUST_LOG").is_none() {
        assert!(!log.contains("failed with error"), "kube's client logs every failed request itself:\n{log}");
    }
    let relisted = log.matches("re-listed").count();
    eprintln!(
        "API server restart: {n} probe rounds without a lapse; {relisted} watches re-listed; a deletion after the restart reached the maps in {took:?}"
    );
}

/// deploy/rbac.yaml's ClusterRole, or (`broken`) with `list` taken from pods and `watch` from
/// services.
fn agent_cluster_role(broken: bool) -> String {
    let rbac = fs::read_to_string(warden_tests::workspace_root().join("deploy/rbac.yaml")).unwrap();
    let role = rbac.split("\n---\n").find(|d| d.contains("kind: ClusterRole\n")).expect("the ClusterRole").to_string();
    if !broken {
        return role;
    }
    let core = "  - apiGroups: [\"\"]\n    resources: [namespaces, pods, services]\n    verbs: [get, list, watch]\n";
    assert!(role.contains(core), "deploy/rbac.yaml changed shape:\n{role}");
    role.replace(
        core,
        &[("namespaces", "get, list, watch"), ("pods", "get, watch"), ("services", "get, list")]
            .map(|(r, verbs)| format!("  - apiGroups: [\"\"]\n    resources: [{r}]\n    verbs: [{verbs}]\n"))
            .concat(),
    )
}

/// A watch that cannot follow the cluster any more (pods lost `list` and services `watch`, then
/// the API server restarts, so the pods must be listed again and the services watched again)
/// freezes updates: the agent says so. The pinned state keeps enforcing; readiness stays 200
/// for the first minute (an API-server restart is not an outage) and then answers 503 naming
/// the watches; the metrics show them out of sync and failing; the log says it once per
/// backoff step, not per attempt. With the RBAC back, everything recovers.
#[test]
fn a_watch_out_of_sync_for_a_minute_makes_the_agent_not_ready_and_enforcement_stays() {
    if !require_root("a_watch_out_of_sync_for_a_minute_makes_the_agent_not_ready_and_enforcement_stays") {
        return;
    }
    let node = "node-ksync";
    let (lab, api) = enforcing_b_access("ksync", 16593, node, 71);
    wait_in_sync(&lab, "at start", Duration::from_secs(5));
    assert_eq!(readiness(&lab), (200, "ready\n".to_string()));
    assert_eq!(metric(&lab, "warden_commit_generation"), Some(f64::from(lab.generation())));
    assert!(metric(&lab, "warden_commit_last_success_timestamp_seconds").is_some_and(|t| t > 1.7e9));
    assert_eq!(metric(&lab, "warden_commit_failures_total"), Some(0.0));

    api.apply(&agent_cluster_role(true)).unwrap();
    let log_before = fs::read_to_string(lab.agent_log()).unwrap().len();
    let stopped = Instant::now();
    api.stop();
    std::thread::sleep(Duration::from_secs(1));
    api.launch();

    // Readiness holds for the first minute, then names the watches out of sync.
    let mut checked_metrics = false;
    let mut namespaces_in_sync = false;
    let not_ready = loop {
        let (status, body) = readiness(&lab);
        let since = stopped.elapsed();
        if status == 503 {
            break (since, body);
        }
        assert_eq!(status, 200, "{body}");
        assert!(since < Duration::from_secs(100), "still ready after {since:?}");
        // Past the API server's start (its RBAC refuses everything for a while after it).
        if !checked_metrics && since > Duration::from_secs(40) {
            for r in ["pods_local", "pods_remote", "services"] {
                assert_eq!(in_sync(&lab, r), Some(0.0), "{r}");
                let failures = format!("warden_kube_watch_failures_total{{resource=\"{r}\"}}");
                assert!(metric(&lab, &failures).is_some_and(|n| n >= 2.0), "{r}");
            }
            checked_metrics = true;
        }
        namespaces_in_sync |= checked_metrics && in_sync(&lab, "namespaces") == Some(1.0);
        std::thread::sleep(Duration::from_millis(500));
    };
    let (after, body) = not_ready;
    assert!(after >= Duration::from_secs(60), "not ready after {after:?}, before the limit: {body}");
    assert!(checked_metrics && namespaces_in_sync, "the namespaces' watch, which may list and watch, is in sync");
    assert!(body.starts_with("not ready: out of sync with the API server for more than 60s"), "{body}");
    for w in ["pods on this node: since", "pods on other nodes: since", "cannot list resource \"pods\""] {
        assert!(body.contains(w), "{w} missing: {body}");
    }
    // The services' list may have completed after the restart (a recovery), their watch failing
    // only then: they join the body a little later.
    let body = loop {
        let (status, body) = readiness(&lab);
        assert_eq!(status, 503, "{body}");
        if body.contains("services: since") {
            break body;
        }
        assert!(stopped.elapsed() < after + Duration::from_secs(40), "services never reported: {body}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(body.contains("cannot watch resource \"services\""), "{body}");
    assert!(!body.contains("namespaces"), "{body}");
    // Enforcement is the pinned state's, whatever readiness says.
    assert_probe(&lab, "a", "b", 8080, "allowed");
    assert_probe(&lab, "c", "b", 8080, "eperm");
    // Once per backoff step and a reminder a minute, not per attempt; kube's own per-request
    // lines are quieted.
    let log = fs::read_to_string(lab.agent_log()).unwrap()[log_before..].to_string();
    let lines = log.lines().filter(|l| l.contains(" WARN ") && l.contains("watch of pods on this node")).count();
    assert!((2..=12).contains(&lines), "{lines} lines about one watch in {after:?}:\n{log}");
    if std::env::var_os("RUST_LOG").is_none() {
        assert!(!log.contains("failed with error") && !log.contains("error with 403"), "{log}");
    }

    // The RBAC back: the lists complete, the watches resume (a quiet one is listed again to
    // know), and the agent is ready and follows changes again.
    api.apply(&agent_cluster_role(false)).unwrap();
    let back = Instant::now();
    while readiness(&lab).0 != 200 {
        assert!(back.elapsed() < Duration::from_secs(30), "not ready again: {:?}", readiness(&lab));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_in_sync(&lab, "with the RBAC back", Duration::from_secs(20));
    api.kubectl(&["delete", "authorizationpolicies.security.istio.io", "b-access", "-n", "team"]).unwrap();
    wait_maps(&lab, "b-access deleted", Duration::from_secs(10), |v| policies_of(v, "team/b").is_empty());
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(
        log.contains("watch of services recovered") && log.contains("watch of pods on this node recovered"),
        "{log}"
    );
    eprintln!(
        "out of sync: not ready after {after:?}, {lines} log lines about the pods watch; ready again in {:?}",
        back.elapsed()
    );
}

/// deploy/daemonset.yaml's capabilities are enough (the cluster test above runs with exactly
/// them) and each is needed: without any one of them the agent cannot start enforcing.
#[test]
fn each_daemonset_capability_is_needed() {
    if !require_root("each_daemonset_capability_is_needed") {
        return;
    }
    let daemonset = fs::read_to_string(warden_tests::workspace_root().join("deploy/daemonset.yaml")).unwrap();
    for cap in DAEMONSET_CAPABILITIES {
        assert!(
            daemonset.contains(&format!("                - {}\n", cap.to_uppercase())),
            "{cap} is not in deploy/daemonset.yaml"
        );
    }
    let mut lab = Lab::up("kcaps", &[Spec::new("team", "a", Ipv4Addr::new(10, 69, 0, 2), &[8080])]).expect("lab up");
    let policies = lab.dir.join("policies");
    warden_tests::write_policies(&policies, &[]).unwrap();
    fs::write(lab.workloads_path(), lab.workload_file()).unwrap();
    let args = [
        "--workloads".to_string(),
        lab.workloads_path().display().to_string(),
        "--policies".into(),
        policies.display().to_string(),
    ];
    for missing in DAEMONSET_CAPABILITIES {
        let caps: Vec<&str> = DAEMONSET_CAPABILITIES.into_iter().filter(|c| *c != missing).collect();
        let mut agent = CappedAgent::spawn(&lab, &caps, &args);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = agent.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent runs without {missing}:\n{}",
                fs::read_to_string(lab.agent_log()).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success());
        assert_eq!(lab.generation(), 0, "nothing committed without {missing}");
        eprintln!(
            "without {missing}: {}",
            fs::read_to_string(lab.agent_log()).unwrap().lines().rfind(|l| l.starts_with("warden:")).unwrap_or("?")
        );
    }
    let before = lab.generation();
    let _agent = CappedAgent::spawn(&lab, &DAEMONSET_CAPABILITIES, &args);
    lab.wait_generation_change(before, Duration::from_secs(20)).unwrap();
    assert_eq!(endpoints(&maps(&lab)), ["team/a"]);
}

#[test]
fn the_daemonsets_mesh_gets_its_certificates_from_the_cluster_ca_with_its_capabilities() {
    if !require_root("the_daemonsets_mesh_gets_its_certificates_from_the_cluster_ca_with_its_capabilities") {
        return;
    }
    let node = "node-kmesh";
    let net = 70;
    let (mut lab, api) = cluster_lab("kmesh", 16583, node, net);
    // As a CNI that answers for the pods' gateway by proxy ARP (Calico's 169.254.1.1): the host
    // veths carry no address, only the pods' /32 routes, so the node does not own the capture
    // address; the agent makes it local. (Removing a device's last address flushes its routes.)
    for m in &lab.members {
        let ip = |args: &[&str]| warden_tests::run(&[&["ip", "-n", lab.node.as_str()], args].concat()).unwrap();
        ip(&["addr", "del", &format!("{}/32", warden_tests::GATEWAY), "dev", &m.veth]);
        ip(&["route", "replace", &format!("{}/32", m.spec.ip), "dev", &m.veth]);
    }
    // The agent's pod (its projected token is bound to it) and the CA, as deploy/ installs them.
    api.system_pod("warden-agent-kmesh", "warden-agent", node);
    let ca_port = 15012;
    let _ca = CaProcess::start(&api, &lab.dir.join("ca"), ca_port);
    let root = lab.dir.join("ca-root").join("root-cert.pem");
    fs::create_dir_all(root.parent().unwrap()).unwrap();
    fs::write(&root, api.wait_data("configmap", "warden-ca-root-cert", "root-cert.pem", Duration::from_secs(20)))
        .unwrap();
    let token = lab.dir.join("warden-ca-token");
    fs::write(&token, api.token("warden-agent", "warden-ca", Some("warden-agent-kmesh"))).unwrap();

    // The DaemonSet's mesh arguments, with exactly its capabilities.
    let daemonset = fs::read_to_string(warden_tests::workspace_root().join("deploy/daemonset.yaml")).unwrap();
    assert!(daemonset.contains("            - --mesh\n"), "deploy/daemonset.yaml runs the mesh");
    let mut args = agent_args(&api, node);
    args.extend([
        "--mesh".into(),
        "--ca-addr".into(),
        format!("https://127.0.0.1:{ca_port}"),
        "--ca-root-cert".into(),
        root.display().to_string(),
        "--ca-token-file".into(),
        token.display().to_string(),
    ]);
    let before = lab.generation();
    let mut agent = CappedAgent::spawn(&lab, &DAEMONSET_CAPABILITIES, &args);
    lab.wait_generation_change(before, Duration::from_secs(60)).unwrap();

    // Each local workload's certificate, issued by the cluster CA to this node's agent.
    let want: Vec<String> = ["a", "b", "c"].iter().map(|w| format!("spiffe://cluster.local/ns/team/sa/{w}")).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let valid: Vec<String> = lab
            .certs()
            .map(|v| {
                v["certificates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["state"] == "VALID")
                    .filter_map(|c| c["identity"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if want.iter().all(|w| valid.contains(w)) {
            break;
        }
        assert!(
            agent.0.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "valid certificates {valid:?}, want {want:?}\n{}",
            fs::read_to_string(lab.agent_log()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The capture address is now the node's (on lo), and a meshed connection is captured and
    // delivered by the agent.
    let lo = warden_tests::run(&["ip", "-n", &lab.node, "-4", "addr", "show", "dev", "lo"]).unwrap();
    assert!(lo.contains(&format!("{}/32", warden_tests::GATEWAY)) && lo.contains("lo:warden"), "{lo}");
    let b = lab.member("b").spec.ip;
    let p = lab.echo("c", b, 8080, "through the agent");
    assert_eq!(p.result, "allowed", "c -> b: {p:?}\n{}", fs::read_to_string(lab.agent_log()).unwrap_or_default());
    assert_eq!(p.intact, Some(true));
    let metrics = lab.node_command("curl", &["-sf", "http://127.0.0.1:15020/stats/prometheus"]).output().unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"source\"")
            && l.contains("source_workload=\"c\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "the agent carried c -> b:\n{metrics}"
    );

    // Through a Service: the API server gives it a ClusterIP; the lab has no kube-proxy, so only
    // the mesh's capture can reach b behind it (port 80 -> b's 8080).
    let before = lab.generation();
    api.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: b-svc, namespace: team}\n\
         spec: {selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}\n",
    )
    .unwrap();
    let vip: Ipv4Addr = api
        .kubectl(&["-n", "team", "get", "service", "b-svc", "-o", "jsonpath={.spec.clusterIP}"])
        .unwrap()
        .parse()
        .unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).unwrap();
    let p = lab.echo("c", vip, 80, "through the service");
    assert_eq!(
        p.result,
        "allowed",
        "c -> b-svc ({vip}:80): {p:?}\n{}",
        fs::read_to_string(lab.agent_log()).unwrap_or_default()
    );
    assert_eq!(p.intact, Some(true));
    assert_eq!(p.peer, Some(format!("{vip}:80")), "c's socket names the Service: {p:?}");

    // b stops being ready (its readiness probe fails): the Service has no serving pod in the
    // mesh, so the kernel stops capturing its address and leaves it to the Service proxy, which
    // has no endpoint either (and would reach a ready pod out of the mesh; the lab has no proxy).
    let before = lab.generation();
    let not_ready = r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#;
    api.kubectl(&["patch", "pod", "b", "-n", "team", "--subresource=status", "--type=merge", "-p", not_ready]).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).unwrap();
    let p = lab.echo("c", vip, 80, "to a pod that is not ready");
    assert_ne!(p.result, "allowed", "no serving pod behind b-svc: {p:?}");
    let captured = |lab: &Lab| {
        maps(lab)["ipcache"].as_array().unwrap().iter().any(|e| e["cidr"] == format!("{vip}/32") && e["meshed"] == true)
    };
    assert!(!captured(&lab), "b-svc is not captured while b is not ready: {}", maps(&lab)["ipcache"]);
    // Ready again: served again.
    let before = lab.generation();
    api.kubectl(&[
        "patch",
        "pod",
        "b",
        "-n",
        "team",
        "--subresource=status",
        "--type=merge",
        "-p",
        &not_ready.replace("False", "True"),
    ])
    .unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).unwrap();
    assert!(captured(&lab), "b-svc is captured again: {}", maps(&lab)["ipcache"]);
    assert_eq!(lab.echo("c", vip, 80, "ready again").result, "allowed");

    // a opts out of the mesh and joins b-svc (its labels, as the API server has them): it is no
    // workload any more (the node leaves it alone), but meshed clients' connections to b-svc are
    // now shared with it, straight to its port 8080.
    let before = lab.generation();
    api.kubectl(&["-n", "team", "label", "pod", "a", "app=b", "istio.io/dataplane-mode=none", "--overwrite"]).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).unwrap();
    let a = lab.member("a").spec.ip;
    assert_eq!(
        maps(&lab)["services"],
        serde_json::json!([{"service": format!("{vip}:80"), "meshed": 1, "plain": [format!("{a}:8080")]}]),
        "the split of b-svc"
    );
    let endpoints = maps(&lab)["endpoints"].to_string();
    assert!(!endpoints.contains("team/a"), "a is not enforced: {endpoints}");
    // c's connections reach both: about half through the agent to b, the rest straight to a.
    let carried = |lab: &Lab| -> u64 {
        let out = lab.node_command("curl", &["-sf", "http://127.0.0.1:15020/stats/prometheus"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .filter(|l| l.contains("reporter=\"source\"") && l.contains("destination_workload=\"b\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = carried(&lab);
    for i in 0..30 {
        let p = lab.echo("c", vip, 80, &format!("shared {i}"));
        assert_eq!(p.result, "allowed", "c -> b-svc #{i}: {p:?}");
        assert_eq!(p.peer, Some(format!("{vip}:80")), "{p:?}");
    }
    let through_agent = carried(&lab) - before;
    assert!(0 < through_agent && through_agent < 30, "{through_agent} of 30 through the agent to b; the rest to a");
}

/// An audit's reproducer: the agent restarts while an ALLOW policy is invalid. The new agent has
/// no previous version of it, and its workloads must not become allow-all: a placeholder that
/// matches nothing stands in for it, as Istio skips the rules it cannot translate and still
/// applies the policy, so b denies by default; the status says so.
#[test]
fn an_invalid_allow_policy_fails_closed_across_an_agent_restart() {
    if !require_root("an_invalid_allow_policy_fails_closed_across_an_agent_restart") {
        return;
    }
    let node = "node-kinv";
    let (mut lab, api) = enforcing_b_access("kinv", 16603, node, 72);
    api.apply(B_ACCESS_INVALID).unwrap();
    let condition = || {
        api.kubectl(&[
            "get",
            "authorizationpolicies.security.istio.io",
            "b-access",
            "-n",
            "team",
            "-o",
            "jsonpath={.status.conditions[0].message}",
        ])
        .unwrap()
    };
    let wait_condition = |prefix: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = condition();
            if c.starts_with(prefix) && c.contains("spec.rules[0].from[0].source.ipBlocks[0]") {
                return;
            }
            assert!(Instant::now() < deadline, "b-access's condition: {c:?}, want {prefix:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_condition("ignored, the previous version stays in force: ");
    assert_probe(&lab, "a", "b", 8080, "allowed");

    // Restarted: no previous version. b denies by default, its default entry says why.
    lab.kill_agent(libc::SIGKILL);
    let before = lab.generation();
    lab.start_agent_with(&agent_args(&api, node)).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(60)).unwrap();
    wait_maps(&lab, "b-access's placeholder", Duration::from_secs(5), |v| {
        let b: Vec<_> = v["endpoints"].as_array().unwrap().iter().filter(|e| e["workload"] == "team/b").collect();
        policies_of(v, "team/b").is_empty()
            && serde_json::to_string(&b).unwrap().contains("(default: no ALLOW policy matched)")
    });
    assert_probe(&lab, "a", "b", 8080, "eperm");
    assert_probe(&lab, "c", "b", 8080, "eperm");
    assert_probe(&lab, "a", "c", 8080, "allowed");
    wait_condition("ignored, in force: matches nothing, its workloads deny by default until it is fixed: ");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(log.contains("in_force=\"in force: matches nothing"), "{log}");

    // Fixed: the policy itself again.
    api.apply(ALLOW_A_TO_B_8080).unwrap();
    wait_maps(&lab, "b-access fixed", Duration::from_secs(5), |v| policies_of(v, "team/b") == ["team/b-access"]);
    assert_probe(&lab, "a", "b", 8080, "allowed");
    assert_probe(&lab, "c", "b", 8080, "eperm");
}
