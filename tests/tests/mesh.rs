//! Root integration tests of the mTLS data plane: two nodes (each a network namespace with its own
//! agent and workloads) joined by a veth wire, agents sharing one CA. Unchanged plain clients
//! (`warden-probe`) on both ends. Without root they print a loud SKIPPING line.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use warden_tests::{Lab, Spec, require_root, write_policies};

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

/// `b` refuses `c` by principal and takes mTLS only (STRICT).
const POLICIES: &[(&str, &str)] = &[
    (
        "deny-c.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-deny-c, namespace: team}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/team/sa/c]}}]
",
    ),
    (
        "strict.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: team}
spec:
  mtls: {mode: STRICT}
",
    ),
];

/// Node 1: clients `a` and `c` (meshed) and `p` (out of the mesh, plaintext); node 2: server `b`.
struct Cluster {
    n1: Lab,
    n2: Lab,
}

fn a_ip(net: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, 1, 2)
}
fn b_ip(net: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, 2, 2)
}

fn cluster(tag: &str, net: u8, policies: &[(&str, &str)]) -> Cluster {
    let mut plain = Spec::new("team", "p", Ipv4Addr::new(10, net, 1, 4), &[]);
    plain.labels.push(("istio.io/dataplane-mode".into(), "none".into()));
    let n1 =
        vec![Spec::new("team", "a", a_ip(net), &[]), Spec::new("team", "c", Ipv4Addr::new(10, net, 1, 3), &[]), plain];
    let n2 = vec![Spec::new("team", "b", b_ip(net), &[PORT, OTHER_PORT])];
    let mut n1 = Lab::up(&format!("{tag}1"), &n1).expect("node 1 up");
    let mut n2 = Lab::up(&format!("{tag}2"), &n2).expect("node 2 up");
    Lab::wire(&mut n1, &mut n2).expect("wire");
    // One CA for the cluster: both agents issue from the same directory (node 1 creates it).
    let ca = n1.dir.join("ca");
    let _ = fs::remove_dir_all(&ca);
    fs::create_dir_all(&ca).unwrap();
    for lab in [&mut n1, &mut n2] {
        let dir = lab.dir.join("policies");
        write_policies(&dir, policies).unwrap();
        start_mesh_agent(lab, &dir, &ca);
    }
    Cluster { n1, n2 }
}

fn start_mesh_agent(lab: &mut Lab, policies: &Path, ca: &Path) {
    lab.start_mesh_agent(policies, ca).unwrap_or_else(|e| panic!("{}: agent: {e}\n{}", lab.tag, log(lab)));
}

fn log(lab: &Lab) -> String {
    fs::read_to_string(lab.agent_log()).unwrap_or_default()
}

/// tcpdump on node 1's end of the wire, writing raw packets to a file.
fn capture(lab: &Lab) -> (Child, PathBuf) {
    let file = lab.dir.join("wire.pcap");
    (lab.capture_wire(&file).expect("tcpdump"), file)
}

fn stop(mut c: Child) {
    // SIGINT flushes the capture file.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    let _ = c.wait();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cross_node_traffic_is_mutual_tls_and_authorized_by_principal() {
    if !require_root("cross_node_traffic_is_mutual_tls_and_authorized_by_principal") {
        return;
    }
    let net = 71;
    let c = cluster("mx", net, POLICIES);
    let (tcpdump, pcap) = capture(&c.n1);
    let marker = "WARDEN-PLAINTEXT-MARKER-7f3a";
    let p = c.n1.echo("a", b_ip(net), PORT, marker);
    std::thread::sleep(Duration::from_millis(300));
    stop(tcpdump);
    assert_eq!(p.result, "allowed", "a -> b over the mesh: {p:?}\nnode1:\n{}\nnode2:\n{}", log(&c.n1), log(&c.n2));
    assert_eq!(p.intact, Some(true), "the bytes arrive intact: {p:?}");
    // The receiving application sees the client's own address (the agents preserve it).
    let seen = p.seen_as.clone().unwrap_or_default();
    assert!(seen.starts_with(&format!("{}:", a_ip(net))), "b sees a's address, not a proxy's: {seen}");

    let wire = fs::read(&pcap).expect("capture file");
    assert!(!wire.is_empty(), "tcpdump captured nothing");
    assert!(!contains(&wire, marker.as_bytes()), "the payload crossed the wire in plaintext");
    // TLS records to and from 15008: a handshake record (0x16 0x03 0x01, the ClientHello), then
    // application data records (0x17 0x03 0x03, TLS 1.3's record version).
    assert!(
        contains(&wire, &15008u16.to_be_bytes()),
        "no traffic to port 15008 on the wire ({} bytes captured in {})",
        wire.len(),
        pcap.display()
    );
    assert!(contains(&wire, &[0x16, 0x03, 0x01]), "no TLS ClientHello on the wire");
    assert!(contains(&wire, &[0x17, 0x03, 0x03]), "no TLS application data on the wire");

    // More connections share the pooled HBONE connection, one stream each.
    for i in 0..5 {
        let p = c.n1.echo("a", b_ip(net), PORT, &format!("again {i}"));
        assert_eq!(p.result, "allowed", "connection {i} over the pooled tunnel: {p:?}\n{}", log(&c.n1));
    }

    // DENY by principal, decided by node 2's agent with the identity c's certificate proves.
    let p = c.n1.echo("c", b_ip(net), PORT, "from c");
    assert_ne!(p.result, "allowed", "c is denied by principal: {p:?}");
    assert!(log(&c.n2).contains("b-deny-c"), "node 2 logs the deciding policy:\n{}", log(&c.n2));

    // Istio's metrics, with mutual TLS, on both sides.
    let m1 = metrics(&c.n1);
    let m2 = metrics(&c.n2);
    let series = |text: &str, name: &str, needles: &[&str]| {
        text.lines().any(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)) && !l.ends_with(" 0"))
    };
    let mtls = "connection_security_policy=\"mutual_tls\"";
    assert!(
        series(
            &m1,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "source_workload=\"a\"",
                "destination_workload=\"b\"",
                mtls,
                "response_flags=\"-\""
            ]
        ),
        "node 1 reports a -> b as source over mTLS:\n{m1}"
    );
    assert!(
        // (The kernel's series name a remote peer by principal; its workload name is known only
        // for workloads of this node.)
        series(
            &m2,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/team/sa/a\"",
                "destination_workload=\"b\"",
                mtls
            ]
        ),
        "node 2 reports a -> b as destination over mTLS:\n{m2}"
    );
    assert!(
        series(
            &m2,
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\"", "source_workload=\"c\"", "response_flags=\"DENY\""]
        ),
        "node 2 reports c's refused connection:\n{m2}"
    );
    assert!(
        series(&m2, "warden_policy_denials_total", &["policy=\"team/b-deny-c\""]),
        "the denial is attributed to its policy:\n{m2}"
    );
}

fn metrics(lab: &Lab) -> String {
    let out = lab.node_command("curl", &["-sf", "http://127.0.0.1:15020/stats/prometheus"]).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_dead_destination_agent_fails_closed_and_a_restart_serves_again() {
    if !require_root("a_dead_destination_agent_fails_closed_and_a_restart_serves_again") {
        return;
    }
    let net = 72;
    let mut c = cluster("mk", net, POLICIES);
    assert_eq!(c.n1.echo("a", b_ip(net), PORT, "before").result, "allowed", "{}", log(&c.n2));

    c.n2.kill_agent(libc::SIGKILL);
    // Nothing reaches b: not over the mesh (no agent to accept the tunnel), not in plaintext
    // (STRICT, enforced by the pinned programs that outlive the agent).
    let p = c.n1.echo("a", b_ip(net), PORT, "while dead");
    assert_ne!(p.result, "allowed", "no agent, no tunnel: {p:?}");
    let p = c.n1.echo("p", b_ip(net), PORT, "plaintext while dead");
    assert_ne!(p.result, "allowed", "plaintext to a STRICT workload stays refused: {p:?}");

    // Restart: new connections flow again, the workloads untouched.
    let dir = c.n2.dir.join("policies");
    let ca = c.n1.dir.join("ca");
    start_mesh_agent(&mut c.n2, &dir, &ca);
    let p = c.n1.echo("a", b_ip(net), PORT, "after restart");
    assert_eq!(p.result, "allowed", "after the restart: {p:?}\n{}", log(&c.n2));
    assert_eq!(p.intact, Some(true));
}

/// Replace node 2's policies and wait until its agent commits them.
fn set_policies(lab: &mut Lab, files: &[(&str, &str)]) {
    let dir = lab.dir.join("policies");
    let before = lab.generation();
    for e in fs::read_dir(&dir).unwrap().flatten() {
        fs::remove_file(e.path()).unwrap();
    }
    write_policies(&dir, files).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).expect("the agent commits the change");
}

const PA: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: team}
spec:
  mtls: {mode: MODE}
";

const PA_PORT_LEVEL: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b-ports, namespace: team}
spec:
  selector: {matchLabels: {app: b}}
  mtls: {mode: STRICT}
  portLevelMtls:
    \"8080\": {mode: PERMISSIVE}
";

#[test]
fn peer_authentication_strict_permissive_disable_and_port_level() {
    if !require_root("peer_authentication_strict_permissive_disable_and_port_level") {
        return;
    }
    let net = 73;
    let mut c = cluster("mp", net, &[("pa.yaml", &PA.replace("MODE", "STRICT"))]);
    let plain = |c: &Cluster, port| c.n1.echo("p", b_ip(net), port, "plaintext");
    let mtls = |c: &Cluster, port| c.n1.echo("a", b_ip(net), port, "over the mesh");

    // STRICT: plaintext is dropped by b's TC program, and the drop reason is counted; mTLS flows.
    assert_ne!(plain(&c, PORT).result, "allowed", "STRICT refuses plaintext");
    assert_eq!(mtls(&c, PORT).result, "allowed", "STRICT accepts mTLS:\n{}", log(&c.n2));
    let m2 = metrics(&c.n2);
    assert!(
        m2.lines().any(|l| l.starts_with("warden_drops_total")
            && l.contains("reason=\"plaintext_strict\"")
            && !l.ends_with(" 0")),
        "the kernel counts the plaintext_strict drop:\n{m2}"
    );

    // PERMISSIVE: both, and the plaintext peer is the workload's address without identity.
    set_policies(&mut c.n2, &[("pa.yaml", &PA.replace("MODE", "PERMISSIVE"))]);
    let p = plain(&c, PORT);
    assert_eq!(p.result, "allowed", "PERMISSIVE accepts plaintext: {p:?}");
    assert_eq!(mtls(&c, PORT).result, "allowed", "PERMISSIVE accepts mTLS");

    // DISABLE behaves as PERMISSIVE (Istio ambient ignores it: HBONE is always mTLS).
    set_policies(&mut c.n2, &[("pa.yaml", &PA.replace("MODE", "DISABLE"))]);
    assert_eq!(plain(&c, PORT).result, "allowed", "DISABLE accepts plaintext");
    assert_eq!(mtls(&c, PORT).result, "allowed", "DISABLE still accepts mTLS");

    // portLevelMtls: b is STRICT except on 8080.
    set_policies(&mut c.n2, &[("pa.yaml", &PA.replace("MODE", "STRICT")), ("b.yaml", PA_PORT_LEVEL)]);
    assert_eq!(plain(&c, PORT).result, "allowed", "8080 is PERMISSIVE by portLevelMtls");
    assert_ne!(plain(&c, OTHER_PORT).result, "allowed", "9090 stays STRICT");
    assert_eq!(mtls(&c, OTHER_PORT).result, "allowed", "mTLS on 9090:\n{}", log(&c.n2));
}

/// Run `f` on a thread inside network namespace `netns`.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd as _;
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = fs::File::open(&path).expect("netns");
            // SAFETY: setns(2) moves only this thread, which does nothing else afterwards.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

#[test]
fn a_tunnel_claiming_another_workloads_address_is_refused() {
    if !require_root("a_tunnel_claiming_another_workloads_address_is_refused") {
        return;
    }
    use warden_agent::certs::{CaSource, WorkloadCerts};
    use warden_hbone::{ConnectRequest, Key, Pool, PoolOptions, SecretManagerTls};
    use warden_identity::{Identity, tls::CompliancePolicy};

    let net = 74;
    let c = cluster("mf", net, &[]);
    let ca = c.n1.dir.join("ca");
    let c_ip = Ipv4Addr::new(10, net, 1, 3);
    // An HBONE client on node 1 holding c's genuine certificate (from the cluster's CA), dialling
    // b directly, as a compromised node or pod could.
    let (forged, honest) = in_netns(&c.n1.node, || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let certs = WorkloadCerts::start(&CaSource::Local { dir: ca }, "cluster.local", None).unwrap();
            let tls = SecretManagerTls::new(certs.secrets().clone(), CompliancePolicy::from_env().unwrap());
            let pool = Pool::new(tls, PoolOptions::default());
            let c_id = Identity::spiffe("cluster.local", "team", "c").unwrap();
            let b_id = Identity::spiffe("cluster.local", "team", "b").unwrap();
            let key = Key::new(c_id, (b_ip(net), 15008).into(), vec![b_id]);
            let dst = (b_ip(net), PORT).into();
            // c's certificate, a's address.
            let forged = pool.connect(&key, ConnectRequest::new(dst).forwarded_for((a_ip(net), 40000).into())).await;
            let honest = pool.connect(&key, ConnectRequest::new(dst).forwarded_for((c_ip, 40001).into())).await;
            (forged.map(|_| ()), honest.map(|_| ()))
        })
    });
    let err = forged.expect_err("a tunnel from c claiming a's address must be refused");
    assert!(err.is_denied(), "refused as unauthorized: {err}");
    assert!(honest.is_ok(), "c under its own address is served: {honest:?}\n{}", log(&c.n2));
    assert!(log(&c.n2).contains("not a workload of the peer"), "node 2 says why:\n{}", log(&c.n2));
}
