//! `cargo xtask <task>`: everything beyond a plain cargo build.
//!
//! | task          | what it does                                                              |
//! |---------------|---------------------------------------------------------------------------|
//! | `setup`       | install what is missing (apt packages, eBPF nightly, bpf-linker, bpffs)   |
//! | `build-ebpf`  | setup, then build the eBPF object alone                                   |
//! | `lab`         | setup, build, bring up the payments-mesh lab, drive traffic, print matrix |
//! | `lab down`    | remove every namespace, link, cgroup and pin the lab made                 |
//! | `test`        | setup, build, run every test (root/netns tests included)                  |
//! | `bench l4`    | the L4 datapath benchmark (see `bench.rs`)                                |
//! | `bench mtls`  | the mTLS data plane against direct TCP (see `bench_mtls.rs`)              |

mod attached;
mod bench;
mod bench_mtls;
mod big_tcp;
mod lab;
mod process;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: apt packages, the pinned eBPF nightly, bpf-linker; mount bpffs.
    Setup,
    /// Build the eBPF object alone (target/bpfel-unknown-none/release/warden).
    BuildEbpf,
    /// The lab: one node with the payments mesh; `lab down` tears it down.
    Lab {
        #[arg(value_parser = ["up", "down"], default_value = "up")]
        action: String,
    },
    /// Run every test, root and network-namespace tests included.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `l4` (datapath throughput, connection rate, per-packet program cost), `mtls`
    /// (the mesh against direct TCP: throughput, latency, connection rate, agent CPU and memory).
    Bench {
        #[arg(value_parser = ["l4", "mtls"])]
        which: String,
        /// `l4` only: run only the configurations of this kind besides the baseline: `warden`,
        /// `iptables`, `nftables` (for quick iterations; the README's figures come from a full run).
        #[arg(long, value_parser = ["warden", "iptables", "nftables"])]
        only: Option<String>,
        /// `l4` only: of the warden configurations, run only one with about this many policy
        /// entries (access log off).
        #[arg(long)]
        entries: Option<usize>,
        /// `l4` only: rounds of each half of the crossover pass (even; 12 when not given). More
        /// rounds take longer and narrow the estimates' 95% intervals (about 4x the rounds for
        /// half the width).
        #[arg(long)]
        rounds: Option<usize>,
        /// `mtls` only: BIG TCP on every lab link, all rows (IPv4 GSO/GRO up to this many bytes,
        /// 65536 to 524280, as Cilium's `enableIPv4BIGTCP` sets a node's), instead of the
        /// kernel's 64 KiB.
        #[arg(long)]
        big_tcp: Option<u32>,
    },
    /// `bench mtls`'s clients, which it runs inside lab workloads (no setup, no build).
    #[command(hide = true)]
    BenchClient {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Build the workspace (host code, the embedded eBPF object, the lab's probe).
pub fn cargo_build(release: bool) -> anyhow::Result<()> {
    let mut c = Command::new("cargo");
    c.args(["build", "--bins"]); // default-members: the eBPF crate is built by agent/build.rs
    if release {
        c.arg("--release");
    }
    if !c.status().context("cargo build")?.success() {
        bail!("cargo build failed");
    }
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    let root = warden_tests::workspace_root();
    let path = format!("{}:{}", setup::LLVM_BIN, std::env::var("PATH").unwrap_or_default());
    let status = Command::new("rustup")
        .args([
            "run",
            setup::EBPF_TOOLCHAIN,
            "cargo",
            "build",
            "--package",
            "warden-ebpf",
            "--bin",
            "warden",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .env("PATH", path)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .current_dir(root.join("ebpf"))
        .status()
        .context("building the eBPF object")?;
    if !status.success() {
        bail!("eBPF build failed");
    }
    eprintln!("eBPF object: {}", root.join("target/bpfel-unknown-none/release/warden").display());
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let apiserver = setup::kube_apiserver()?;
    cargo_build(false)?;
    let status = Command::new("cargo")
        .args(["test"])
        .args(args)
        .env("WARDEN_KUBE_APISERVER", apiserver)
        .status()
        .context("cargo test")?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let setup = if matches!(cli.task, Task::BenchClient { .. }) { Ok(()) } else { setup::setup() };
    let r = setup.and_then(|()| match cli.task {
        Task::Setup => Ok(()),
        Task::BuildEbpf => build_ebpf(),
        Task::Lab { action } if action == "down" => lab::down(),
        Task::Lab { .. } => cargo_build(false).and_then(|()| lab::up()),
        Task::Test { args } => test(&args),
        Task::Bench { which, only, entries, rounds, .. }
            if which == "mtls" && (only.is_some() || entries.is_some() || rounds.is_some()) =>
        {
            bail!("--only, --entries and --rounds apply to `bench l4`")
        }
        Task::Bench { which, big_tcp, .. } if which == "mtls" => {
            cargo_build(true).and_then(|()| bench_mtls::mtls(big_tcp))
        }
        Task::Bench { big_tcp: Some(_), .. } => bail!("--big-tcp applies to `bench mtls`"),
        Task::Bench { only, entries, rounds, .. } => {
            cargo_build(true).and_then(|()| bench::l4(only.as_deref(), entries, rounds))
        }
        Task::BenchClient { args } => bench_mtls::client(&args),
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
