//! `cargo xtask bench l4`: what the datapath costs, side by side in one invocation.
//!
//! Two lab workloads (client and server) on one node; for each configuration:
//! - TCP throughput: `iperf3`, one stream, client -> server;
//! - new-connection rate: `warden-probe rate` (connect, read the greeting, close), which is where
//!   per-packet cost shows: GSO hides it from bulk throughput.
//!
//! Configurations: (a) no programs; (b) warden with 1, 1k and 100k policy entries (through the
//! real agent and policy compiler: the server's ALLOW policy names many remote identities and
//! ports, and the client's entry is one of them); (c) iptables chains of 1, 1k and 10k rules
//! (conntrack ESTABLISHED first, the client's rule last) and an nftables verdict map of 100k
//! elements. Each is printed as a ratio to (a), measured just before and just after it.
//!
//! Each warden configuration also gets a crossover pass. The lab has two like pairs of client and
//! server on the node, and the agent is told about one of them at a time (the other has no
//! programs on its veths or cgroups). The pairs take turns, one run each per round: first with
//! pair one enforced, then, after the agent has moved its programs to pair two, with pair two
//! enforced. The estimate is the geometric mean of the two halves' median ratios: whatever
//! makes one pair faster than the other on a given boot (up to 4% here, either way) multiplies
//! one half's ratio and divides the other's, so it cancels. The same pass with no agent at all
//! shows the pairs' own difference and the estimator's noise. The agent enables TCX hooks
//! node-wide, which the bare pair then passes through too: a few nanoseconds per packet that
//! favour warden's paired figure. Each estimate comes with a 95% bootstrap interval.
//!
//! The ratios are measured with the kernel's BPF run-time accounting off, as in production: with
//! it on, every program run pays two clock reads and a per-CPU stats update that the baseline and
//! the iptables rows never pay. Each warden configuration then gets a second, separate pass with
//! the accounting on (same lab, same agent and policy), which reports each program's in-kernel
//! cost per packet (run_time_ns / run_cnt) and per connection; that pass's rates are not used.
//!
//! The warden rows measure the datapath with the agent's access log off (the kernel then writes
//! no flow events: `CONFIG_EVENTS`); one more row runs the 100k configuration with the text
//! access log on, whose cost (the kernel's events, the agent formatting and writing a line per
//! connection event on the same cores) shows separately.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use warden_common::names;
use warden_tests::{Lab, Spec, probe_bin, run};

use crate::{attached, process::cpu_seconds};

const TAG: &str = "bench";
const PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const SECONDS: u64 = 3;
/// Repetitions per figure; the median is reported.
const REPEAT: usize = 5;
/// Repetitions of each baseline on either side of a configuration.
const BRACKET: usize = 3;
/// Repetitions of the pass with BPF run-time accounting on (per-program cost only: a few seconds
/// of churn make tens of thousands of connections, plenty for a mean).
const STATS_REPEAT: usize = 2;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 3);
/// Rounds of each half of the crossover pass (see [`crossover_pass`]) unless `--rounds` says
/// otherwise; even (see [`paired_half`]).
const PAIRED_ROUNDS: usize = 12;
/// The target for warden at 100k policy entries: this share of the baseline (a), for
/// throughput and for connection rate.
const TARGET_RATIO: f64 = 0.95;
/// Resamples of the crossover's bootstrap interval (see [`Estimate::of`]).
const RESAMPLES: usize = 4000;

/// A client workload and the server it measures against.
#[derive(Clone, Copy, PartialEq)]
struct Pair {
    client: &'static str,
    server_name: &'static str,
    server: Ipv4Addr,
}

impl Pair {
    fn members(&self) -> [&'static str; 2] {
        [self.client, self.server_name]
    }
    /// The other pair of the lab.
    fn other(&self) -> Pair {
        if *self == PAIR_ONE { PAIR_TWO } else { PAIR_ONE }
    }
}

/// The pair the bracketed ratios and the per-program costs are measured on.
const PAIR_ONE: Pair = Pair { client: "client", server_name: "server", server: SERVER_IP };
/// A second pair of the same kind on the same node, for the crossover pass. At any moment the
/// agent knows one of the two pairs; the other has no programs on its veths or cgroups. iptables
/// and nftables rules would apply to both, so only the warden rows are paired.
const PAIR_TWO: Pair = Pair { client: "client2", server_name: "server2", server: Ipv4Addr::new(10, 88, 0, 5) };
/// Ports named by the generated policy; the client uses the first.
const POLICY_PORTS: u16 = 10;

/// Per program: (run_time_ns, run_cnt) accumulated over a phase.
type Stats = BTreeMap<String, (u64, u64)>;

struct Figures {
    gbps: f64,
    conn_per_s: f64,
    /// BPF cost during the bulk transfer (established-flow packets) and the connection churn.
    bulk: Stats,
    churn: Stats,
    /// Connections made during the churn phases (for the in-kernel cost per connection).
    connections: u64,
}

/// Growth of each program's totals. Totals sum every loaded program of a name, so one that
/// shrank means a program went away meanwhile (another warden on the machine): that phase's
/// figure for it is dropped rather than wrapped.
fn delta(before: &Stats, after: &Stats, into: &mut Stats) {
    for (name, (t, c)) in after {
        let (t0, c0) = before.get(name).copied().unwrap_or((0, 0));
        if *t < t0 || *c < c0 {
            continue;
        }
        let e = into.entry(name.clone()).or_insert((0, 0));
        e.0 += t - t0;
        e.1 += c - c0;
    }
}

/// `prog=Nns` for every program that ran.
fn per_packet(s: &Stats) -> String {
    let mut out = String::new();
    for (name, (t, c)) in s {
        if *c > 0 {
            let _ = write!(out, "{}={:.0} ", name.trim_start_matches("warden_"), *t as f64 / *c as f64);
        }
    }
    out
}

/// One throughput and one churn phase; `programs`: collect the run-time statistics of the warden
/// programs that read this configuration map (see [`config_map_id`]).
fn measure_once(lab: &Lab, pair: Pair, programs: Option<u64>) -> anyhow::Result<Figures> {
    if programs.is_none() && stats_sysctl_on() {
        STATS_ON_IN_RATIOS.store(true, Ordering::Relaxed);
    }
    let (mut bulk, mut churn) = (Stats::new(), Stats::new());
    let s0 = prog_stats(programs);
    let out = lab
        .command_in(
            pair.client,
            "iperf3".as_ref(),
            &[
                "-c".into(),
                pair.server.to_string(),
                "-p".into(),
                IPERF_PORT.to_string(),
                "-t".into(),
                SECONDS.to_string(),
                "-J".into(),
            ],
        )
        .output()
        .context("iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let gbps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")? / 1e9;
    let s1 = prog_stats(programs);
    delta(&s0, &s1, &mut bulk);
    let out = lab
        .command_in(
            pair.client,
            &probe_bin(),
            &[
                "rate".into(),
                format!("{}:{PORT}", pair.server),
                "--seconds".into(),
                SECONDS.to_string(),
                "--threads".into(),
                "2".into(),
            ],
        )
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("probe rate JSON")?;
    if v["errors"].as_u64().unwrap_or(0) > 0 && v["connections"].as_u64().unwrap_or(0) == 0 {
        bail!("connections failed: {v}");
    }
    delta(&s1, &prog_stats(programs), &mut churn);
    Ok(Figures {
        gbps,
        conn_per_s: v["per_second"].as_f64().unwrap_or(0.0),
        bulk,
        churn,
        connections: v["connections"].as_u64().unwrap_or(0),
    })
}

/// The geometric mean (of ratios: one that doubles and one that halves cancel).
fn geometric_mean(v: &[f64]) -> f64 {
    v.iter().product::<f64>().powf(1.0 / v.len() as f64)
}

/// The median; of an even number of values, the mean of the middle two (the upper one alone
/// would favour whichever side a bimodal set's upper half is).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) { (v[n / 2 - 1] + v[n / 2]) / 2.0 } else { v[n / 2] }
}

/// The median of `REPEAT` measurements.
fn measure(lab: &Lab) -> anyhow::Result<Figures> {
    measure_n(lab, REPEAT, None)
}

/// The median of `n` measurements.
fn measure_n(lab: &Lab, n: usize, programs: Option<u64>) -> anyhow::Result<Figures> {
    let runs = (0..n).map(|_| measure_once(lab, PAIR_ONE, programs)).collect::<anyhow::Result<Vec<_>>>()?;
    let (mut bulk, mut churn) = (Stats::new(), Stats::new());
    for r in &runs {
        delta(&Stats::new(), &r.bulk, &mut bulk);
        delta(&Stats::new(), &r.churn, &mut churn);
    }
    Ok(Figures {
        gbps: median(runs.iter().map(|f| f.gbps).collect()),
        conn_per_s: median(runs.iter().map(|f| f.conn_per_s).collect()),
        bulk,
        churn,
        connections: runs.iter().map(|f| f.connections).sum(),
    })
}

/// One crossover half's ratios (enforced / bare, or pair / pair), one value per two rounds (see
/// [`paired_half`]).
struct Half {
    gbps: Vec<f64>,
    conn: Vec<f64>,
}

/// One half of a crossover pass: `rounds` rounds, each one run on `a` and one on `b`,
/// back to back, in alternating order (b a, a b, b a, ...). The drift of a shared machine moves
/// both runs of a round alike, so their ratio a / b is steadier than ratios of figures taken
/// minutes apart. Whichever run of a round comes first, or follows a run of its own pair, may
/// have an edge: consecutive rounds give that edge once to each pair, so each two rounds count
/// as one value, the geometric mean of their ratios.
fn paired_half(lab: &Lab, a: Pair, b: Pair, rounds: usize) -> anyhow::Result<Half> {
    let (mut gbps, mut conn) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (fa, fb) = if round % 2 == 0 {
            let fb = measure_once(lab, b, None)?;
            (measure_once(lab, a, None)?, fb)
        } else {
            let fa = measure_once(lab, a, None)?;
            (fa, measure_once(lab, b, None)?)
        };
        gbps.push(fa.gbps / fb.gbps);
        conn.push(fa.conn_per_s / fb.conn_per_s);
    }
    let show = |v: &[f64]| v.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(" ");
    eprintln!(
        "bench:   {} / {} per round: throughput {}; connection rate {}",
        a.client,
        b.client,
        show(&gbps),
        show(&conn)
    );
    let two_by_two = |v: &[f64]| v.chunks(2).map(geometric_mean).collect();
    Ok(Half { gbps: two_by_two(&gbps), conn: two_by_two(&conn) })
}

/// A crossover estimate of one figure: each half's median, their geometric mean (a difference
/// between the pairs themselves multiplies one half and divides the other), and a 95% bootstrap
/// interval of that mean.
struct Estimate {
    value: f64,
    first: f64,
    second: f64,
    low: f64,
    high: f64,
}

impl Estimate {
    /// The interval resamples each half's values with replacement, `RESAMPLES` times, and takes
    /// the 2.5th and 97.5th percentiles of the estimates (a fixed seed: the same values always
    /// give the same interval).
    fn of(first: &[f64], second: &[f64]) -> Estimate {
        let (m1, m2) = (median(first.to_vec()), median(second.to_vec()));
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        let mut resample = |v: &[f64]| median((0..v.len()).map(|_| v[rng.below(v.len())]).collect());
        let mut estimates: Vec<f64> =
            (0..RESAMPLES).map(|_| geometric_mean(&[resample(first), resample(second)])).collect();
        estimates.sort_by(f64::total_cmp);
        Estimate {
            value: geometric_mean(&[m1, m2]),
            first: m1,
            second: m2,
            low: estimates[RESAMPLES * 25 / 1000],
            high: estimates[RESAMPLES * 975 / 1000 - 1],
        }
    }
}

/// Where a crossover estimate stands against [`TARGET_RATIO`]: met when its whole 95% interval is
/// at or above it, not met when all of it is below, and otherwise not shown either way.
fn verdict(e: &Estimate) -> String {
    let state = if e.low >= TARGET_RATIO {
        "met"
    } else if e.high < TARGET_RATIO {
        "NOT MET"
    } else {
        "NOT SHOWN (the interval spans the target)"
    };
    format!("{:.3} [{:.3}, {:.3}]: {state}", e.value, e.low, e.high)
}

/// A small deterministic generator for the bootstrap (xorshift64).
struct Xorshift(u64);

impl Xorshift {
    /// A value in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What a crossover pass found: throughput and connection rate.
struct Crossover {
    gbps: Estimate,
    conn: Estimate,
}

impl Crossover {
    fn of(first: &Half, second: &Half) -> Crossover {
        Crossover { gbps: Estimate::of(&first.gbps, &second.gbps), conn: Estimate::of(&first.conn, &second.conn) }
    }
}

/// The crossover pass. With no agent (`workloads_two` is `None`): pair one against pair two, then
/// pair two against pair one. With the agent enforcing pair one: pair one against the bare pair
/// two; then the agent is given a workload file with pair two in pair one's place
/// (`workloads_two`), commits it, and pair two, now enforced, runs against the bare pair one. The
/// swap is checked with `BPF_PROG_QUERY` ([`check_enforced`]): the benchmark stops rather than
/// compare two enforced pairs, or two bare ones.
fn crossover_pass(lab: &mut Lab, workloads_two: Option<&str>, rounds: usize) -> anyhow::Result<Crossover> {
    let first = paired_half(lab, PAIR_ONE, PAIR_TWO, rounds)?;
    if let Some(wl) = workloads_two {
        let before = lab.generation();
        fs::write(lab.workloads_path(), wl)?;
        lab.wait_generation_change(before, Duration::from_secs(60))?;
        check_enforced(lab, PAIR_TWO)?;
    }
    let second = paired_half(lab, PAIR_TWO, PAIR_ONE, rounds)?;
    Ok(Crossover::of(&first, &second))
}

/// Fail unless warden's programs are attached to both veths and cgroups of `enforced` and to
/// none of the other pair's.
fn check_enforced(lab: &Lab, enforced: Pair) -> anyhow::Result<()> {
    for pair in [enforced, enforced.other()] {
        for name in pair.members() {
            let m = lab.member(name);
            let found = (attached::tcx_ingress(&lab.node, &m.veth)?, attached::cgroup_connect4(&m.cgroup)?);
            let want = if pair == enforced { (1, 1) } else { (0, 0) };
            if found != want {
                bail!(
                    "{name}: {} program(s) at its veth's TCX ingress and {} at its cgroup's connect4, expected {} and {}",
                    found.0,
                    found.1,
                    want.0,
                    want.1
                );
            }
        }
    }
    Ok(())
}

/// Nanoseconds all programs ran per connection made (the whole in-kernel price of a connection),
/// then each program's runs and nanoseconds per connection.
fn per_connection(f: &Figures) -> String {
    if f.connections == 0 {
        return "-".into();
    }
    let n = f.connections as f64;
    let total: u64 = f.churn.values().map(|(t, _)| t).sum();
    let mut out = format!("{:.1} µs:", total as f64 / n / 1e3);
    for (name, (t, c)) in f.churn.iter().filter(|(_, (_, c))| *c > 0) {
        let _ = write!(
            out,
            " {}={:.1}x{:.0}ns",
            name.trim_start_matches("warden_"),
            *c as f64 / n,
            *t as f64 / *c.max(&1) as f64
        );
    }
    out
}

/// The kernel's BPF run-time accounting (`kernel.bpf_stats_enabled`), on while this lives.
/// `BPF_ENABLE_STATS` hands out a file descriptor that keeps it on until closed, so, unlike the
/// sysctl, it cannot outlive the benchmark if the benchmark dies.
struct BpfStats {
    /// Held, not read: closing it ends the accounting.
    _fd: OwnedFd,
}

impl BpfStats {
    fn enable() -> anyhow::Result<BpfStats> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // `union bpf_attr`'s `enable_stats` member: one u32, the kind of statistics.
        let attr = [BPF_STATS_RUN_TIME, 0];
        // SAFETY: a valid pointer to `size_of_val(&attr)` readable bytes; the kernel reads only.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), size_of_val(&attr)) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
        }
        // SAFETY: a new file descriptor that nothing else owns.
        Ok(BpfStats { _fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) } })
    }
}

/// Someone else on the machine turned the accounting on during a measurement meant without it.
static STATS_ON_IN_RATIOS: AtomicBool = AtomicBool::new(false);

/// Whether the sysctl turns the accounting on for every program (whoever set it).
fn stats_sysctl_on() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// The id of the lab agent's configuration map, which every warden program reads. Other wardens
/// on the machine (other labs, tests running meanwhile) load programs of the same names, whose
/// runs must not count.
fn config_map_id(lab: &Lab) -> anyhow::Result<u64> {
    let pin = lab.pin_dir.join(names::CONFIG);
    let json = run(&["bpftool", "map", "show", "pinned", &pin.display().to_string(), "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("bpftool map show JSON")?;
    v["id"].as_u64().context("bpftool map show: no id")
}

/// (run_time_ns, run_cnt) per warden program reading configuration map `config` (none: no
/// statistics), from bpftool.
fn prog_stats(config: Option<u64>) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Some(config) = config else { return out };
    let Ok(json) = run(&["bpftool", "prog", "show", "--json"]) else { return out };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) else { return out };
    for p in v.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        let ours = p["map_ids"].as_array().is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(config)));
        if name.starts_with("warden_") && ours {
            let e = out.entry(name.to_string()).or_insert((0, 0));
            e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            e.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    out
}

/// Inputs of a warden configuration with about `entries` policy entries: `k` remote identities
/// (plus the two clients) times `POLICY_PORTS` ports. Writes the policy and the workload file with
/// pair one enforced; returns the policy directory and the workload file with pair two enforced
/// instead (for the crossover pass). Both servers carry `app: server`, so one policy serves either.
fn warden_inputs(lab: &Lab, entries: usize) -> anyhow::Result<(std::path::PathBuf, String)> {
    let (k, ports) = if entries <= 1 { (0, 1) } else { (entries / POLICY_PORTS as usize - 2, POLICY_PORTS) };
    let mut peers = String::new();
    let mut principals: Vec<String> =
        [PAIR_ONE, PAIR_TWO].iter().map(|p| format!("cluster.local/ns/bench/sa/{}", p.client)).collect();
    for i in 0..k {
        let ip = peer_ip(i);
        let _ = writeln!(peers, "  - {{name: peer-{i}, namespace: peers, serviceAccount: peer-{i}, ip: {ip}}}");
        principals.push(format!("cluster.local/ns/peers/sa/peer-{i}"));
    }
    let workloads = |enforced: Pair| lab.workload_file_without(&enforced.other().members()) + &peers;
    fs::write(lab.workloads_path(), workloads(PAIR_ONE))?;
    let port_list: Vec<String> = (0..ports).map(|p| format!("\"{}\"", PORT + p)).collect();
    let mut policy = String::from(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: server-access, namespace: bench}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals:\n",
    );
    for p in &principals {
        let _ = writeln!(policy, "        - {p}");
    }
    let _ = writeln!(policy, "    to:\n    - operation:\n        ports: [{}, \"{IPERF_PORT}\"]", port_list.join(", "));
    let dir = lab.dir.join(format!("policies-{entries}"));
    warden_tests::write_policies(&dir, &[("server.yaml", &policy)])?;
    Ok((dir, workloads(PAIR_TWO)))
}

/// The address of generated peer `i` (10.90.0.0 upwards), the same in every configuration.
fn peer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 90 + (i / 65536) as u8, ((i / 256) % 256) as u8, (i % 256) as u8)
}

fn in_node(lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
    let mut v = vec!["ip", "netns", "exec", &lab.node];
    v.extend_from_slice(args);
    run(&v)
}

fn iptables_chain(lab: &Lab, rules: usize) -> anyhow::Result<()> {
    let mut script =
        String::from("*filter\n:FORWARD DROP [0:0]\n-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    for i in 1..rules {
        let ip = peer_ip(i);
        let _ = writeln!(script, "-A FORWARD -s {ip}/32 -d {SERVER_IP}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT");
    }
    let _ = writeln!(
        script,
        "-A FORWARD -s {CLIENT_IP}/32 -d {SERVER_IP}/32 -p tcp -m multiport --dports {PORT},{IPERF_PORT} -j ACCEPT"
    );
    // Return traffic of the reverse direction is ESTABLISHED; nothing else passes.
    script += "COMMIT\n";
    let mut c =
        Command::new("ip").args(["netns", "exec", &lab.node, "iptables-restore"]).stdin(Stdio::piped()).spawn()?;
    std::io::Write::write_all(c.stdin.as_mut().unwrap(), script.as_bytes())?;
    if !c.wait()?.success() {
        bail!("iptables-restore failed");
    }
    Ok(())
}

fn iptables_flush(lab: &Lab) {
    let _ = in_node(lab, &["iptables", "-P", "FORWARD", "ACCEPT"]);
    let _ = in_node(lab, &["iptables", "-F", "FORWARD"]);
}

fn nft_vmap(lab: &Lab, elements: usize) -> anyhow::Result<()> {
    let mut script = String::from(
        "table inet wardenbench {\n  map allow { type ipv4_addr . inet_service : verdict; flags interval; }\n  chain forward { type filter hook forward priority 0; policy drop;\n    ct state established,related accept\n    ip saddr . tcp dport vmap @allow\n  }\n}\n",
    );
    script += "add element inet wardenbench allow {\n";
    for i in 1..elements {
        let ip = peer_ip(i);
        let _ = writeln!(script, "  {ip} . {PORT} : accept,");
    }
    let _ = writeln!(script, "  {CLIENT_IP} . {PORT} : accept,\n  {CLIENT_IP} . {IPERF_PORT} : accept\n}}");
    let file = lab.dir.join("bench.nft");
    fs::write(&file, script)?;
    in_node(lab, &["nft", "-f", file.to_str().unwrap()])?;
    Ok(())
}

/// `only`: one kind of configuration besides the baseline; `entries`: one warden configuration
/// (that many policy entries, access log off). Both are for quick iterations.
/// `rounds`: of each crossover half (even; more rounds, a narrower interval; [`PAIRED_ROUNDS`]
/// when not given).
pub fn l4(only: Option<&str>, entries: Option<usize>, rounds: Option<usize>) -> anyhow::Result<()> {
    let rounds = rounds.unwrap_or(PAIRED_ROUNDS);
    if rounds < 2 || !rounds.is_multiple_of(2) {
        bail!("--rounds {rounds}: the crossover counts rounds two by two, so it needs an even number, at least 2");
    }
    let runs = |kind: &str| only.is_none_or(|o| o == kind);
    let release = warden_tests::workspace_root().join("target/release");
    // SAFETY: set before any thread is spawned; the lab helpers read these to find the binaries.
    unsafe {
        std::env::set_var("WARDEN_BIN", release.join("warden"));
        std::env::set_var("WARDEN_PROBE_BIN", release.join("warden-probe"));
    }
    // The ratios are measured without run-time accounting (see the module's documentation). An
    // earlier version of this benchmark turned the sysctl on and left it on.
    if stats_sysctl_on() {
        eprintln!("bench: kernel.bpf_stats_enabled is on (left by an earlier run?): turning it off");
        run(&["sysctl", "-qw", "kernel.bpf_stats_enabled=0"])?;
    }
    let specs = [
        Spec::new("bench", "client", CLIENT_IP, &[]),
        Spec { ports: vec![PORT, PORT + 1], ..Spec::new("bench", "server", SERVER_IP, &[]) },
        Spec::new("bench", PAIR_TWO.client, Ipv4Addr::new(10, 88, 0, 4), &[]),
        Spec {
            ports: vec![PORT, PORT + 1],
            labels: vec![("app".into(), "server".into())],
            ..Spec::new("bench", PAIR_TWO.server_name, PAIR_TWO.server, &[])
        },
    ];
    let mut lab = Lab::up(TAG, &specs)?;
    for client in [PAIR_ONE.client, PAIR_TWO.client] {
        let netns = lab.member(client).netns.clone();
        run(&["ip", "netns", "exec", &netns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
        run(&["ip", "netns", "exec", &netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    }
    // The client closes first, so TIME-WAIT sockets pile up at the client: at 12k connections a
    // second, every port towards the server is in TIME-WAIT within seconds, and connect()'s search
    // for a free port then costs more than anything measured here, and more the more churn came
    // before (which biased whichever run of a pair went second). Reusing TIME-WAIT ports for new
    // outgoing connections (RFC 7323 timestamps keep that safe) takes the search out of every row.
    let mut iperfs = [PAIR_ONE.server_name, PAIR_TWO.server_name]
        .map(|server| {
            lab.command_in(server, "iperf3".as_ref(), &["-s".into(), "-p".into(), IPERF_PORT.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(300));

    // Each configuration is bracketed by baselines (nothing installed) measured just before and
    // just after it, and its ratios are to their mean: the machine's drift over a ten-minute run
    // (2 shared vCPUs) would otherwise be larger than the effects measured, and a baseline on one
    // side only would lend the configuration whatever changes in one direction over time.
    let mut rows: Vec<(String, Figures)> = Vec::new();
    let mut brackets: Vec<(f64, f64)> = Vec::new();
    // The agent's own CPU (utime + stime per second of wall time) during each warden ratio pass:
    // whatever it spends there is taken from the two CPUs the workloads share.
    let mut agent_load: Vec<f64> = Vec::new();
    // Each warden configuration's crossover pass: see `crossover_pass`.
    let mut crossovers: Vec<Crossover> = Vec::new();
    let baseline = |lab: &Lab, brackets: &mut Vec<(f64, f64)>| -> anyhow::Result<()> {
        eprintln!("bench: (a) no programs, before");
        let before = measure_n(lab, BRACKET, None)?;
        brackets.push((before.gbps, before.conn_per_s));
        Ok(())
    };
    let baseline_after = |lab: &Lab, brackets: &mut Vec<(f64, f64)>| -> anyhow::Result<()> {
        eprintln!("bench: (a) no programs, after");
        let after = measure_n(lab, BRACKET, None)?;
        let before = brackets.last_mut().expect("a baseline before");
        *before = ((before.0 + after.gbps) / 2.0, (before.1 + after.conn_per_s) / 2.0);
        Ok(())
    };

    let warden_configs = match entries {
        _ if !runs("warden") => vec![],
        Some(n) => vec![(n, "off")],
        None => vec![(1usize, "off"), (1_000, "off"), (100_000, "off"), (100_000, "text")],
    };
    // The configuration the issue sets a target for (100k entries, no log), if it runs: its index
    // here is its crossover's too (one per configuration, in order).
    let target_row = warden_configs.iter().position(|&(entries, log)| entries == 100_000 && log == "off");
    // The pairing's own noise and the pairs' asymmetry: the same pass with no agent at all.
    let aa = if warden_configs.is_empty() {
        None
    } else {
        eprintln!("bench: (a) no programs, crossover pass on both pairs (A/A)");
        Some(crossover_pass(&mut lab, None, rounds)?)
    };
    for (entries, access_log) in warden_configs {
        eprintln!("bench: (b) warden, {entries} policy entries, access log {access_log}");
        // SAFETY: no other thread runs; the agent started next inherits the setting.
        unsafe { std::env::set_var("WARDEN_ACCESS_LOG", access_log) };
        let (policies, workloads_two) = warden_inputs(&lab, entries)?;
        baseline(&lab, &mut brackets)?;
        lab.start_agent(&policies)?;
        let agent = lab.agent_pid().context("the agent just started has no process")?;
        let maps = lab.warden(&["maps", "--output", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&maps)?;
        let actual: usize =
            v["endpoints"].as_array().into_iter().flatten().map(|e| e["policy"].as_array().map_or(0, Vec::len)).sum();
        let (cpu0, t0) = (cpu_seconds(agent)?, Instant::now());
        let mut f = measure(&lab)?;
        let agent_cpu = (cpu_seconds(agent)? - cpu0) / t0.elapsed().as_secs_f64();
        eprintln!("bench: (b) warden, {entries} policy entries, access log {access_log}: with bpf_stats");
        let stats = BpfStats::enable()?;
        let s = measure_n(&lab, STATS_REPEAT, Some(config_map_id(&lab)?))?;
        drop(stats);
        eprintln!("bench: (b) warden, {entries} policy entries, access log {access_log}: crossover pass");
        check_enforced(&lab, PAIR_ONE)?;
        crossovers.push(crossover_pass(&mut lab, Some(&workloads_two), rounds)?);
        (f.bulk, f.churn, f.connections) = (s.bulk, s.churn, s.connections);
        let log = if access_log == "off" { String::new() } else { format!(", access log {access_log}") };
        rows.push((format!("(b) warden, {actual} entries{log}"), f));
        agent_load.push(agent_cpu);
        lab.kill_agent(libc::SIGKILL);
        let _ = Command::new(warden_tests::warden_bin()).args(["cleanup", "--pin-dir"]).arg(&lab.pin_dir).status();
        let _ = fs::remove_dir_all(&lab.state_dir);
        baseline_after(&lab, &mut brackets)?;
    }

    for rules in if runs("iptables") { vec![1usize, 1_000, 10_000] } else { vec![] } {
        eprintln!("bench: (c) iptables, {rules} rules");
        baseline(&lab, &mut brackets)?;
        iptables_chain(&lab, rules)?;
        rows.push((format!("(c) iptables, {rules} rules"), measure(&lab)?));
        iptables_flush(&lab);
        baseline_after(&lab, &mut brackets)?;
    }
    if runs("nftables") {
        eprintln!("bench: (c) nftables verdict map, 100000 elements");
        baseline(&lab, &mut brackets)?;
        nft_vmap(&lab, 100_000)?;
        rows.push(("(c) nftables vmap, 100000".into(), measure(&lab)?));
        let _ = in_node(&lab, &["nft", "delete", "table", "inet", "wardenbench"]);
        baseline_after(&lab, &mut brackets)?;
    }
    for iperf in &mut iperfs {
        let _ = iperf.kill();
        let _ = iperf.wait();
    }
    let stats_note = if STATS_ON_IN_RATIOS.load(Ordering::Relaxed) {
        "; WARNING: something turned kernel.bpf_stats_enabled on during it"
    } else {
        ""
    };
    println!(
        "\nL4 datapath benchmark (median of {REPEAT} x {SECONDS}s per figure; each ratio is to the baseline (a), the mean of the medians of {BRACKET} runs just before and {BRACKET} just after; BPF run-time accounting off{stats_note})"
    );
    println!(
        "{:<44} {:>10} {:>7} {:>12} {:>7}   {:>16}",
        "configuration", "Gbit/s", "ratio", "conn/s", "ratio", "(a) Gbit/s conn/s"
    );
    for ((name, f), (bg, bc)) in rows.iter().zip(&brackets) {
        println!(
            "{:<44} {:>10.2} {:>7.2} {:>12.0} {:>7.2}   {:>8.2} {:>7.0}",
            name,
            f.gbps,
            f.gbps / bg,
            f.conn_per_s,
            f.conn_per_s / bc,
            bg,
            bc
        );
    }
    println!(
        "\nIn-kernel cost per run of each warden program, ns (bpf_stats run_time_ns / run_cnt; a separate pass of {STATS_REPEAT} x {SECONDS}s per configuration with kernel.bpf_stats_enabled on, after its ratio pass):"
    );
    println!(
        "{:<44} {:<58} connection churn (every packet of short connections)",
        "configuration", "bulk transfer (established flows)"
    );
    for (name, f) in rows.iter().filter(|(n, _)| n.starts_with("(b)")) {
        println!("{:<44} {:<58} {}", name, per_packet(&f.bulk), per_packet(&f.churn));
    }
    println!("\nIn-kernel cost per connection (all programs, connection churn; the same pass):");
    for (name, f) in rows.iter().filter(|(n, _)| n.starts_with("(b)")) {
        println!("{:<44} {}", name, per_connection(f));
    }
    println!(
        "\nCrossover: two like pairs on the node take turns, one run each per round, alternating order; {rounds} rounds with pair one enforced and pair two bare, then {rounds} with the agent moved to pair two; each two rounds (b a, then a b) give one value, the geometric mean of their ratios (enforced / bare); each half is the median of its values, the estimate the halves' geometric mean, [low, high] its 95% bootstrap interval:"
    );
    println!(
        "{:<44} {:>10} {:>7} {:>7} {:>15}   {:>9} {:>7} {:>7} {:>15}",
        "", "throughput", "half 1", "half 2", "95% interval", "conn rate", "half 1", "half 2", "95% interval"
    );
    let interval = |e: &Estimate| format!("[{:.3}, {:.3}]", e.low, e.high);
    let line = |name: &str, x: &Crossover| {
        println!(
            "{name:<44} {:>10.3} {:>7.3} {:>7.3} {:>15}   {:>9.3} {:>7.3} {:>7.3} {:>15}",
            x.gbps.value,
            x.gbps.first,
            x.gbps.second,
            interval(&x.gbps),
            x.conn.value,
            x.conn.first,
            x.conn.second,
            interval(&x.conn)
        );
    };
    if let Some(x) = &aa {
        line("(a) no agent: one / two, then two / one", x);
    }
    let warden_rows: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).filter(|n| n.starts_with("(b)")).collect();
    for (name, x) in warden_rows.iter().zip(&crossovers) {
        line(name, x);
    }
    // The target, judged by the interval: met only when all of it is at or above it.
    if let Some(i) = target_row {
        println!(
            "\ntarget >= {TARGET_RATIO} of (a), {}: throughput {}; connection rate {}",
            warden_rows[i].trim_start_matches("(b) "),
            verdict(&crossovers[i].gbps),
            verdict(&crossovers[i].conn)
        );
    }
    println!("\nThe agent process's own CPU during each ratio pass (utime + stime / wall time):");
    for ((name, _), load) in rows.iter().filter(|(n, _)| n.starts_with("(b)")).zip(&agent_load) {
        println!("{:<44} {:.2} ms/s ({:.3}% of one CPU)", name, load * 1e3, load * 100.0);
    }
    drop(lab);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_of_identical_values_is_that_value() {
        let e = Estimate::of(&[0.97; 6], &[0.97; 6]);
        assert!((e.value - 0.97).abs() < 1e-12);
        assert!((e.low - 0.97).abs() < 1e-12 && (e.high - 0.97).abs() < 1e-12);
    }

    #[test]
    fn the_interval_holds_the_estimate_and_widens_with_the_spread() {
        let narrow = Estimate::of(&[0.96, 0.97, 0.98, 0.97, 0.96, 0.98], &[0.97, 0.98, 0.96, 0.97, 0.98, 0.96]);
        let wide = Estimate::of(&[0.86, 0.97, 1.08, 0.92, 1.02, 0.97], &[0.90, 1.04, 0.97, 0.88, 1.06, 0.97]);
        for e in [&narrow, &wide] {
            assert!(e.low <= e.value && e.value <= e.high, "{} [{}, {}]", e.value, e.low, e.high);
        }
        assert!(wide.high - wide.low > 2.0 * (narrow.high - narrow.low));
        // The halves' geometric mean: a pair that runs 4% faster in one half and 4% slower in the
        // other cancels.
        let skewed = Estimate::of(&[0.97 * 1.04; 4], &[0.97 / 1.04; 4]);
        assert!((skewed.value - 0.97).abs() < 1e-12);
    }

    #[test]
    fn a_target_is_met_only_when_the_whole_interval_clears_it() {
        let e = |value, low, high| Estimate { value, first: value, second: value, low, high };
        assert!(verdict(&e(0.97, 0.95, 0.99)).ends_with(": met"));
        assert!(verdict(&e(0.96, 0.94, 0.99)).contains("NOT SHOWN"));
        assert!(verdict(&e(0.93, 0.92, 0.949)).contains("NOT MET"));
    }
}
