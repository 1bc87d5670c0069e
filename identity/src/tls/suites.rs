//! The TLS 1.3 cipher suites, and whose AES-GCM encrypts the records.
//!
//! Key exchange (the hybrid post-quantum `X25519MLKEM768`) and signatures are aws-lc-rs's. The
//! record layer is the mesh's bulk cost, and the two libraries' AES-GCM differ by CPU: aws-lc has
//! a VAES AVX-512 implementation but nothing between it and the AES-NI one that interleaves six
//! blocks (`aesni_ctr32_ghash_6x`), while ring has a VAES AVX2 one. On a CPU with VAES and
//! AVX2 but no AVX-512 (the AMD EPYC of this project's CI machines), a 16 KiB record of
//! AES-256-GCM through rustls seals at 3.7 GiB/s with ring's and 2.7 with aws-lc's, and opens at
//! 6.2 against 2.7 (`cargo bench -p warden-identity --bench records`, which seals its own copy
//! of the plaintext as rustls does). With aws-lc's, AES-GCM was a third of the agents' CPU in a
//! cross-node transfer on such a machine (docs/mesh.md). So the suites
//! are aws-lc's where its AVX-512 path runs, ring's everywhere else (without VAES both run the
//! same AES-NI code). Other architectures keep aws-lc's. Both are TLS 1.3 AES-GCM: the wire
//! cannot tell.

use rustls::SupportedCipherSuite;
use rustls::crypto::{aws_lc_rs, ring};

/// Whose AES-GCM the record layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordCipher {
    /// aws-lc: its VAES AVX-512 AES-GCM runs on this CPU, or the CPU is not x86-64 (aws-lc's
    /// Arm AES-GCM is unrolled eight blocks wide).
    AwsLc,
    /// ring: VAES AVX2 where the CPU has it, AES-NI otherwise.
    Ring,
}

impl RecordCipher {
    /// The faster of the two on this CPU. aws-lc takes its AVX-512 path when the CPU has VAES,
    /// VPCLMULQDQ and AVX-512 F, DQ, BW and VL (`crypto_gcm_avx512_enabled`).
    pub fn for_this_cpu() -> RecordCipher {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("vaes")
                && has!("vpclmulqdq")
                && has!("avx512f")
                && has!("avx512dq")
                && has!("avx512bw")
                && has!("avx512vl")
            {
                RecordCipher::AwsLc
            } else {
                RecordCipher::Ring
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        RecordCipher::AwsLc
    }

    /// TLS 1.3 AES-GCM, AES-256 preferred.
    pub fn suites(self) -> Vec<SupportedCipherSuite> {
        match self {
            RecordCipher::AwsLc => vec![
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ],
            RecordCipher::Ring => {
                vec![ring::cipher_suite::TLS13_AES_256_GCM_SHA384, ring::cipher_suite::TLS13_AES_128_GCM_SHA256]
            }
        }
    }
}
