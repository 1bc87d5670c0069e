//! `cargo xtask bench mtls`: what the mTLS data plane costs, against direct TCP on the same lab
//! path, side by side in one invocation.
//!
//! One two-node cluster: two lab nodes joined by a veth wire, both agents with `--mesh
//! --no-fast-path` and one CA, no policies (everything allowed, so only the data plane is
//! measured). Node 1 holds the clients `client` (meshed) and `client-plain` (labelled
//! `istio.io/dataplane-mode: none`) and the servers `near` (meshed) and `near-plain`; node 2 the
//! servers `far` and `far-plain`. Nodes 3 and 4, wired to each other, run their agents with
//! `--fast-path` and hold `client` and `near`, and `far` (the fast path is a node's switch, so its
//! rows need their own nodes). Every server runs `warden-probe serve` and `iperf3 -s`. The rows:
//!
//! | row                          | client -> server            | path                                          |
//! |------------------------------|-----------------------------|-----------------------------------------------|
//! | (1) direct TCP, same node    | client-plain -> near-plain  | routed by node 1                              |
//! | (2) warden, same node        | client -> near              | captured, authorized, delivered by agent 1    |
//! | (2f) warden + fast path      | client -> near on node 3    | as (2), agent 3, bytes through the sock hash  |
//! | (3) direct TCP, cross node   | client-plain -> far-plain   | routed over the wire                          |
//! | (4) warden, cross node       | client -> far               | agent 1 -> HBONE (mTLS 1.3, 15008) -> agent 2 |
//! | (4f) warden + fast path      | client (3) -> far (4)       | as (4), agents 3 and 4; their hops to their own workloads through the sock hash |
//! | (5) TCP relay pair, cross    | client-plain -> far-plain   | plain TCP through a relay in node 1's namespace and one in node 2's |
//!
//! Row (5) is the reference for the cross-node rows: the least any pair of user-space proxies does
//! on that path (a thread per direction, read and write, no TLS, no HTTP/2, no event loop). What it
//! adds to row (3) is the price of the two extra hops on this machine; what row (4) adds to it is
//! warden's own.
//!
//! The direct rows run with both agents up and warden's programs on every veth (the workloads are
//! only out of the mesh), so they pay warden's L4 datapath too and a ratio isolates the mesh.
//! Before measuring, each row is checked to take the path it claims (a connection of a warden row
//! is an established socket on the agent's capture port; one of a direct row is not; the fast
//! path's row moved its greeting through the sock hash). Row (2f)'s ratios are against row (1).
//!
//! Figures per row, medians of [`REPEAT`] with the rows interleaved so drift hits all alike:
//! - throughput: `iperf3`, one stream, [`SECONDS`] s; the agents' CPU (utime + stime of both
//!   agent processes) per GB received;
//! - latency: p50/p99 of a [`MESSAGE`]-byte echo on one long connection ([`ROUND_TRIPS`] after
//!   [`WARMUP`]), timed by this binary's hidden `bench-client latency` in the client's network
//!   namespace and cgroup (where the kernel's capture applies);
//! - new connections per second: `warden-probe rate` (connect, read the greeting, close with RST),
//!   2 threads, [`SECONDS`] s; and the agents' CPU per connection.
//!
//! Then the agents' resident memory (`VmRSS`): idle before any traffic, with [`HOLD`] connections
//! open through the mesh across nodes (`bench-client hold`), and idle again [`IDLE_AFTER`] after
//! they close.
//!
//! The table shows each figure beside its target, met or not, then every repeat's values and the
//! TIME-WAIT sockets in the server's node namespace as each rate run starts (a warden row's last
//! hop is the agent's own connection, so its TIME-WAIT stays on the node, not in the client).
//!
//! `BENCH_MTLS_HOLD=FILE cargo xtask bench mtls` measures nothing: it sets the cluster up, prints
//! each workload's network namespace and cgroup and each agent's pid, creates FILE and holds the
//! cluster until FILE is removed (for `perf` and runs by hand on the benchmark's own paths).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use warden_tests::{Lab, Spec, probe_bin, run};

use crate::process::{cpu_seconds, machine_busy_seconds};

const TAGS: [&str; 4] = ["bmtls1", "bmtls2", "bmtls3", "bmtls4"];
const NAMESPACE: &str = "bench";
/// `warden-probe serve` (greeting, then echo) on every server.
const PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
/// The agent's capture listener and HBONE port (the defaults of `--mesh`).
const CAPTURE_PORT: u16 = 15001;
const HBONE_PORT: u16 = 15008;
/// Seconds of each throughput and connection-rate run.
const SECONDS: u64 = 5;
/// Repetitions per figure; the median is reported.
const REPEAT: usize = 3;
/// Echo size of the latency figure, newline included.
const MESSAGE: usize = 64;
const WARMUP: usize = 2_000;
const ROUND_TRIPS: usize = 20_000;
/// Connections held open for the memory figure.
const HOLD: usize = 1_000;
/// How long an idle agent is left before its memory is read.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the agents are left idle after the held connections close before their memory is
/// read: past the agent's quiet time (`memory::QUIET_FOR`, 5 s, after which it releases the
/// code its traffic mapped) and one more tick of its trimmer.
const IDLE_AFTER: Duration = Duration::from_secs(8);

/// The targets beside the figures.
const MIN_THROUGHPUT_RATIO: f64 = 0.45;
const MAX_CPU_S_PER_GB: f64 = 0.9;
const MIN_CONN_RATIO: f64 = 0.25;
const MAX_ADDED_P99_US: f64 = 60.0;
const MAX_RSS_IDLE_MIB: f64 = 12.0;
const MAX_RSS_HOLD_MIB: f64 = 20.0;

const fn node1(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 61, 1, host)
}
const fn node2(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 61, 2, host)
}
const fn node3(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 61, 3, host)
}
const fn node4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 61, 4, host)
}
/// A node's address on every host veth, as its workloads see it (`warden_tests::GATEWAY`): where
/// row (5)'s client finds node 1's relay.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The relays' read buffer (the largest read warden's relay makes, too).
const RELAY_BUFFER: usize = 256 * 1024;

/// One row: a client and a server, and the path between them.
struct Row {
    name: &'static str,
    client: &'static str,
    server: &'static str,
    /// Where the client connects: the server, or for the relay row node 1's relay.
    ip: Ipv4Addr,
    meshed: bool,
    /// The server is on another node (node 2, or node 4 for the fast path's pair).
    cross: bool,
    /// Client and server are on the fast path's nodes (3, and 4 across).
    fast: bool,
    /// Plain TCP through [`relay`]s on nodes 1 and 2, no TLS, no HTTP/2: what two user-space
    /// hops cost on this machine, whoever runs them.
    relay: bool,
    /// The direct row this row is compared with.
    base: usize,
}

const fn row(name: &'static str, client: &'static str, server: &'static str, ip: Ipv4Addr, base: usize) -> Row {
    Row { name, client, server, ip, meshed: false, cross: false, fast: false, relay: false, base }
}

const ROWS: [Row; 7] = [
    row("(1) direct TCP, same node", "client-plain", "near-plain", node1(5), 0),
    Row { meshed: true, ..row("(2) warden, same node", "client", "near", node1(4), 0) },
    Row { meshed: true, fast: true, ..row("(2f) warden + fast path", "client", "near", node3(4), 0) },
    Row { cross: true, ..row("(3) direct TCP, cross node", "client-plain", "far-plain", node2(3), 3) },
    Row { meshed: true, cross: true, ..row("(4) warden, cross node", "client", "far", node2(2), 3) },
    Row {
        meshed: true,
        cross: true,
        fast: true,
        ..row("(4f) warden + fast path, cross", "client", "far", node4(2), 3)
    },
    Row { cross: true, relay: true, ..row("(5) TCP relay pair, cross", "client-plain", "far-plain", GATEWAY, 3) },
];

/// Index of row (4) in [`ROWS`] (the memory figures hold its connections).
const CROSS: usize = 4;

/// What the repeats of one row measured.
#[derive(Default)]
struct Figures {
    gbps: Vec<f64>,
    /// Bytes received by the iperf3 servers, and the agents' CPU seconds meanwhile.
    bytes: f64,
    bulk_cpu: f64,
    /// The whole machine's busy CPU seconds during the iperf3 runs (both ends, the agents, the
    /// kernel's softirq work wherever it is charged).
    bulk_machine_cpu: f64,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    conn_per_s: Vec<f64>,
    connections: u64,
    errors: u64,
    /// What the failed connections of the rate runs failed with (`warden-probe rate`'s
    /// `error_kinds`: the error and when), and how many.
    error_kinds: std::collections::BTreeMap<String, u64>,
    /// The agents' CPU seconds during the connection-rate runs.
    churn_cpu: f64,
    /// TIME-WAIT sockets in the server's node namespace as each rate run starts.
    time_wait: Vec<usize>,
    /// Throughput runs of the fast path's row that failed (reported, not fatal: what a workload
    /// would see).
    failed: Vec<String>,
}

/// A row's reported figures; ratios and added latency against `base`, its direct row.
struct Summary {
    gbps: f64,
    gbps_ratio: f64,
    p50_us: f64,
    p99_us: f64,
    added_p50_us: f64,
    added_p99_us: f64,
    conn_per_s: f64,
    conn_ratio: f64,
    cpu_s_per_gb: f64,
    machine_cpu_s_per_gb: f64,
    cpu_us_per_conn: f64,
}

impl Summary {
    fn new(f: &Figures, base: &Figures) -> Summary {
        Summary {
            gbps: median(&f.gbps),
            gbps_ratio: median(&f.gbps) / median(&base.gbps),
            p50_us: median(&f.p50_us),
            p99_us: median(&f.p99_us),
            added_p50_us: median(&f.p50_us) - median(&base.p50_us),
            added_p99_us: median(&f.p99_us) - median(&base.p99_us),
            conn_per_s: median(&f.conn_per_s),
            conn_ratio: median(&f.conn_per_s) / median(&base.conn_per_s),
            cpu_s_per_gb: f.bulk_cpu / (f.bytes / 1e9),
            machine_cpu_s_per_gb: f.bulk_machine_cpu / (f.bytes / 1e9),
            cpu_us_per_conn: f.churn_cpu / f.connections as f64 * 1e6,
        }
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The cluster and what runs in it.
struct Cluster {
    n1: Lab,
    n2: Lab,
    /// The fast path's nodes, wired to each other.
    n3: Lab,
    n4: Lab,
    /// The agent processes of nodes 1 to 4.
    agents: [u32; 4],
    /// Row (5)'s relays, in the node namespaces of nodes 1 and 2.
    relays: [Child; 2],
    iperf: Vec<Child>,
}

impl Cluster {
    fn up() -> anyhow::Result<Cluster> {
        let plain = |name: &str, ip, ports: &[u16]| {
            let mut s = Spec::new(NAMESPACE, name, ip, ports);
            s.labels.push(("istio.io/dataplane-mode".into(), "none".into()));
            s
        };
        let specs1 = [
            Spec::new(NAMESPACE, "client", node1(2), &[]),
            plain("client-plain", node1(3), &[]),
            Spec::new(NAMESPACE, "near", node1(4), &[PORT]),
            plain("near-plain", node1(5), &[PORT]),
        ];
        let specs2 = [Spec::new(NAMESPACE, "far", node2(2), &[PORT]), plain("far-plain", node2(3), &[PORT])];
        let specs3 = [Spec::new(NAMESPACE, "client", node3(2), &[]), Spec::new(NAMESPACE, "near", node3(4), &[PORT])];
        let specs4 = [Spec::new(NAMESPACE, "far", node4(2), &[PORT])];
        let mut n1 = Lab::up(TAGS[0], &specs1)?;
        let mut n2 = Lab::up(TAGS[1], &specs2)?;
        let mut n3 = Lab::up(TAGS[2], &specs3)?;
        let mut n4 = Lab::up(TAGS[3], &specs4)?;
        Lab::wire(&mut n1, &mut n2)?;
        Lab::wire(&mut n3, &mut n4)?;
        // Whoever closes first keeps the TIME-WAIT socket: the clients, and on the warden rows also
        // the agent's last hop (it relays the client's FIN). At thousands of connections a second to
        // one server, every port is in TIME-WAIT within seconds and connect()'s port search then
        // costs more than anything measured (the rate fell tenfold in a second repeat). Every
        // namespace that connects reuses TIME-WAIT ports (RFC 7323 timestamps keep that safe), the
        // direct rows' clients as much as the agents'.
        for (lab, client) in [(&n1, "client"), (&n1, "client-plain"), (&n3, "client")] {
            let netns = lab.member(client).netns.clone();
            run(&["ip", "netns", "exec", &netns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
            run(&["ip", "netns", "exec", &netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        }
        for lab in [&n1, &n2, &n3, &n4] {
            run(&["ip", "netns", "exec", &lab.node, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        }
        // One CA for the cluster, as in tests/tests/mesh.rs.
        let ca = n1.dir.join("ca");
        fs::create_dir_all(&ca)?;
        for (lab, switch) in [
            (&mut n1, "--no-fast-path"),
            (&mut n2, "--no-fast-path"),
            (&mut n3, "--fast-path"),
            (&mut n4, "--fast-path"),
        ] {
            let policies = lab.dir.join("policies");
            warden_tests::write_policies(&policies, &[])?;
            lab.start_mesh_agent_with(&policies, &ca, &[switch])
                .with_context(|| format!("{}: starting the mesh agent", lab.tag))?;
        }
        let pid = |lab: &Lab| lab.agent_pid().with_context(|| format!("{}: no agent process", lab.tag));
        let agents = [pid(&n1)?, pid(&n2)?, pid(&n3)?, pid(&n4)?];
        if GATEWAY.to_string() != warden_tests::GATEWAY {
            bail!("the relay row dials {GATEWAY}, but the lab's gateway is {}", warden_tests::GATEWAY);
        }
        // Row (5): node 1's relay takes the client's connection on the ports the servers use and
        // connects over the wire to node 2's, which connects to far-plain.
        let far_plain = ROWS[3].ip;
        let wire = |lab: &Lab| lab.wire.clone().map(|(_, ip)| ip).context("the node is not wired");
        let to = |ip: Ipv4Addr| [PORT, IPERF_PORT].map(|port| format!("0.0.0.0:{port}={ip}:{port}"));
        let relays = [relay(&n1, &to(wire(&n2)?))?, relay(&n2, &to(far_plain))?];
        let mut iperf = Vec::new();
        for (lab, server) in
            [(&n1, "near"), (&n1, "near-plain"), (&n2, "far"), (&n2, "far-plain"), (&n3, "near"), (&n4, "far")]
        {
            let child = lab
                .command_in(server, "iperf3".as_ref(), &["-s".into(), "-p".into(), IPERF_PORT.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting iperf3 -s")?;
            iperf.push(child);
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(Cluster { n1, n2, n3, n4, agents, relays, iperf })
    }

    /// The node of `row`'s client.
    fn client_node(&self, row: &Row) -> &Lab {
        if row.fast { &self.n3 } else { &self.n1 }
    }

    /// The node of `row`'s server.
    fn server_node(&self, row: &Row) -> &Lab {
        match (row.cross, row.fast) {
            (false, _) => self.client_node(row),
            (true, false) => &self.n2,
            (true, true) => &self.n4,
        }
    }

    /// The CPU seconds so far of what relays `row`'s bytes: the agents (all four processes, all
    /// threads, user and system; those a row does not use are idle), or row (5)'s relays.
    fn proxy_cpu(&self, row: &Row) -> anyhow::Result<f64> {
        let mut s = 0.0;
        if row.relay {
            for r in &self.relays {
                s += cpu_seconds(r.id()).with_context(|| format!("relay pid {}", r.id()))?;
            }
            return Ok(s);
        }
        for (pid, lab) in self.agents.iter().zip([&self.n1, &self.n2, &self.n3, &self.n4]) {
            s += cpu_seconds(*pid)
                .with_context(|| format!("agent of {} (pid {pid}); log: {}", lab.tag, log_tail(lab)))?;
        }
        Ok(s)
    }

    /// `bench-client ARGS` in the namespace and cgroup of `row`'s client.
    fn client(&self, row: &Row, args: &[String]) -> std::process::Command {
        let mut v = vec!["bench-client".to_string()];
        v.extend_from_slice(args);
        self.client_node(row).command_in(row.client, &xtask_bin(), &v)
    }

    /// Hold `count` connections from `row`'s client to its server; returns the holder once they are
    /// open (closing its stdin releases them) and what it reported.
    fn hold(&self, row: &Row, count: usize) -> anyhow::Result<(Child, serde_json::Value)> {
        let args = ["hold".into(), format!("{}:{PORT}", row.ip), "--count".into(), count.to_string()];
        let (child, line) = spawn_until_first_line(self.client(row, &args).stdin(Stdio::piped()), "bench-client hold")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("bench-client hold reported {line:?}"))?;
        Ok((child, v))
    }

    /// Established sockets in `lab`'s node namespace whose `side` (`sport`/`dport`) is `port`.
    fn sockets(&self, lab: &Lab, side: &str, port: u16) -> anyhow::Result<usize> {
        count_sockets(lab, &["state", "established", &format!("( {side} = :{port} )")])
    }

    /// Check that `row` takes the path it names: one held connection is (or is not) a socket on
    /// the agent's capture port, and a cross-node warden row's travels over HBONE.
    fn check_path(&self, row: &Row) -> anyhow::Result<String> {
        let redirected = fast_path_redirected(&self.n3)?;
        let (mut holder, v) = self.hold(row, 1)?;
        let node = self.client_node(row);
        let (captured, hbone) = (self.sockets(node, "sport", CAPTURE_PORT)?, self.sockets(node, "dport", HBONE_PORT)?);
        let relayed = (self.sockets(&self.n1, "sport", PORT)?, self.sockets(&self.n2, "sport", PORT)?);
        let redirected = fast_path_redirected(&self.n3)? - redirected;
        drop(holder.stdin.take());
        let _ = holder.wait();
        if v["open"] != 1 {
            bail!("{}: no connection: {v}\n{}", row.name, self.logs());
        }
        if row.meshed != (captured > 0) {
            bail!(
                "{}: {captured} connections on the capture port {CAPTURE_PORT}; expected meshed={}",
                row.name,
                row.meshed
            );
        }
        if row.meshed && row.cross && hbone == 0 {
            bail!("{}: captured, but no HBONE connection from {} to {HBONE_PORT}", row.name, node.tag);
        }
        if row.relay != (relayed.0 > 0 && relayed.1 > 0) {
            bail!(
                "{}: {} and {} connections accepted by the relays of nodes 1 and 2; expected relay={}",
                row.name,
                relayed.0,
                relayed.1,
                row.relay
            );
        }
        if row.fast != (redirected > 0) {
            bail!("{}: {redirected} bytes through the fast path's sock hash; expected fast={}", row.name, row.fast);
        }
        Ok(match (row.meshed, row.cross, row.fast) {
            (false, _, _) if row.relay => {
                "not captured (plain TCP), through a relay in node 1's namespace and one in node 2's".into()
            }
            (false, _, _) => "not captured (plain TCP)".into(),
            (true, false, false) => format!("captured by agent 1 ({CAPTURE_PORT}), delivered on the node"),
            (true, false, true) => format!(
                "captured by agent 3 ({CAPTURE_PORT}), delivered on the node; the greeting took the sock hash \
                 ({redirected} bytes redirected)"
            ),
            (true, true, false) => format!("captured by agent 1 ({CAPTURE_PORT}), HBONE to {}:{HBONE_PORT}", row.ip),
            (true, true, true) => format!(
                "captured by agent 3 ({CAPTURE_PORT}), HBONE to {}:{HBONE_PORT}; the greeting took the sock hash \
                 ({redirected} bytes redirected)",
                row.ip
            ),
        })
    }

    fn throughput(&self, row: &Row, f: &mut Figures) -> anyhow::Result<()> {
        let args = ["-c", &row.ip.to_string(), "-p", &IPERF_PORT.to_string(), "-t", &SECONDS.to_string(), "-J"];
        let (cpu0, machine0) = (self.proxy_cpu(row)?, machine_busy_seconds()?);
        let out = self
            .client_node(row)
            .command_in(row.client, "iperf3".as_ref(), &args.map(String::from))
            .output()
            .context("iperf3")?;
        let (cpu1, machine1) = (self.proxy_cpu(row)?, machine_busy_seconds()?);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{}: iperf3 JSON; stderr {}", row.name, String::from_utf8_lossy(&out.stderr)))?;
        if let Some(e) = v["error"].as_str() {
            if row.fast {
                f.failed.push(format!("iperf3: {e}"));
                return Ok(());
            }
            bail!("{}: iperf3: {e}\n{}", row.name, self.logs());
        }
        let received = &v["end"]["sum_received"];
        f.gbps.push(received["bits_per_second"].as_f64().context("iperf3 result")? / 1e9);
        f.bytes += received["bytes"].as_f64().context("iperf3 bytes")?;
        f.bulk_cpu += cpu1 - cpu0;
        f.bulk_machine_cpu += machine1 - machine0;
        Ok(())
    }

    fn latency(&self, row: &Row, f: &mut Figures) -> anyhow::Result<()> {
        let args = [
            "latency".into(),
            format!("{}:{PORT}", row.ip),
            "--warmup".into(),
            WARMUP.to_string(),
            "--count".into(),
            ROUND_TRIPS.to_string(),
        ];
        let out = self.client(row, &args).output().context("bench-client latency")?;
        if !out.status.success() {
            bail!("{}: bench-client latency: {}", row.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bench-client latency JSON")?;
        f.p50_us.push(v["p50_us"].as_f64().context("p50")?);
        f.p99_us.push(v["p99_us"].as_f64().context("p99")?);
        Ok(())
    }

    fn rate(&self, row: &Row, f: &mut Figures) -> anyhow::Result<()> {
        let args = [
            "rate".into(),
            format!("{}:{PORT}", row.ip),
            "--seconds".into(),
            SECONDS.to_string(),
            "--threads".into(),
            "2".into(),
        ];
        // Connections the node that delivers to the server closed first linger there in TIME-WAIT
        // (shown: they make the next runs' port allocation dearer).
        f.time_wait.push(count_sockets(self.server_node(row), &["state", "time-wait"])?);
        let cpu0 = self.proxy_cpu(row)?;
        let out =
            self.client_node(row).command_in(row.client, &probe_bin(), &args).output().context("warden-probe rate")?;
        let cpu1 = self.proxy_cpu(row)?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("probe rate JSON")?;
        let (n, errors) = (v["connections"].as_u64().unwrap_or(0), v["errors"].as_u64().unwrap_or(0));
        if n == 0 {
            bail!("{}: no connection succeeded: {v}\n{}", row.name, self.logs());
        }
        f.conn_per_s.push(v["per_second"].as_f64().unwrap_or(0.0));
        f.connections += n;
        f.errors += errors;
        for (what, n) in v["error_kinds"].as_object().into_iter().flatten() {
            *f.error_kinds.entry(what.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
        f.churn_cpu += cpu1 - cpu0;
        Ok(())
    }

    /// The last lines of the agents' logs (for errors).
    fn logs(&self) -> String {
        [&self.n1, &self.n2, &self.n3, &self.n4]
            .iter()
            .enumerate()
            .map(|(i, lab)| format!("node {} agent {}", i + 1, log_tail(lab)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Resident memory of both agents.
    fn rss(&self) -> anyhow::Result<[Rss; 2]> {
        Ok([Rss::of(self.agents[0])?, Rss::of(self.agents[1])?])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.iperf.iter_mut().chain(&mut self.relays) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Bytes the fast path of `lab`'s agent redirected so far (`warden_fastpath_counters_v2`, all
/// CPUs), read with bpftool.
fn fast_path_redirected(lab: &Lab) -> anyhow::Result<u64> {
    let pin = lab.pin_dir.join(warden_common::names::FASTPATH_COUNTERS);
    let out = run(&["bpftool", "-j", "map", "dump", "pinned", &pin.display().to_string()])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("bpftool map dump")?;
    // With BTF, bpftool prints the raw bytes and a `formatted` copy with field names.
    let entry = if v[0]["formatted"].is_object() { &v[0]["formatted"] } else { &v[0] };
    let mut total = 0;
    for cpu in entry["values"].as_array().with_context(|| format!("per-CPU values in bpftool's dump: {out}"))? {
        total += cpu["value"]["redirected_bytes"]
            .as_u64()
            .with_context(|| format!("redirected_bytes in bpftool's dump: {out}"))?;
    }
    Ok(total)
}

/// TCP sockets in `lab`'s node namespace matching the `ss` filter.
fn count_sockets(lab: &Lab, filter: &[&str]) -> anyhow::Result<usize> {
    let mut args = vec!["-Htn"];
    args.extend_from_slice(filter);
    let out = lab.node_command("ss", &args).output().context("ss")?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// The release build of this binary (the clients run as `xtask bench-client`).
fn xtask_bin() -> PathBuf {
    warden_tests::workspace_root().join("target/release/xtask")
}

/// An agent's resident memory, MiB.
#[derive(Clone, Copy)]
struct Rss {
    total: f64,
    anon: f64,
    file: f64,
}

impl Rss {
    fn of(pid: u32) -> anyhow::Result<Rss> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("agent pid {pid}"))?;
        let mib = |field: &str| -> anyhow::Result<f64> {
            let kib: f64 = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("{field} of pid {pid}"))?;
            Ok(kib / 1024.0)
        };
        Ok(Rss { total: mib("VmRSS:")?, anon: mib("RssAnon:")?, file: mib("RssFile:")? })
    }
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Padded as a whole, so table columns line up.
        let s = format!("{:.1} ({:.1} + {:.1})", self.total, self.anon, self.file);
        f.pad(&s)
    }
}

/// The last lines of a lab's agent log (for errors).
fn log_tail(lab: &Lab) -> String {
    let log = fs::read_to_string(lab.agent_log()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    format!("({})\n{}", lab.agent_log().display(), lines[lines.len().saturating_sub(15)..].join("\n"))
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT MET" }
}

/// `big_tcp`: BIG TCP on every lab link, all rows (`big_tcp.rs`); None: the kernel's 64 KiB.
pub fn mtls(big_tcp: Option<u32>) -> anyhow::Result<()> {
    let release = warden_tests::workspace_root().join("target/release");
    // SAFETY: set before any thread is spawned; the lab helpers and the agents read these.
    unsafe {
        std::env::set_var("WARDEN_BIN", release.join("warden"));
        std::env::set_var("WARDEN_PROBE_BIN", release.join("warden-probe"));
        // As bench l4's datapath rows: no access-log line per connection (it would load the
        // agents in the direct rows too).
        std::env::set_var("WARDEN_ACCESS_LOG", "off");
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_string();
    eprintln!("bench mtls: two nodes, mesh agents, one CA, no policies");
    let cluster = Cluster::up()?;
    let links = match big_tcp {
        Some(bytes) => {
            // Before any row's connection exists: TCP takes the sizes when a connection is set up.
            let mut set = 0;
            for lab in [&cluster.n1, &cluster.n2, &cluster.n3, &cluster.n4] {
                for netns in std::iter::once(&lab.node).chain(lab.members.iter().map(|m| &m.netns)) {
                    set += crate::big_tcp::set(netns, bytes)?.len();
                }
            }
            eprintln!("bench mtls: BIG TCP on {set} lab interfaces: gso_ipv4_max_size and gro_ipv4_max_size {bytes}");
            format!("BIG TCP on every lab link (gso/gro_ipv4_max_size {bytes})")
        }
        None => "lab links at the kernel's default 64 KiB GSO/GRO".to_string(),
    };
    std::thread::sleep(SETTLE);
    let idle = cluster.rss()?;
    let mut paths = Vec::new();
    for row in &ROWS {
        paths.push(cluster.check_path(row)?);
        eprintln!("bench mtls: {}: {}", row.name, paths.last().unwrap());
    }

    // For profiling by hand: the cluster as the benchmark measures it, held until the file is
    // removed.
    if let Ok(flag) = std::env::var("BENCH_MTLS_HOLD") {
        for lab in [&cluster.n1, &cluster.n2, &cluster.n3, &cluster.n4] {
            for m in &lab.members {
                eprintln!("HOLD {} {} netns={} cgroup={}", lab.tag, m.spec.name, m.netns, m.cgroup.display());
            }
            eprintln!("HOLD {} node={} agent={}", lab.tag, lab.node, lab.agent_pid().unwrap_or(0));
        }
        fs::write(&flag, "")?;
        while fs::metadata(&flag).is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
        return Ok(());
    }
    let mut figures: Vec<Figures> = ROWS.iter().map(|_| Figures::default()).collect();
    for rep in 1..=REPEAT {
        for (row, f) in ROWS.iter().zip(&mut figures) {
            eprintln!("bench mtls: [{rep}/{REPEAT}] {}: throughput", row.name);
            cluster.throughput(row, f)?;
        }
        for (row, f) in ROWS.iter().zip(&mut figures) {
            eprintln!("bench mtls: [{rep}/{REPEAT}] {}: latency", row.name);
            cluster.latency(row, f)?;
        }
        for (row, f) in ROWS.iter().zip(&mut figures) {
            eprintln!("bench mtls: [{rep}/{REPEAT}] {}: connection rate", row.name);
            cluster.rate(row, f)?;
        }
    }

    eprintln!("bench mtls: {HOLD} connections open through the mesh, cross node");
    let far = &ROWS[CROSS];
    let (mut holder, held) = cluster.hold(far, HOLD)?;
    std::thread::sleep(SETTLE);
    let holding = cluster.rss()?;
    let (captured, hbone) =
        (cluster.sockets(&cluster.n1, "sport", CAPTURE_PORT)?, cluster.sockets(&cluster.n1, "dport", HBONE_PORT)?);
    drop(holder.stdin.take());
    let _ = holder.wait();
    std::thread::sleep(IDLE_AFTER);
    let after = cluster.rss()?;
    let open = held["open"].as_u64().unwrap_or(0);

    let summary: Vec<Summary> =
        ROWS.iter().enumerate().map(|(i, row)| Summary::new(&figures[i], &figures[row.base])).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nmTLS data plane benchmark: warden's mesh (capture, HBONE over mTLS 1.3) against direct TCP on the same path"
    );
    let _ = writeln!(
        out,
        "(median of {REPEAT}, rows interleaved; {cpus} CPUs, load average {load} at start; all agents up in every row, \
         access log off, no policies; {links})"
    );
    let _ = writeln!(
        out,
        "direct = the same kind of client and server labelled istio.io/dataplane-mode: none, on warden's L4 datapath: \
         ratios isolate the mesh"
    );
    for (row, path) in ROWS.iter().zip(&paths) {
        let _ = writeln!(out, "  {:<31} {} -> {} ({}): {path}", row.name, row.client, row.server, row.ip);
    }
    let _ = writeln!(
        out,
        "\n{:<31} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>11} {:>10}",
        "configuration",
        "Gbit/s",
        "ratio",
        "p50 µs",
        "p99 µs",
        "+p50 µs",
        "+p99 µs",
        "conn/s",
        "ratio",
        "CPU s/GB",
        "CPU µs/conn",
        "node s/GB"
    );
    for (row, s) in ROWS.iter().zip(&summary) {
        let added = |v: f64| if row.meshed || row.relay { format!("{v:.1}") } else { "-".into() };
        let _ = writeln!(
            out,
            "{:<31} {:>7.2} {:>6.2} {:>8.1} {:>8.1} {:>8} {:>8} {:>8.0} {:>6.2} {:>9.3} {:>11.1} {:>10.3}",
            row.name,
            s.gbps,
            s.gbps_ratio,
            s.p50_us,
            s.p99_us,
            added(s.added_p50_us),
            added(s.added_p99_us),
            s.conn_per_s,
            s.conn_ratio,
            s.cpu_s_per_gb,
            s.cpu_us_per_conn,
            s.machine_cpu_s_per_gb,
        );
    }
    let _ = writeln!(
        out,
        "(ratios and added latency against the direct row of the same path, (1) or (3); CPU: utime + stime of all agents (row (5): of both \
         relays) during the iperf3 runs per GB received, and during the rate runs per connection; node s/GB: busy time of all CPUs (user, system, irq, softirq) during the \
         iperf3 runs per GB received, both ends and the agents, wherever the kernel charges its softirq work)"
    );
    let errors: Vec<String> = ROWS
        .iter()
        .zip(&figures)
        .filter(|(_, f)| f.errors > 0)
        .map(|(r, f)| {
            let kinds: Vec<String> = f.error_kinds.iter().map(|(what, n)| format!("{n}x {what}")).collect();
            format!("{}: {} of {} ({})", r.name, f.errors, f.errors + f.connections, kinds.join(", "))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "failed connections in the rate runs: {}", errors.join("; "));
    }
    for (row, f) in ROWS.iter().zip(&figures).filter(|(_, f)| !f.failed.is_empty()) {
        let _ = writeln!(
            out,
            "{}: {} of {REPEAT} throughput runs failed (left out of its figures): {}",
            row.name,
            f.failed.len(),
            f.failed.join("; ")
        );
    }
    let _ = writeln!(
        out,
        "\nper repeat, in run order          Gbit/s              p99 µs                 conn/s               \
         TIME-WAIT at the server's node before each rate run"
    );
    for (row, f) in ROWS.iter().zip(&figures) {
        let list = |v: &[f64], digits: usize| v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(" ");
        let tw: Vec<String> = f.time_wait.iter().map(usize::to_string).collect();
        let _ = writeln!(
            out,
            "{:<33} {:<19} {:<22} {:<20} {}",
            row.name,
            list(&f.gbps, 2),
            list(&f.p99_us, 1),
            list(&f.conn_per_s, 0),
            tw.join(" ")
        );
    }
    let _ = writeln!(
        out,
        "\nagent memory, MiB: VmRSS (= RssAnon, the heap and stacks + RssFile, mapped code and libraries)"
    );
    let _ = writeln!(out, "{:<40} {:<26} {:<26}", "", "node 1", "node 2");
    let _ = writeln!(out, "{:<40} {:<26} {:<26}", "idle, after start (no traffic yet)", idle[0], idle[1]);
    let _ = writeln!(
        out,
        "{:<40} {:<26} {:<26} (client -> far; {captured} sockets on the capture port, {hbone} HBONE connections)",
        format!("{open} connections open ({} failed)", held["errors"]),
        holding[0],
        holding[1]
    );
    let _ = writeln!(
        out,
        "{:<40} {:<26} {:<26}",
        format!("idle, {} s after they closed", IDLE_AFTER.as_secs()),
        after[0],
        after[1]
    );
    if open < HOLD as u64 {
        let _ = writeln!(out, "(only {open} of {HOLD} connections opened: {})", held["error"]);
    }

    let columns = [1, 2, CROSS, CROSS + 1, CROSS + 2];
    let _ = writeln!(
        out,
        "\n{:<48} {:<22} {:<22} {:<22} {:<22} {:<22}",
        "target", "(2) same node", "(2f) + fast path", "(4) cross node", "(4f) + fast path", "(5) relay pair, no TLS"
    );
    let mut target = |name: String, figure: fn(&Summary) -> f64, met: &dyn Fn(f64) -> bool, unit: &str| {
        let cells: Vec<String> = columns
            .iter()
            .map(|&i| {
                let v = figure(&summary[i]);
                // The relay pair is a reference, not warden: its figure, without a verdict.
                let verdict = if ROWS[i].relay { "(reference)" } else { verdict(met(v)) };
                format!("{:<22}", format!("{v:.2}{unit} {verdict}"))
            })
            .collect();
        let _ = writeln!(out, "{name:<48} {}", cells.join(" ").trim_end());
    };
    target(
        format!("throughput >= {:.0}% of direct TCP", MIN_THROUGHPUT_RATIO * 100.0),
        |s| s.gbps_ratio,
        &|r| r >= MIN_THROUGHPUT_RATIO,
        "",
    );
    target(format!("agents' CPU <= {MAX_CPU_S_PER_GB} s/GB"), |s| s.cpu_s_per_gb, &|v| v <= MAX_CPU_S_PER_GB, " s/GB");
    target(
        format!("new connections >= {:.0}% of direct", MIN_CONN_RATIO * 100.0),
        |s| s.conn_ratio,
        &|r| r >= MIN_CONN_RATIO,
        "",
    );
    target(
        format!("added p99 latency <= {MAX_ADDED_P99_US} µs"),
        |s| s.added_p99_us,
        &|v| v <= MAX_ADDED_P99_US,
        " µs",
    );
    let _ = writeln!(out, "{:<48} {:<22} {:<22}", "", "node 1", "node 2");
    let mut rss = |name: String, v: [Rss; 2], max: f64| {
        let cell = |v: Rss| format!("{:.1} MiB {}", v.total, verdict(v.total <= max));
        let _ = writeln!(out, "{name:<48} {:<22} {:<22}", cell(v[0]), cell(v[1]));
    };
    rss(format!("agent RSS <= {MAX_RSS_IDLE_MIB} MiB idle (no traffic yet)"), idle, MAX_RSS_IDLE_MIB);
    rss(format!("agent RSS <= {MAX_RSS_IDLE_MIB} MiB idle (after the run)"), after, MAX_RSS_IDLE_MIB);
    rss(format!("agent RSS <= {MAX_RSS_HOLD_MIB} MiB, {HOLD} open connections"), holding, MAX_RSS_HOLD_MIB);
    print!("{out}");
    drop(cluster);
    Ok(())
}

/// `cargo xtask bench-client` (hidden): the benchmark's clients, run by `bench mtls` inside a
/// workload's network namespace and cgroup.
///
/// - `latency IP:PORT [--warmup N] [--count N]`: one connection to `warden-probe serve`; after the
///   greeting, `MESSAGE`-byte lines echoed back one at a time; prints the percentiles as JSON.
/// - `hold IP:PORT [--count N]`: opens N connections (each greeted), prints `{"open": n, "errors":
///   e, "error": first}`, and holds them until stdin closes.
/// - `relay LISTEN=TARGET...`: row (5)'s relay, run in a node's namespace (see [`serve_relay`]).
pub fn client(args: &[String]) -> anyhow::Result<()> {
    let flag = |name: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => {
                args.get(i + 1).with_context(|| format!("{name} needs a value"))?.parse().context(name.to_string())
            }
            None => Ok(default),
        }
    };
    match args {
        [mode, addr, ..] if mode == "latency" => {
            latency(addr.parse().context("IP:PORT")?, flag("--warmup", WARMUP)?, flag("--count", ROUND_TRIPS)?)
        }
        [mode, addr, ..] if mode == "hold" => hold(addr.parse().context("IP:PORT")?, flag("--count", HOLD)?),
        [mode, pairs @ ..] if mode == "relay" && !pairs.is_empty() => serve_relay(pairs),
        _ => bail!(
            "usage: bench-client latency IP:PORT [--warmup N] [--count N] | hold IP:PORT [--count N] | relay \
             LISTEN=TARGET..."
        ),
    }
}

/// A connection to `warden-probe serve`, its greeting read.
fn greeted(addr: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    let timeout = Duration::from_secs(5);
    let s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    let mut r = BufReader::new(s);
    let mut hello = String::new();
    r.read_line(&mut hello).context("reading the greeting")?;
    if !hello.starts_with("hello ") {
        bail!("unexpected greeting {hello:?}");
    }
    Ok(r)
}

fn latency(addr: SocketAddr, warmup: usize, count: usize) -> anyhow::Result<()> {
    let mut r = greeted(addr)?;
    let mut message = vec![b'x'; MESSAGE - 1];
    message.push(b'\n');
    let mut back = vec![0; MESSAGE];
    let mut ns = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        r.get_ref().write_all(&message)?;
        r.read_exact(&mut back).with_context(|| format!("round trip {i}"))?;
        let dt = t.elapsed();
        if back != message {
            bail!("round trip {i}: the echo differs");
        }
        if i >= warmup {
            ns.push(dt.as_nanos() as u64);
        }
    }
    ns.sort_unstable();
    let pct = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)] as f64 / 1e3;
    let v = serde_json::json!({
        "round_trips": count, "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": pct(1.0),
    });
    println!("{v}");
    Ok(())
}

fn hold(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut open = Vec::with_capacity(count);
    let (mut errors, mut first) = (0, None);
    for _ in 0..count {
        match greeted(addr) {
            Ok(c) => open.push(c),
            Err(e) => {
                errors += 1;
                first.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", serde_json::json!({"open": open.len(), "errors": errors, "error": first}))?;
    stdout.flush()?;
    // Hold until the benchmark closes stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(open);
    Ok(())
}

/// Spawn `command` (its stderr inherited) and wait for the first line it prints: a client's
/// report, or a server saying it is ready.
fn spawn_until_first_line(command: &mut std::process::Command, what: &str) -> anyhow::Result<(Child, String)> {
    let mut child =
        command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().with_context(|| format!("starting {what}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("piped stdout")?)
        .read_line(&mut line)
        .with_context(|| format!("reading {what}"))?;
    Ok((child, line))
}

/// Start `bench-client relay` in `lab`'s node namespace, forwarding each `LISTEN=TARGET`; returns
/// once it listens.
fn relay(lab: &Lab, pairs: &[String]) -> anyhow::Result<Child> {
    let mut args = vec!["bench-client", "relay"];
    args.extend(pairs.iter().map(String::as_str));
    let (mut child, line) =
        spawn_until_first_line(&mut lab.node_command(&xtask_bin().display().to_string(), &args), "bench-client relay")?;
    if line.trim() != "listening" {
        let _ = child.kill();
        bail!("{}: the relay did not start (said {line:?})", lab.tag);
    }
    Ok(child)
}

/// The least a user-space relay does: per connection, a thread per direction reading up to
/// [`RELAY_BUFFER`] and writing it on, the peer's EOF passed on as a half-close; no TLS, no HTTP/2,
/// no event loop. Prints `listening` once every port is bound.
fn serve_relay(pairs: &[String]) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for pair in pairs {
        let (listen, target) = pair.split_once('=').with_context(|| format!("{pair:?}: expected LISTEN=TARGET"))?;
        let target: SocketAddr = target.parse().with_context(|| format!("{pair:?}: TARGET"))?;
        let listener = std::net::TcpListener::bind(listen).with_context(|| format!("{pair:?}: binding {listen}"))?;
        listeners.push((listener, target));
    }
    println!("listening");
    std::io::stdout().flush()?;
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|(listener, target)| std::thread::spawn(move || relay_from(listener, target)))
        .collect();
    for a in accepting {
        let _ = a.join();
    }
    Ok(())
}

/// Relay every connection `listener` accepts to `target`.
fn relay_from(listener: std::net::TcpListener, target: SocketAddr) {
    for client in listener.incoming().flatten() {
        std::thread::spawn(move || relay_connection(client, target));
    }
}

fn relay_connection(client: TcpStream, target: SocketAddr) {
    let Ok(server) = TcpStream::connect(target) else { return };
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else { return };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
    }
    let upstream = std::thread::spawn(move || pump(client2, server2));
    pump(server, client);
    let _ = upstream.join();
}

/// Copy `from` to `to` until EOF (then half-close `to`) or an error.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0; RELAY_BUFFER];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(std::net::Shutdown::Read);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Shutdown, TcpListener, TcpStream},
        thread,
    };

    /// Row (5)'s relay moves a stream intact both ways and passes a half-close on, so the other
    /// direction can still finish (what iperf3 and the echo rely on).
    #[test]
    fn the_relay_moves_both_directions_intact_and_passes_a_half_close_on() {
        // The server reverses each byte's bits, returns everything once the client half-closes,
        // then closes.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            let back: Vec<u8> = got.iter().map(|b| b.reverse_bits()).collect();
            s.write_all(&back).unwrap();
        });
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = relay.local_addr().unwrap();
        thread::spawn(move || super::relay_from(relay, target));

        let sent: Vec<u8> = (0..3 * super::RELAY_BUFFER + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        let mut c = TcpStream::connect(at).unwrap();
        // A half-close the relay does not pass on leaves the server waiting: fail, do not hang.
        c.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let writer = {
            let (mut c, sent) = (c.try_clone().unwrap(), sent.clone());
            thread::spawn(move || {
                c.write_all(&sent).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back.len(), sent.len());
        assert!(back.iter().zip(&sent).all(|(b, s)| *b == s.reverse_bits()), "the bytes came back altered");
    }
}
