//! The node agent's side of identity: keys generated locally, CSRs sent to a CA through the
//! [`CaClient`] seam, certificates installed into [`CertSlot`]s and rotated before they expire.
//!
//! Rotation: a certificate is renewed once `rotation_fraction` of its lifetime has passed (default
//! half), minus a random jitter of up to `rotation_jitter` of the lifetime so that a fleet does not
//! renew in lock-step. If the CA fails, the current certificate stays in use while it is valid and
//! the attempt is retried with capped exponential backoff. An expired certificate is withdrawn.
//! Rotation only swaps the slot: established connections keep the keys they negotiated.

mod client;
mod keys;
mod manager;

pub use client::{
    BoxFuture, CA_TLS_SERVER_NAME, CaClient, CaClientError, GrpcCaClient, IMPERSONATED_IDENTITY_KEY, LocalCaClient,
};
pub use keys::generate_key_and_csr;
pub use manager::{
    CertStatus, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_ROTATION_FRACTION, DEFAULT_ROTATION_JITTER,
    RotationReport, SecretError, SecretManager, SecretManagerConfig, WorkloadCert,
};

#[cfg(test)]
mod tests;
