//! Workload side: key generation and CSRs (secret manager and rotation follow).
mod keys;
pub use keys::generate_key_and_csr;
