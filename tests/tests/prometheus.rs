//! Root integration test of the agent's observability against a real Prometheus (the Debian
//! package): a lab agent serves `:15020/stats/prometheus` and `:15021/healthz/ready` inside the
//! lab's node namespace; our own Prometheus instance runs in that namespace too (loopback only),
//! scrapes the agent, and loads the alerts of `deploy/grafana/warden-alerts.yaml`. Every panel
//! expression of `deploy/grafana/warden-dashboard.json` and every alert expression, parsed out
//! of those files, must return data, and every alert must become active.
//!
//! The agent does not run an identity manager yet, so the certificate panel and alert are
//! evaluated against identity metrics from a real `SecretManager` that issues a real
//! certificate in this process, served to the same Prometheus as a second scrape target.
//!
//! Finally the agent is killed and restarted: no series may reset.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;
use warden_tests::{
    Lab,
    fixtures::{ALLOW_A_TO_B_8080, DENY_C_TO_A, team},
    probe_bin, require_root, workspace_root, write_policies,
};

/// Ports inside the lab's node namespace, where nothing else listens.
const PROMETHEUS: &str = "127.0.0.1:19090";
const IDENTITY_METRICS: &str = "127.0.0.1:19091";
const AGENT_METRICS: &str = "127.0.0.1:15020";
const AGENT_READY: &str = "127.0.0.1:15021";
/// Grafana's rate window variable, resolved as Grafana would for a 1 s scrape interval.
const RATE_INTERVAL: (&str, &str) = ("$__rate_interval", "1m");

/// Run `f` on a thread that has entered network namespace `netns` (only that thread moves).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&path);
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn enter_netns(path: &str) {
    let ns = fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a valid namespace fd; it changes only the calling thread's namespace.
    assert_eq!(
        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns {path}: {}",
        std::io::Error::last_os_error()
    );
}

/// A plain HTTP/1.0 GET: (status, body).
fn http_get(addr: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query against our Prometheus: the result vector, or why there is none.
fn query(node: &str, expr: &str) -> Result<Vec<Value>, String> {
    let (status, body) = in_netns(node, || http_get(PROMETHEUS, &format!("/api/v1/query?query={}", urlencode(expr))))
        .map_err(|e| format!("querying Prometheus: {e}"))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("Prometheus answered {status} {body:?}: {e}"))?;
    // A query Prometheus rejects is a broken expression: fail at once.
    assert_eq!(v["status"], "success", "query {expr}: {v}");
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Poll `expr` until `accept` holds for its result.
fn eventually(node: &str, expr: &str, what: &str, timeout: Duration, accept: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = query(node, expr);
        if let Ok(r) = &r
            && accept(r)
        {
            return r.clone();
        }
        if Instant::now() > deadline {
            panic!("{what}: `{expr}` returned {r:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

fn sum(r: &[Value]) -> f64 {
    r.iter().map(value).sum()
}

/// Every `expr` of the dashboard's panels (rows included).
fn dashboard_exprs(path: &Path) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("?").to_string(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let d: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).expect("dashboard is JSON");
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// The PrometheusRule's `spec` (a Prometheus rule file) and its (alert, expr) pairs.
fn alert_rules(path: &Path) -> (serde_yaml::Value, Vec<(String, String)>) {
    let doc: serde_yaml::Value = serde_yaml::from_str(&fs::read_to_string(path).unwrap()).expect("rules are YAML");
    assert_eq!(doc["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(doc["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    let spec = doc["spec"].clone();
    let mut out = Vec::new();
    for g in spec["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            if let (Some(a), Some(e)) = (r["alert"].as_str(), r["expr"].as_str()) {
                out.push((a.to_string(), e.trim().to_string()));
            }
        }
    }
    (spec, out)
}

/// Our Prometheus, killed on drop.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(lab: &Lab, rules: &serde_yaml::Value) -> Prometheus {
    let dir = lab.dir.join("prometheus");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("data")).unwrap();
    fs::write(dir.join("rules.yml"), serde_yaml::to_string(rules).unwrap()).unwrap();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{rules}]
scrape_configs:
  - job_name: warden-agent
    metrics_path: /stats/prometheus
    static_configs: [{{targets: ['{AGENT_METRICS}']}}]
  - job_name: warden-identity
    static_configs: [{{targets: ['{IDENTITY_METRICS}']}}]
",
        rules = dir.join("rules.yml").display()
    );
    fs::write(dir.join("prometheus.yml"), config).unwrap();
    let log = fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node))
        .args(["--", "prometheus"])
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prometheus (install it with `cargo xtask setup`)");
    let mut p = Prometheus(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(in_netns(&lab.node, || http_get(PROMETHEUS, "/-/ready")), Ok((200, _))) {
        if Instant::now() > deadline || p.0.try_wait().ok().flatten().is_some() {
            panic!("Prometheus did not start:\n{}", fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    p
}

/// Identity metrics of a real certificate: a CA in `dir` issues one for team/b through a
/// `SecretManager`; its registry is served on [`IDENTITY_METRICS`] in `node`.
fn serve_identity_metrics(node: &str, dir: &Path) {
    use warden_identity::{
        Identity, SystemClock,
        ca::{CaConfig, CertificateAuthority},
        metrics::Metrics,
        tls::TrustBundle,
        workload::{LocalCaClient, SecretManager, SecretManagerConfig},
    };
    let clock: Arc<dyn warden_identity::Clock> = Arc::new(SystemClock);
    let ca = CertificateAuthority::load_or_init(dir, CaConfig::default(), clock.clone()).expect("CA");
    let trust = Arc::new(TrustBundle::new(ca.roots().to_vec(), vec!["cluster.local".into()]).unwrap());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let mgr = SecretManager::new(
        Arc::new(LocalCaClient(Arc::new(ca))),
        trust,
        clock,
        SecretManagerConfig::default(),
        Some(metrics),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(mgr.fetch(&Identity::spiffe("cluster.local", "team", "b").unwrap())).expect("certificate issued");
    let registry = Arc::new(registry);
    let path = format!("/run/netns/{node}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter_netns(&path);
        let l = TcpListener::bind(IDENTITY_METRICS).expect("bind identity metrics");
        tx.send(()).unwrap();
        let _keep = mgr;
        for mut conn in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let mut body = String::new();
            prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(body.as_bytes()));
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("identity metrics listening");
}

/// `n` connection attempts from `from` to `to`:`port`, on `threads` threads; the results.
fn probes(lab: &Lab, from: &str, to: &str, port: u16, n: usize, threads: usize) -> Vec<String> {
    let ip = lab.member(to).spec.ip;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|_| {
                            let out = lab
                                .command_in(
                                    from,
                                    &probe_bin(),
                                    &["connect".into(), format!("{ip}:{port}"), "--timeout-ms".into(), "700".into()],
                                )
                                .stderr(Stdio::null())
                                .output()
                                .expect("warden-probe");
                            let v: Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
                            v["result"].as_str().unwrap_or("?").to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    })
}

/// Counter totals from `warden maps` for `workload`'s allowed TC flows with `remote` in
/// `direction`: (bytes_in, bytes_out, opened).
fn kernel_counts(lab: &Lab, workload: &str, remote: &str, direction: &str) -> (u64, u64, u64) {
    let v: Value = serde_json::from_str(&lab.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
    let e = v["endpoints"].as_array().unwrap().iter().find(|e| e["workload"] == workload).expect("endpoint");
    let mut t = (0, 0, 0);
    for c in e["counters"].as_array().unwrap() {
        if c["hook"] == "tc" && c["verdict"] == "ALLOW" && c["remote"] == remote && c["direction"] == direction {
            t.0 += c["bytes_in"].as_u64().unwrap();
            t.1 += c["bytes_out"].as_u64().unwrap();
            t.2 += c["opened"].as_u64().unwrap();
        }
    }
    t
}

#[test]
fn prometheus_sees_istio_metrics_and_every_dashboard_and_alert_expression_returns_data() {
    if !require_root("prometheus_sees_istio_metrics_and_every_dashboard_and_alert_expression_returns_data") {
        return;
    }
    let grafana: PathBuf = workspace_root().join("deploy/grafana");
    let panels = dashboard_exprs(&grafana.join("warden-dashboard.json"));
    let (rule_file, alerts) = alert_rules(&grafana.join("warden-alerts.yaml"));
    assert!(panels.len() >= 8 && alerts.len() >= 3, "{panels:?} {alerts:?}");

    let mut lab = Lab::up("prom", &team(67, &[8080])).expect("lab up");
    let dir = lab.dir.join("policies");
    write_policies(&dir, &[("b.yaml", ALLOW_A_TO_B_8080), ("a.yaml", DENY_C_TO_A)]).unwrap();
    lab.start_agent(&dir).unwrap();
    let node = lab.node.clone();

    // Readiness: the agent has committed.
    let (status, body) = in_netns(&node, || http_get(AGENT_READY, "/healthz/ready")).unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    serve_identity_metrics(&node, &lab.dir.join("ca"));
    let _prometheus = start_prometheus(&lab, &rule_file);
    let up = "up{job=~\"warden-agent|warden-identity\"} == 1";
    eventually(&node, up, "Prometheus scrapes the agent and the identity metrics", Duration::from_secs(30), |r| {
        r.len() == 2
    });

    // Phase 1: every kind of flow once, so each series exists before the rates are measured.
    assert_eq!(probes(&lab, "a", "b", 8080, 2, 1), ["allowed"; 2], "a -> b is allowed by team/b-access");
    assert_eq!(probes(&lab, "c", "b", 8080, 1, 1), ["eperm"], "c -> b: default deny (b-access selects b)");
    assert_eq!(probes(&lab, "c", "a", 8080, 1, 1), ["eperm"], "c -> a: denied by team/a-deny-c");
    eventually(&node, "warden_policy_denials_total", "denials scraped", Duration::from_secs(20), |r| r.len() == 2);

    // Phase 2: more allowed flows and a burst of denials by team/a-deny-c (the spike).
    assert_eq!(probes(&lab, "a", "b", 8080, 3, 1), ["allowed"; 3]);
    let denied = probes(&lab, "c", "a", 8080, 400, 4);
    assert!(denied.iter().all(|r| r == "eperm"), "{denied:?}");

    // The metrics carry Istio's names and labels, and sent/received match the kernel's counters.
    let base = "reporter=\"destination\",source_workload=\"a\",source_workload_namespace=\"team\",source_principal=\"spiffe://cluster.local/ns/team/sa/a\",\
                destination_workload=\"b\",destination_workload_namespace=\"team\",destination_principal=\"spiffe://cluster.local/ns/team/sa/b\",\
                connection_security_policy=\"none\",response_flags=\"-\"";
    let (b_in, b_out, b_opened) = kernel_counts(&lab, "team/b", "team/a", "ingress");
    assert_eq!(b_opened, 5, "five connections a -> b");
    let opened = eventually(
        &node,
        &format!("istio_tcp_connections_opened_total{{{base}}}"),
        "opened, server side",
        Duration::from_secs(20),
        |r| sum(r) == 5.0,
    );
    assert_eq!(opened.len(), 1, "one series for one label set: {opened:?}");
    eventually(
        &node,
        &format!("istio_tcp_connections_closed_total{{{base}}}"),
        "closed, server side",
        Duration::from_secs(10),
        |r| sum(r) == 5.0,
    );
    // The destination received the request (bytes into b) and sent the response (bytes out of b).
    eventually(
        &node,
        &format!("istio_tcp_received_bytes_total{{{base}}}"),
        "received = request",
        Duration::from_secs(10),
        |r| sum(r) == b_in as f64,
    );
    eventually(
        &node,
        &format!("istio_tcp_sent_bytes_total{{{base}}}"),
        "sent = response",
        Duration::from_secs(10),
        |r| sum(r) == b_out as f64,
    );
    // The client reports as source: its own outbound bytes are the request (received).
    let (a_in, a_out, _) = kernel_counts(&lab, "team/a", "team/b", "egress");
    assert!(a_in > 0 && a_out > 0 && a_out != a_in);
    let src = "reporter=\"source\",source_workload=\"a\",destination_workload=\"b\",response_flags=\"-\"";
    eventually(
        &node,
        &format!("istio_tcp_received_bytes_total{{{src}}}"),
        "source received = request",
        Duration::from_secs(10),
        |r| sum(r) == a_out as f64,
    );
    eventually(
        &node,
        &format!("istio_tcp_sent_bytes_total{{{src}}}"),
        "source sent = response",
        Duration::from_secs(10),
        |r| sum(r) == a_in as f64,
    );
    // Denials: refused connections carry DENY, and are attributed to the policy by name.
    eventually(
        &node,
        "istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"c\",destination_workload=\"a\",response_flags=\"DENY\"}",
        "refused connections c -> a",
        Duration::from_secs(10),
        |r| sum(r) == 401.0,
    );
    eventually(
        &node,
        "warden_policy_denials_total{policy=\"team/a-deny-c\",workload=\"a\",namespace=\"team\",direction=\"ingress\",reason=\"policy_deny\"}",
        "denials by team/a-deny-c",
        Duration::from_secs(10),
        |r| sum(r) == 401.0,
    );
    eventually(
        &node,
        "warden_policy_denials_total{policy=\"default-deny\",workload=\"b\",reason=\"policy_default_deny\"}",
        "default deny on b",
        Duration::from_secs(10),
        |r| sum(r) == 1.0,
    );

    // Every dashboard panel returns data.
    for (title, expr) in &panels {
        let expr = expr.replace(RATE_INTERVAL.0, RATE_INTERVAL.1);
        assert!(!expr.contains('$'), "panel {title}: unresolved variable in {expr}");
        eventually(&node, &expr, &format!("panel {title:?} returns data"), Duration::from_secs(20), |r| {
            !r.is_empty() && r.iter().all(|s| value(s).is_finite())
        });
    }
    // Every alert expression returns data, and every alert is active in Prometheus' rule engine.
    for (alert, expr) in &alerts {
        let r =
            eventually(&node, expr, &format!("alert {alert} expression"), Duration::from_secs(20), |r| !r.is_empty());
        if alert.contains("Denial") {
            assert!(
                r.iter().any(|s| s["metric"]["policy"] == "team/a-deny-c" && s["metric"]["workload"] == "a"),
                "{alert}: {r:?}"
            );
        }
        eventually(
            &node,
            &format!("ALERTS{{alertname=\"{alert}\",alertstate=~\"pending|firing\"}}"),
            &format!("alert {alert} active"),
            Duration::from_secs(20),
            |r| !r.is_empty(),
        );
    }

    // Access log lines: the allowed open and close, and the denial, with names and principals.
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    let line = |needles: &[&str]| log.lines().find(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string);
    // Both ends log the flow: the client as reporter=source, the server as reporter=destination.
    assert!(
        line(&["event=open", "reporter=source", "direction=egress", "src_workload=a", "dst_workload=b"]).is_some(),
        "no client-side open line:\n{log}"
    );
    let open = line(&["event=open", "reporter=destination", "src_workload=a", "dst_workload=b", "dst=10.67.0.3:8080"])
        .unwrap_or_else(|| panic!("no open line:\n{log}"));
    for f in [
        "verdict=ALLOW",
        "policy=team/b-access",
        "proto=tcp",
        "hook=tc",
        "direction=ingress",
        "src_principal=spiffe://cluster.local/ns/team/sa/a",
        "dst_principal=spiffe://cluster.local/ns/team/sa/b",
        "src=10.67.0.2:",
    ] {
        assert!(open.contains(f), "{f} missing in {open}");
    }
    assert!(
        line(&["event=close", "src=10.67.0.2:", "dst=10.67.0.3:8080", "src_workload=a", "dst_workload=b"]).is_some(),
        "no close line:\n{log}"
    );
    let deny =
        line(&["event=deny", "src_workload=c", "dst_workload=a"]).unwrap_or_else(|| panic!("no deny line:\n{log}"));
    for f in [
        "verdict=DENY",
        "reason=policy_deny",
        "policy=team/a-deny-c",
        "hook=connect",
        "src_principal=spiffe://cluster.local/ns/team/sa/c",
        "dst=10.67.0.2:8080",
    ] {
        assert!(deny.contains(f), "{f} missing in {deny}");
    }
    assert!(
        line(&["event=deny", "src_workload=c", "dst_workload=b", "policy=default-deny", "reason=policy_default_deny"])
            .is_some(),
        "no default-deny line:\n{log}"
    );

    // A restart (as a crash) keeps every series monotonic: the counters live in the kernel.
    // The new agent writes JSON access logs (WARDEN_ACCESS_LOG, the flag's environment form).
    lab.kill_agent(libc::SIGKILL);
    // SAFETY: this test binary has one test; no other thread reads or writes the environment.
    unsafe { std::env::set_var("WARDEN_ACCESS_LOG", "json") };
    lab.start_agent(&dir).unwrap();
    assert_eq!(probes(&lab, "a", "b", 8080, 1, 1), ["allowed"]);
    eventually(
        &node,
        &format!("istio_tcp_connections_opened_total{{{base}}}"),
        "the restarted agent is scraped",
        Duration::from_secs(20),
        |r| sum(r) == 6.0,
    );
    for m in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
        "warden_policy_denials_total",
        "warden_drops_total",
    ] {
        let r = query(&node, &format!("resets({m}[5m]) > 0")).unwrap();
        assert!(r.is_empty(), "{m} was reset by the restart: {r:?}");
    }
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    let json: Vec<Value> =
        log.lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect();
    let open = json
        .iter()
        .find(|e| {
            e["event"] == "open"
                && e["reporter"] == "destination"
                && e["src_workload"] == "a"
                && e["dst_workload"] == "b"
        })
        .unwrap_or_else(|| panic!("no JSON open line:\n{log}"));
    assert_eq!(open["policy"], "team/b-access");
    assert_eq!(open["dst"], "10.67.0.3:8080");
    assert_eq!(open["src_principal"], "spiffe://cluster.local/ns/team/sa/a");
    assert!(json.iter().any(|e| e["event"] == "close" && e["src_workload"] == "a"), "no JSON close line:\n{log}");
}
