//! `warden policy validate` and `warden authz check`, as library code the `warden` binary wires in.

use crate::eval::{Decision, Verdict};
use crate::load::load_paths_with;
use crate::request::parse_request;
use crate::set::{Options, PolicySet};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code: valid / ALLOW.
pub const EXIT_OK: u8 = 0;
/// Exit code of `authz check` for a DENY.
pub const EXIT_DENY: u8 = 1;
/// Exit code: invalid policies or request.
pub const EXIT_INVALID: u8 = 2;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate AuthorizationPolicy / PeerAuthentication / RequestAuthentication files.
    Validate {
        /// Files or directories (searched recursively for *.yaml / *.yml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Namespace whose policies apply mesh-wide.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
        /// The mesh's trust domain (a policy's `cluster.local/...` principals name it).
        #[arg(long, default_value = crate::matcher::CLUSTER_LOCAL)]
        trust_domain: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AuthzCheckArgs {
    /// Policy files or directories (repeatable).
    #[arg(long, required = true)]
    pub policies: Vec<PathBuf>,
    /// The request file (YAML) describing one connection or HTTP request.
    #[arg(long)]
    pub request: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Namespace whose policies apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// The mesh's trust domain (a policy's `cluster.local/...` principals name it).
    #[arg(long, default_value = crate::matcher::CLUSTER_LOCAL)]
    pub trust_domain: String,
}

pub fn run_policy(cmd: PolicyCommand) -> ExitCode {
    ExitCode::from(run_policy_to(cmd, &mut std::io::stdout(), &mut std::io::stderr()))
}

pub fn run_authz_check(args: AuthzCheckArgs) -> ExitCode {
    ExitCode::from(run_authz_check_to(args, &mut std::io::stdout(), &mut std::io::stderr()))
}

/// [`run_policy`] writing to the given streams; returns the exit code.
pub fn run_policy_to(cmd: PolicyCommand, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match cmd {
        PolicyCommand::Validate { paths, root_namespace, trust_domain } => {
            let options = Options { root_namespace, trust_domain, ..Options::default() };
            match load_paths_with(&paths, &options) {
                Ok(set) => {
                    for w in set.warnings() {
                        let _ = writeln!(err, "{w}");
                    }
                    let _ = writeln!(out, "{}", summary(&set));
                    EXIT_OK
                }
                Err(e) => {
                    for e in e.iter() {
                        let _ = writeln!(err, "error: {e}");
                    }
                    let _ = writeln!(err, "{} error(s); nothing loaded", e.len());
                    EXIT_INVALID
                }
            }
        }
    }
}

fn summary(set: &PolicySet) -> String {
    format!(
        "valid: {} AuthorizationPolicy, {} PeerAuthentication, {} RequestAuthentication ({} warning(s))",
        set.authorization_policies().len(),
        set.peer_authentications().len(),
        set.request_authentications().len(),
        set.warnings().len()
    )
}

/// Renders a decision as text.
pub fn decision_text(d: &Decision) -> String {
    let verdict = match d.decision {
        Verdict::Allow => "ALLOW",
        Verdict::Deny => "DENY",
    };
    let layer = match d.layer {
        crate::eval::Layer::L4 => "L4",
        crate::eval::Layer::L7 => "L7",
    };
    let mut s = format!("{verdict} ({layer})");
    match (&d.policy, &d.action, d.rule) {
        (Some(p), Some(a), Some(r)) => s.push_str(&format!(" by {a} policy {p}, rule {r}")),
        (Some(p), Some(a), None) => s.push_str(&format!(" by {a} {p}")),
        _ => s.push_str(" by default"),
    }
    s.push_str(&format!("\nreason: {}", d.reason));
    for x in &d.shadow {
        s.push_str(&format!("\nnote: {x}"));
    }
    s
}

/// [`run_authz_check`] writing to the given streams; returns the exit code.
pub fn run_authz_check_to(args: AuthzCheckArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let options =
        Options { root_namespace: args.root_namespace, trust_domain: args.trust_domain, ..Options::default() };
    let set = match load_paths_with(&args.policies, &options) {
        Ok(s) => s,
        Err(e) => {
            for e in e.iter() {
                let _ = writeln!(err, "error: {e}");
            }
            return EXIT_INVALID;
        }
    };
    let text = match std::fs::read_to_string(&args.request) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(err, "error: {}: cannot read: {e}", args.request.display());
            return EXIT_INVALID;
        }
    };
    let req = match parse_request(&text) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "error: {}: {e}", args.request.display());
            return EXIT_INVALID;
        }
    };
    let d = set.evaluate(&req);
    match args.output {
        OutputFormat::Json => {
            let _ = writeln!(out, "{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        }
        OutputFormat::Text => {
            let _ = writeln!(out, "{}", decision_text(&d));
        }
    }
    match d.decision {
        Verdict::Allow => EXIT_OK,
        Verdict::Deny => EXIT_DENY,
    }
}
