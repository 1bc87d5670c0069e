//! Root integration tests of the mesh's same-node fast path (`ebpf/src/fastpath.rs`): one node,
//! meshed workloads `a` (client), `b` (server) and `c` (denied by `b`'s policy), the agent in its
//! own cgroup. Without root they print a loud SKIPPING line.
//!
//! The transfer: `a` sends [`SIZE`] pseudo-random bytes and half-closes; `b` reads to end of
//! stream before it answers (so the half-close must arrive while `a` still reads), then sends every
//! byte back XORed with [`XOR`] and closes. `a` checks both directions byte for byte. Both ends
//! are this test binary (the ignored [`helper`] test), run inside the workloads' network
//! namespaces and cgroups, where the kernel's capture applies.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use warden_agent::datapath::{Maps, maps::fast_path_counters};

use warden_common::{FastpathCounter, HOOK_TUNNEL};
use warden_tests::{Lab, Probe, Spec, probe_bin, require_root, write_policies};

const PORT: u16 = 8080;
/// The helper's sink in `b`.
const SINK_PORT: u16 = 7070;
const SIZE: u64 = 24 << 20;
const XOR: u8 = 0x5a;
const HELPER_ENV: &str = "WARDEN_FASTPATH_HELPER";
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// `b` refuses `c` by principal.
const POLICIES: &[(&str, &str)] = &[(
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
)];

fn ip(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, 1, host)
}

/// One meshed node: `a`, `b` (serving [`PORT`]), `c`; the agent started with `agent_args`.
fn node(tag: &str, net: u8, agent_args: &[&str]) -> Lab {
    node_with(tag, net, agent_args, &[])
}

/// [`node`], with `sysctls` (`name=value`) set in the node's network namespace before the agent
/// starts.
fn node_with(tag: &str, net: u8, agent_args: &[&str], sysctls: &[&str]) -> Lab {
    let specs = [
        Spec::new("team", "a", ip(net, 2), &[]),
        Spec::new("team", "b", ip(net, 3), &[PORT]),
        Spec::new("team", "c", ip(net, 4), &[]),
    ];
    let mut lab = Lab::up(tag, &specs).expect("node up");
    for s in sysctls {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.node, "sysctl", "-qw", s])
            .output()
            .expect("ip netns exec sysctl");
        assert!(out.status.success(), "sysctl {s}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ca = lab.dir.join("ca");
    fs::create_dir_all(&ca).unwrap();
    let policies = lab.dir.join("policies");
    write_policies(&policies, POLICIES).unwrap();
    lab.start_mesh_agent_with(&policies, &ca, agent_args)
        .unwrap_or_else(|e| panic!("agent: {e}\n{}", fs::read_to_string(lab.agent_log()).unwrap_or_default()));
    lab
}

fn log(lab: &Lab) -> String {
    fs::read_to_string(lab.agent_log()).unwrap_or_default()
}

/// This test binary as the helper, in workload `name`.
fn helper_in(lab: &Lab, name: &str, role: &str) -> std::process::Command {
    let exe = std::env::current_exe().expect("test binary");
    let args = ["helper", "--exact", "--ignored", "--nocapture", "--quiet"].map(String::from);
    let mut c = lab.command_in(name, &exe, &args);
    c.env(HELPER_ENV, role);
    c
}

/// Start the sink in `b`; returns once it listens.
fn sink(lab: &Lab) -> Child {
    sink_as(lab, &format!("sink {SINK_PORT}")).0
}

/// Start a helper in `b` in `role`; returns once it listens, with the lines it prints after that.
fn sink_as(lab: &Lab, role: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = helper_in(lab, "b", role).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("sink");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("listening") => break,
            Some(Ok(_)) => {}
            _ => panic!("the sink stopped before listening"),
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// What the sender reported.
#[derive(Debug, serde::Deserialize)]
struct Transfer {
    sent: u64,
    received: u64,
    /// Every byte came back, XORed, in order.
    exact: bool,
    /// Why the transfer failed (a read timing out means the half-close never arrived).
    #[serde(default)]
    error: String,
    /// Blocking reads that returned EAGAIN before their timeout (retried).
    #[serde(default)]
    spurious_eagain: u64,
    #[serde(default)]
    ms: u64,
}

fn transfer(lab: &Lab, to: Ipv4Addr) -> Transfer {
    let out = helper_in(lab, "a", &format!("send {to}:{SINK_PORT} {SIZE}")).output().expect("sender");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| {
        panic!("sender printed no result: {stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), log(lab))
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Bytes the TC programs counted on the mesh's hops (`HOOK_TUNNEL`: the workloads' captured
/// connections and the agent's last hop), both directions.
fn tc_tunnel_bytes(lab: &Lab) -> u64 {
    let maps = Maps::open(&lab.pin_dir).expect("maps");
    let mut total = 0;
    for item in maps.counters.iter() {
        let (k, per_cpu) = item.expect("counter");
        if k.hook == HOOK_TUNNEL {
            total += per_cpu.iter().map(|c| c.bytes_in + c.bytes_out).sum::<u64>();
        }
    }
    total
}

fn counters(lab: &Lab) -> FastpathCounter {
    let maps = Maps::open(&lab.pin_dir).expect("maps");
    fast_path_counters(&maps.fastpath_counters).expect("fast path counters")
}

/// The checks both configurations share: the transfer is exact both ways across a half-close, an
/// unchanged client is served, and a denied connection is refused.
fn check_the_mesh(lab: &Lab, net: u8) -> Transfer {
    let mut sink = sink(lab);
    let t = transfer(lab, ip(net, 3));
    eprintln!("transfer: {t:?}");
    let _ = sink.kill();
    let _ = sink.wait();
    assert!(t.error.is_empty(), "transfer failed: {t:?}\n{}", log(lab));
    assert_eq!((t.sent, t.received), (SIZE, SIZE), "every byte both ways: {t:?}");
    assert!(t.exact, "the bytes came back intact and in order: {t:?}");

    let p = lab.echo("a", ip(net, 3), PORT, "unchanged client");
    assert_eq!(p.result, "allowed", "warden-probe echo a -> b: {p:?}\n{}", log(lab));
    assert_eq!(p.intact, Some(true));
    let seen = p.seen_as.clone().unwrap_or_default();
    assert!(seen.starts_with(&format!("{}:", ip(net, 2))), "b sees a's own address: {seen}");

    let p = lab.probe("c", "b", PORT);
    assert_ne!(p.result, "allowed", "c is denied by b's policy: {p:?}");
    t
}

#[test]
fn fast_path_carries_a_same_node_connection_through_the_sock_hash() {
    if !require_root("fast_path_carries_a_same_node_connection_through_the_sock_hash") {
        return;
    }
    let net = 81;
    let lab = node("fpon", net, &["--fast-path"]);
    assert!(log(&lab).contains("same-node fast path on"), "the agent attached to its cgroup:\n{}", log(&lab));
    let (before, tc_before) = (counters(&lab), tc_tunnel_bytes(&lab));
    let t = check_the_mesh(&lab, net);
    // Not asserted: a kernel behaviour of sock-map sockets, documented in docs/mesh.md.
    eprintln!("{} blocking reads returned EAGAIN early ({} ms)", t.spurious_eagain, t.ms);
    let (after, tc_after) = (counters(&lab), tc_tunnel_bytes(&lab));

    // Each byte crosses four sockets' sends (a -> agent -> b, and back); all were redirected.
    let redirected = after.redirected_bytes - before.redirected_bytes;
    assert!(
        redirected >= 4 * SIZE,
        "{redirected} bytes redirected, expected at least {}: {before:?} -> {after:?}",
        4 * SIZE
    );
    assert!(after.sockets - before.sockets >= 4, "both pairs filed: {after:?}");
    // The veths saw the handshakes and FINs, not the data.
    let tc = tc_after - tc_before;
    assert!(tc < SIZE / 100, "TC counted {tc} bytes on the mesh's hops: the data took the veth");
}

#[test]
fn without_the_fast_path_the_same_connection_takes_tcp() {
    if !require_root("without_the_fast_path_the_same_connection_takes_tcp") {
        return;
    }
    let net = 82;
    let lab = node("fpoff", net, &["--no-fast-path"]);
    let tc_before = tc_tunnel_bytes(&lab);
    let t = check_the_mesh(&lab, net);
    assert_eq!(t.spurious_eagain, 0, "plain TCP sockets never return EAGAIN to a blocking read early");
    let c = counters(&lab);
    assert_eq!((c.sockets, c.redirected_bytes), (0, 0), "nothing filed, nothing redirected: {c:?}");
    let tc = tc_tunnel_bytes(&lab) - tc_before;
    assert!(tc >= 2 * SIZE, "TC counted {tc} bytes on the mesh's hops; the data took the veths");
}

/// `b` refuses `a` as well.
const DENY_A: (&str, &str) = (
    "deny-a.yaml",
    "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-deny-a, namespace: team}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/team/sa/a]}}]
",
);

/// An established a -> b connection, then a policy that denies it: the connection stops, with
/// the fast path as without it (TC decides the flow again under the new generation; the fast
/// path's sockets fall back to TCP at their next send, so TC sees their bytes).
fn policy_change_stops_an_established_connection(tag: &str, net: u8, switch: &str) -> (Probe, FastpathCounter) {
    let mut lab = node(tag, net, &[switch]);
    let args = ["hold", &format!("{}:{PORT}", ip(net, 3)), "--seconds", "4", "--interval-ms", "50"].map(String::from);
    let mut hold = lab
        .command_in("a", &probe_bin(), &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("warden-probe hold");
    let mut stderr = BufReader::new(hold.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "established", "the held connection opened:\n{}", log(&lab));
    // Some round trips first, on the fast path when it is on.
    std::thread::sleep(Duration::from_millis(400));
    let before = lab.generation();
    write_policies(&lab.dir.join("policies"), &[POLICIES[0], DENY_A]).unwrap();
    lab.wait_generation_change(before, Duration::from_secs(10)).expect("the agent commits the change");
    let out = hold.wait_with_output().expect("hold");
    let p: Probe = serde_json::from_slice(&out.stdout).expect("hold's report");
    (p, counters(&lab))
}

#[test]
fn a_policy_change_stops_an_established_connection_as_without_the_fast_path() {
    if !require_root("a_policy_change_stops_an_established_connection_as_without_the_fast_path") {
        return;
    }
    let (on, c) = policy_change_stops_an_established_connection("fppon", 83, "--fast-path");
    assert!(on.round_trips.unwrap_or(0) > 0, "round trips before the change: {on:?}");
    assert_ne!(on.result, "allowed", "the denied connection stops with the fast path: {on:?}");
    assert!(c.redirected_msgs > 0 && c.fallbacks > 0, "it took the fast path, then fell back to TCP: {c:?}");
    let (off, c) = policy_change_stops_an_established_connection("fppoff", 84, "--no-fast-path");
    assert!(off.round_trips.unwrap_or(0) > 0, "round trips before the change: {off:?}");
    assert_ne!(off.result, "allowed", "the denied connection stops without the fast path: {off:?}");
    assert_eq!(c.redirected_msgs, 0, "{c:?}");
    assert_eq!(on.result, off.result, "the same outcome: {on:?} / {off:?}");
}

/// `b` reads nothing for [`SLOW_MS`] after it accepts, then reads as the sink does.
const SLOW_MS: u64 = 1500;

/// A redirected send leaves the sender at once, so without a bound a reader that does not keep up
/// would have its queue grow with everything the sender has (until the node's TCP memory runs out
/// and the sender's `write()` fails with ENOMEM). With the bound, the agent's sends to `b` are
/// redirected until `b`'s queue holds about the node's largest TCP receive buffer, then take TCP,
/// whose window makes the agent (and through it `a`) wait: `b`'s queue, measured with `FIONREAD`
/// after the pause, holds the bound and not the whole transfer, and every byte still arrives in
/// order.
#[test]
fn a_slow_reader_bounds_the_redirected_queue_and_its_sender_falls_back_to_tcp() {
    if !require_root("a_slow_reader_bounds_the_redirected_queue_and_its_sender_falls_back_to_tcp") {
        return;
    }
    let net = 85;
    // The bound is the node's largest TCP receive buffer: 4 MiB here, so the transfer is six
    // times it (this machine's default is 32 MiB).
    let lab = node_with("fpslow", net, &["--fast-path"], &["net.ipv4.tcp_rmem=4096 131072 4194304"]);
    let text = log(&lab);
    let limit: u64 = text
        .lines()
        .find(|l| l.contains("same-node fast path on"))
        .and_then(|l| l.split("queue_limit=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the agent logs the queue limit:\n{text}"));
    assert!(SIZE > 2 * limit, "the transfer ({SIZE} bytes) must be larger than the bound ({limit}) to test it");
    let before = counters(&lab);

    let (mut sink, lines) = sink_as(&lab, &format!("slow-sink {SINK_PORT} {SLOW_MS}"));
    let t = transfer(&lab, ip(net, 3));
    let queued: u64 = lines
        .recv_timeout(Duration::from_secs(5))
        .ok()
        .and_then(|l| l.strip_prefix("queued ").and_then(|n| n.parse().ok()))
        .expect("the slow sink reports its queue");
    let _ = sink.kill();
    let _ = sink.wait();
    let after = counters(&lab);
    eprintln!("transfer: {t:?}; b's queue after {SLOW_MS} ms: {queued} bytes (bound {limit}); {before:?} -> {after:?}");

    assert!(t.error.is_empty(), "no write failed (ENOMEM before the bound): {t:?}\n{}", log(&lab));
    assert_eq!((t.sent, t.received), (SIZE, SIZE), "every byte both ways: {t:?}");
    assert!(t.exact, "the bytes came back intact and in order across the fallback: {t:?}");
    // The agent's last send before the fallback is at most one relay chunk (256 KiB).
    assert!(
        queued <= limit && queued + (256 << 10) >= limit,
        "b's redirected queue held {queued} bytes: filled up to the bound {limit}, not past it"
    );
    assert!(after.backlog_fallbacks > before.backlog_fallbacks, "the agent's socket to b fell back: {after:?}");
    assert!(after.redirected_bytes > before.redirected_bytes, "it was redirected first: {after:?}");

    // Operators see the same on the metrics port.
    let m = lab.metrics();
    let value = |series: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in:\n{m}"))
    };
    assert_eq!(value("warden_fastpath_fallbacks_total{reason=\"backlog\"} "), after.backlog_fallbacks, "{m}");
    assert_eq!(value("warden_fastpath_redirected_bytes_total "), after.redirected_bytes, "{m}");
    // And `warden maps`, from the pins.
    let maps: serde_json::Value = serde_json::from_str(&lab.warden(&["maps", "--output", "json"]).unwrap()).unwrap();
    let f = &maps["fast_path"];
    assert_eq!(f["on"], true, "{f}");
    assert_eq!(f["queue_limit"], 4_194_304, "{f}");
    assert_eq!(f["counters"]["fallbacks_backlog"], after.backlog_fallbacks, "{f}");
    let text = lab.warden(&["maps"]).unwrap();
    assert!(text.contains("FAST PATH  on  redirected queues bounded at 4194304 bytes"), "{text}");
}

/// The two ends of the transfer, run by the tests above inside workloads (`WARDEN_FASTPATH_HELPER`):
/// - `sink PORT`: prints `listening`, then per connection reads to end of stream, sends every
///   byte back XORed with [`XOR`], and closes;
/// - `slow-sink PORT MS`: as `sink`, but first waits MS after accepting and prints `queued N`,
///   the bytes waiting to be read (`FIONREAD`);
/// - `send IP:PORT BYTES`: sends BYTES pseudo-random bytes, half-closes, reads to end of stream
///   and prints a [`Transfer`] as JSON.
#[test]
#[ignore = "run by the tests of this file inside a workload"]
fn helper() {
    let Ok(role) = std::env::var(HELPER_ENV) else { return };
    let args: Vec<&str> = role.split_whitespace().collect();
    match args.as_slice() {
        ["sink", port] => {
            let l = TcpListener::bind(("0.0.0.0", port.parse::<u16>().unwrap())).unwrap();
            println!("listening");
            std::io::stdout().flush().unwrap();
            for conn in l.incoming() {
                echo_xor(conn.unwrap());
            }
        }
        ["slow-sink", port, ms] => {
            let l = TcpListener::bind(("0.0.0.0", port.parse::<u16>().unwrap())).unwrap();
            println!("listening");
            std::io::stdout().flush().unwrap();
            for conn in l.incoming() {
                let conn = conn.unwrap();
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
                println!("queued {}", queued(&conn));
                std::io::stdout().flush().unwrap();
                echo_xor(conn);
            }
        }
        ["send", addr, bytes] => {
            let addr: SocketAddr = addr.parse().unwrap();
            let size: u64 = bytes.parse().unwrap();
            let result = send(addr, size).unwrap_or_else(
                |e| serde_json::json!({"sent": 0, "received": 0, "exact": false, "error": e.to_string()}),
            );
            println!("{result}");
        }
        _ => panic!("{HELPER_ENV}={role}: unknown role"),
    }
}

/// Read to end of stream, send every byte back XORed with [`XOR`], close.
fn echo_xor(mut conn: TcpStream) {
    let mut all = Vec::new();
    conn.read_to_end(&mut all).unwrap();
    all.iter_mut().for_each(|b| *b ^= XOR);
    conn.write_all(&all).unwrap();
}

/// The bytes waiting to be read on `conn` (`FIONREAD`; for a socket in a sock map, kernel 6.18
/// counts its redirected queue).
fn queued(conn: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd as _;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer.
    let rc = unsafe { libc::ioctl(conn.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as u64
}

/// The byte at `i` of the pseudo-random stream (a position hash: no state to share).
fn byte_at(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (x >> 29) as u8
}

fn send(addr: SocketAddr, size: u64) -> std::io::Result<serde_json::Value> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut w = s.try_clone()?;
    let start = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        while sent < size {
            let n = buf.len().min((size - sent) as usize);
            buf[..n].iter_mut().enumerate().for_each(|(j, b)| *b = byte_at(sent + j as u64));
            w.write_all(&buf[..n]).map_err(|e| std::io::Error::new(e.kind(), format!("write at {sent}: {e}")))?;
            sent += n as u64;
        }
        // Half-close: the sink answers only after this.
        w.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut r = s;
    let (mut received, mut exact, mut spurious) = (0u64, true, 0u64);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let asked = Instant::now();
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            // A blocking read of a socket in a sock map can return EAGAIN long before its timeout
            // when something else wakes the socket's waiters (here: this socket's own writer);
            // see docs/mesh.md. Counted and retried.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && asked.elapsed() < READ_TIMEOUT / 2 => {
                spurious += 1;
                continue;
            }
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("read at {received}: {e}"))),
        };
        if n == 0 {
            break;
        }
        exact &= buf[..n].iter().enumerate().all(|(j, b)| *b == byte_at(received + j as u64) ^ XOR);
        received += n as u64;
    }
    let sent = writer.join().expect("writer")?;
    let ms = start.elapsed().as_millis() as u64;
    Ok(serde_json::json!({"sent": sent, "received": received, "exact": exact, "spurious_eagain": spurious, "ms": ms}))
}
