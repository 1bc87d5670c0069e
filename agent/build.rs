//! Builds the eBPF object with the pinned nightly (see `EBPF_TOOLCHAIN`) and bpf-linker, so the
//! agent embeds it. `cargo xtask setup` installs both; `AYA_BUILD_SKIP=1` skips this for
//! tooling that only needs the host code to type-check.

/// The eBPF toolchain. Its LLVM major must equal bpf-linker's (22): never float it.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-15";

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "warden-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
