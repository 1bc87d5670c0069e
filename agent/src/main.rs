//! The `warden` command: the node agent and the operator's CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use warden_agent::{agent, datapath, defaults, inspect, telemetry};

#[derive(Parser)]
#[command(name = "warden", version, about = "eBPF zero-trust enforcer speaking Istio's security API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
// Parsed once per process: the size of the agent's variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the node agent: load and attach the programs, compile policy into the maps, follow changes.
    Agent {
        /// Workload file (YAML): the workloads of this node and where to enforce them.
        #[arg(long, required_unless_present_any = ["kubeconfig", "cluster"], requires = "policies", conflicts_with_all = ["kubeconfig", "cluster"])]
        workloads: Option<PathBuf>,
        /// Directory (or file) of Istio security resources.
        #[arg(long, requires = "workloads")]
        policies: Option<PathBuf>,
        /// Read workloads and policies from the Kubernetes API of this kubeconfig (instead of files).
        #[arg(long, conflicts_with = "cluster")]
        kubeconfig: Option<PathBuf>,
        /// Read workloads and policies from the Kubernetes API, with the pod's service account.
        #[arg(long)]
        cluster: bool,
        /// This node's name (pods with this `spec.nodeName` are enforced here).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// The cgroup v2 hierarchy holding the pods' cgroups (default: /sys/fs/cgroup/unified when
        /// it is a cgroup v2 mount, else /sys/fs/cgroup).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        #[arg(long, default_value = defaults::PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = defaults::STATE_DIR)]
        state_dir: PathBuf,
        /// Trust domain of the mesh's SPIFFE identities (checked as `warden ca init` checks it).
        #[arg(long, default_value = defaults::TRUST_DOMAIN, value_parser = trust_domain)]
        trust_domain: String,
        #[arg(long, default_value = defaults::ROOT_NAMESPACE)]
        root_namespace: String,
        /// With --mesh: the cluster's DNS domain (kubelet's clusterDomain). Services' hostnames,
        /// `<name>.<namespace>.svc.<domain>`, label the metrics (`destination_service`) and name
        /// the Service an HBONE request addressed.
        #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
        cluster_domain: warden_agent::services::ClusterDomain,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: Output,
        /// Where to serve Istio-compatible metrics (`/stats/prometheus`).
        #[arg(long, env = "WARDEN_METRICS_ADDR", default_value = telemetry::DEFAULT_METRICS_ADDR)]
        metrics_addr: std::net::SocketAddr,
        /// Where to serve readiness (`/healthz/ready`: 200 once the first state is committed).
        #[arg(long, env = "WARDEN_READY_ADDR", default_value = telemetry::DEFAULT_READY_ADDR)]
        ready_addr: std::net::SocketAddr,
        /// Access log of decided flows, denials and closes, one line per event on stdout.
        #[arg(long, env = "WARDEN_ACCESS_LOG", value_enum, default_value = "text")]
        access_log: telemetry::AccessLogFormat,
        /// In-process CA directory (Istio cacerts layout; a root is generated if empty): the
        /// agent issues its local workloads' certificates itself. For a single-node lab.
        #[arg(long, env = "WARDEN_CA_DIR", conflicts_with = "ca_addr", group = "ca")]
        ca_dir: Option<PathBuf>,
        /// Istio CA API endpoint (e.g. https://warden-ca.warden-system:15012) for workload certificates.
        #[arg(long, requires = "ca_root_cert", group = "ca")]
        ca_addr: Option<String>,
        /// Root certificate(s) the CA and peers are verified against (watched for rotation and CRL).
        #[arg(long)]
        ca_root_cert: Option<PathBuf>,
        /// Bearer token file presented to the CA.
        #[arg(long)]
        ca_token_file: Option<PathBuf>,
        /// Admin endpoint: `GET /certs` (read by `warden certs`).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: std::net::SocketAddr,
        /// Lifetime requested for workload certificates (Istio's SECRET_TTL), renewed at half of
        /// it: `90s`, `30m`, `24h`.
        #[arg(long, env = "WARDEN_WORKLOAD_CERT_TTL", default_value = warden_agent::certs::DEFAULT_CERT_TTL,
              value_parser = warden_agent::certs::parse_ttl)]
        workload_cert_ttl: std::time::Duration,
        /// Run the mTLS data plane: capture meshed workloads' outbound TCP, carry it over HBONE
        /// (mutual TLS 1.3, port 15008) and enforce PeerAuthentication. Needs a CA.
        #[arg(long, env = "WARDEN_MESH", requires = "ca")]
        mesh: bool,
        /// The outbound capture listener: an address every workload reaches on this node (its
        /// gateway), port 15001.
        #[arg(long, default_value = "169.254.1.1:15001")]
        capture_addr: std::net::SocketAddrV4,
        /// With --mesh: the same-node fast path. The sockets of a same-node hop (a workload and
        /// the agent) exchange bytes through each other's receive queue (sock_ops + sk_msg)
        /// instead of TCP/IP and the veth; the agent still relays and authorizes. Needs the agent
        /// in its own cgroup (its pod's).
        #[arg(long, env = "WARDEN_FAST_PATH", overrides_with = "no_fast_path")]
        fast_path: bool,
        /// With --mesh: no fast path (also turns it off for connections already using it).
        #[arg(long, overrides_with = "fast_path")]
        no_fast_path: bool,
        /// With --mesh: the TCP congestion control of the agent's sockets to workloads of this
        /// node (a veth hop, where pacing only costs timer work); `inherit` keeps the node's
        /// default. Connections between nodes always keep the node's default.
        #[arg(long, env = "WARDEN_LOCAL_CONGESTION_CONTROL", default_value = warden_agent::mesh::local_hop::DEFAULT)]
        local_congestion_control: warden_agent::mesh::local_hop::LocalCongestion,
        /// Threads of the agent's async runtime (the mesh's relays, the control loop, telemetry),
        /// as ztunnel's `ZTUNNEL_WORKER_THREADS`. Default: half the CPUs the agent may use, at
        /// least 1, at most 2.
        #[arg(long, env = "WARDEN_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
        worker_threads: Option<u16>,
        /// TCP from the node's own network stack (kubelet's probes, hostNetwork pods) to a local
        /// workload: allowed without policy (as Istio ambient and Cilium), or decided by the
        /// node's address like any peer.
        #[arg(long, env = "WARDEN_NODE_PROBES", value_enum, default_value = "allow")]
        node_probes: agent::NodeProbes,
    },
    /// Print the live maps: per workload, its policy entries and counters; the identity cache.
    Maps {
        #[arg(long, default_value = defaults::PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = defaults::STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Istio security resources: `warden policy validate PATH...`.
    Policy {
        #[command(subcommand)]
        command: warden_authz::cli::PolicyCommand,
    },
    /// Authorization: `warden authz check` evaluates one connection or request and explains it.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Certificate authority: `init`, `issue`, `revoke`, and `serve` (Istio's CA gRPC API).
    Ca {
        #[command(subcommand)]
        command: warden_identity::cli::CaCommand,
    },
    /// The certificates of a running agent: identity, serial, validity, rotation, chain, trust bundle.
    Certs(warden_identity::cli::CertsArgs),
    /// Detach every program and remove every pin under the pin directory (the node stops
    /// enforcing), and the mesh's policy-routing rules, tables and capture address.
    Cleanup {
        #[arg(long, default_value = defaults::PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuthzCommand {
    /// Evaluate a request file against a policy directory (exit 0 ALLOW, 1 DENY, 2 invalid input).
    Check(warden_authz::cli::AuthzCheckArgs),
}

/// `--trust-domain`: refused at start, before anything is created, when the CA would refuse it.
fn trust_domain(text: &str) -> Result<String, String> {
    warden_identity::identity::validate_trust_domain(text).map(|()| text.to_owned()).map_err(|e| e.to_string())
}

fn init_logging(format: Output) {
    let filter = warden_agent::telemetry::log_filter();
    // Colours only on a terminal: a DaemonSet's log (kubectl logs) or a file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        Output::Json => builder.json().init(),
        Output::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy { command } => return warden_authz::cli::run_policy(command),
        Command::Authz { command: AuthzCommand::Check(args) } => return warden_authz::cli::run_authz_check(args),
        Command::Ca { command } => {
            use warden_identity::cli::CaCommand;
            if let CaCommand::Serve { kubernetes, .. } = &command {
                // The CA logs each issuance and refusal.
                init_logging(Output::Text);
                // In a cluster it authenticates node agents through the API server (kubeca).
                if *kubernetes {
                    return warden_agent::kubeca::run(command);
                }
            }
            return warden_identity::cli::run_ca(command);
        }
        Command::Certs(args) => {
            return match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(warden_identity::cli::run_certs(&args)),
                Err(e) => {
                    eprintln!("warden: cannot start the async runtime: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Agent {
            workloads,
            policies,
            kubeconfig,
            cluster,
            node_name,
            cgroup_root,
            pin_dir,
            state_dir,
            trust_domain,
            root_namespace,
            cluster_domain,
            log_format,
            metrics_addr,
            ready_addr,
            access_log,
            ca_dir,
            ca_addr,
            ca_root_cert,
            ca_token_file,
            admin_addr,
            workload_cert_ttl,
            mesh,
            capture_addr,
            fast_path,
            no_fast_path,
            local_congestion_control,
            worker_threads,
            node_probes,
        } => {
            warden_agent::memory::single_arena();
            init_logging(log_format);
            let options =
                warden_authz::Options { root_namespace, trust_domain: trust_domain.clone(), ..Default::default() };
            let telemetry = telemetry::TelemetryConfig { metrics_addr, ready_addr, access_log, ..Default::default() };
            let ca = match (ca_dir, ca_addr, ca_root_cert) {
                (Some(dir), _, _) => Some(warden_agent::certs::CaSource::Local { dir }),
                (None, Some(url), Some(root_cert)) => {
                    Some(warden_agent::certs::CaSource::Remote { url, root_cert, token_file: ca_token_file })
                }
                _ => None,
            };
            let certs =
                ca.map(|source| warden_agent::certs::CertsConfig { source, admin_addr, cert_ttl: workload_cert_ttl });
            let fast_path = !no_fast_path && (fast_path || defaults::FAST_PATH);
            let mesh = mesh.then(|| warden_agent::mesh::MeshConfig {
                capture: capture_addr,
                fast_path,
                local_congestion: local_congestion_control,
                cluster_domain,
                cgroup_root: cgroup_root.clone().unwrap_or_else(warden_agent::source::kube::node::default_cgroup_root),
                ..Default::default()
            });
            let cfg = agent::AgentConfig { pin_dir, state_dir, trust_domain, telemetry, certs, mesh, node_probes };
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let worker_threads = worker_threads.unwrap_or_else(|| defaults::worker_threads(cpus));
            tracing::info!(worker_threads, cpus, "async runtime");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_threads.into())
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async move {
                        use warden_agent::source::{Source, files::FileSource, kube};
                        let source: Box<dyn Source> = match (workloads, policies) {
                            (Some(w), Some(p)) => Box::new(FileSource::new(w, p, options)),
                            _ => {
                                let connection = match (kubeconfig, cluster) {
                                    (Some(path), _) => kube::Connection::Kubeconfig(path),
                                    (None, true) => kube::Connection::InCluster,
                                    (None, false) => {
                                        anyhow::bail!("give --workloads and --policies, --kubeconfig, or --cluster")
                                    }
                                };
                                let node_name = node_name.ok_or_else(|| {
                                    anyhow::anyhow!("--node-name (or NODE_NAME) is required with a cluster")
                                })?;
                                let cgroup_root = cgroup_root.unwrap_or_else(kube::node::default_cgroup_root);
                                Box::new(
                                    kube::KubeSource::connect(kube::KubeConfig {
                                        connection,
                                        node_name,
                                        cgroup_root,
                                        options,
                                        watches: cfg.telemetry.watches.clone(),
                                    })
                                    .await?,
                                )
                            }
                        };
                        agent::run(cfg, source).await
                    })
                })
        }
        Command::Maps { pin_dir, state_dir, output } => inspect::read(&pin_dir, &state_dir).map(|v| match output {
            Output::Text => print!("{}", inspect::render(&v)),
            Output::Json => println!("{}", serde_json::to_string_pretty(&v).expect("view serializes")),
        }),
        Command::Cleanup { pin_dir } => (|| {
            // A running agent would put back what this removes: it must be stopped first.
            let _pins = datapath::lock::PinLock::acquire_existing(&pin_dir).map_err(|e| {
                anyhow::anyhow!("{e}: stop it first (it would put back what cleanup removes); nothing removed")
            })?;
            datapath::remove_pins(&pin_dir);
            let (removed, failed) = warden_agent::mesh::routing::remove();
            for what in removed {
                eprintln!("warden cleanup: removed the mesh's {what}");
            }
            failed.map_or(Ok(()), |e| Err(e.into()))
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warden: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, each once ([`warden_agent::describe`]).
fn describe(e: &anyhow::Error) -> String {
    warden_agent::describe(e.as_ref())
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn an_invalid_trust_domain_is_refused_naming_the_flag() {
        use clap::Parser as _;
        let agent = |td: &'static str| {
            super::Cli::try_parse_from(["warden", "agent", "--workloads", "w", "--policies", "p", "--trust-domain", td])
        };
        let err = agent("Bad TD").err().expect("an invalid trust domain must be refused");
        let text = err.to_string();
        assert!(text.contains("--trust-domain") && text.contains("Bad TD") && text.contains("lower-case"), "{text}");
        for bad in ["", "example.org:8080", "user@example.org"] {
            assert!(agent(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(agent("example.org").is_ok());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("creating {path}: {source}")]
    struct Named {
        path: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting")]
    struct Unnamed {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_is_printed_once() {
        let denied = || std::io::Error::from_raw_os_error(libc::EACCES);
        let named = anyhow::Error::new(Named { path: "/sys/fs/bpf/warden", source: denied() });
        assert_eq!(describe(&named), "creating /sys/fs/bpf/warden: Permission denied (os error 13)");
        let unnamed = anyhow::Error::new(Unnamed { source: denied() });
        assert_eq!(describe(&unnamed), "starting: Permission denied (os error 13)");
        let context = anyhow::Error::new(Named { path: "/x", source: denied() }).context("loading");
        assert_eq!(describe(&context), "loading: creating /x: Permission denied (os error 13)");
    }
}
