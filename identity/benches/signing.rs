//! CA signing throughput on one core.
//!
//! Run pinned to one CPU:
//! `CARGO_TARGET_DIR=target-identity taskset -c 0 cargo bench -p warden-identity --bench signing`
//!
//! - `ca/sign_parsed_csr`: the CA's signing work per workload certificate (fresh serial, TBS
//!   encoding, ECDSA P-256 signature, PEM chain). Key generation belongs to the requester.
//! - `ca/sign_csr_pem`: the whole request path of the CA: PEM/DER parsing, CSR signature
//!   verification, SPIFFE ID extraction and checks, then signing.
//! - `agent/generate_key_and_csr`: the requester's side, for reference.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use warden_identity::Identity;
use warden_identity::ca::{CaConfig, CertificateAuthority};
use warden_identity::clock::SystemClock;
use warden_identity::workload::generate_key_and_csr;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_init(dir.path(), CaConfig::default(), Arc::new(SystemClock)).unwrap();
    let id = Identity::spiffe("cluster.local", "default", "web").unwrap();
    let (_key, csr) = generate_key_and_csr(&id).unwrap();
    let parsed = ca.parse_csr(&csr).unwrap();

    let mut g = c.benchmark_group("ca");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("sign_parsed_csr", |b| b.iter(|| ca.sign(&parsed, None).unwrap()));
    g.bench_function("sign_csr_pem", |b| b.iter(|| ca.sign_csr(&csr, None).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("agent");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("generate_key_and_csr", |b| b.iter(|| generate_key_and_csr(&id).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
