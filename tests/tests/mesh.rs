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
    cluster_with(tag, net, policies, &[], &[], &[])
}

/// A workload out of the mesh (ambient's opt-out label): it talks plaintext.
fn plain(name: &str, ip: Ipv4Addr, ports: &[u16]) -> Spec {
    let mut s = Spec::new("team", name, ip, ports);
    s.labels.push(("istio.io/dataplane-mode".into(), "none".into()));
    s
}

/// [`cluster`], with `more1` workloads on node 1 and `more2` on node 2, and more agent arguments.
fn cluster_with(
    tag: &str,
    net: u8,
    policies: &[(&str, &str)],
    more1: &[Spec],
    more2: &[Spec],
    agent_args: &[&str],
) -> Cluster {
    let mut n1 = vec![
        Spec::new("team", "a", a_ip(net), &[]),
        Spec::new("team", "c", Ipv4Addr::new(10, net, 1, 3), &[]),
        plain("p", Ipv4Addr::new(10, net, 1, 4), &[]),
    ];
    n1.extend_from_slice(more1);
    let mut n2 = vec![Spec::new("team", "b", b_ip(net), &[PORT, OTHER_PORT])];
    n2.extend_from_slice(more2);
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
        lab.start_mesh_agent_with(&dir, &ca, agent_args)
            .unwrap_or_else(|e| panic!("{}: agent: {e}\n{}", lab.tag, log(lab)));
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
    // And a's socket names b as its peer, not the agent's capture listener (getpeername4).
    let to_b = format!("{}:{PORT}", b_ip(net));
    assert_eq!(p.peer.as_deref(), Some(to_b.as_str()), "a's socket names b as its peer: {p:?}");

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
        series(
            &m1,
            "istio_tcp_connections_opened_total",
            &["source_workload=\"a\"", "destination_service=\"unknown\""]
        ),
        "b is behind no Service here:\n{m1}"
    );
    assert!(
        series(
            &m2,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "source_workload=\"a\"",
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

/// Whether `text` (a scrape) has a non-zero series of metric `name` whose line holds every needle.
fn series(text: &str, name: &str, needles: &[&str]) -> bool {
    text.lines().any(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)) && !l.ends_with(" 0"))
}

fn metrics(lab: &Lab) -> String {
    lab.metrics()
}

#[test]
fn a_dead_destination_agent_fails_closed_and_a_restart_serves_again() {
    if !require_root("a_dead_destination_agent_fails_closed_and_a_restart_serves_again") {
        return;
    }
    let net = 72;
    let mut c = cluster("mk", net, POLICIES);
    assert_eq!(c.n1.echo("a", b_ip(net), PORT, "before").result, "allowed", "{}", log(&c.n2));

    // Under traffic: a's connection exchanges a line with b every 50 ms when node 2's agent dies.
    let (tcpdump, pcap) = capture(&c.n1);
    let hold = hold_from(&c.n1, "a", b_ip(net), PORT, 8);
    std::thread::sleep(Duration::from_millis(1500));
    c.n2.kill_agent(libc::SIGKILL);
    let held: warden_tests::Probe = serde_json::from_slice(&hold.wait_with_output().unwrap().stdout).unwrap();
    stop(tcpdump);
    // The connection ends with the agent that carried it (a sees it fail, well before its 8 s),
    // and not one of its lines crossed the wire in plaintext, before the kill or after it.
    assert_ne!(held.result, "allowed", "the held connection cannot outlive its tunnel: {held:?}");
    assert!(held.round_trips.unwrap_or(0) >= 10, "lines went through before the kill: {held:?}");
    assert!(held.ms < 6_000, "it failed when the agent died, not when it gave up: {held:?}");
    let wire = fs::read(&pcap).expect("capture file");
    assert!(!wire.is_empty(), "tcpdump captured nothing");
    assert!(!contains(&wire, b"ping "), "a held line crossed the wire in plaintext");

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
    let before = lab.generation();
    replace_policies(lab, files);
    lab.wait_generation_change(before, Duration::from_secs(10)).expect("the agent commits the change");
}

/// Replace node 2's policies with ones the kernel enforces alike: the agent builds them and
/// commits nothing (the generation, and every flow the kernel has cached, stays).
fn set_policies_alike(lab: &mut Lab, files: &[(&str, &str)]) {
    let before = lab.generation();
    replace_policies(lab, files);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(lab.generation(), before, "nothing the node enforces changed: no commit\n{}", log(lab));
}

fn replace_policies(lab: &Lab, files: &[(&str, &str)]) {
    let dir = lab.dir.join("policies");
    for e in fs::read_dir(&dir).unwrap().flatten() {
        fs::remove_file(e.path()).unwrap();
    }
    write_policies(&dir, files).unwrap();
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

    // DISABLE behaves as PERMISSIVE (Istio ambient ignores it: HBONE is always mTLS): the same
    // state, so nothing is committed.
    set_policies_alike(&mut c.n2, &[("pa.yaml", &PA.replace("MODE", "DISABLE"))]);
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

/// A node whose HBONE stack is not warden's, as a ztunnel node would be: the interop peer
/// (`hbone/tests/hbone/peer.py`: OpenSSL and hyper-h2) on node 1, holding c's certificate from
/// the cluster's CA, tunnels to b through node 2's agent. b sees c's address; once b denies c by
/// principal, the same tunnel is refused with 401.
#[test]
fn an_independent_hbone_peer_is_served_and_authorized_by_its_certificate() {
    if !require_root("an_independent_hbone_peer_is_served_and_authorized_by_its_certificate") {
        return;
    }
    use std::sync::Arc;
    use warden_identity::{
        Identity, SystemClock,
        ca::{CaConfig, CertificateAuthority},
        workload::generate_key_and_csr,
    };

    let net = 78;
    let mut c = cluster("mio", net, &[]);
    let c_ip = Ipv4Addr::new(10, net, 1, 3);
    let files = c.n1.dir.join("peer");
    fs::create_dir_all(&files).unwrap();
    let ca = CertificateAuthority::load_or_init(&c.n1.dir.join("ca"), CaConfig::default(), Arc::new(SystemClock))
        .expect("the cluster's CA");
    let (key, csr) = generate_key_and_csr(&Identity::spiffe("cluster.local", "team", "c").unwrap()).unwrap();
    let cert = ca.sign_csr(&csr, None).expect("c's certificate");
    fs::write(files.join("c.crt"), cert.chain_pem.concat()).unwrap();
    fs::write(files.join("c.key"), key.serialize_pem()).unwrap();
    let roots = c.n1.dir.join("ca").join(warden_identity::ca::ROOT_CERT_FILE);

    let python = warden_tests::interop_python();
    let tunnel = |c: &Cluster| -> serde_json::Value {
        let args: Vec<String> = vec![
            warden_tests::interop_peer().display().to_string(),
            "client".into(),
            "--connect".into(),
            format!("{}:15008", b_ip(net)),
            "--authority".into(),
            format!("{}:{PORT}", b_ip(net)),
            "--forwarded".into(),
            format!("for=\"{c_ip}:40000\""),
            "--send".into(),
            "ping from an independent peer\n".into(),
            "--cert".into(),
            files.join("c.crt").display().to_string(),
            "--key".into(),
            files.join("c.key").display().to_string(),
            "--ca".into(),
            roots.display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = c.n1.node_command(&python.display().to_string(), &args).output().expect("run the peer");
        assert!(out.status.success(), "peer: {}\nnode 2:\n{}", String::from_utf8_lossy(&out.stderr), log(&c.n2));
        serde_json::from_slice(&out.stdout).expect("the peer's JSON")
    };

    let v = tunnel(&c);
    assert_eq!(v["status"], "200", "{v}\nnode 2:\n{}", log(&c.n2));
    assert_eq!(v["tls"], "TLSv1.3", "{v}");
    assert_eq!(
        v["peer"],
        serde_json::json!(["spiffe://cluster.local/ns/team/sa/b"]),
        "node 2 presents b's identity: {v}"
    );
    let received = v["received"].as_str().unwrap_or_default();
    // The source IP is kept (the port is the agent's own, as with ztunnel).
    let (greeting, echo) = received.split_once('\n').unwrap_or_default();
    assert!(greeting.starts_with(&format!("hello {PORT} from {c_ip}:")), "b sees c's own address: {v}");
    assert_eq!(echo, "ping from an independent peer\n", "{v}");

    set_policies(&mut c.n2, POLICIES);
    let v = tunnel(&c);
    assert_eq!(v["status"], "401", "b denies c by principal: {v}\nnode 2:\n{}", log(&c.n2));
    assert_eq!(v["echoed"], 0, "{v}");
    assert!(log(&c.n2).contains("b-deny-c"), "node 2 names the deciding policy:\n{}", log(&c.n2));
}

/// `q` (node 2, namespace `shop`, out of the mesh) takes connections from `a` only.
const Q_ALLOW_A: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: q-allow-a, namespace: shop}
spec:
  selector: {matchLabels: {app: q}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/team/sa/a]}}]
";

/// A policy that selects no workload: committing it re-decides every cached flow, changes nothing.
/// A change of b's policy that the node's probes do not meet (a's port 1), so a commit without
/// consequence for them. (A policy selecting no workload of the node would commit nothing.)
const UNRELATED: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: unrelated, namespace: team}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/team/sa/a]}}]
    to: [{operation: {ports: [\"1\"]}}]
";

/// What the agent's last hop does (`agent/src/mesh/deliver.rs`), by hand in `lab`'s node
/// namespace: a transparent socket bound to `client`, marked `MARK_TUNNEL`, connecting to
/// `server`. The server's greeting, or why there was none.
fn marked_connect(lab: &Lab, client: Ipv4Addr, server: std::net::SocketAddrV4) -> std::io::Result<String> {
    use std::{
        io::{BufRead as _, BufReader},
        os::fd::FromRawFd as _,
    };
    fn check(rc: libc::c_int) -> std::io::Result<()> {
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
    fn set<T>(fd: libc::c_int, level: libc::c_int, name: libc::c_int, v: &T) -> std::io::Result<()> {
        // SAFETY: `v` is a valid option value of its own size.
        check(unsafe {
            libc::setsockopt(fd, level, name, (v as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
        })
    }
    fn sockaddr(a: std::net::SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
            sin_zero: [0; 8],
        }
    }
    in_netns(&lab.node, || {
        // SAFETY: socket(2) has no preconditions; the stream owns (and closes) the descriptor.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh socket this function owns.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        set(fd, libc::SOL_IP, libc::IP_TRANSPARENT, &1 as &libc::c_int)?;
        set(fd, libc::SOL_SOCKET, libc::SO_MARK, &(warden_common::MARK_TUNNEL as libc::c_int))?;
        // A blocking connect() gives up after SO_SNDTIMEO.
        set(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &libc::timeval { tv_sec: 1, tv_usec: 0 })?;
        let (local, remote) = (sockaddr(std::net::SocketAddrV4::new(client, 0)), sockaddr(server));
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid addresses of the given length.
        check(unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) })?;
        // SAFETY: as above.
        check(unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) })?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut hello = String::new();
        BufReader::new(stream).read_line(&mut hello)?;
        Ok(hello.trim_end().to_string())
    })
}

/// Counter rows of `workload` (`namespace/name`) in `warden maps`: (reason, opened, packets).
fn counter_rows(lab: &Lab, workload: &str) -> Vec<(String, u64, u64)> {
    lab.counters_of(workload)
        .into_iter()
        .map(|c| {
            (c["reason"].as_str().unwrap().to_string(), c["opened"].as_u64().unwrap(), c["packets"].as_u64().unwrap())
        })
        .collect()
}

/// Packets `workload` counted under `reason`.
fn packets_with(lab: &Lab, workload: &str, reason: &str) -> u64 {
    counter_rows(lab, workload).iter().filter(|(r, _, _)| r == reason).map(|(_, _, p)| p).sum()
}

#[test]
fn the_nodes_own_probes_reach_its_workloads_and_nothing_else_does() {
    if !require_root("the_nodes_own_probes_reach_its_workloads_and_nothing_else_does") {
        return;
    }
    let net = 75;
    let q_ip = Ipv4Addr::new(10, net, 2, 3);
    let c_ip = Ipv4Addr::new(10, net, 1, 3);
    // Node 2: b (meshed, STRICT, denies c), q (out of the mesh in namespace shop, which is not
    // STRICT: its ALLOW policy names a only), r (a plaintext client out of the mesh).
    let mut q = plain("q", q_ip, &[PORT]);
    q.namespace = "shop".into();
    let more = [q, plain("r", Ipv4Addr::new(10, net, 2, 4), &[])];
    let mut policies = POLICIES.to_vec();
    policies.push(("q-allow-a.yaml", Q_ALLOW_A));
    let mut c = cluster_with("mnp", net, &policies, &[], &more, &[]);
    let targets = [("team/b", b_ip(net)), ("shop/q", q_ip)];

    // Kubelet's probes: from node 2's own network namespace, to b (STRICT: plaintext is refused)
    // and q (its ALLOW policy names only a). Both answer.
    for (name, ip) in targets {
        let p = c.n2.probe_from_node(ip, PORT);
        assert_eq!(p.result, "allowed", "node 2's probe of {name}: {p:?}\n{}", log(&c.n2));
    }
    // The node's connection outlives a commit: its replies are decided again as the node's flow.
    let args = hold_args(b_ip(net), PORT, 3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let hold = established(c.n2.node_command(warden_tests::probe_bin().to_str().unwrap(), &args), "node 2 -> b");
    std::thread::sleep(Duration::from_millis(300));
    let mut recommitted = policies.clone();
    recommitted.push(("unrelated.yaml", UNRELATED));
    set_policies(&mut c.n2, &recommitted);
    let held: warden_tests::Probe = serde_json::from_slice(&hold.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(held.result, "allowed", "the held probe connection survives a commit: {held:?}");
    assert!(held.round_trips.unwrap_or(0) > 20, "{held:?}");

    // The same connection from anywhere else is refused:
    for (name, ip) in targets {
        // from node 1's own stack, across the wire (received on node 2's wire interface);
        let p = c.n1.probe_from_node(ip, PORT);
        assert_ne!(p.result, "allowed", "node 1 -> {name} across the wire: {p:?}");
        // from a workload of node 2, in its cgroup (connect4) and outside it (TC alone: its
        // packets are forwarded from its veth);
        assert_eq!(c.n2.probe_addr("r", ip, PORT).result, "eperm", "r -> {name}");
        let p = c.n2.probe_uncaged("r", ip, PORT);
        assert_ne!(p.result, "allowed", "r -> {name} from outside its cgroup: {p:?}");
        // from a workload of node 1, in plaintext.
        let p = c.n1.probe_addr("p", ip, PORT);
        assert_ne!(p.result, "allowed", "p -> {name}: {p:?}");
    }
    // The agent's last hop also comes from the node's own stack, but marked: it is decided by the
    // identity of the address it carries, never exempt. As a it reaches b; as c, b's DENY and
    // q's ALLOW refuse it.
    let b = std::net::SocketAddrV4::new(b_ip(net), PORT);
    let q = std::net::SocketAddrV4::new(q_ip, PORT);
    let hello = marked_connect(&c.n2, a_ip(net), b).expect("a marked delivery as a reaches b");
    assert!(hello.contains(&format!("from {}:", a_ip(net))), "b sees a: {hello}");
    assert!(marked_connect(&c.n2, c_ip, b).is_err(), "a marked delivery as c is refused by b-deny-c");
    assert!(marked_connect(&c.n2, c_ip, q).is_err(), "a marked delivery as c is refused by q-allow-a");

    // Counted by name: in the maps, the metrics (not as Istio connections) and the access log.
    for (name, _) in targets {
        let rows = counter_rows(&c.n2, name);
        let opened: u64 = rows.iter().filter(|(r, _, _)| r == "node_local").map(|(_, o, _)| o).sum();
        assert!(opened >= 1, "{name}'s node_local connections in warden maps: {rows:?}");
    }
    assert!(packets_with(&c.n2, "team/b", "policy_deny") > 0, "the marked delivery as c was denied by policy");
    let m2 = metrics(&c.n2);
    for (namespace, name) in [("team", "b"), ("shop", "q")] {
        let needle =
            format!("warden_exemptions_total{{reason=\"node_local\",workload=\"{name}\",namespace=\"{namespace}\"");
        assert!(m2.lines().any(|l| l.starts_with(&needle) && !l.ends_with(" 0")), "{needle} in:\n{m2}");
    }
    assert!(
        !m2.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("source_principal=\"unknown\"")
            && l.contains("response_flags=\"-\"")),
        "the node's probes are not Istio connections:\n{m2}"
    );
    let access = log(&c.n2);
    assert!(
        access.lines().any(|l| l.contains("event=open")
            && l.contains("reason=node_local")
            && l.contains(&format!("dst={}:{PORT}", b_ip(net)))),
        "the access log names the exemption:\n{access}"
    );

    // Switched off: the node is decided by its address like any peer.
    let ca = c.n1.dir.join("ca");
    let dir = c.n2.dir.join("policies");
    c.n2.kill_agent(libc::SIGTERM);
    c.n2.start_mesh_agent_with(&dir, &ca, &["--node-probes", "deny"]).expect("agent with --node-probes deny");
    let strict = packets_with(&c.n2, "team/b", "plaintext_strict");
    let default_deny = packets_with(&c.n2, "shop/q", "policy_default_deny");
    for (name, ip) in targets {
        let p = c.n2.probe_from_node(ip, PORT);
        assert_ne!(p.result, "allowed", "with --node-probes deny, node 2's probe of {name}: {p:?}");
    }
    assert!(packets_with(&c.n2, "team/b", "plaintext_strict") > strict, "b refuses the node as plaintext");
    assert!(packets_with(&c.n2, "shop/q", "policy_default_deny") > default_deny, "q's ALLOW policy refuses the node");
}

/// The value of the series of `metric` whose labels include every one of `labels` (0 if none).
fn sample(text: &str, metric: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && labels.iter().all(|n| l.contains(n)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// `warden-probe hold`'s arguments: a line to `ip`:`port` and back every 50 ms for `seconds`.
fn hold_args(ip: Ipv4Addr, port: u16, seconds: u64) -> Vec<String> {
    ["hold", &format!("{ip}:{port}"), "--seconds", &seconds.to_string(), "--interval-ms", "50"]
        .map(String::from)
        .to_vec()
}

/// The serial of the certificate the agent of `lab` holds for `identity` now (`warden certs`).
fn serial(lab: &Lab, identity: &str) -> Option<String> {
    let v = lab.certs()?;
    let cert = v["certificates"].as_array()?.iter().find(|c| c["identity"] == identity)?;
    (cert["state"] == "VALID").then(|| cert["serial"].as_str().map(String::from)).flatten()
}

/// Spawn a `warden-probe hold` `command`; returns once its connection is established.
fn established(mut command: std::process::Command, what: &str) -> Child {
    use std::process::Stdio;
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("warden-probe hold");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stderr.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "established", "{what}: the held connection did not open");
    child
}

/// `warden-probe hold` to `ip`:`port` from workload `from` for `seconds`, once established.
fn hold_from(lab: &Lab, from: &str, ip: Ipv4Addr, port: u16, seconds: u64) -> Child {
    let command = lab.command_in(from, &warden_tests::probe_bin(), &hold_args(ip, port, seconds));
    established(command, &format!("{from} -> {ip}:{port}\n{}", log(lab)))
}

#[test]
fn both_sides_count_cross_node_connections_live_and_once() {
    if !require_root("both_sides_count_cross_node_connections_live_and_once") {
        return;
    }
    let net = 76;
    // a2 on node 1 runs as a's service account: the same identity, another workload. The kernel,
    // which counts by identity, cannot tell them apart; the destination agent can.
    let mut a2 = Spec::new("team", "a2", Ipv4Addr::new(10, net, 1, 5), &[]);
    a2.service_account = "a".into();
    // s: a server on node 1, for a delivery on the same node.
    let s_ip = Ipv4Addr::new(10, net, 1, 6);
    let c = cluster_with("mnm", net, POLICIES, &[a2, Spec::new("team", "s", s_ip, &[PORT])], &[], &[]);
    let holds = [("a", hold_from(&c.n1, "a", b_ip(net), PORT, 4)), ("a2", hold_from(&c.n1, "a2", b_ip(net), PORT, 4))];
    let dst = |name: &str| {
        [
            "reporter=\"destination\"".to_string(),
            format!("source_workload=\"{name}\""),
            "source_principal=\"spiffe://cluster.local/ns/team/sa/a\"".into(),
            "destination_workload=\"b\"".into(),
            "connection_security_policy=\"mutual_tls\"".into(),
            "response_flags=\"-\"".into(),
        ]
    };
    let value = |m: &str, metric: &str, name: &str| {
        let labels = dst(name);
        sample(m, metric, &labels.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let src = |name: &str| {
        ["reporter=\"source\"".to_string(), format!("source_workload=\"{name}\""), "destination_workload=\"b\"".into()]
    };
    let src_value = |m: &str, metric: &str, name: &str| {
        let labels = src(name);
        sample(m, metric, &labels.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Live, while both connections are open, on both sides (node 2 names each caller it proved,
    // node 1 each workload it captured): opened once, not closed, bytes growing between scrapes.
    std::thread::sleep(Duration::from_millis(800));
    let (early, early1) = (metrics(&c.n2), metrics(&c.n1));
    std::thread::sleep(Duration::from_millis(800));
    let (late, late1) = (metrics(&c.n2), metrics(&c.n1));
    for name in ["a", "a2"] {
        for (side, value, early, late) in [
            ("destination", &value as &dyn Fn(&str, &str, &str) -> u64, &early, &late),
            ("source", &src_value, &early1, &late1),
        ] {
            assert_eq!(
                value(late, "istio_tcp_connections_opened_total", name),
                1,
                "{side}: {name} opened once:\n{late}"
            );
            assert_eq!(
                value(late, "istio_tcp_connections_closed_total", name),
                0,
                "{side}: {name} is still open:\n{late}"
            );
            for (metric, what) in
                [("istio_tcp_received_bytes_total", "request"), ("istio_tcp_sent_bytes_total", "response")]
            {
                let (before, after) = (value(early, metric, name), value(late, metric, name));
                assert!(
                    0 < before && before < after,
                    "{side}: {name}'s {what} bytes grow while it lasts: {before} then {after}"
                );
            }
        }
    }
    // Closed: exact payload totals, on both sides, counted once.
    let mut want = Vec::new();
    for (name, h) in holds {
        let p: warden_tests::Probe = serde_json::from_slice(&h.wait_with_output().unwrap().stdout).unwrap();
        assert_eq!(p.result, "allowed", "{name}'s held connection: {p:?}");
        let n = p.round_trips.unwrap();
        let request: u64 = (0..n).map(|i| format!("ping {i}\n").len() as u64).sum();
        let greeting = format!("hello {PORT} from {}\n", p.seen_as.unwrap()).len() as u64;
        want.push((name, request, request + greeting));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (m2, m1) = loop {
        let (m, m1) = (metrics(&c.n2), metrics(&c.n1));
        if want.iter().all(|(name, _, _)| {
            value(&m, "istio_tcp_connections_closed_total", name) == 1
                && src_value(&m1, "istio_tcp_connections_closed_total", name) == 1
        }) {
            break (m, m1);
        }
        assert!(std::time::Instant::now() < deadline, "the closes are reported:\n{m}\n{m1}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for (name, request, response) in want {
        assert_eq!(value(&m2, "istio_tcp_received_bytes_total", name), request, "{name}'s request bytes at b");
        assert_eq!(value(&m2, "istio_tcp_sent_bytes_total", name), response, "{name}'s response bytes at b");
        assert_eq!(
            src_value(&m1, "istio_tcp_received_bytes_total", name),
            request,
            "node 1 agrees on {name}'s request"
        );
        assert_eq!(src_value(&m1, "istio_tcp_sent_bytes_total", name), response, "and on its response");
        assert_eq!(src_value(&m1, "istio_tcp_connections_opened_total", name), 1, "node 1 opened {name} once");
        assert_eq!(src_value(&m1, "istio_tcp_connections_closed_total", name), 1, "and closed it once");
    }
    // Once: the two connections are all the destination side of b has (no series from the
    // kernel's count of the last hop, which would name the identity's workload "unknown").
    let all = ["reporter=\"destination\"", "destination_workload=\"b\"", "response_flags=\"-\""];
    assert_eq!(sample(&m2, "istio_tcp_connections_opened_total", &all), 2, "{m2}");
    assert!(
        !m2.lines().any(|l| l.contains("reporter=\"destination\"") && l.contains("source_workload=\"unknown\"")),
        "{m2}"
    );

    // The same on one node: a -> s is delivered by node 1's agent, which reports both sides.
    let message = "same node";
    let p = c.n1.echo("a", s_ip, PORT, message);
    assert_eq!(p.result, "allowed", "a -> s: {p:?}\n{}", log(&c.n1));
    let to_s = format!("{s_ip}:{PORT}");
    assert_eq!(p.peer.as_deref(), Some(to_s.as_str()), "a's socket names s as its peer: {p:?}");
    let request = message.len() as u64 + 1;
    let response = format!("hello {PORT} from {}\n", p.seen_as.unwrap()).len() as u64 + request;
    let side = |reporter: &str| {
        [format!("reporter=\"{reporter}\""), "source_workload=\"a\"".into(), "destination_workload=\"s\"".into()]
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&c.n1);
        let totals = |reporter: &str| {
            let l = side(reporter);
            let l: Vec<&str> = l.iter().map(String::as_str).collect();
            [
                sample(&m, "istio_tcp_connections_opened_total", &l),
                sample(&m, "istio_tcp_connections_closed_total", &l),
                sample(&m, "istio_tcp_received_bytes_total", &l),
                sample(&m, "istio_tcp_sent_bytes_total", &l),
            ]
        };
        let (src, dst) = (totals("source"), totals("destination"));
        if src == [1, 1, request, response] && dst == src {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a -> s once on both sides: {src:?} {dst:?}\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn certificates_rotate_on_both_nodes_during_a_long_transfer_that_never_drops() {
    if !require_root("certificates_rotate_on_both_nodes_during_a_long_transfer_that_never_drops") {
        return;
    }
    let net = 77;
    // 80 s certificates are renewed every 3 to 10 s ((80 - 60) / 2 after issuance, less up to 5 %
    // of their 140 s lifetime of jitter): several rotations on each node during the transfer.
    let d = Spec::new("team", "d", Ipv4Addr::new(10, net, 1, 5), &[]);
    let c = cluster_with("mrot", net, POLICIES, &[d], &[], &["--workload-cert-ttl", "80s"]);
    let (a, b) = ("spiffe://cluster.local/ns/team/sa/a", "spiffe://cluster.local/ns/team/sa/b");
    // 20 s of lines from a to b and back, each compared byte for byte, on one connection. (A line
    // fits one segment: the probe does not set TCP_NODELAY, so a longer one would wait on Nagle
    // and delayed ACKs for 40 ms a round trip.)
    const SECONDS: u64 = 20;
    const LINE: usize = 1400;
    let mut args = hold_args(b_ip(net), PORT, SECONDS);
    // (The probe reads the first of repeated flags.)
    let interval = args.iter().position(|a| a == "--interval-ms").unwrap() + 1;
    args[interval] = "1".into();
    args.extend(["--line-bytes".into(), LINE.to_string()]);
    let hold = established(c.n1.command_in("a", &warden_tests::probe_bin(), &args), "a -> b");
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(SECONDS - 1);
    while std::time::Instant::now() < deadline {
        for (seen, lab, id) in [(&mut seen_a, &c.n1, a), (&mut seen_b, &c.n2, b)] {
            if let Some(s) = serial(lab, id).filter(|s| seen.last() != Some(s)) {
                seen.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let p: warden_tests::Probe = serde_json::from_slice(&hold.wait_with_output().unwrap().stdout).unwrap();
    // Every line came back intact, on the one connection, to the end.
    assert_eq!(p.result, "allowed", "the transfer across the rotations: {p:?}\n{}\n{}", log(&c.n1), log(&c.n2));
    let lines = p.round_trips.unwrap();
    assert!(lines > 2000, "{lines} lines of {LINE} bytes in {SECONDS} s");
    eprintln!("{lines} lines of {LINE} bytes each way; a's serials {seen_a:?}, b's {seen_b:?}");
    assert!(seen_a.len() >= 2, "a's certificate rotated on node 1 during the transfer: {seen_a:?}");
    assert!(seen_b.len() >= 2, "b's certificate rotated on node 2 during the transfer: {seen_b:?}");
    // One connection, counted once at b with every byte (the request is the lines sent).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let labels = ["reporter=\"destination\"", "source_workload=\"a\"", "destination_workload=\"b\""];
    loop {
        let m = metrics(&c.n2);
        if sample(&m, "istio_tcp_connections_closed_total", &labels) == 1 {
            assert_eq!(sample(&m, "istio_tcp_connections_opened_total", &labels), 1, "{m}");
            assert_eq!(sample(&m, "istio_tcp_received_bytes_total", &labels), lines * LINE as u64, "{m}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the transfer's close is reported:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // After the rotations: a new connection of a, and one of d (a new HBONE connection, whose
    // handshake presents and verifies the certificates current now on both nodes).
    for from in ["a", "d"] {
        let p = c.n1.echo(from, b_ip(net), PORT, "after the rotations");
        assert_eq!((p.result.as_str(), p.intact), ("allowed", Some(true)), "{from} -> b: {p:?}\n{}", log(&c.n2));
    }
}

/// The congestion-control algorithms of node `lab`'s established sockets that `ss` `filter`
/// selects, one per socket.
fn congestion_of(lab: &Lab, filter: &str) -> Vec<String> {
    let out = lab.node_command("ss", &["-Htin", "state", "established", filter]).output().expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    // Each socket is a line of addresses, then an indented line of TCP_INFO opening with the
    // algorithm's name.
    text.lines()
        .filter(|l| l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn the_agents_hops_to_local_workloads_use_its_congestion_control_and_the_wire_the_nodes() {
    if !require_root("the_agents_hops_to_local_workloads_use_its_congestion_control_and_the_wire_the_nodes") {
        return;
    }
    let net = 77;
    // An algorithm other than the nodes' default, so each socket shows whose choice it took.
    let default = fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap().trim().to_string();
    let local = if default == "reno" { "cubic" } else { "reno" };
    let s_ip = Ipv4Addr::new(10, net, 1, 6);
    let c = cluster_with(
        "mcc",
        net,
        POLICIES,
        &[Spec::new("team", "s", s_ip, &[PORT])],
        &[],
        &["--local-congestion-control", local],
    );
    for lab in [&c.n1, &c.n2] {
        let netns_default = lab.node_command("sysctl", &["-n", "net.ipv4.tcp_congestion_control"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&netns_default.stdout).trim(), default, "{}: the node's default", lab.tag);
    }
    let far = hold_from(&c.n1, "a", b_ip(net), PORT, 3);
    let near = hold_from(&c.n1, "c", s_ip, PORT, 3);
    let b = format!("dst {}:{PORT}", b_ip(net));
    let s = format!("dst {s_ip}:{PORT}");
    let sockets = [
        // Node 1: the two captured connections (accepted on 15001) and the same-node delivery to
        // s: local hops. The HBONE connection to node 2: the node's default.
        (&c.n1, "sport = :15001", local, 2),
        (&c.n1, s.as_str(), local, 1),
        (&c.n1, "dport = :15008", default.as_str(), 1),
        // Node 2: the HBONE connection (accepted on 15008), and the delivery to b.
        (&c.n2, "sport = :15008", default.as_str(), 1),
        (&c.n2, b.as_str(), local, 1),
    ];
    for (lab, filter, want, count) in sockets {
        let got = congestion_of(lab, filter);
        assert_eq!(
            got,
            vec![want.to_string(); count],
            "{}: `{filter}` (local hops {local}, the node's default {default})",
            lab.tag
        );
    }
    for (name, h) in [("a -> b", far), ("c -> s", near)] {
        let p: warden_tests::Probe = serde_json::from_slice(&h.wait_with_output().unwrap().stdout).unwrap();
        assert_eq!(p.result, "allowed", "{name}: {p:?}");
    }

    // A name the kernel does not have stops the agent at start, naming the option.
    let mut n3 = Lab::up("mcc3", &[Spec::new("team", "x", Ipv4Addr::new(10, net, 3, 2), &[PORT])]).unwrap();
    let dir = n3.dir.join("policies");
    write_policies(&dir, &[]).unwrap();
    let err = n3.start_mesh_agent_with(&dir, &c.n1.dir.join("ca"), &["--local-congestion-control", "nosuchalgo"]);
    assert!(err.is_err(), "the agent must not start");
    let log = log(&n3);
    assert!(
        log.contains("--local-congestion-control nosuchalgo: the kernel refused it") && log.contains("available:"),
        "{log}"
    );
}

/// A dual-stack client: an `AF_INET6` socket connecting to an IPv4 server through its v4-mapped
/// address (`::ffff:a.b.c.d`), as Java, and any runtime that opens IPv6 sockets by default, does.
/// Prints one JSON line: the server's greeting and the socket's peer, or the error.
const DUAL_STACK_CLIENT: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    greeting = s.makefile("r").readline().strip()
    host, port = s.getpeername()[:2]
    print(json.dumps({"greeting": greeting, "peer": f"[{host}]:{port}"}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "detail": str(e)}))
"#;

fn dual_stack(lab: &Lab, from: &str, ip: Ipv4Addr, port: u16) -> serde_json::Value {
    python_client(lab, from, DUAL_STACK_CLIENT, &[format!("::ffff:{ip}"), port.to_string()])
}

/// Run a plain Python client `script` with `args` as workload `from`; its one JSON line.
fn python_client(lab: &Lab, from: &str, script: &str, args: &[String]) -> serde_json::Value {
    let args: Vec<String> = ["-c".to_string(), script.to_string()].into_iter().chain(args.iter().cloned()).collect();
    let out = lab.command_in(from, Path::new("/usr/bin/python3"), &args).output().expect("python3");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// The kernel runs cgroup/connect6, not connect4, for a v4-mapped destination, and a socket's
/// getpeername goes through getpeername6. Capture and policy must hold there too, or a dual-stack
/// client would talk plaintext to its peer (and a STRICT peer would drop it).
#[test]
fn a_dual_stack_client_is_captured_and_authorized_as_an_ipv4_one() {
    if !require_root("a_dual_stack_client_is_captured_and_authorized_as_an_ipv4_one") {
        return;
    }
    let net = 79;
    let c = cluster("m6", net, POLICIES);
    let (tcpdump, pcap) = capture(&c.n1);
    // b is STRICT: only a connection the agents carried over mTLS reaches it.
    let v = dual_stack(&c.n1, "a", b_ip(net), PORT);
    std::thread::sleep(Duration::from_millis(300));
    stop(tcpdump);
    let greeting = v["greeting"].as_str().unwrap_or_default();
    assert!(
        greeting.starts_with(&format!("hello {PORT} from {}:", a_ip(net))),
        "a reaches b over the mesh, seen with its own address: {v}\nnode1:\n{}\nnode2:\n{}",
        log(&c.n1),
        log(&c.n2)
    );
    assert_eq!(v["peer"], format!("[::ffff:{}]:{PORT}", b_ip(net)), "a's socket names b as its peer: {v}");
    let wire = fs::read(&pcap).expect("capture file");
    assert!(contains(&wire, &15008u16.to_be_bytes()), "the connection crossed the wire over HBONE");
    assert!(!contains(&wire, greeting.as_bytes()), "the greeting crossed the wire in plaintext");

    // DENY by principal holds for a dual-stack client too.
    let v = dual_stack(&c.n1, "c", b_ip(net), PORT);
    assert!(v["greeting"].as_str().is_none_or(str::is_empty), "c is denied by principal: {v}");
    assert!(log(&c.n2).contains("b-deny-c"), "node 2 logs the deciding policy:\n{}", log(&c.n2));
}

/// Give both nodes the workload file's `services` and wait for their agents to commit it.
fn set_services(c: &mut Cluster, services: &[String]) {
    for lab in [&mut c.n1, &mut c.n2] {
        let before = lab.generation();
        lab.services = services.to_vec();
        fs::write(lab.workloads_path(), lab.workload_file()).unwrap();
        lab.wait_generation_change(before, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", lab.tag, log(lab)));
    }
}

/// Clients usually reach their peers through a Service's virtual address (a ClusterIP, which
/// kube-proxy DNATs only after the socket hooks have run). A meshed client's connection to a
/// Service with meshed pods is captured, and the agent carries it to one of those pods over HBONE
/// (or delivers it on the node), on the pod's target port, authorized as a direct one. The lab has
/// no kube-proxy: a connection the mesh did not capture would reach nothing at all. The agents run
/// with a cluster domain of their own, so the Service's hostname (in the metrics, and in the
/// tunnel's `forwarded: host=`) must follow it.
#[test]
fn a_connection_to_a_services_address_reaches_a_meshed_pod_over_the_mesh() {
    if !require_root("a_connection_to_a_services_address_reaches_a_meshed_pod_over_the_mesh") {
        return;
    }
    let net = 80;
    let s_ip = Ipv4Addr::new(10, net, 1, 6);
    let domain = ["--cluster-domain", "corp.example"];
    let mut c = cluster_with("msv", net, POLICIES, &[Spec::new("team", "s", s_ip, &[PORT])], &[], &domain);
    let (b_vip, s_vip, alt_vip) =
        (Ipv4Addr::new(10, 96, net, 1), Ipv4Addr::new(10, 96, net, 2), Ipv4Addr::new(10, 96, net, 3));
    set_services(
        &mut c,
        &[
            format!(
                "{{name: b-svc, namespace: team, clusterIP: {b_vip}, selector: {{app: b}}, ports: [{{port: 80, targetPort: {PORT}}}]}}"
            ),
            format!(
                "{{name: s-svc, namespace: team, clusterIP: {s_vip}, selector: {{app: s}}, ports: [{{port: 80, targetPort: {PORT}}}]}}"
            ),
            // b's second Service: node 2 can only tell which one a connection addressed from the
            // tunnel's `host`. Node-local: node 1 has no pod of it.
            format!(
                "{{name: b-alt, namespace: team, clusterIP: {alt_vip}, selector: {{app: b}}, ports: [{{port: 80, targetPort: {PORT}}}], internalTrafficPolicy: Local}}"
            ),
        ],
    );
    // `warden maps` shows the Service's address as captured.
    let maps: serde_json::Value = serde_json::from_str(&c.n1.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
    let vip = maps["ipcache"].as_array().unwrap().iter().find(|e| e["cidr"] == format!("{b_vip}/32")).cloned();
    assert!(vip.as_ref().is_some_and(|e| e["meshed"] == true && e["service"] == true), "{vip:?}\n{maps}");
    let text = c.n1.warden(&["maps"]).unwrap();
    assert!(
        text.lines().any(|l| l.trim_start().starts_with(&format!("{b_vip}/32")) && l.contains("service, meshed")),
        "the identity cache's MESH column:\n{text}"
    );
    let (tcpdump, pcap) = capture(&c.n1);
    let p = c.n1.echo("a", b_vip, 80, "through the service");
    std::thread::sleep(Duration::from_millis(300));
    stop(tcpdump);
    assert_eq!(p.result, "allowed", "a -> b-svc:80: {p:?}\nnode1:\n{}\nnode2:\n{}", log(&c.n1), log(&c.n2));
    assert_eq!(p.intact, Some(true), "{p:?}");
    let seen = p.seen_as.clone().unwrap_or_default();
    assert!(seen.starts_with(&format!("{}:", a_ip(net))), "b sees a's own address: {p:?}");
    assert_eq!(p.peer, Some(format!("{b_vip}:80")), "a's socket names the Service it connected to: {p:?}");
    let wire = fs::read(&pcap).expect("capture file");
    assert!(contains(&wire, &15008u16.to_be_bytes()), "carried over HBONE");
    assert!(!contains(&wire, b"through the service"), "the payload crossed the wire in plaintext");
    // Both sides count it against the Service (Istio's destination_service labels), in the
    // agents' cluster domain: node 1 knows it was addressed, node 2 reads it from the tunnel's
    // `forwarded: host=` (b has two Services, so nothing else could tell it which).
    for (lab, reporter) in [(&c.n1, "reporter=\"source\""), (&c.n2, "reporter=\"destination\"")] {
        let m = metrics(lab);
        let needles = [
            reporter,
            "source_workload=\"a\"",
            "destination_service=\"b-svc.team.svc.corp.example\"",
            "destination_service_name=\"b-svc\"",
            "destination_service_namespace=\"team\"",
        ];
        assert!(
            series(&m, "istio_tcp_connections_opened_total", &needles),
            "{}: {reporter} counts a -> b-svc:\n{m}",
            lab.tag
        );
    }

    // Authorized as a direct connection: b still refuses c by principal.
    let p = c.n1.echo("c", b_vip, 80, "from c");
    assert_ne!(p.result, "allowed", "c -> b-svc is denied by principal: {p:?}");
    assert!(log(&c.n2).contains("b-deny-c"), "node 2 logs the deciding policy:\n{}", log(&c.n2));

    // A Service whose pod is on the same node: delivered by node 1's agent.
    let p = c.n1.echo("a", s_vip, 80, "same node");
    assert_eq!(p.result, "allowed", "a -> s-svc:80: {p:?}\n{}", log(&c.n1));
    assert_eq!(p.peer, Some(format!("{s_vip}:80")), "{p:?}");

    // A workload reaching itself: through its Service (the agent delivers it from the capture
    // address, as kube-proxy's hairpin masquerade would show the node), and at its own address
    // (never captured nor decided: it stays on the workload's loopback). s is STRICT, so a
    // plaintext decision of either would refuse it.
    let p = c.n1.echo("s", s_vip, 80, "hairpin");
    assert_eq!(p.result, "allowed", "s -> s-svc:80 (itself): {p:?}\n{}", log(&c.n1));
    assert_eq!(p.intact, Some(true), "{p:?}");
    assert_eq!(p.peer, Some(format!("{s_vip}:80")), "s's socket names its Service: {p:?}");
    let seen = p.seen_as.clone().unwrap_or_default();
    assert!(seen.starts_with("169.254.1.1:"), "s sees the node's capture address, not a martian: {p:?}");
    let p = c.n1.echo("s", s_ip, PORT, "itself");
    assert_eq!(p.result, "allowed", "s -> its own address: {p:?}");
    assert!(p.seen_as.unwrap_or_default().starts_with(&format!("{s_ip}:")), "over its loopback, from itself");

    // A port the Service does not have: refused by the agent, and said why.
    let p = c.n1.echo("a", b_vip, 81, "no such port");
    assert_ne!(p.result, "allowed", "b-svc has no port 81: {p:?}");
    assert!(log(&c.n1).contains("no meshed pod of the service serves this port"), "{}", log(&c.n1));

    // internalTrafficPolicy: Local, and no pod of it on node 1: node 1 does not capture it (its
    // Service proxy would send it to a local pod out of the mesh, or drop it as kube-proxy does;
    // the lab has none, so nothing answers); node 2, where b is, does.
    let p = c.n1.echo("a", alt_vip, 80, "node-local service");
    assert_ne!(p.result, "allowed", "b-alt is node-local and b is on node 2: {p:?}");
    let cidr = |ip: Ipv4Addr| format!("{ip}/32");
    assert_eq!(captured_services(&c.n1), [cidr(b_vip), cidr(s_vip)], "node 1 captures b-svc and s-svc, not b-alt");
    assert_eq!(captured_services(&c.n2), [cidr(b_vip), cidr(s_vip), cidr(alt_vip)], "node 2 captures b-alt too");
}

/// The Service addresses node `lab`'s kernel captures (`warden maps`' identity cache), sorted.
fn captured_services(lab: &Lab) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&lab.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
    let mut vips: Vec<String> = v["ipcache"]
        .as_array()
        .expect("ipcache")
        .iter()
        .filter(|e| e["service"] == true && e["meshed"] == true)
        .map(|e| e["cidr"].as_str().unwrap().to_string())
        .collect();
    vips.sort();
    vips
}

/// A TCP Fast Open client: no `connect()`, the first `sendto(MSG_FASTOPEN)` opens the connection
/// (the kernel runs connect4 from inside it). Prints the reply line or the error.
const FAST_OPEN_CLIENT: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
# The connection's wait is bounded by the send timeout.
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 3, 0))
try:
    # Blocking (Python's timeouts make the socket non-blocking, and a Fast Open send without a
    # cookie then returns EINPROGRESS): it returns once the connection is up and the data sent.
    s.sendto(b"fast open\n", socket.MSG_FASTOPEN, (sys.argv[1], int(sys.argv[2])))
    s.settimeout(3)
    f = s.makefile("r")
    greeting, echo = f.readline().strip(), f.readline().strip()
    host, port = s.getpeername()[:2]
    print(json.dumps({"greeting": greeting, "echo": echo, "peer": f"{host}:{port}"}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "detail": str(e)}))
"#;

/// The connection a Fast Open `sendto()` opens is captured as a `connect()`'s is, and its first
/// bytes arrive.
#[test]
fn a_tcp_fast_open_client_is_captured_too() {
    if !require_root("a_tcp_fast_open_client_is_captured_too") {
        return;
    }
    let net = 83;
    let c = cluster("mfo", net, POLICIES);
    let v = python_client(&c.n1, "a", FAST_OPEN_CLIENT, &[b_ip(net).to_string(), PORT.to_string()]);
    assert!(
        v["greeting"].as_str().unwrap_or_default().starts_with(&format!("hello {PORT} from {}:", a_ip(net))),
        "a reaches b (STRICT) over the mesh: {v}\n{}",
        log(&c.n1)
    );
    assert_eq!(v["echo"], "fast open", "the data sent with the SYN arrives: {v}");
    assert_eq!(v["peer"], format!("{}:{PORT}", b_ip(net)), "{v}");
}

/// A plain client that connects from a source port of its choosing; its one JSON line.
const FROM_PORT_CLIENT: &str = r#"
import json, socket, sys
ip, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(3)
try:
    s.bind(("0.0.0.0", sport))
    s.connect((ip, port))
    print(json.dumps({"greeting": s.makefile().readline().strip(), "source_port": s.getsockname()[1]}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "detail": str(e)}))
"#;

/// The addresses node `lab` delivers HBONE for (`routing::TABLE`'s local routes), sorted.
fn hbone_routes(lab: &Lab) -> Vec<String> {
    let out = lab.node_command("ip", &["-4", "route", "show", "table", "15008"]).output().expect("ip route");
    let mut routes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("local ").and_then(|r| r.split_whitespace().next()).map(str::to_string))
        .collect();
    routes.sort();
    routes
}

/// The node's rules at priority `pref`, as `ip rule` prints them.
fn rule_at(lab: &Lab, pref: u32) -> String {
    let out = lab.node_command("ip", &["rule", "show", "pref", &pref.to_string()]).output().expect("ip rule");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The node's rule for the replies of the workloads the agent delivers to (priority 1002).
fn replies_rule(lab: &Lab) -> String {
    rule_at(lab, 1002)
}

/// Port 15008 is HBONE's only towards a meshed pod of the node. Any other TCP packet for port
/// 15008 is routed as without the mesh: above all the replies to a client whose source port
/// happens to be 15008 (inside the kernel's default ephemeral range 32768-60999 it never is,
/// but clusters widen the range; `bench mtls` does, and lost one connection in ~30,000 to
/// this). The node delivers locally exactly its meshed pods' addresses, following the mesh as
/// pods join and leave it, and an agent started on a node set up by an agent before this rule
/// replaces the old catch-all.
#[test]
fn only_hbone_to_a_meshed_pod_of_the_node_goes_to_its_agent() {
    if !require_root("only_hbone_to_a_meshed_pod_of_the_node_goes_to_its_agent") {
        return;
    }
    let net = 86;
    let (c_ip, q_ip) = (Ipv4Addr::new(10, net, 1, 3), Ipv4Addr::new(10, net, 2, 3));
    let mut c = cluster_with("mr", net, &[], &[], &[plain("q", q_ip, &[PORT])], &[]);
    let s = |ip: Ipv4Addr| ip.to_string();
    assert_eq!(hbone_routes(&c.n1), [s(a_ip(net)), s(c_ip)], "node 1 serves HBONE for a and c, not p");
    assert_eq!(hbone_routes(&c.n2), [s(b_ip(net))], "node 2 serves HBONE for b, not q");
    // `warden maps` shows the same, from the node's kernel: the mesh's three rules, nothing missing.
    let routing = |lab: &Lab| -> serde_json::Value {
        let maps = lab.warden(&["maps", "--output", "json"]).unwrap();
        serde_json::from_str::<serde_json::Value>(&maps).unwrap()["routing"].clone()
    };
    let r = routing(&c.n1);
    assert_eq!(r["hbone_pods"], serde_json::json!([s(a_ip(net)), s(c_ip)]), "{r}");
    assert_eq!(r["missing"], serde_json::json!([]), "{r}");
    assert_eq!((r["replies_table"].clone(), r["earlier_catch_all"].clone()), (true.into(), false.into()), "{r}");
    let rules: Vec<String> =
        r["rules"].as_array().unwrap().iter().map(|x| x["rule"].as_str().unwrap().into()).collect();
    assert_eq!(
        rules,
        [
            "1000: from all iif lo ipproto tcp dport 15008 lookup main",
            "1001: from all ipproto tcp dport 15008 lookup 15008",
            "1002: from all fwmark 0x200000/0xf00000 lookup 15009"
        ],
        "{r}"
    );
    assert!(r["rules"].as_array().unwrap().iter().all(|x| x["mesh"] == true), "{r}");

    // p and q are out of the mesh: p's connection from port 15008 is routed as any other, both
    // ways, across both nodes.
    let from_15008 = |c: &Cluster| {
        python_client(&c.n1, "p", FROM_PORT_CLIENT, &[q_ip.to_string(), PORT.to_string(), "15008".into()])
    };
    let v = from_15008(&c);
    assert_eq!(v["source_port"], 15008, "{v}");
    assert!(v["greeting"].as_str().is_some_and(|g| g.starts_with("hello")), "q greets p: {v}");
    let mesh = c.n1.echo("a", b_ip(net), PORT, "over the mesh");
    assert_eq!(mesh.result, "allowed", "HBONE to b still reaches node 2's agent: {mesh:?}\n{}", log(&c.n2));
    assert_eq!(mesh.intact, Some(true));

    // c leaves the mesh: node 1 stops taking HBONE for it.
    let before = c.n1.generation();
    let member = c.n1.members.iter_mut().find(|m| m.spec.name == "c").unwrap();
    member.spec.labels.push(("istio.io/dataplane-mode".into(), "none".into()));
    fs::write(c.n1.workloads_path(), c.n1.workload_file()).unwrap();
    c.n1.wait_generation_change(before, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e}\n{}", log(&c.n1)));
    // The routes follow the commit.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while hbone_routes(&c.n1).len() > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(hbone_routes(&c.n1), [s(a_ip(net))], "c left the mesh:\n{}", log(&c.n1));

    // What is removed under the running agent (a's route, the HBONE rule) is back within its
    // check of the node's routing (every 10 s), and the agent says so.
    let route = format!("{}/32", a_ip(net));
    for args in
        [&["route", "del", "local", &route, "dev", "lo", "table", "15008"][..], &["rule", "del", "pref", "1001"]]
    {
        let out = c.n1.node_command("ip", args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let hbone_rule = |lab: &Lab| rule_at(lab, 1001);
    assert!(hbone_rule(&c.n1).is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while (hbone_routes(&c.n1).is_empty() || hbone_rule(&c.n1).is_empty()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(hbone_routes(&c.n1), [s(a_ip(net))], "a's route is back:\n{}", log(&c.n1));
    assert!(
        hbone_rule(&c.n1).ends_with("ipproto tcp dport 15008 lookup 15008"),
        "the HBONE rule is back: {}\n{}",
        hbone_rule(&c.n1),
        log(&c.n1)
    );
    assert!(log(&c.n1).contains("routing had been changed under the agent; restored"), "and the agent says so");
    let restored = c.n1.metrics();
    let restored = restored.lines().find(|l| l.starts_with("warden_mesh_routing_restored_total "));
    assert_eq!(restored, Some("warden_mesh_routing_restored_total 2"), "the route and the rule, counted");
    let mesh = c.n1.echo("a", b_ip(net), PORT, "after the repair");
    assert_eq!(mesh.result, "allowed", "{mesh:?}\n{}", log(&c.n2));

    // Node 2 as an agent of before this rule left it: every address local in the table, which
    // the replies' rule shared. A new agent takes the node over without either.
    c.n2.kill_agent(libc::SIGTERM);
    for args in [
        &["route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "15008"][..],
        &["rule", "del", "pref", "1002"],
        &["rule", "add", "pref", "1002", "fwmark", "0x200000/0xf00000", "lookup", "15008"],
    ] {
        let out = c.n2.node_command("ip", args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_ne!(
        from_15008(&c)["greeting"].as_str().map(|g| g.starts_with("hello")),
        Some(true),
        "the old catch-all takes q's reply"
    );
    // With no agent running, `warden maps` shows the node as the earlier agent left it.
    let r = routing(&c.n2);
    assert_eq!(r["earlier_catch_all"], true, "{r}");
    assert!(
        r["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["rule"] == "1002: from all fwmark 0x200000/0xf00000 lookup 15008" && x["mesh"] == true),
        "an earlier agent's rule is the mesh's: {r}"
    );
    let rule_1001 = c.n2.node_command("ip", &["rule", "del", "pref", "1001"]).status().unwrap();
    assert!(rule_1001.success());
    let text = c.n2.warden(&["maps"]).unwrap();
    assert!(text.contains("\n  1001: missing"), "{text}");
    assert!(text.contains("and an earlier agent's catch-all (every address)"), "{text}");
    let (dir, ca) = (c.n2.dir.join("policies"), c.n1.dir.join("ca"));
    start_mesh_agent(&mut c.n2, &dir, &ca);
    assert_eq!(hbone_routes(&c.n2), [s(b_ip(net))], "the catch-all is gone:\n{}", log(&c.n2));
    assert!(
        !replies_rule(&c.n2).ends_with("lookup 15008"),
        "the replies have their own table: {}",
        replies_rule(&c.n2)
    );
    let v = from_15008(&c);
    assert!(v["greeting"].as_str().is_some_and(|g| g.starts_with("hello")), "q greets p again: {v}");
    let mesh = c.n1.echo("a", b_ip(net), PORT, "over the mesh again");
    assert_eq!(mesh.result, "allowed", "{mesh:?}\n{}", log(&c.n2));

    // One agent per pin directory: a second one on node 2's pins (with a state directory of its
    // own) stops before it touches anything, and names the agent in its way; `warden cleanup`
    // refuses to run under the agent, and removes nothing.
    let (warden, pins) = (warden_tests::warden_bin(), c.n2.pin_dir.display().to_string());
    let (workloads, policies, state2) = (c.n2.workloads_path(), dir.display().to_string(), c.n2.dir.join("state2"));
    let second =
        c.n2.node_command(
            "timeout",
            &[
                "20",
                warden.to_str().unwrap(),
                "agent",
                "--workloads",
                workloads.to_str().unwrap(),
                "--policies",
                &policies,
                "--pin-dir",
                &pins,
                "--state-dir",
                state2.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{said}");
    assert!(said.contains("a warden agent (pid ") && said.contains("one agent per pin directory"), "{said}");
    let refused = c.n2.node_command(warden.to_str().unwrap(), &["cleanup", "--pin-dir", &pins]).output().unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("stop it first") && said.contains("nothing removed"), "{said}");
    assert!(replies_rule(&c.n2).ends_with("lookup 15009"), "the routing stays: {}", replies_rule(&c.n2));
    let mesh = c.n1.echo("a", b_ip(net), PORT, "still served");
    assert_eq!(mesh.result, "allowed", "{mesh:?}\n{}", log(&c.n2));

    // `warden cleanup` leaves node 2 routing as without the mesh.
    c.n2.kill_agent(libc::SIGTERM);
    let out = c.n2.node_command(warden.to_str().unwrap(), &["cleanup", "--pin-dir", &pins]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rules = String::from_utf8_lossy(&c.n2.node_command("ip", &["rule"]).output().unwrap().stdout).into_owned();
    assert!(!["1000:", "1001:", "1002:"].iter().any(|p| rules.contains(p)), "the mesh's rules are gone:\n{rules}");
    assert_eq!(hbone_routes(&c.n2), Vec::<String>::new(), "table 15008 is empty");
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed the mesh's rule"), "cleanup says what it removed");

    // Another program's rule at one of the mesh's priorities: the agent refuses to start the mesh
    // and says why, and the rule stays.
    let foreign = ["rule", "add", "pref", "1002", "from", "10.99.0.0/16", "lookup", "100"];
    assert!(c.n2.node_command("ip", &foreign).status().unwrap().success());
    let refused = c.n2.start_mesh_agent_with(&dir, &ca, &[]).expect_err("the mesh cannot route around a foreign rule");
    assert!(
        refused.to_string().contains("priority 1002 holds another program's rule (1002: from 10.99.0.0/16 lookup 100)"),
        "the agent names the rule in its way: {refused}"
    );
    assert!(replies_rule(&c.n2).contains("from 10.99.0.0/16 lookup 100"), "the foreign rule stays");
}

/// A Service in front of pods in the mesh and pods out of it (a rollout into the mesh, or pods
/// opted out): a meshed client's connections are shared among all of them, as ztunnel shares
/// them among a Service's endpoints. The kernel (`connect4`) sends a share straight to the pods
/// out of the mesh, in plaintext from the client's own socket, and captures the rest for the
/// agent, which carries them to the meshed pods over HBONE. Either way the client's socket names
/// the Service as its peer.
#[test]
fn a_services_connections_are_shared_between_its_meshed_pods_and_the_others() {
    if !require_root("a_services_connections_are_shared_between_its_meshed_pods_and_the_others") {
        return;
    }
    let net = 87;
    let mut q = plain("q", Ipv4Addr::new(10, net, 2, 3), &[PORT]);
    q.labels[0].1 = "b".into(); // one of b-svc's pods, out of the mesh
    // Another, on a's node, whose policy refuses everyone: a's connect() fails at once (EPERM),
    // as a direct one to r would, instead of timing out at TC.
    let mut r = plain("r", Ipv4Addr::new(10, net, 1, 5), &[PORT]);
    r.labels[0].1 = "b".into();
    r.labels.push(("role".into(), "r".into()));
    let deny_r = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: r-closed, namespace: team}
spec:
  selector: {matchLabels: {role: r}}
  action: DENY
  rules:
  - to: [{operation: {ports: [\"8080\"]}}]
";
    let mut c = cluster_with("msp", net, &[("deny-r.yaml", deny_r)], &[r], &[q], &[]);
    let vip = Ipv4Addr::new(10, 96, net, 1);
    set_services(
        &mut c,
        &[format!(
            "{{name: b-svc, namespace: team, clusterIP: {vip}, selector: {{app: b}}, ports: [{{port: 80, targetPort: {PORT}}}]}}"
        )],
    );
    let maps: serde_json::Value = serde_json::from_str(&c.n1.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
    let split = &maps["services"];
    assert_eq!(split[0]["service"], format!("{vip}:80"), "node 1's split: {split}");
    let pods = serde_json::json!([format!("10.{net}.1.5:{PORT}"), format!("10.{net}.2.3:{PORT}")]);
    assert_eq!((split[0]["meshed"].as_u64(), split[0]["plain"].clone()), (Some(1), pods), "{split}");

    let (tcpdump, pcap) = capture(&c.n1);
    const N: usize = 45;
    let mut refused = 0;
    for i in 0..N {
        let p = c.n1.echo("a", vip, 80, &format!("SPLIT-MARKER-{i:03}-end"));
        if p.result == "eperm" {
            refused += 1; // r's share
            continue;
        }
        assert_eq!(p.result, "allowed", "a -> b-svc #{i}: {p:?}\n{}", log(&c.n1));
        assert_eq!(p.intact, Some(true), "#{i}: {p:?}");
        assert_eq!(p.peer, Some(format!("{vip}:80")), "a's socket names the Service either way: {p:?}");
        assert!(p.seen_as.unwrap_or_default().starts_with(&format!("{}:", a_ip(net))), "the pod sees a's own address");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop(tcpdump);
    let wire = fs::read(&pcap).expect("capture file");
    let plain = (0..N).filter(|i| contains(&wire, format!("SPLIT-MARKER-{i:03}-end").as_bytes())).count();
    // A third each way on average; none on one side has odds of about 3 in 1.5^45.
    assert!(plain > 0, "no connection went to q, the pod out of the mesh on node 2");
    assert!(refused > 0, "no connection was r's (refused by its policy at connect())");
    let tunnels = sample(
        &metrics(&c.n2),
        "istio_tcp_connections_opened_total",
        &["reporter=\"destination\"", "destination_workload=\"b\""],
    ) as usize;
    assert!(tunnels > 0, "no connection went over the mesh to b");
    assert_eq!(
        tunnels,
        N - plain - refused,
        "every allowed connection that did not cross the wire in plaintext reached b"
    );
    eprintln!(
        "{plain} of {N} connections to q in plaintext, {refused} refused by r's policy, {tunnels} to b over HBONE"
    );
}
