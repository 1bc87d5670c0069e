//! Compiles the vendored Istio CA protobuf with pure-Rust tooling (protox), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ca.proto");
    let fds = protox::compile(["proto/ca.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
