//! The network-namespace lab: one node with workloads, as a Kubernetes node with pods.
//!
//! ```text
//!                      node netns "<tag>-node" (the agent runs here)
//!   ┌──────────────┐   veth <tag>w0  ┌───────────────────────────────┐
//!   │ <tag>-0      │◀───────────────▶│ 169.254.1.1 on every host veth│
//!   │ eth0 10.x/32 │                 │ route 10.x/32 dev <tag>wN     │
//!   └──────────────┘     ...         │ TCX + cgroup programs         │
//! ```
//! Each workload gets a network namespace, a veth pair (host side in the node namespace), a
//! cgroup (`<cgroup root>/warden-<tag>/<name>`) that holds its processes, and a
//! `warden-probe serve` process on its ports. Everything is named after the lab's tag, so
//! [`Lab::down_by_tag`] removes a lab even when the process that made it is gone.
//!
//! Shared by `cargo xtask lab` and the root integration tests (each test uses its own tag, pin
//! directory and state directory, so tests run in parallel).

use std::{
    ffi::OsString,
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

pub mod fixtures;
pub mod kapi;

/// The agent's cgroup under the lab's cgroup (no workload has this name).
pub const AGENT_CGROUP: &str = "node-agent";

/// Gateway address every workload routes through (present on every host-side veth).
pub const GATEWAY: &str = "169.254.1.1";

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The HBONE interop peer's Python environment, relative to the repository root: `cargo xtask
/// setup` creates it with hyper-h2 (`hbone/tests/hbone/peer.py` runs in it).
pub const INTEROP_VENV: &str = "target/interop-venv";

/// The Python that runs the HBONE interop peer: `WARDEN_INTEROP_PYTHON`, or [`INTEROP_VENV`]'s.
pub fn interop_python() -> PathBuf {
    let path = std::env::var_os("WARDEN_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(INTEROP_VENV).join("bin/python3"));
    assert!(
        path.exists(),
        "{}: no Python for the interop peer; `cargo xtask setup` creates it (or set WARDEN_INTEROP_PYTHON to a \
         python3 with hyper-h2)",
        path.display()
    );
    path
}

/// The HBONE interop peer (OpenSSL and hyper-h2).
pub fn interop_peer() -> PathBuf {
    workspace_root().join("hbone/tests/hbone/peer.py")
}

/// `env` if set, else the binary in the target directory (debug first).
fn find_bin(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    ["debug", "release"].iter().map(|profile| target.join(profile).join(name)).find(|p| p.is_file())
}

fn target_bin(name: &str, env: &str) -> PathBuf {
    find_bin(name, env).unwrap_or_else(|| {
        panic!("{name} is not built: run `cargo build --workspace` (or `cargo xtask test`), or set {env}")
    })
}

/// The `warden` binary under test.
pub fn warden_bin() -> PathBuf {
    target_bin("warden", "WARDEN_BIN")
}

/// The lab's traffic tool.
pub fn probe_bin() -> PathBuf {
    target_bin("warden-probe", "WARDEN_PROBE_BIN")
}

/// The cgroup v2 hierarchy: `WARDEN_CGROUP_ROOT`, else the unified mount of a hybrid setup, else
/// `/sys/fs/cgroup` when it is pure v2.
pub fn cgroup_root() -> PathBuf {
    if let Some(p) = std::env::var_os("WARDEN_CGROUP_ROOT") {
        return p.into();
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").is_file() {
        return unified.into();
    }
    "/sys/fs/cgroup".into()
}

/// Whether root tests can run. When they cannot, says so loudly on stderr (never a silent pass).
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let bpf = Path::new("/sys/kernel/btf/vmlinux").exists();
    if !root || !bpf {
        eprintln!(
            "\n!!!!!!!! SKIPPING {test}: needs root and a BPF-capable kernel (root={root}, btf={bpf}) !!!!!!!!\n"
        );
        return false;
    }
    true
}

/// Run a command; fail with its stderr.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A workload to create.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub ip: Ipv4Addr,
    /// Ports its server listens on.
    pub ports: Vec<u16>,
}

impl Spec {
    pub fn new(namespace: &str, name: &str, ip: Ipv4Addr, ports: &[u16]) -> Spec {
        Spec {
            name: name.into(),
            namespace: namespace.into(),
            service_account: name.into(),
            labels: vec![("app".into(), name.into())],
            ip,
            ports: ports.to_vec(),
        }
    }
}

/// A created workload.
#[derive(Debug)]
pub struct Member {
    pub spec: Spec,
    pub netns: String,
    pub veth: String,
    pub cgroup: PathBuf,
}

/// The outcome of one `warden-probe connect`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
pub struct Probe {
    pub result: String,
    pub ms: u64,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub round_trips: Option<u64>,
    /// `echo`: the client's address as the server saw it.
    #[serde(default)]
    pub seen_as: Option<String>,
    /// `echo`: the server's address as the client's socket names it (`getpeername`).
    #[serde(default)]
    pub peer: Option<String>,
    /// `echo`: the bytes came back intact.
    #[serde(default)]
    pub intact: Option<bool>,
}

pub struct Lab {
    pub tag: String,
    pub node: String,
    pub members: Vec<Member>,
    /// Files of this lab: workloads.yaml, the agent log, the state directory.
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_dir: PathBuf,
    /// Workloads of other nodes this node knows (see [`Lab::wire`]).
    pub remote: Vec<Spec>,
    /// The node's end of the wire to another node: (interface, address).
    pub wire: Option<(String, Ipv4Addr)>,
    /// Entries of the workload file's `services` list (YAML flow mappings).
    pub services: Vec<String>,
    servers: Vec<Child>,
    agent: Option<Child>,
}

impl Lab {
    /// Where a lab with `tag` keeps its files.
    pub fn dir_for(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("warden-lab-{tag}"))
    }

    /// Pin directory of a lab: the production one for the main lab, a private one per test.
    pub fn pin_dir_for(tag: &str) -> PathBuf {
        if tag == "lab" { warden_common::PIN_DIR.into() } else { format!("/sys/fs/bpf/warden-{tag}").into() }
    }

    /// Create the node and its workloads, and start each workload's server.
    pub fn up(tag: &str, specs: &[Spec]) -> anyhow::Result<Lab> {
        assert!(tag.len() <= 8 && tag.bytes().all(|b| b.is_ascii_alphanumeric()), "tag must be 1-8 alphanumerics");
        Lab::down_by_tag(tag);
        let dir = Lab::dir_for(tag);
        fs::create_dir_all(&dir)?;
        let cgroup_dir = cgroup_root().join(format!("warden-{tag}"));
        let node = format!("{tag}-node");
        let mut lab = Lab {
            tag: tag.into(),
            node: node.clone(),
            members: Vec::new(),
            pin_dir: Lab::pin_dir_for(tag),
            state_dir: dir.join("state"),
            dir,
            cgroup_dir: cgroup_dir.clone(),
            remote: Vec::new(),
            wire: None,
            services: Vec::new(),
            servers: Vec::new(),
            agent: None,
        };
        run(&["ip", "netns", "add", &node])?;
        lab.in_node(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv4.ip_forward=1",
        ])?;
        lab.in_node(&["ip", "link", "set", "lo", "up"])?;
        fs::create_dir_all(&cgroup_dir).with_context(|| format!("creating cgroup {}", cgroup_dir.display()))?;
        for (i, s) in specs.iter().enumerate() {
            let netns = format!("{tag}-{i}");
            let veth = format!("{tag}w{i}");
            run(&["ip", "netns", "add", &netns])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])?;
            run(&[
                "ip", "link", "add", &veth, "netns", &node, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ])?;
            let ip = s.ip.to_string();
            let w = |args: &[&str]| {
                let mut v = vec!["ip", "netns", "exec", &netns];
                v.extend_from_slice(args);
                run(&v)
            };
            w(&["ip", "link", "set", "lo", "up"])?;
            w(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            w(&["ip", "link", "set", "eth0", "up"])?;
            w(&["ip", "route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
            w(&["ip", "route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
            lab.in_node(&["ip", "addr", "add", &format!("{GATEWAY}/32"), "dev", &veth])?;
            lab.in_node(&["ip", "link", "set", &veth, "up"])?;
            lab.in_node(&["ip", "route", "add", &format!("{ip}/32"), "dev", &veth])?;
            let cgroup = cgroup_dir.join(&s.name);
            fs::create_dir_all(&cgroup)?;
            lab.members.push(Member { spec: s.clone(), netns, veth, cgroup });
        }
        for m in &lab.members {
            if m.spec.ports.is_empty() {
                continue;
            }
            let mut args = vec!["serve".to_string()];
            args.extend(m.spec.ports.iter().map(u16::to_string));
            let child = lab
                .command_in(&m.spec.name, &probe_bin(), &args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a workload server")?;
            lab.servers.push(child);
        }
        // Servers listen before anyone probes them.
        for m in &lab.members {
            for port in &m.spec.ports {
                let deadline = Instant::now() + Duration::from_secs(5);
                let needle = format!(":{port:04X} ");
                loop {
                    let tcp = run(&["ip", "netns", "exec", &m.netns, "cat", "/proc/net/tcp"]).unwrap_or_default();
                    if tcp.lines().any(|l| l.contains(&needle) && l.contains(" 0A ")) {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("{} did not start listening on {port}", m.spec.name);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(lab)
    }

    /// Join two nodes with a veth "wire" (`<tag>x` in each node namespace, 192.168.77.1/.2), route
    /// each node's workload addresses over it, and make each node know the other's workloads (its
    /// workload file lists them without a veth), as two Kubernetes nodes of one cluster.
    pub fn wire(a: &mut Lab, b: &mut Lab) -> anyhow::Result<()> {
        let (ia, ib) = (format!("{}x", a.tag), format!("{}x", b.tag));
        let (aa, ab) = (Ipv4Addr::new(192, 168, 77, 1), Ipv4Addr::new(192, 168, 77, 2));
        run(&["ip", "link", "add", &ia, "netns", &a.node, "type", "veth", "peer", "name", &ib, "netns", &b.node])?;
        for (lab, iface, addr) in [(&mut *a, &ia, aa), (&mut *b, &ib, ab)] {
            lab.in_node(&["ip", "addr", "add", &format!("{addr}/30"), "dev", iface])?;
            lab.in_node(&["ip", "link", "set", iface, "up"])?;
            lab.wire = Some((iface.clone(), addr));
        }
        for (from, to, via, iface) in [(&*a, &*b, ab, &ia), (&*b, &*a, aa, &ib)] {
            for m in &to.members {
                from.in_node(&[
                    "ip",
                    "route",
                    "add",
                    &format!("{}/32", m.spec.ip),
                    "via",
                    &via.to_string(),
                    "dev",
                    iface,
                ])?;
            }
        }
        let (sa, sb): (Vec<Spec>, Vec<Spec>) =
            (a.members.iter().map(|m| m.spec.clone()).collect(), b.members.iter().map(|m| m.spec.clone()).collect());
        a.remote.extend(sb);
        b.remote.extend(sa);
        Ok(())
    }

    /// tcpdump on this node's end of the wire, writing raw packets to `file`; returns once tcpdump
    /// says it is listening. Stop it with SIGINT, which flushes the file. (`--immediate-mode`:
    /// otherwise libpcap hands packets over a block at a time, after up to a second, and a capture
    /// stopped sooner loses them.)
    pub fn capture_wire(&self, file: &Path) -> anyhow::Result<Child> {
        use std::io::BufRead as _;
        let (iface, _) = self.wire.clone().context("the node is not wired")?;
        let _ = fs::remove_file(file);
        let mut child = self
            .node_command(
                "tcpdump",
                &["-i", &iface, "--immediate-mode", "-U", "-s", "0", "-w", &file.display().to_string(), "tcp"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let mut lines = std::io::BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => bail!("tcpdump stopped before listening"),
            }
        }
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(child)
    }

    /// A command in the node's network namespace.
    pub fn node_command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.node)).arg("--").arg(program).args(args);
        c
    }

    /// The agent's metrics (`:15020/stats/prometheus`, from the node's namespace); empty when it
    /// does not answer.
    pub fn metrics(&self) -> String {
        let out = self.node_command("curl", &["-sf", "http://127.0.0.1:15020/stats/prometheus"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }

    /// `warden-probe echo`: one line to `ip:port` and back.
    pub fn echo(&self, from: &str, ip: Ipv4Addr, port: u16, message: &str) -> Probe {
        probe_result(self.command_in(from, &probe_bin(), &["echo".into(), format!("{ip}:{port}"), message.into()]))
    }

    fn in_node(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.node];
        v.extend_from_slice(args);
        run(&v)
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.spec.name == name).unwrap_or_else(|| panic!("no workload {name} in the lab"))
    }

    /// A command that runs inside workload `name`'s network namespace and cgroup.
    pub fn command_in(&self, name: &str, program: &Path, args: &[String]) -> Command {
        let m = self.member(name);
        let procs = m.cgroup.join("cgroup.procs");
        // nsenter switches only the network namespace: `ip netns exec` would also remount /sys,
        // hiding the cgroup2 and bpffs mounts.
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", m.netns)).arg("--").arg(program).args(args);
        // SAFETY: the closure only opens and writes a file (async-signal-safe syscalls).
        unsafe {
            c.pre_exec(move || fs::OpenOptions::new().write(true).open(&procs)?.write_all(b"0"));
        }
        c
    }

    /// The workload file describing this lab.
    pub fn workload_file(&self) -> String {
        self.workload_file_without(&[])
    }

    /// The workload file describing this lab but for the members named in `unmanaged`, which the
    /// agent then never sees: no programs on their veths or cgroups.
    pub fn workload_file_without(&self, unmanaged: &[&str]) -> String {
        let mut s = String::from("workloads:\n");
        for m in self.members.iter().filter(|m| !unmanaged.contains(&m.spec.name.as_str())) {
            let labels: Vec<String> = m.spec.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            s += &format!(
                "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    labels: {{{}}}\n    ip: {}\n    veth: {}\n    cgroup: {}\n",
                m.spec.name,
                m.spec.namespace,
                m.spec.service_account,
                labels.join(", "),
                m.spec.ip,
                m.veth,
                m.cgroup.display()
            );
        }
        for r in &self.remote {
            let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            s += &format!(
                "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    labels: {{{}}}\n    ip: {}\n",
                r.name,
                r.namespace,
                r.service_account,
                labels.join(", "),
                r.ip
            );
        }
        if !self.services.is_empty() {
            s += "services:\n";
            for svc in &self.services {
                s += &format!("  - {svc}\n");
            }
        }
        s
    }

    pub fn workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml")
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The generation the agent last recorded (0 before any).
    pub fn generation(&self) -> u32 {
        fs::read_to_string(self.state_dir.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["generation"].as_u64())
            .unwrap_or(0) as u32
    }

    /// Wait until the agent records a generation other than `before`.
    pub fn wait_generation_change(&mut self, before: u32, timeout: Duration) -> anyhow::Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let g = self.generation();
            if g != before && g != 0 {
                return Ok(g);
            }
            if let Some(a) = self.agent.as_mut()
                && let Some(status) = a.try_wait()?
            {
                bail!("the agent exited ({status}):\n{}", fs::read_to_string(self.agent_log()).unwrap_or_default());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent committed nothing within {timeout:?}:\n{}",
                    fs::read_to_string(self.agent_log()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start `warden agent` in the node namespace on this lab's workload file and `policies`,
    /// and wait until it has committed.
    pub fn start_agent(&mut self, policies: &Path) -> anyhow::Result<u32> {
        let args = self.file_args(policies)?;
        self.start(&args, Duration::from_secs(20))
    }

    /// Spawn the agent without waiting (for tests of refused starts).
    pub fn spawn_agent(&self, policies: &Path) -> anyhow::Result<AgentProcess> {
        Ok(AgentProcess(Some(self.spawn_agent_with(&self.file_args(policies)?)?)))
    }

    /// Start `warden agent` in the node namespace with `args` in place of the workload file and
    /// policy directory (e.g. `--kubeconfig K --node-name N`), and wait until it has committed.
    pub fn start_agent_with(&mut self, args: &[String]) -> anyhow::Result<u32> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        self.start(&args, Duration::from_secs(60))
    }

    /// Write the workload file and start `warden agent --mesh` on `policies`, issuing certificates
    /// from the CA directory `ca` (one for all nodes of a cluster); waits until it has committed.
    pub fn start_mesh_agent(&mut self, policies: &Path, ca: &Path) -> anyhow::Result<u32> {
        self.start_mesh_agent_with(policies, ca, &[])
    }

    /// As [`Lab::start_mesh_agent`], with more agent arguments (e.g. `--fast-path`).
    pub fn start_mesh_agent_with(&mut self, policies: &Path, ca: &Path, extra: &[&str]) -> anyhow::Result<u32> {
        fs::write(self.workloads_path(), self.workload_file())?;
        let path = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "--workloads".into(),
            path(&self.workloads_path()),
            "--policies".into(),
            path(policies),
            "--mesh".into(),
            "--ca-dir".into(),
            path(ca),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        self.start_agent_with(&args)
    }

    /// The directory-source arguments (writing the lab's workload file if there is none).
    fn file_args(&self, policies: &Path) -> anyhow::Result<Vec<OsString>> {
        if !self.workloads_path().exists() {
            fs::write(self.workloads_path(), self.workload_file())?;
        }
        Ok(vec!["--workloads".into(), self.workloads_path().into(), "--policies".into(), policies.into()])
    }

    fn start(&mut self, args: &[OsString], timeout: Duration) -> anyhow::Result<u32> {
        // Read before spawning: an agent that commits at once must still count as a change.
        let before = self.generation();
        self.agent = Some(self.spawn_agent_with(args)?);
        self.wait_generation_change(before, timeout)
    }

    /// `warden agent ARGS --pin-dir .. --state-dir ..` in the node namespace, logging to the
    /// lab's agent log.
    fn spawn_agent_with(&self, args: &[OsString]) -> anyhow::Result<Child> {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.agent_log())?;
        // The agent's own cgroup, as a DaemonSet pod has one: the mesh's fast path attaches to it
        // (never to the root cgroup).
        let cgroup = self.agent_cgroup();
        fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let procs = cgroup.join("cgroup.procs");
        let mut command = Command::new("nsenter");
        // SAFETY: the closure only opens and writes a file (async-signal-safe syscalls).
        unsafe {
            command.pre_exec(move || fs::OpenOptions::new().write(true).open(&procs)?.write_all(b"0"));
        }
        command
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg("--")
            .arg(warden_bin())
            .arg("agent")
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")
    }

    /// The process id of the agent this lab started, if it has one (`nsenter` execs the agent in
    /// place, so the child's id is the agent's).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The cgroup the node's agent runs in (`<lab cgroup>/node-agent`).
    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup_dir.join(AGENT_CGROUP)
    }

    /// Move workload `name` to a new cgroup `leaf` beside its own (e.g. kubelet's `pod<uid>`):
    /// its processes move there and later commands run there. (cgroup v2 forbids renaming.)
    pub fn move_cgroup(&mut self, name: &str, leaf: &str) -> anyhow::Result<PathBuf> {
        let m = self
            .members
            .iter_mut()
            .find(|m| m.spec.name == name)
            .with_context(|| format!("no workload {name} in the lab"))?;
        let to = m.cgroup.with_file_name(leaf);
        fs::create_dir_all(&to).with_context(|| format!("creating cgroup {}", to.display()))?;
        let procs = fs::read_to_string(m.cgroup.join("cgroup.procs"))?;
        for pid in procs.split_whitespace() {
            fs::write(to.join("cgroup.procs"), pid).with_context(|| format!("moving {pid} to {}", to.display()))?;
        }
        let _ = fs::remove_dir(&m.cgroup);
        m.cgroup = to.clone();
        Ok(to)
    }

    /// Kill the agent with `signal` (9: as a crash) and wait for it to exit.
    pub fn kill_agent(&mut self, signal: i32) {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(a.id() as i32, signal) };
            let _ = a.wait();
        }
    }

    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|a| a.try_wait().ok().flatten().is_none())
    }

    /// One connection attempt from workload `from` to `to`:`port`.
    pub fn probe(&self, from: &str, to: &str, port: u16) -> Probe {
        let ip = self.member(to).spec.ip;
        self.probe_addr(from, ip, port)
    }

    pub fn probe_addr(&self, from: &str, ip: Ipv4Addr, port: u16) -> Probe {
        probe_result(self.command_in(from, &probe_bin(), &probe_args("connect", ip, port)))
    }

    /// One UDP datagram from `from` to `to`:`port` by an unconnected socket, and its echo: `eperm`
    /// when the send itself fails.
    pub fn probe_udp(&self, from: &str, to: &str, port: u16) -> Probe {
        probe_result(self.command_in(from, &probe_bin(), &probe_args("udp", self.member(to).spec.ip, port)))
    }

    /// As [`Lab::probe`] and [`Lab::probe_udp`] (`kind` `connect` or `udp`), from a dual-stack
    /// socket: `AF_INET6`, to `to`'s v4-mapped address (`::ffff:a.b.c.d`), as Java opens them. The
    /// kernel runs the IPv6 socket hooks for it, although its packets are IPv4.
    pub fn probe_dual_stack(&self, kind: &str, from: &str, to: &str, port: u16) -> Probe {
        let mapped = self.member(to).spec.ip.to_ipv6_mapped();
        probe_result(self.command_in(from, &probe_bin(), &probe_args(kind, mapped, port)))
    }

    /// As [`Lab::probe_udp`], by a process in `from`'s network namespace outside its cgroup.
    pub fn probe_udp_uncaged(&self, from: &str, to: &str, port: u16) -> Probe {
        self.uncaged(from, probe_args("udp", self.member(to).spec.ip, port))
    }

    /// One connection attempt from the node's own network namespace (as kubelet's probes, or
    /// any hostNetwork process) to `ip`:`port`.
    pub fn probe_from_node(&self, ip: Ipv4Addr, port: u16) -> Probe {
        probe_in_netns(&self.node, probe_args("connect", ip, port))
    }

    /// One connection attempt from workload `from`'s network namespace by a process outside its
    /// cgroup (one that escaped it): no cgroup hook sees it, the TC program on the veth decides.
    pub fn probe_uncaged(&self, from: &str, ip: Ipv4Addr, port: u16) -> Probe {
        self.uncaged(from, probe_args("connect", ip, port))
    }

    /// `warden-probe args` in workload `from`'s network namespace, outside its cgroup.
    fn uncaged(&self, from: &str, args: [String; 4]) -> Probe {
        probe_in_netns(&self.member(from).netns, args)
    }

    /// `warden certs -o json` of the agent in this lab's node namespace (its admin endpoint is on
    /// the node's loopback), if it answers.
    pub fn certs(&self) -> Option<serde_json::Value> {
        let out = self
            .node_command(
                warden_bin().to_str()?,
                &["certs", "-o", "json", "--admin-url", "http://127.0.0.1:15000/certs"],
            )
            .output()
            .ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    /// The counter rows `warden maps --output json` shows for `workload` (`namespace/name`).
    pub fn counters_of(&self, workload: &str) -> Vec<serde_json::Value> {
        let maps = self.warden(&["maps", "--output", "json"]).expect("warden maps");
        let v: serde_json::Value = serde_json::from_str(&maps).expect("warden maps prints JSON");
        v["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["workload"] == workload)
            .flat_map(|e| e["counters"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// `warden` CLI against this lab's pins and state, in the node's network namespace (as an
    /// operator runs it on a node: `warden maps` reads the node's routing too).
    pub fn warden(&self, args: &[&str]) -> anyhow::Result<String> {
        let pin = self.pin_dir.display().to_string();
        let state = self.state_dir.display().to_string();
        let bin = warden_bin();
        let netns = format!("--net=/run/netns/{}", self.node);
        let mut v: Vec<&str> = vec!["nsenter", &netns, "--", bin.to_str().unwrap()];
        v.extend_from_slice(args);
        v.extend_from_slice(&["--pin-dir", &pin, "--state-dir", &state]);
        run(&v)
    }

    /// Remove everything a lab with `tag` made: processes, namespaces, cgroups, pins, files.
    pub fn down_by_tag(tag: &str) {
        let cgroup_dir = cgroup_root().join(format!("warden-{tag}"));
        // Processes first: every lab process lives in one of the lab's cgroups or namespaces.
        if let Ok(rd) = fs::read_dir(&cgroup_dir) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = fs::write(e.path().join("cgroup.kill"), "1");
                }
            }
        }
        if let Ok(names) = run(&["ip", "netns", "list"]) {
            let prefix = format!("{tag}-");
            for name in names.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(&prefix)) {
                if let Ok(pids) = run(&["ip", "netns", "pids", name]) {
                    for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                        // SAFETY: signalling a process of the lab's own namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                let _ = run(&["ip", "netns", "del", name]);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Ok(rd) = fs::read_dir(&cgroup_dir) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                while fs::remove_dir(e.path()).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = fs::remove_dir(&cgroup_dir);
        let pin_dir = Lab::pin_dir_for(tag);
        if pin_dir.exists() {
            let _ = Command::new(find_bin("warden", "WARDEN_BIN").unwrap_or_else(|| "true".into()))
                .args(["cleanup", "--pin-dir"])
                .arg(&pin_dir)
                .output();
            if pin_dir.exists() {
                let _ = run(&["rm", "-rf", pin_dir.to_str().unwrap()]);
            }
        }
        let _ = fs::remove_dir_all(Lab::dir_for(tag));
    }

    pub fn down(&mut self) {
        self.kill_agent(libc::SIGKILL);
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        self.servers.clear();
        Lab::down_by_tag(&self.tag);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("WARDEN_KEEP_LAB").is_none() {
            self.down();
        }
    }
}

/// A spawned agent not yet owned by a lab.
pub struct AgentProcess(Option<Child>);

impl AgentProcess {
    /// Wait for the process to exit within `timeout`; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.0.as_mut()?;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `warden-probe args` in network namespace `netns`, in the caller's cgroup (no workload's).
fn probe_in_netns(netns: &str, args: [String; 4]) -> Probe {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{netns}")).arg("--").arg(probe_bin()).args(args);
    probe_result(c)
}

/// `warden-probe`'s arguments for one `connect` or `udp` probe of `ip`:`port` (an IPv6 address
/// makes the probe use an `AF_INET6` socket).
fn probe_args(kind: &str, ip: impl Into<IpAddr>, port: u16) -> [String; 4] {
    [kind.into(), SocketAddr::new(ip.into(), port).to_string(), "--timeout-ms".into(), "700".into()]
}

/// Run a `warden-probe` command and parse its one JSON line.
fn probe_result(mut command: Command) -> Probe {
    let out = command.output().expect("running warden-probe");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe output {:?} ({e}); stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Convenience: write a policy directory from (file name, YAML) pairs.
pub fn write_policies(dir: &Path, files: &[(&str, &str)]) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    for (name, yaml) in files {
        fs::write(dir.join(name), yaml)?;
    }
    Ok(())
}
