//! Helpers for warden root integration tests.
