//! Validated resources: the form the engine evaluates and the compiler compiles. Every string
//! pattern is precompiled; every field is typed. Built only by [`crate::validate`].

use crate::matcher::{PathMatch, StrMatch, TimeWindow, ValueMatch};
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::fmt;

/// AuthorizationPolicy action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `targetRef(s)` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// Which workloads of its scope a policy selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// No selector and no targetRefs: every workload of the namespace (mesh-wide in the root namespace).
    All,
    /// `selector.matchLabels`: workloads carrying all these labels.
    Labels(BTreeMap<String, String>),
    /// `targetRef`/`targetRefs`: workloads behind these Services / Gateways.
    TargetRefs(Vec<TargetRef>),
}

/// A validated AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthzPolicy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    /// `provider.name` of a CUSTOM policy.
    pub provider: Option<String>,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
    pub selection: Selection,
    /// Empty when `rules` is unset or `[]`: the policy matches nothing.
    pub rules: Vec<Rule>,
    /// `file: document N` the policy came from.
    pub origin: String,
}

impl AuthzPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One rule: at least one `from` and at least one `to` (when present) and every `when`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Empty: any source.
    pub from: Vec<Source>,
    /// Empty: any operation.
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
    /// Uses an attribute only an HTTP enforcement point can see.
    pub has_l7: bool,
    /// Every clause that constrains anything is L7-only: stripped to L4 it matches everything.
    pub only_l7: bool,
}

/// `from.source`. Positive lists OR; the `not_` lists exclude; fields AND.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Source {
    pub principals: Vec<StrMatch>,
    pub not_principals: Vec<StrMatch>,
    pub request_principals: Vec<StrMatch>,
    pub not_request_principals: Vec<StrMatch>,
    pub namespaces: Vec<StrMatch>,
    pub not_namespaces: Vec<StrMatch>,
    /// (namespace, service account).
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    pub ip_blocks: Vec<Ipv4Net>,
    pub not_ip_blocks: Vec<Ipv4Net>,
    pub remote_ip_blocks: Vec<Ipv4Net>,
    pub not_remote_ip_blocks: Vec<Ipv4Net>,
}

impl Source {
    pub fn has_l7(&self) -> bool {
        !(self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.remote_ip_blocks.is_empty()
            && self.not_remote_ip_blocks.is_empty())
    }
    pub fn has_l4(&self) -> bool {
        !(self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty())
    }
}

/// `to.operation`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Operation {
    pub hosts: Vec<StrMatch>,
    pub not_hosts: Vec<StrMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StrMatch>,
    pub not_methods: Vec<StrMatch>,
    pub paths: Vec<PathMatch>,
    pub not_paths: Vec<PathMatch>,
}

impl Operation {
    pub fn has_l7(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
    pub fn has_l4(&self) -> bool {
        !(self.ports.is_empty() && self.not_ports.is_empty())
    }
}

/// A `when` key, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    /// `source.serviceAccount`: `namespace/name`, or `name` in the policy's namespace.
    SourceServiceAccount,
    RemoteIp,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `request.headers[name]`; the name is lower-cased (HTTP header names are case-insensitive).
    RequestHeader(String),
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// `request.auth.claims[a][b]`: the path into nested claims.
    AuthClaim(Vec<String>),
    /// `experimental.envoy.filters.*`: accepted by Istio, not evaluated by warden.
    Experimental(String),
    /// warden extension `custom.time_of_day`.
    TimeOfDay,
    /// warden extension `custom.day_of_week`.
    DayOfWeek,
}

impl Key {
    /// Only an HTTP enforcement point (or a TLS-inspecting one, for SNI) can see it.
    pub fn is_l7(&self) -> bool {
        matches!(
            self,
            Key::RemoteIp
                | Key::ConnectionSni
                | Key::RequestHeader(_)
                | Key::AuthPrincipal
                | Key::AuthAudiences
                | Key::AuthPresenter
                | Key::AuthClaim(_)
                | Key::Experimental(_)
        )
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::SourceIp => f.write_str("source.ip"),
            Key::SourceNamespace => f.write_str("source.namespace"),
            Key::SourcePrincipal => f.write_str("source.principal"),
            Key::SourceServiceAccount => f.write_str("source.serviceAccount"),
            Key::RemoteIp => f.write_str("remote.ip"),
            Key::DestinationIp => f.write_str("destination.ip"),
            Key::DestinationPort => f.write_str("destination.port"),
            Key::ConnectionSni => f.write_str("connection.sni"),
            Key::RequestHeader(h) => write!(f, "request.headers[{h}]"),
            Key::AuthPrincipal => f.write_str("request.auth.principal"),
            Key::AuthAudiences => f.write_str("request.auth.audiences"),
            Key::AuthPresenter => f.write_str("request.auth.presenter"),
            Key::AuthClaim(p) => {
                f.write_str("request.auth.claims")?;
                for s in p {
                    write!(f, "[{s}]")?;
                }
                Ok(())
            }
            Key::Experimental(k) => f.write_str(k),
            Key::TimeOfDay => f.write_str("custom.time_of_day"),
            Key::DayOfWeek => f.write_str("custom.day_of_week"),
        }
    }
}

/// The typed values of a `when` condition (the type follows the key).
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    Ips(Vec<Ipv4Net>),
    Ports(Vec<u16>),
    Strs(Vec<StrMatch>),
    /// (namespace, service account).
    ServiceAccounts(Vec<(String, String)>),
    Headers(Vec<ValueMatch>),
    Windows(Vec<TimeWindow>),
    Days(Vec<u8>),
}

impl Values {
    pub fn is_empty(&self) -> bool {
        match self {
            Values::Ips(v) => v.is_empty(),
            Values::Ports(v) => v.is_empty(),
            Values::Strs(v) => v.is_empty(),
            Values::ServiceAccounts(v) => v.is_empty(),
            Values::Headers(v) => v.is_empty(),
            Values::Windows(v) => v.is_empty(),
            Values::Days(v) => v.is_empty(),
        }
    }
}

/// `when`: `values` (any matches; ignored when empty) and `notValues` (none matches).
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub key: Key,
    pub values: Values,
    pub not_values: Values,
}

// ---------------------------------------------------------------- PeerAuthentication

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    pub fn parse(s: &str) -> Option<MtlsMode> {
        match s {
            "UNSET" => Some(MtlsMode::Unset),
            "DISABLE" => Some(MtlsMode::Disable),
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            "STRICT" => Some(MtlsMode::Strict),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_level: BTreeMap<u16, MtlsMode>,
    pub origin: String,
}

impl PeerAuth {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// ---------------------------------------------------------------- RequestAuthentication

#[derive(Clone, Debug, PartialEq)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    /// Inline JWKS (validated as JSON with a `keys` array).
    pub jwks: Option<String>,
    /// (header name, value prefix).
    pub from_headers: Vec<(String, String)>,
    pub from_params: Vec<String>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RequestAuth {
    pub namespace: String,
    pub name: String,
    pub selection: Selection,
    pub jwt_rules: Vec<JwtRule>,
    pub origin: String,
}

/// A validated resource, with the validator's warnings (already formatted with their location).
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    AuthorizationPolicy(AuthzPolicy),
    PeerAuthentication(PeerAuth),
    RequestAuthentication(RequestAuth),
}

impl Resource {
    pub fn key(&self) -> String {
        match self {
            Resource::AuthorizationPolicy(p) => p.key(),
            Resource::PeerAuthentication(p) => p.key(),
            Resource::RequestAuthentication(r) => format!("{}/{}", r.namespace, r.name),
        }
    }
}
