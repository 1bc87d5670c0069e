//! Link arguments of the eBPF object, wherever it is built from (`cargo xtask build-ebpf`, the
//! agent's build script through aya-build).

fn main() {
    // bpf-linker asks LLVM for `--bpf-expand-memcpy-in-order` by default, which also stops LLVM
    // from expanding `memset` inline: every zero-initialised key or value (padding, counter
    // deltas, fresh flow entries) became a BPF-to-BPF call into a byte-at-a-time `memset`, a few
    // per packet, each paying a call and a return (through the return thunk on CPUs with
    // speculation mitigations). Without it LLVM writes the zeros inline. The ordering the flag
    // keeps for memcpy matters only to JITs that pattern-match copies, which x86-64's does not.
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
