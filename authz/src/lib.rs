//! Istio security API: parse, validate, evaluate, compile.
//!
//! - [`load_paths`] / [`parse_str`]: YAML -> validated resources ([`model`]), all or nothing,
//!   every error with file, document, resource, field path and reason.
//! - [`PolicySet::evaluate`]: Istio's semantics at L4 and L7 with an explanation.
//! - [`compile()`]: the L4 part -> the datapath's identity cache and policy map entries.
#![forbid(unsafe_code)]

pub mod cli;
pub mod compile;
pub mod error;
pub mod eval;
pub mod load;
pub mod matcher;
pub mod model;
pub mod names;
pub mod request;
pub mod resource;
pub mod set;
pub mod validate;

pub use compile::{CompileInput, Compiled, IdAllocator, compile};
pub use error::{CompileError, LoadError, LoadErrors};
pub use eval::{Decision, Destination, Http, Jwt, Layer, Peer, Request, Verdict};
pub use load::{Parsed, load_paths, load_paths_with, parse_str, parse_str_with_warnings, policy_inputs};
pub use model::Resource;
pub use request::parse_request;
pub use set::{Options, PolicySet, Workload};
