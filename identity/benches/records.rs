//! The TLS record layer's AES-GCM: one full record (16 KiB of application data) sealed and
//! opened through rustls's own record encrypter and decrypter, with the suites of each
//! [`RecordCipher`] (aws-lc's and ring's). Which is faster depends on the CPU; the agent uses
//! `RecordCipher::for_this_cpu()`, printed first.
//!
//! `cargo bench -p warden-identity --bench records`
//!
//! AES-256-GCM only: it is the suite warden's peers negotiate (preferred by both sides), and
//! rustls builds a 16-byte key only inside its key schedule.

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rustls::crypto::cipher::{AeadKey, InboundOpaqueMessage, Iv, OutboundChunks, OutboundPlainMessage};
use rustls::{CipherSuite, ContentType, ProtocolVersion, SupportedCipherSuite};
use warden_identity::tls::RecordCipher;

/// The largest record's plaintext.
const RECORD: usize = 16 * 1024;

fn bench(c: &mut Criterion) {
    eprintln!("records: this CPU's choice is {:?}", RecordCipher::for_this_cpu());
    let plaintext = vec![0x5a; RECORD];
    let mut g = c.benchmark_group("record_aes256gcm_16k");
    g.throughput(Throughput::Bytes(RECORD as u64));
    g.measurement_time(Duration::from_secs(3));
    for lib in [RecordCipher::AwsLc, RecordCipher::Ring] {
        let aead = lib
            .suites()
            .into_iter()
            .find_map(|s| match s {
                SupportedCipherSuite::Tls13(t) if t.common.suite == CipherSuite::TLS13_AES_256_GCM_SHA384 => {
                    Some(t.aead_alg)
                }
                _ => None,
            })
            .expect("an AES-256-GCM suite");
        let key = || AeadKey::from([7; 32]);
        let iv = || Iv::new([9; 12]);
        let mut sealer = aead.encrypter(key(), iv());
        let mut opener = aead.decrypter(key(), iv());
        let message = |payload| OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        // aws-lc's TLS 1.3 sealing key insists on sequence numbers from 0 up, as a connection's.
        let mut seq = 0;
        g.bench_function(format!("{lib:?}/seal"), |b| {
            b.iter(|| {
                let record = sealer.encrypt(message(&plaintext), seq).unwrap();
                seq += 1;
                record
            });
        });
        let record = aead.encrypter(key(), iv()).encrypt(message(&plaintext), 0).unwrap().encode();
        g.bench_function(format!("{lib:?}/open"), |b| {
            b.iter_batched_ref(
                || record.clone(),
                |wire| {
                    let msg = InboundOpaqueMessage::new(
                        ContentType::ApplicationData,
                        ProtocolVersion::TLSv1_2,
                        &mut wire[5..],
                    );
                    let plain = opener.decrypt(msg, 0).unwrap();
                    assert_eq!(plain.payload.len(), RECORD);
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
