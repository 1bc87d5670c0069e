//! Validation: one YAML document -> a typed, precompiled [`Resource`], or every error in it with
//! its field path. Istio's own validation rules (pilot's `ValidateAuthorizationPolicy`,
//! `ValidatePeerAuthentication`, `ValidateRequestAuthentication`) are reproduced, plus the
//! checks warden needs (IPv4 only) and warnings for warden's non-portable extensions and for
//! L7 attributes that an L4-only enforcement point cannot see.

use crate::error::LoadError;
use crate::matcher::{PathMatch, StrMatch, TimeWindow, ValueMatch, parse_cidr, parse_weekday};
use crate::model::*;
use crate::names::{is_dns_label, is_dns_subdomain, label_key};
use crate::resource::{self as raw, API_VERSIONS, Kind, Scalar};
use std::collections::BTreeMap;

/// The annotation that turns a policy into a dry run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Collects the errors and warnings of one document.
pub(crate) struct Ctx<'a> {
    pub origin: &'a str,
    pub document: usize,
    pub resource: Option<String>,
    pub errors: Vec<LoadError>,
    pub warnings: Vec<String>,
}

impl<'a> Ctx<'a> {
    pub fn new(origin: &'a str, document: usize) -> Self {
        Ctx { origin, document, resource: None, errors: Vec::new(), warnings: Vec::new() }
    }
    pub fn err(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(LoadError {
            origin: self.origin.to_string(),
            document: Some(self.document),
            resource: self.resource.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }
    pub fn warn(&mut self, field: &str, msg: impl AsRef<str>) {
        let e = LoadError {
            origin: self.origin.to_string(),
            document: Some(self.document),
            resource: self.resource.clone(),
            field: field.to_string(),
            reason: msg.as_ref().to_string(),
        };
        self.warnings.push(format!("warning: {e}"));
    }
    fn location(&self) -> String {
        format!("{}: document {}", self.origin, self.document)
    }
}

/// Validates one parsed YAML document. `Ok(None)` for an empty document.
pub(crate) fn document(ctx: &mut Ctx, doc: serde_yaml::Value) -> Option<Resource> {
    if doc.is_null() {
        return None;
    }
    let serde_yaml::Value::Mapping(map) = &doc else {
        ctx.err("", "a document must be a mapping with apiVersion, kind, metadata and spec");
        return None;
    };
    let get = |k: &str| map.get(serde_yaml::Value::String(k.to_string()));
    let api_version = get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    let kind_s = get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let metadata: raw::Metadata = match get("metadata") {
        None => raw::Metadata::default(),
        Some(v) => deserialize_at(ctx, "metadata", v.clone())?,
    };
    let namespace = metadata.namespace.clone().unwrap_or_else(|| "default".to_string());
    if let Some(name) = &metadata.name {
        ctx.resource = Some(format!("{namespace}/{name}"));
    }
    let Some(kind) = Kind::parse(kind_s) else {
        if kind_s.is_empty() {
            ctx.err("kind", "missing; expected AuthorizationPolicy, PeerAuthentication or RequestAuthentication");
        } else {
            ctx.err(
                "kind",
                format!("{kind_s:?} is not supported; expected AuthorizationPolicy, PeerAuthentication or RequestAuthentication"),
            );
        }
        return None;
    };
    if !API_VERSIONS.contains(&api_version) {
        ctx.err("apiVersion", format!("{api_version:?} is not supported for {kind_s}; expected security.istio.io/v1 or security.istio.io/v1beta1"));
    }
    for k in map.keys() {
        let ks = k.as_str().unwrap_or("");
        if !matches!(ks, "apiVersion" | "kind" | "metadata" | "spec" | "status") {
            ctx.err(ks, format!("unknown top-level field {ks:?}"));
        }
    }
    let name = match &metadata.name {
        Some(n) if !n.is_empty() => n.clone(),
        _ => {
            ctx.err("metadata.name", "missing");
            String::new()
        }
    };
    // The API server's rules for a namespaced object: a name is a DNS-1123 subdomain, a
    // namespace a DNS-1123 label.
    if !name.is_empty() && !is_dns_subdomain(&name) {
        ctx.err(
            "metadata.name",
            format!("{name:?} is not a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.', at most 253)"),
        );
    }
    match metadata.namespace.as_deref() {
        None => ctx.warn("metadata.namespace", "missing; assuming namespace \"default\""),
        Some(ns) if !is_dns_label(ns) => ctx.err(
            "metadata.namespace",
            format!("{ns:?} is not a DNS-1123 label (lower-case alphanumerics and '-', at most 63)"),
        ),
        Some(_) => {}
    }
    for k in metadata.labels.keys() {
        if let Err(why) = label_key(k) {
            ctx.err(format!("metadata.labels[{k}]"), why);
        }
    }
    let spec = get("spec").cloned().unwrap_or(serde_yaml::Value::Mapping(Default::default()));
    let spec = if spec.is_null() { serde_yaml::Value::Mapping(Default::default()) } else { spec };
    let origin = ctx.location();
    match kind {
        Kind::AuthorizationPolicy => {
            let spec: raw::AuthorizationPolicySpec = deserialize(ctx, spec)?;
            authorization_policy(ctx, namespace, name, &metadata, spec, origin).map(Resource::AuthorizationPolicy)
        }
        Kind::PeerAuthentication => {
            let spec: raw::PeerAuthenticationSpec = deserialize(ctx, spec)?;
            dry_run_not_supported(ctx, &metadata, kind);
            peer_authentication(ctx, namespace, name, spec, origin).map(Resource::PeerAuthentication)
        }
        Kind::RequestAuthentication => {
            let spec: raw::RequestAuthenticationSpec = deserialize(ctx, spec)?;
            dry_run_not_supported(ctx, &metadata, kind);
            request_authentication(ctx, namespace, name, spec, origin).map(Resource::RequestAuthentication)
        }
    }
}

fn dry_run_not_supported(ctx: &mut Ctx, md: &raw::Metadata, kind: Kind) {
    if md.annotations.contains_key(DRY_RUN_ANNOTATION) {
        ctx.err(
            format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
            format!("{} does not support the annotation {DRY_RUN_ANNOTATION}; please remove it", kind.name()),
        );
    }
}

fn deserialize<T: serde::de::DeserializeOwned>(ctx: &mut Ctx, spec: serde_yaml::Value) -> Option<T> {
    deserialize_at(ctx, "spec", spec)
}

/// Deserializes `value`, found at `at`; an error names the field inside it. A boolean or number
/// where a label or annotation (a string) is expected gets a hint: YAML reads `true` and `1` as
/// such, Kubernetes wants them quoted.
fn deserialize_at<T: serde::de::DeserializeOwned>(ctx: &mut Ctx, at: &str, value: serde_yaml::Value) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() { at.to_string() } else { format!("{at}.{path}") };
            let mut reason = e.inner().to_string();
            if at == "metadata" && (path.starts_with("labels.") || path.starts_with("annotations.")) {
                reason.push_str(" (quote the value: \"true\", not true)");
            }
            ctx.err(field, reason);
            None
        }
    }
}

fn selection(
    ctx: &mut Ctx,
    selector: Option<raw::WorkloadSelector>,
    target_ref: Option<raw::TargetRef>,
    target_refs: Option<Vec<raw::TargetRef>>,
) -> Selection {
    // An empty list is no list, as in Istio (a repeated field): `targetRefs: []` leaves the policy
    // namespace-wide, it does not make it select nothing.
    let target_refs = target_refs.filter(|refs| !refs.is_empty());
    let n = selector.is_some() as u8 + target_ref.is_some() as u8 + target_refs.is_some() as u8;
    if n > 1 {
        ctx.err("spec", "only one of selector, targetRef or targetRefs can be set");
    }
    if let Some(sel) = selector {
        for (k, v) in &sel.match_labels {
            if k.contains('*') || v.contains('*') {
                ctx.err(
                    format!("spec.selector.matchLabels[{k}]"),
                    format!("wildcard is not supported in selector: \"{k}={v}\""),
                );
            }
            if k.is_empty() {
                ctx.err("spec.selector.matchLabels", "empty key is not allowed");
            }
        }
        if sel.match_labels.is_empty() {
            return Selection::All;
        }
        return Selection::Labels(sel.match_labels);
    }
    let (refs, field) = match (target_ref, target_refs) {
        (Some(r), _) => (vec![r], "spec.targetRef"),
        (None, Some(rs)) => (rs, "spec.targetRefs"),
        (None, None) => return Selection::All,
    };
    let mut out = Vec::new();
    for (i, r) in refs.into_iter().enumerate() {
        let f = if field == "spec.targetRef" { field.to_string() } else { format!("{field}[{i}]") };
        let kind = r.kind.unwrap_or_default();
        let group = r.group.unwrap_or_default();
        let name = r.name.unwrap_or_default();
        if name.is_empty() {
            ctx.err(format!("{f}.name"), "must be set");
        }
        if r.namespace.is_some() {
            ctx.err(format!("{f}.namespace"), "cross-namespace policy target references are not supported");
        }
        let ok = matches!(
            (group.as_str(), kind.as_str()),
            ("", "Service")
                | ("core", "Service")
                | ("gateway.networking.k8s.io", "Gateway")
                | ("networking.istio.io", "ServiceEntry")
        );
        if !ok {
            ctx.err(
                format!("{f}.kind"),
                format!("group {group:?} kind {kind:?} is not supported; use Service (group \"\"), Gateway (gateway.networking.k8s.io) or ServiceEntry (networking.istio.io)"),
            );
        }
        out.push(TargetRef { group, kind, name });
    }
    Selection::TargetRefs(out)
}

fn authorization_policy(
    ctx: &mut Ctx,
    namespace: String,
    name: String,
    md: &raw::Metadata,
    spec: raw::AuthorizationPolicySpec,
    origin: String,
) -> Option<AuthzPolicy> {
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" | "" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => Action::Custom,
        other => {
            ctx.err("spec.action", format!("{other:?} is not one of ALLOW, DENY, AUDIT, CUSTOM"));
            Action::Allow
        }
    };
    let dry_run = match md.annotations.get(DRY_RUN_ANNOTATION) {
        None => false,
        Some(v) => {
            let f = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
            if !matches!(action, Action::Allow | Action::Deny) {
                ctx.err(
                    &f,
                    format!("the annotation {DRY_RUN_ANNOTATION} only supports action ALLOW/DENY, found {action}"),
                );
            }
            match v.as_str() {
                "true" | "True" | "TRUE" | "1" | "t" | "T" => true,
                "false" | "False" | "FALSE" | "0" | "f" | "F" => false,
                _ => {
                    ctx.err(&f, format!("invalid value {v:?}: expected true or false"));
                    false
                }
            }
        }
    };
    let provider = spec.provider.as_ref().and_then(|p| p.name.clone());
    if spec.provider.is_some() && action != Action::Custom {
        ctx.err("spec.provider", format!("`provider` must not be with non CUSTOM action, found {action}"));
    }
    if action == Action::Custom {
        if spec.rules.is_none() {
            ctx.err("spec.rules", "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request");
        } else if provider.as_deref().unwrap_or("").is_empty() {
            ctx.err("spec.provider.name", "must not be empty for a CUSTOM policy");
        }
        ctx.warn("spec.action", "CUSTOM: warden cannot consult an external authorizer; a request or connection matching a CUSTOM rule is denied (fail safe)");
    }
    if action == Action::Deny && spec.rules.is_none() {
        ctx.err("spec.rules", "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request");
    }
    let selection = selection(ctx, spec.selector, spec.target_ref, spec.target_refs);
    if let Selection::TargetRefs(refs) = &selection
        && refs.iter().any(|r| r.kind == "Service" || r.kind == "ServiceEntry")
    {
        ctx.warn("spec.targetRefs", "a policy bound to a Service applies to the workloads the agent reports as members of that Service (Workload::services)");
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.unwrap_or_default().into_iter().enumerate() {
        rules.push(rule(ctx, &format!("spec.rules[{i}]"), r, action, &namespace));
    }
    if rules.is_empty() && action == Action::Allow {
        // `spec: {}` is the documented deny-all; nothing to warn about.
    }
    Some(AuthzPolicy { namespace, name, action, provider, dry_run, selection, rules, origin })
}

fn strs(ctx: &mut Ctx, field: &str, values: &[String]) -> Vec<StrMatch> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if v.is_empty() {
                ctx.err(format!("{field}[{i}]"), "empty value not allowed");
            }
            warn_contains(ctx, &format!("{field}[{i}]"), v);
            StrMatch::parse(v)
        })
        .collect()
}

/// `*abc*` is not a "contains" match in Istio: it is a suffix match on `abc*` (literal `*`).
fn warn_contains(ctx: &mut Ctx, field: &str, v: &str) {
    if v.len() > 1 && v.starts_with('*') && v.ends_with('*') {
        ctx.warn(
            field,
            format!("{v:?} is not a \"contains\" match: Istio matches it as the suffix {:?} with a literal `*`, so it almost never matches", &v[1..]),
        );
    }
}

/// Principals compare without `spiffe://`.
fn principals(ctx: &mut Ctx, field: &str, values: &[String]) -> Vec<StrMatch> {
    let stripped: Vec<String> = values.iter().map(|v| v.strip_prefix("spiffe://").unwrap_or(v).to_string()).collect();
    strs(ctx, field, &stripped)
}

fn cidrs(ctx: &mut Ctx, field: &str, values: &[String]) -> Vec<ipnet::Ipv4Net> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        match parse_cidr(v) {
            Ok(n) => out.push(n),
            Err(e) => ctx.err(format!("{field}[{i}]"), e),
        }
    }
    out
}

fn ports(ctx: &mut Ctx, field: &str, values: &[Scalar]) -> Vec<u16> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let s = match v {
            Scalar::Float(f) => format!("{f:?}"),
            _ => v.as_string(),
        };
        // Digits only, as Istio's `strconv.ParseUint` reads them: no sign, no fraction.
        let digits = matches!(v, Scalar::Str(_) | Scalar::Int(_)) && s.bytes().all(|b| b.is_ascii_digit());
        match s.parse::<u32>() {
            Ok(p) if digits && (1..=65535).contains(&p) => out.push(p as u16),
            _ => ctx.err(format!("{field}[{i}]"), format!("{s:?} is not a port number in range 1..65535")),
        }
    }
    out
}

fn service_accounts(ctx: &mut Ctx, field: &str, values: &[String], policy_ns: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let parts: Vec<&str> = v.split('/').collect();
        match parts.as_slice() {
            [sa] if !sa.is_empty() => out.push((policy_ns.to_string(), sa.to_string())),
            [ns, sa] if !ns.is_empty() && !sa.is_empty() => out.push((ns.to_string(), sa.to_string())),
            _ => {
                ctx.err(format!("{field}[{i}]"), format!("{v:?} is not a service account (`name` or `namespace/name`)"))
            }
        }
        if v.contains('*') {
            ctx.err(format!("{field}[{i}]"), format!("{v:?}: wildcards are not supported in service accounts"));
        }
    }
    out
}

fn source(ctx: &mut Ctx, f: &str, s: raw::Source, policy_ns: &str) -> Source {
    let sa_set = !(s.service_accounts.is_empty() && s.not_service_accounts.is_empty());
    let pn_set = !(s.principals.is_empty()
        && s.not_principals.is_empty()
        && s.namespaces.is_empty()
        && s.not_namespaces.is_empty());
    if sa_set && pn_set {
        ctx.err(f, "cannot set serviceAccounts with namespaces or principals");
    }
    let raw_empty = !pn_set
        && !sa_set
        && s.request_principals.is_empty()
        && s.not_request_principals.is_empty()
        && s.ip_blocks.is_empty()
        && s.not_ip_blocks.is_empty()
        && s.remote_ip_blocks.is_empty()
        && s.not_remote_ip_blocks.is_empty();
    let out = Source {
        principals: principals(ctx, &format!("{f}.principals"), &s.principals),
        not_principals: principals(ctx, &format!("{f}.notPrincipals"), &s.not_principals),
        request_principals: strs(ctx, &format!("{f}.requestPrincipals"), &s.request_principals),
        not_request_principals: strs(ctx, &format!("{f}.notRequestPrincipals"), &s.not_request_principals),
        namespaces: strs(ctx, &format!("{f}.namespaces"), &s.namespaces),
        not_namespaces: strs(ctx, &format!("{f}.notNamespaces"), &s.not_namespaces),
        service_accounts: service_accounts(ctx, &format!("{f}.serviceAccounts"), &s.service_accounts, policy_ns),
        not_service_accounts: service_accounts(
            ctx,
            &format!("{f}.notServiceAccounts"),
            &s.not_service_accounts,
            policy_ns,
        ),
        ip_blocks: cidrs(ctx, &format!("{f}.ipBlocks"), &s.ip_blocks),
        not_ip_blocks: cidrs(ctx, &format!("{f}.notIpBlocks"), &s.not_ip_blocks),
        remote_ip_blocks: cidrs(ctx, &format!("{f}.remoteIpBlocks"), &s.remote_ip_blocks),
        not_remote_ip_blocks: cidrs(ctx, &format!("{f}.notRemoteIpBlocks"), &s.not_remote_ip_blocks),
    };
    if raw_empty {
        ctx.err(f, "`from.source` must not be empty");
    }
    out
}

fn paths(ctx: &mut Ctx, field: &str, values: &[String]) -> Vec<PathMatch> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        if v.is_empty() {
            ctx.err(format!("{field}[{i}]"), "empty value not allowed");
            continue;
        }
        warn_contains(ctx, &format!("{field}[{i}]"), v);
        match PathMatch::parse(v) {
            Ok(p) => {
                if let PathMatch::Str(StrMatch::Exact(e) | StrMatch::Prefix(e) | StrMatch::Suffix(e)) = &p
                    && e.contains('*')
                {
                    ctx.warn(
                        &format!("{field}[{i}]"),
                        format!("{v:?}: a `*` inside a path is a literal character, not a wildcard"),
                    );
                }
                out.push(p)
            }
            Err(e) => ctx.err(format!("{field}[{i}]"), e),
        }
    }
    out
}

fn operation(ctx: &mut Ctx, f: &str, o: raw::Operation) -> Operation {
    let out = Operation {
        hosts: strs(ctx, &format!("{f}.hosts"), &o.hosts),
        not_hosts: strs(ctx, &format!("{f}.notHosts"), &o.not_hosts),
        ports: ports(ctx, &format!("{f}.ports"), &o.ports),
        not_ports: ports(ctx, &format!("{f}.notPorts"), &o.not_ports),
        methods: strs(ctx, &format!("{f}.methods"), &o.methods),
        not_methods: strs(ctx, &format!("{f}.notMethods"), &o.not_methods),
        paths: paths(ctx, &format!("{f}.paths"), &o.paths),
        not_paths: paths(ctx, &format!("{f}.notPaths"), &o.not_paths),
    };
    let raw_empty = o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.ports.is_empty()
        && o.not_ports.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty();
    if raw_empty {
        ctx.err(f, "`to.operation` must not be empty");
    }
    out
}

/// Parses a `when` key.
pub(crate) fn parse_key(key: &str) -> Result<Key, String> {
    let bracketed = |prefix: &str| -> Option<Result<Vec<String>, String>> {
        let rest = key.strip_prefix(prefix)?;
        let mut parts = Vec::new();
        let mut r = rest;
        while !r.is_empty() {
            let Some(inner) = r.strip_prefix('[') else {
                return Some(Err(format!("{key:?}: expected `[name]` after {prefix}")));
            };
            let Some(end) = inner.find(']') else {
                return Some(Err(format!("{key:?}: missing `]`")));
            };
            let name = &inner[..end];
            if name.is_empty() {
                return Some(Err(format!("{key:?}: empty name inside `[]`")));
            }
            parts.push(name.to_string());
            r = &inner[end + 1..];
        }
        if parts.is_empty() {
            return Some(Err(format!("{key:?}: missing `[name]`")));
        }
        Some(Ok(parts))
    };
    match key {
        "source.ip" => return Ok(Key::SourceIp),
        "source.namespace" => return Ok(Key::SourceNamespace),
        "source.principal" => return Ok(Key::SourcePrincipal),
        "source.serviceAccount" => return Ok(Key::SourceServiceAccount),
        "remote.ip" => return Ok(Key::RemoteIp),
        "destination.ip" => return Ok(Key::DestinationIp),
        "destination.port" => return Ok(Key::DestinationPort),
        "connection.sni" => return Ok(Key::ConnectionSni),
        "request.auth.principal" => return Ok(Key::AuthPrincipal),
        "request.auth.audiences" => return Ok(Key::AuthAudiences),
        "request.auth.presenter" => return Ok(Key::AuthPresenter),
        "custom.time_of_day" => return Ok(Key::TimeOfDay),
        "custom.day_of_week" => return Ok(Key::DayOfWeek),
        "destination.namespace" => return Err(format!("attribute {key} is replaced by the metadata.namespace")),
        "destination.user" => return Err(format!("attribute {key} is replaced by the workload selector")),
        "destination.name" => return Err(format!("attribute {key} is replaced by the workload selector")),
        _ => {}
    }
    if key.starts_with("destination.labels") {
        return Err(format!("attribute {key} is replaced by the workload selector"));
    }
    if let Some(r) = bracketed("request.headers") {
        let parts = r?;
        if parts.len() != 1 {
            return Err(format!("{key:?}: a header key takes exactly one `[name]`"));
        }
        return Ok(Key::RequestHeader(parts[0].to_ascii_lowercase()));
    }
    if let Some(r) = bracketed("request.auth.claims") {
        return Ok(Key::AuthClaim(r?));
    }
    if key.starts_with("experimental.envoy.filters.") {
        return Ok(Key::Experimental(key.to_string()));
    }
    Err(format!("unknown attribute {key:?}"))
}

fn cond_values(ctx: &mut Ctx, f: &str, key: &Key, vals: &[Scalar], policy_ns: &str) -> Values {
    let strings: Vec<String> = vals.iter().map(|v| v.as_string()).collect();
    for (i, s) in strings.iter().enumerate() {
        if s.is_empty() {
            ctx.err(format!("{f}[{i}]"), "empty value not allowed");
        }
    }
    match key {
        Key::SourceServiceAccount => Values::ServiceAccounts(service_accounts(ctx, f, &strings, policy_ns)),
        Key::SourceIp | Key::RemoteIp | Key::DestinationIp => Values::Ips(cidrs(ctx, f, &strings)),
        Key::DestinationPort => Values::Ports(ports(ctx, f, vals)),
        Key::SourcePrincipal => Values::Strs(principals(ctx, f, &strings)),
        Key::RequestHeader(_) => {
            let mut out = Vec::new();
            for (i, s) in strings.iter().enumerate() {
                warn_contains(ctx, &format!("{f}[{i}]"), s);
                let (m, ext) = ValueMatch::parse_header(s);
                if ext {
                    ctx.warn(
                        &format!("{f}[{i}]"),
                        format!("{s:?}: numeric header comparison is a warden extension, not portable to Istio (Istio compares the text {s:?} literally)"),
                    );
                }
                out.push(m);
            }
            Values::Headers(out)
        }
        Key::TimeOfDay => {
            let mut out = Vec::new();
            for (i, s) in strings.iter().enumerate() {
                match TimeWindow::parse(s) {
                    Ok(w) => out.push(w),
                    Err(e) => ctx.err(format!("{f}[{i}]"), e),
                }
            }
            Values::Windows(out)
        }
        Key::DayOfWeek => {
            let mut out = Vec::new();
            for (i, s) in strings.iter().enumerate() {
                match parse_weekday(s) {
                    Ok(d) => out.push(d),
                    Err(e) => ctx.err(format!("{f}[{i}]"), e),
                }
            }
            Values::Days(out)
        }
        _ => Values::Strs(strs(ctx, f, &strings)),
    }
}

fn condition(ctx: &mut Ctx, f: &str, c: raw::Condition, policy_ns: &str) -> Option<Condition> {
    let key_s = c.key.unwrap_or_default();
    if key_s.is_empty() {
        ctx.err(format!("{f}.key"), "`key` must not be empty");
        return None;
    }
    let key = match parse_key(&key_s) {
        Ok(k) => k,
        Err(e) => {
            ctx.err(format!("{f}.key"), e);
            return None;
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        ctx.err(f, format!("at least one of `values` or `notValues` must be set for key {key_s}"));
    }
    if matches!(key, Key::TimeOfDay | Key::DayOfWeek) {
        ctx.warn(
            &format!("{f}.key"),
            format!("{key_s} is a warden extension, not portable to Istio (Istio rejects the key)"),
        );
    }
    if let Key::Experimental(_) = key {
        ctx.warn(
            &format!("{f}.key"),
            format!("{key_s} is not evaluated by warden: `values` never match, `notValues` never exclude"),
        );
    }
    let values = cond_values(ctx, &format!("{f}.values"), &key, &c.values, policy_ns);
    let not_values = cond_values(ctx, &format!("{f}.notValues"), &key, &c.not_values, policy_ns);
    Some(Condition { key, values, not_values })
}

fn rule(ctx: &mut Ctx, f: &str, r: raw::Rule, action: Action, policy_ns: &str) -> Rule {
    if matches!(&r.from, Some(v) if v.is_empty()) {
        ctx.err(format!("{f}.from"), "`from` must not be empty");
    }
    if matches!(&r.to, Some(v) if v.is_empty()) {
        ctx.err(format!("{f}.to"), "`to` must not be empty");
    }
    let mut from = Vec::new();
    for (i, fr) in r.from.unwrap_or_default().into_iter().enumerate() {
        match fr.source {
            Some(s) => from.push(source(ctx, &format!("{f}.from[{i}].source"), s, policy_ns)),
            None => ctx.err(format!("{f}.from[{i}].source"), "`from.source` must not be nil"),
        }
    }
    let mut to = Vec::new();
    for (i, t) in r.to.unwrap_or_default().into_iter().enumerate() {
        match t.operation {
            Some(o) => to.push(operation(ctx, &format!("{f}.to[{i}].operation"), o)),
            None => ctx.err(format!("{f}.to[{i}].operation"), "`to.operation` must not be nil"),
        }
    }
    let mut when = Vec::new();
    for (i, c) in r.when.unwrap_or_default().into_iter().enumerate() {
        if let Some(c) = condition(ctx, &format!("{f}.when[{i}]"), c, policy_ns) {
            when.push(c);
        }
    }
    if action == Action::Custom {
        for (i, s) in from.iter().enumerate() {
            if !(s.namespaces.is_empty()
                && s.not_namespaces.is_empty()
                && s.principals.is_empty()
                && s.not_principals.is_empty()
                && s.request_principals.is_empty()
                && s.not_request_principals.is_empty()
                && s.service_accounts.is_empty()
                && s.not_service_accounts.is_empty())
            {
                ctx.err(format!("{f}.from[{i}].source"), "principals, requestPrincipals, namespaces and serviceAccounts (and their not forms) are currently not supported with CUSTOM action");
            }
        }
        for (i, c) in when.iter().enumerate() {
            if matches!(
                c.key,
                Key::SourceNamespace
                    | Key::SourcePrincipal
                    | Key::SourceServiceAccount
                    | Key::AuthPrincipal
                    | Key::AuthAudiences
                    | Key::AuthPresenter
                    | Key::AuthClaim(_)
            ) {
                ctx.err(
                    format!("{f}.when[{i}].key"),
                    format!("{} is currently not supported with CUSTOM action", c.key),
                );
            }
        }
    }
    let has_l7 =
        from.iter().any(Source::has_l7) || to.iter().any(Operation::has_l7) || when.iter().any(|c| c.key.is_l7());
    // Stripped of its L7 parts, a clause that becomes empty matches everything.
    let from_l7_only = from.iter().any(|s| !s.has_l4());
    let to_l7_only = to.iter().any(|o| !o.has_l4());
    let when_l4 = when.iter().any(|c| !c.key.is_l7());
    let only_l7 = has_l7 && (from.is_empty() || from_l7_only) && (to.is_empty() || to_l7_only) && !when_l4;
    match action {
        Action::Allow if has_l7 => ctx.warn(
            f,
            "ALLOW rule uses L7 (HTTP) attributes: where only L4 is enforced (the kernel datapath, a TCP connection) it never matches",
        ),
        Action::Deny | Action::Custom if only_l7 => ctx.warn(
            f,
            format!("{} rule uses only L7 (HTTP) attributes: at L4 (the kernel datapath, a TCP connection) it matches, and denies, every connection to the selected workloads; add `ports` to narrow it", action),
        ),
        Action::Deny | Action::Custom if has_l7 => ctx.warn(
            f,
            format!("{} rule mixes L4 and L7 attributes: at L4 its L7 attributes are ignored and it denies on its L4 part alone (wider than at L7)", action),
        ),
        _ => {}
    }
    Rule { from, to, when, has_l7, only_l7 }
}

fn mode(ctx: &mut Ctx, f: &str, m: Option<&str>) -> MtlsMode {
    match m {
        None | Some("") => MtlsMode::Unset,
        Some(s) => MtlsMode::parse(s).unwrap_or_else(|| {
            ctx.err(f, format!("{s:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT"));
            MtlsMode::Unset
        }),
    }
}

fn peer_authentication(
    ctx: &mut Ctx,
    namespace: String,
    name: String,
    spec: raw::PeerAuthenticationSpec,
    origin: String,
) -> Option<PeerAuth> {
    let selector = match spec.selector {
        Some(s) if !s.match_labels.is_empty() => match selection(ctx, Some(s), None, None) {
            Selection::Labels(l) => Some(l),
            _ => None,
        },
        _ => None,
    };
    let m = mode(ctx, "spec.mtls.mode", spec.mtls.as_ref().and_then(|m| m.mode.as_deref()));
    let mut port_level = BTreeMap::new();
    if let Some(map) = spec.port_level_mtls {
        if selector.is_none() {
            ctx.err(
                "spec.portLevelMtls",
                "mesh/namespace peer authentication cannot have port level mTLS (portLevelMtls requires a selector)",
            );
        }
        if map.is_empty() {
            ctx.err("spec.portLevelMtls", "port level mTLS, if defined, must have at least one element");
        }
        for (k, v) in map {
            let ks = match &k {
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            let f = format!("spec.portLevelMtls[{ks}]");
            let port = match ks.parse::<u32>() {
                Ok(p) if (1..=65535).contains(&p) => Some(p as u16),
                _ => {
                    ctx.err(&f, format!("{ks:?}: port must be in range 1..65535"));
                    None
                }
            };
            let pm: raw::Mtls = match serde_yaml::from_value(v) {
                Ok(m) => m,
                Err(e) => {
                    ctx.err(&f, e.to_string());
                    continue;
                }
            };
            let pmode = mode(ctx, &format!("{f}.mode"), pm.mode.as_deref());
            if let Some(p) = port {
                port_level.insert(p, pmode);
            }
        }
    }
    Some(PeerAuth { namespace, name, selector, mode: m, port_level, origin })
}

fn request_authentication(
    ctx: &mut Ctx,
    namespace: String,
    name: String,
    spec: raw::RequestAuthenticationSpec,
    origin: String,
) -> Option<RequestAuth> {
    let selection = selection(ctx, spec.selector, spec.target_ref, spec.target_refs);
    let mut rules = Vec::new();
    for (i, r) in spec.jwt_rules.into_iter().enumerate() {
        let f = format!("spec.jwtRules[{i}]");
        let issuer = r.issuer.unwrap_or_default();
        if issuer.is_empty() && r.jwks_uri.as_deref().unwrap_or("").is_empty() {
            ctx.err(format!("{f}.issuer"), "issuer or jwksUri must be non-empty string");
        }
        for (j, a) in r.audiences.iter().enumerate() {
            if a.is_empty() {
                ctx.err(format!("{f}.audiences[{j}]"), "audience must be non-empty string");
            }
        }
        if let Some(u) = &r.jwks_uri {
            let scheme_ok = u.starts_with("https://") || u.starts_with("http://");
            let host =
                u.split_once("://").map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or("")).unwrap_or("");
            if !scheme_ok {
                ctx.err(format!("{f}.jwksUri"), format!("{u:?}: URI scheme is not supported (http or https)"));
            } else if host.is_empty() {
                ctx.err(format!("{f}.jwksUri"), format!("{u:?}: missing host"));
            }
        }
        if let Some(j) = &r.jwks {
            match serde_json::from_str::<serde_json::Value>(j) {
                Ok(v) if v.get("keys").map(|k| k.is_array()).unwrap_or(false) => {}
                Ok(_) => ctx.err(
                    format!("{f}.jwks"),
                    "jwks parse error: expected a JSON Web Key Set (an object with a `keys` array)",
                ),
                Err(e) => ctx.err(format!("{f}.jwks"), format!("jwks parse error: {e}")),
            }
        }
        let mut from_headers = Vec::new();
        for (j, h) in r.from_headers.iter().enumerate() {
            match h.name.as_deref() {
                Some(n) if !n.is_empty() => from_headers.push((n.to_string(), h.prefix.clone().unwrap_or_default())),
                _ => ctx.err(format!("{f}.fromHeaders[{j}].name"), "location header name must be non-empty string"),
            }
        }
        for (j, p) in r.from_params.iter().enumerate() {
            if p.is_empty() {
                ctx.err(format!("{f}.fromParams[{j}]"), "location query must be non-empty string");
            }
        }
        for (j, c) in r.from_cookies.iter().enumerate() {
            if c.is_empty() {
                ctx.err(format!("{f}.fromCookies[{j}]"), "cookie name must be non-empty string");
            }
        }
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            if c.claim.as_deref().unwrap_or("").is_empty() || c.header.as_deref().unwrap_or("").is_empty() {
                ctx.err(
                    format!("{f}.outputClaimToHeaders[{j}]"),
                    "outputClaimToHeaders header and claim value must be non-empty string",
                );
            }
        }
        if let Some(h) = &r.output_payload_to_header
            && (h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            ctx.err(format!("{f}.outputPayloadToHeader"), format!("{h:?} is not a valid header name"));
        }
        rules.push(JwtRule {
            issuer,
            audiences: r.audiences,
            jwks_uri: r.jwks_uri,
            jwks: r.jwks,
            from_headers,
            from_params: r.from_params,
            forward_original_token: r.forward_original_token.unwrap_or(false),
            output_payload_to_header: r.output_payload_to_header,
        });
    }
    Some(RequestAuth { namespace, name, selection, jwt_rules: rules, origin })
}
