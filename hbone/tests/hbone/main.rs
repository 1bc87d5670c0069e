//! HBONE end to end on loopback: real sockets, real TLS, real HTTP/2.
//!
//! - `tunnel`: bytes, half-close, flow control, refusals and malformed requests.
//! - `pool`: multiplexing, single-flight, idle close, reconnect after a server restart, shutdown.
//! - `security`: certificates refused on either side, rotation under load.
//! - `interop`: an HBONE peer on independent stacks (OpenSSL, hyper-h2) against warden's server
//!   and client.

mod common;
mod interop;
mod pool;
mod security;
mod tunnel;
