//! Workload identity and PKI.
