//! Workload identity and PKI for warden.
//!
//! One concern per module:
//! - [`identity`]: the SPIFFE identity type and its parser.
//! - [`ca`]: the certificate authority (self-signed or Istio `cacerts` plug-in), CSR signing, CRL.
//! - [`workload`]: the node agent's secret manager: key generation, CSR, rotation, CA client seam.
//! - [`tls`]: rustls mTLS configs, SPIFFE-aware verifiers, trust-bundle/CRL store, PQC policy.
//! - [`server`]: Istio's `IstioCertificateService` gRPC API with requester authentication.
//! - [`metrics`]: prometheus-client metrics.
//! - [`cli`]: `warden ca ...` and `warden certs`.
#![forbid(unsafe_code)]

pub mod ca;
pub mod cli;
pub mod clock;
pub mod identity;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod workload;

/// Generated protobuf/gRPC types of Istio's CA API (`istio.v1.auth`).
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("istio.v1.auth");
}

pub use clock::{Clock, ManualClock, SystemClock};
pub use identity::{Identity, IdentityError};
