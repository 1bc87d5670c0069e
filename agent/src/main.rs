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
        #[arg(long, env = "NODE_NAME", required_if_eq_any = [("cluster", "true")], required_unless_present_any = ["workloads", "cluster"])]
        node_name: Option<String>,
        /// The cgroup v2 hierarchy holding the pods' cgroups (default: /sys/fs/cgroup/unified when
        /// it is a cgroup v2 mount, else /sys/fs/cgroup).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        #[arg(long, default_value = defaults::PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = defaults::STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long, default_value = defaults::TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(long, default_value = defaults::ROOT_NAMESPACE)]
        root_namespace: String,
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
    /// Detach every program and remove every pin under the pin directory (the node stops enforcing).
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

fn init_logging(format: Output) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
            log_format,
            metrics_addr,
            ready_addr,
            access_log,
        } => {
            init_logging(log_format);
            let options = warden_authz::Options { root_namespace, ..Default::default() };
            let telemetry = telemetry::TelemetryConfig { metrics_addr, ready_addr, access_log, ..Default::default() };
            let cfg = agent::AgentConfig { pin_dir, state_dir, trust_domain, telemetry };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
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
                                    (None, false) => anyhow::bail!("give --workloads and --policies, --kubeconfig, or --cluster"),
                                };
                                let node_name = node_name.ok_or_else(|| anyhow::anyhow!("--node-name (or NODE_NAME) is required with a cluster"))?;
                                let cgroup_root = cgroup_root.unwrap_or_else(kube::node::default_cgroup_root);
                                Box::new(kube::KubeSource::connect(kube::KubeConfig { connection, node_name, cgroup_root, options }).await?)
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
        Command::Cleanup { pin_dir } => {
            datapath::remove_pins(&pin_dir);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warden: {e:#}");
            ExitCode::FAILURE
        }
    }
}
