//! Provisioning: everything a fresh Debian 12 machine needs, installed idempotently. Each step
//! checks first and costs nothing when already done.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// The eBPF toolchain: its LLVM major (22) must equal bpf-linker's. Keep in step with agent/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-06-15";
pub const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// hyper-h2, the HTTP/2 stack of the HBONE interop tests' independent peer
/// (`hbone/tests/hbone/peer.py`), in a virtual environment of the machine's Python 3
/// (`warden_tests::INTEROP_VENV`; the tests find it there, or at `WARDEN_INTEROP_PYTHON`).
const H2_VERSION: &str = "4.3.0";

/// Debian packages: LLVM 22 for bpf-linker, bpftool, iproute2 for the lab, iptables/nftables and
/// iperf3 for the L4 benchmark's comparisons, Prometheus for the observability tests, tcpdump for
/// the mesh tests' wire captures.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "iperf3",
    "prometheus",
    "tcpdump",
];

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}

fn sh(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    eprintln!("setup: {what}");
    let status = cmd.status().with_context(|| what.to_string())?;
    if !status.success() {
        bail!("setup: {what} failed ({status})");
    }
    Ok(())
}

fn apt_missing() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

/// Install what is missing. `root_only`: steps that need root (apt, bpffs) are skipped with a
/// message when not root.
pub fn setup() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing = apt_missing();
    if !missing.is_empty() {
        if !root {
            bail!("setup: needs root to install {missing:?} (run as root, or install them)");
        }
        sh(Command::new("apt-get").args(["update", "-q"]), "apt-get update")?;
        sh(
            // With recommends, as in the verified toolchain recipe (LLVM's runtime and linker tools).
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            &format!("apt-get install {}", missing.join(" ")),
        )?;
    }

    let toolchains = Command::new("rustup").args(["toolchain", "list"]).output().context("rustup")?;
    let has_nightly = String::from_utf8_lossy(&toolchains.stdout).lines().any(|l| l.starts_with(EBPF_TOOLCHAIN));
    let has_src = has_nightly
        && Command::new("rustup")
            .args(["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")));
    if !has_src {
        sh(
            Command::new("rustup").args([
                "toolchain",
                "install",
                EBPF_TOOLCHAIN,
                "--profile",
                "minimal",
                "-c",
                "rust-src",
            ]),
            &format!("rustup toolchain install {EBPF_TOOLCHAIN} (+rust-src)"),
        )?;
    }

    if !bpf_linker_ok() {
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        sh(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path),
            &format!("cargo install bpf-linker {BPF_LINKER_VERSION} (llvm-22)"),
        )?;
    }

    if root && !ok(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]), "mount bpffs at /sys/fs/bpf")?;
    }
    // Prometheus' Debian package starts a system service; the tests run their own instance.
    let _ =
        Command::new("systemctl").args(["disable", "--now", "prometheus"]).stderr(std::process::Stdio::null()).status();
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("setup: WARNING: no /sys/kernel/btf/vmlinux; the kernel lacks BTF and the datapath will not load");
    }
    interop_peer()
}

/// The HBONE interop peer's Python environment ([`H2_VERSION`] in `warden_tests::INTEROP_VENV`).
fn interop_peer() -> anyhow::Result<()> {
    let venv = warden_tests::workspace_root().join(warden_tests::INTEROP_VENV);
    let python = venv.join("bin/python3");
    let check = format!("import sys, h2; sys.exit(h2.__version__ != '{H2_VERSION}')");
    if ok(Command::new(&python).args(["-c", &check])) {
        return Ok(());
    }
    sh(Command::new("python3").args(["-m", "venv"]).arg(&venv), &format!("python3 -m venv {}", venv.display()))?;
    sh(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            &format!("h2=={H2_VERSION}"),
        ]),
        &format!("pip install h2=={H2_VERSION} (the HBONE interop peer)"),
    )
}

/// The real Kubernetes API server the integration tests run against: built from Debian's source
/// package by `../shared/kube-apiserver/setup.sh` (about 4 minutes once, cached). Returns its path.
pub fn kube_apiserver() -> anyhow::Result<std::path::PathBuf> {
    let script = warden_tests::workspace_root().join("../shared/kube-apiserver/setup.sh");
    if !script.exists() {
        bail!("{} not found: the Kubernetes integration tests need ../shared beside the repository", script.display());
    }
    eprintln!("setup: kube-apiserver (cached after the first build)");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("kube-apiserver setup")?;
    if !out.status.success() {
        bail!("kube-apiserver setup failed");
    }
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    Ok(path.into())
}
