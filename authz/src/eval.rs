//! Evaluation with Istio's semantics at L4 (a TCP connection) and L7 (an HTTP request), with an
//! explanation of every decision.
//!
//! Order: PeerAuthentication STRICT refuses plaintext peers; at L7 a JWT that the workload's
//! RequestAuthentications do not accept (issuer, audiences) is rejected; then CUSTOM (warden cannot consult
//! an external authorizer: a matching CUSTOM rule denies, fail safe); then DENY; then, if no
//! ALLOW policy applies to the workload, allow; then the first matching ALLOW; else deny.
//! AUDIT and dry-run policies never decide; their matches are reported.
//!
//! At L4, an ALLOW rule that uses any L7 attribute never matches; a DENY/CUSTOM rule drops its
//! L7 attributes (each treated as matching) and is enforced on its L4 part, so a rule made only
//! of L7 attributes denies every connection (Istio's sidecar TCP semantics; fail safe).

use crate::matcher::StrMatch;
use crate::model::*;
use crate::set::{PolicySet, RuleRef, Target};
use ipnet::Ipv4Net;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};
use warden_common::PROTO_TCP;

/// The peer of a connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Peer {
    /// `trust-domain/ns/NS/sa/SA` (a leading `spiffe://` is ignored); `None` = plaintext.
    pub principal: Option<String>,
    /// Defaults from the principal.
    pub namespace: Option<String>,
    pub ip: Option<Ipv4Addr>,
}

/// The destination workload and port.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Destination {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub port: u16,
    pub services: Vec<String>,
}

/// Claims of the token a request carries (its signature taken as good). The policies see them only
/// when a RequestAuthentication applies to the destination.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Jwt {
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub aud: Vec<String>,
    /// `azp`, the presenter.
    pub azp: Option<String>,
    /// Every claim (including iss/sub/aud when given in `claims`).
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// The HTTP part of a request (absent: L4 evaluation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Http {
    pub method: String,
    pub path: String,
    pub host: String,
    /// Lower-cased names.
    pub headers: BTreeMap<String, String>,
    pub jwt: Option<Jwt>,
    /// The original client address (X-Forwarded-For); defaults to the peer's address.
    pub remote_ip: Option<Ipv4Addr>,
}

/// One connection or request to evaluate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub source: Peer,
    pub destination: Destination,
    /// IP protocol; 0 means TCP (the only protocol Istio authorizes).
    pub protocol: u8,
    pub sni: Option<String>,
    pub http: Option<Http>,
    /// Defaults to now.
    pub time: Option<SystemTime>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Layer {
    L4,
    L7,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Allow,
    Deny,
}

/// The decision and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub decision: Verdict,
    /// `namespace/name` of the deciding policy; `None` for a default allow or deny.
    pub policy: Option<String>,
    /// `ALLOW`, `DENY`, `CUSTOM`, `PEER_AUTHENTICATION` or `REQUEST_AUTHENTICATION`; `None` for a
    /// default verdict.
    pub action: Option<String>,
    /// Index of the matching rule.
    pub rule: Option<usize>,
    pub layer: Layer,
    pub reason: String,
    /// AUDIT and dry-run policies that matched (never decide).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<String>,
}

/// A remote address as the matcher sees it: an exact address, or (for the compiler) "an address
/// whose most specific policy CIDR is this one" / "an address in no policy CIDR".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Addr {
    Ip(Ipv4Addr),
    Region(Option<Ipv4Net>),
    Unknown,
}

impl Addr {
    fn within(self, net: &Ipv4Net) -> bool {
        match self {
            Addr::Ip(a) => net.contains(&a),
            Addr::Region(Some(c)) => net.prefix_len() <= c.prefix_len() && net.contains(&c.network()),
            Addr::Region(None) | Addr::Unknown => false,
        }
    }
}

/// The peer attributes the matchers use.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerView<'a> {
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// (namespace, service account) parsed from the principal.
    pub sa: Option<(&'a str, &'a str)>,
    pub addr: Addr,
}

/// Parses `td/ns/NS/sa/SA` into (NS, SA).
pub(crate) fn principal_parts(p: &str) -> Option<(&str, &str)> {
    let mut it = p.split('/');
    let _td = it.next()?;
    if it.next()? != "ns" {
        return None;
    }
    let ns = it.next()?;
    if it.next()? != "sa" {
        return None;
    }
    let sa = it.next()?;
    if it.next().is_some() {
        return None;
    }
    Some((ns, sa))
}

/// Minute of the day and weekday (0 = Monday) at `t`, shifted by `offset` minutes.
pub(crate) fn clock(t: SystemTime, offset_minutes: i32) -> (u32, u8) {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    } + offset_minutes as i64 * 60;
    let days = secs.div_euclid(86_400);
    let minute = (secs.rem_euclid(86_400) / 60) as u32;
    // 1970-01-01 was a Thursday (3 when Monday is 0).
    let weekday = (days + 3).rem_euclid(7) as u8;
    (minute, weekday)
}

fn any_str(ms: &[StrMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| ms.iter().any(|m| m.matches(v)))
}

/// `values` OR (ignored when empty), `not` excludes. An absent attribute matches no value.
fn pos_neg<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&f)) && !neg.iter().any(f)
}

/// L7 context for matching (absent at L4).
pub(crate) struct L7<'a> {
    pub http: &'a Http,
    /// The request's token as the policies see it: `request.auth.*` and `requestPrincipals`.
    /// `None` when no RequestAuthentication applies to the workload, since then nothing
    /// validated the token (Istio's proxy only reads one its JWT rules accept).
    pub jwt: Option<&'a Jwt>,
    pub sni: Option<&'a str>,
    pub remote: Option<Ipv4Addr>,
}

/// Does a source match? At L4 (`l7 == None`) the L7 fields are not evaluated (they count as
/// matching: only DENY/CUSTOM rules, whose L7 parts are dropped, are evaluated at L4 with them).
pub(crate) fn source_matches(s: &Source, peer: &PeerView, l7: Option<&L7>) -> bool {
    let str_field = |pos: &[StrMatch], neg: &[StrMatch], v: Option<&str>| {
        (pos.is_empty() || any_str(pos, v)) && !(v.is_some() && any_str(neg, v))
    };
    if !str_field(&s.principals, &s.not_principals, peer.principal) {
        return false;
    }
    if !str_field(&s.namespaces, &s.not_namespaces, peer.namespace) {
        return false;
    }
    let sa_eq = |(n, a): &(String, String)| peer.sa.is_some_and(|(pn, pa)| pn == n && pa == a);
    if !(s.service_accounts.is_empty() || s.service_accounts.iter().any(sa_eq))
        || s.not_service_accounts.iter().any(sa_eq)
    {
        return false;
    }
    if !pos_neg(&s.ip_blocks, &s.not_ip_blocks, |n| peer.addr.within(n)) {
        return false;
    }
    if let Some(l7) = l7 {
        let rp = l7.jwt.and_then(|j| match (&j.iss, &j.sub) {
            (Some(i), Some(s)) => Some(format!("{i}/{s}")),
            _ => None,
        });
        if !str_field(&s.request_principals, &s.not_request_principals, rp.as_deref()) {
            return false;
        }
        let remote = l7.remote.map(Addr::Ip).unwrap_or(peer.addr);
        if !pos_neg(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |n| remote.within(n)) {
            return false;
        }
    }
    true
}

/// Does an operation's port part match? Ports are TCP ports.
pub(crate) fn op_ports_match(o: &Operation, proto: u8, port: u16) -> bool {
    let tcp = proto == PROTO_TCP;
    (o.ports.is_empty() || (tcp && o.ports.contains(&port))) && !(tcp && o.not_ports.contains(&port))
}

fn op_matches(o: &Operation, proto: u8, port: u16, l7: Option<&L7>) -> bool {
    if !op_ports_match(o, proto, port) {
        return false;
    }
    if let Some(l7) = l7 {
        let h = l7.http;
        let host = Some(h.host.as_str()).filter(|s| !s.is_empty());
        let host_ok = (o.hosts.is_empty() || host.is_some_and(|v| o.hosts.iter().any(|m| m.matches_ignore_case(v))))
            && !host.is_some_and(|v| o.not_hosts.iter().any(|m| m.matches_ignore_case(v)));
        let method = Some(h.method.as_str()).filter(|s| !s.is_empty());
        let path = Some(h.path.as_str()).filter(|s| !s.is_empty());
        let path_ok = (o.paths.is_empty() || path.is_some_and(|v| o.paths.iter().any(|m| m.matches(v))))
            && !path.is_some_and(|v| o.not_paths.iter().any(|m| m.matches(v)));
        let method_ok = (o.methods.is_empty() || any_str(&o.methods, method))
            && !(method.is_some() && any_str(&o.not_methods, method));
        return host_ok && method_ok && path_ok;
    }
    true
}

/// Looks up a (possibly nested) claim; a list matches when any element matches.
fn claim<'a>(jwt: &'a Jwt, path: &[String]) -> Vec<String> {
    let mut cur: Option<&'a serde_json::Value> = jwt.claims.get(&path[0]);
    for p in &path[1..] {
        cur = cur.and_then(|v| v.get(p));
    }
    match cur {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Bool(_) | serde_json::Value::Number(_) => Some(v.to_string()),
                _ => None,
            })
            .collect(),
        Some(v @ (serde_json::Value::Bool(_) | serde_json::Value::Number(_))) => vec![v.to_string()],
        _ => Vec::new(),
    }
}

/// The environment a condition is evaluated in.
pub(crate) struct Env<'a> {
    pub peer: PeerView<'a>,
    pub dest_ip: Option<Ipv4Addr>,
    pub proto: u8,
    pub port: u16,
    pub clock: (u32, u8),
    pub l7: Option<&'a L7<'a>>,
}

/// Does a `when` condition hold? Multi-valued attributes (audiences, list claims) match when
/// any of their values matches; `notValues` exclude when any value matches.
pub(crate) fn condition_matches(c: &Condition, env: &Env) -> bool {
    if c.key.is_l7() && env.l7.is_none() {
        return true; // dropped at L4 (only DENY/CUSTOM rules get here)
    }
    let strs_match = |vals: &[String]| -> bool {
        match (&c.values, &c.not_values) {
            (Values::Strs(p), Values::Strs(n)) => {
                (p.is_empty() || vals.iter().any(|v| p.iter().any(|m| m.matches(v))))
                    && !vals.iter().any(|v| n.iter().any(|m| m.matches(v)))
            }
            (Values::Headers(p), Values::Headers(n)) => {
                (p.is_empty() || vals.iter().any(|v| p.iter().any(|m| m.matches(v))))
                    && !vals.iter().any(|v| n.iter().any(|m| m.matches(v)))
            }
            _ => false,
        }
    };
    let ips_match = |a: Addr| match (&c.values, &c.not_values) {
        (Values::Ips(p), Values::Ips(n)) => pos_neg(p, n, |x| a.within(x)),
        _ => false,
    };
    let one = |v: Option<&str>| strs_match(&v.map(|s| vec![s.to_string()]).unwrap_or_default());
    let l7 = env.l7;
    let jwt = l7.and_then(|l| l.jwt);
    match &c.key {
        Key::SourceIp => ips_match(env.peer.addr),
        Key::RemoteIp => ips_match(l7.and_then(|l| l.remote).map(Addr::Ip).unwrap_or(env.peer.addr)),
        Key::DestinationIp => ips_match(env.dest_ip.map(Addr::Ip).unwrap_or(Addr::Unknown)),
        Key::SourceNamespace => one(env.peer.namespace),
        Key::SourcePrincipal => one(env.peer.principal),
        Key::SourceServiceAccount => match (&c.values, &c.not_values) {
            (Values::ServiceAccounts(p), Values::ServiceAccounts(n)) => {
                pos_neg(p, n, |(ns, sa)| env.peer.sa.is_some_and(|(pn, pa)| pn == ns && pa == sa))
            }
            _ => false,
        },
        Key::DestinationPort => match (&c.values, &c.not_values) {
            (Values::Ports(p), Values::Ports(n)) => {
                let tcp = env.proto == PROTO_TCP;
                (p.is_empty() || (tcp && p.contains(&env.port))) && !(tcp && n.contains(&env.port))
            }
            _ => false,
        },
        Key::ConnectionSni => one(l7.and_then(|l| l.sni)),
        Key::RequestHeader(h) => one(l7.and_then(|l| l.http.headers.get(h)).map(|s| s.as_str())),
        Key::AuthPrincipal => {
            let p = jwt.and_then(|j| Some(format!("{}/{}", j.iss.as_ref()?, j.sub.as_ref()?)));
            one(p.as_deref())
        }
        Key::AuthAudiences => strs_match(&jwt.map(|j| j.aud.clone()).unwrap_or_default()),
        Key::AuthPresenter => one(jwt.and_then(|j| j.azp.as_deref())),
        Key::AuthClaim(path) => strs_match(&jwt.map(|j| claim(j, path)).unwrap_or_default()),
        // Not evaluated: no value matches, no notValue excludes.
        Key::Experimental(_) => c.values.is_empty(),
        Key::TimeOfDay => match (&c.values, &c.not_values) {
            (Values::Windows(p), Values::Windows(n)) => pos_neg(p, n, |w| w.contains(env.clock.0)),
            _ => false,
        },
        Key::DayOfWeek => match (&c.values, &c.not_values) {
            (Values::Days(p), Values::Days(n)) => pos_neg(p, n, |d| *d == env.clock.1),
            _ => false,
        },
    }
}

/// Does a rule match? The caller has already excluded ALLOW rules with L7 attributes at L4.
pub(crate) fn rule_matches(r: &Rule, env: &Env) -> bool {
    // All three are pure predicates; the cheapest (ports, usually) goes first.
    (r.to.is_empty() || r.to.iter().any(|o| op_matches(o, env.proto, env.port, env.l7)))
        && (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, &env.peer, env.l7)))
        && r.when.iter().all(|c| condition_matches(c, env))
}

impl PolicySet {
    /// Evaluates one connection (`http` absent: L4) or request (L7) and explains the decision.
    pub fn evaluate(&self, req: &Request) -> Decision {
        let layer = if req.http.is_some() { Layer::L7 } else { Layer::L4 };
        let principal = req.source.principal.as_deref().map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let sa = principal.and_then(principal_parts);
        let namespace = req.source.namespace.as_deref().or(sa.map(|(n, _)| n));
        let peer = PeerView { principal, namespace, sa, addr: req.source.ip.map(Addr::Ip).unwrap_or(Addr::Unknown) };
        let d = &req.destination;
        let target = Target { namespace: &d.namespace, labels: &d.labels, services: &d.services };
        let l7 = req.http.as_ref().map(|h| L7 {
            http: h,
            jwt: h.jwt.as_ref().filter(|_| self.request_authentications_for(&target).next().is_some()),
            sni: req.sni.as_deref(),
            remote: h.remote_ip.or(req.source.ip),
        });
        let proto = if req.protocol == 0 { PROTO_TCP } else { req.protocol };
        let env = Env {
            peer,
            dest_ip: req.destination.ip,
            proto,
            port: req.destination.port,
            clock: clock(req.time.unwrap_or_else(SystemTime::now), self.options.utc_offset_minutes),
            l7: l7.as_ref(),
        };
        let mut decision = self.decide(&target, &env, layer);
        decision.shadow = self.shadow_matches(&target, &env, layer);
        decision
    }

    pub(crate) fn decide(&self, target: &Target, env: &Env, layer: Layer) -> Decision {
        let mk = |decision, policy: Option<String>, action: Option<&str>, rule, reason: String| Decision {
            decision,
            policy,
            action: action.map(str::to_string),
            rule,
            layer,
            reason,
            shadow: Vec::new(),
        };
        // PeerAuthentication: STRICT refuses plaintext peers.
        if env.peer.principal.is_none() {
            let port = (env.proto == PROTO_TCP).then_some(env.port);
            let (mode, by) = self.mtls_mode(target, port);
            if mode == MtlsMode::Strict {
                let name = by.map(|p| p.key());
                return mk(
                    Verdict::Deny,
                    name.clone(),
                    Some("PEER_AUTHENTICATION"),
                    None,
                    format!(
                        "plaintext peer refused: mTLS mode STRICT (PeerAuthentication {})",
                        name.unwrap_or_default()
                    ),
                );
            }
        }
        // RequestAuthentication: a token the workload's JWT rules do not accept is rejected (401).
        if let Some(jwt) = env.l7.and_then(|l| l.jwt)
            && let Some(reason) = self.jwt_rejection(target, jwt)
        {
            return mk(Verdict::Deny, Some(reason.0), Some("REQUEST_AUTHENTICATION"), None, reason.1);
        }
        let scopes = self.scopes(target.namespace);
        thread_local! {
            static CANDIDATES: std::cell::RefCell<Vec<RuleRef>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let found = CANDIDATES.with(|c| {
            let mut cands = c.borrow_mut();
            self.candidates(target, &scopes, env.peer.principal, env.peer.namespace, env.peer.sa, &mut cands);
            cands.iter().copied().find(|rr| {
                let p = self.policy(rr.policy);
                let r = &p.rules[rr.rule as usize];
                !(layer == Layer::L4 && p.action == Action::Allow && r.has_l7) && rule_matches(r, env)
            })
        });
        if let Some(rr) = found {
            let p = self.policy(rr.policy);
            let r = &p.rules[rr.rule as usize];
            {
                let what = match p.action {
                    Action::Custom => format!(
                        "CUSTOM policy {} (provider {}) matched rule {}; warden cannot consult the external authorizer, so it denies (fail safe)",
                        p.key(),
                        p.provider.as_deref().unwrap_or("?"),
                        rr.rule
                    ),
                    Action::Deny if layer == Layer::L4 && r.has_l7 => format!(
                        "DENY policy {} rule {} matched on its L4 part (its L7 attributes cannot be checked on a TCP connection)",
                        p.key(),
                        rr.rule
                    ),
                    Action::Deny => format!("DENY policy {} rule {} matched", p.key(), rr.rule),
                    _ => format!("ALLOW policy {} rule {} matched", p.key(), rr.rule),
                };
                let v = if p.action == Action::Allow { Verdict::Allow } else { Verdict::Deny };
                return mk(v, Some(p.key()), Some(p.action.name()), Some(rr.rule as usize), what);
            }
        }
        if !self.allow_applies(target, &scopes) {
            return mk(
                Verdict::Allow,
                None,
                None,
                None,
                "no ALLOW policy applies to the workload: allowed by default".into(),
            );
        }
        let l7_allow = || self.allow_policies(target, &scopes).any(|pi| self.policy(pi).rules.iter().any(|r| r.has_l7));
        let note =
            if layer == Layer::L4 && l7_allow() { " (ALLOW rules with L7 attributes never match at L4)" } else { "" };
        mk(
            Verdict::Deny,
            None,
            None,
            None,
            format!("ALLOW policies apply to the workload and none matched{note}: denied by default"),
        )
    }

    /// When RequestAuthentications select the workload, the token's issuer must be one of their
    /// `jwtRules` and, when the rule lists audiences, one of the token's audiences must be among
    /// them. Returns (policy, reason) for a rejected token.
    fn jwt_rejection(&self, target: &Target, jwt: &Jwt) -> Option<(String, String)> {
        let ras: Vec<&RequestAuth> = self.request_authentications_for(target).collect();
        let first = ras.first()?;
        let iss = jwt.iss.as_deref().unwrap_or("");
        // A rule without an issuer (its keys from `jwksUri`) takes a token of any issuer, as
        // Envoy's JWT filter does when no issuer is configured.
        let Some((ra, rule)) = ras
            .iter()
            .find_map(|ra| ra.jwt_rules.iter().find(|r| r.issuer.is_empty() || r.issuer == iss).map(|r| (*ra, r)))
        else {
            let key = format!("{}/{}", first.namespace, first.name);
            return Some((
                key.clone(),
                format!(
                    "JWT issuer {iss:?} is not accepted by RequestAuthentication {key}: the request is rejected (401)"
                ),
            ));
        };
        if !rule.audiences.is_empty() && !jwt.aud.iter().any(|a| rule.audiences.contains(a)) {
            let key = format!("{}/{}", ra.namespace, ra.name);
            return Some((
                key.clone(),
                format!(
                    "JWT audiences {:?} are not among {:?} required by RequestAuthentication {key}: the request is rejected (401)",
                    jwt.aud, rule.audiences
                ),
            ));
        }
        None
    }

    /// The RequestAuthentications that apply to `target`.
    fn request_authentications_for<'a>(&'a self, target: &'a Target) -> impl Iterator<Item = &'a RequestAuth> + 'a {
        let root = self.options.root_namespace.as_str();
        self.request_auth.iter().filter(move |r| crate::set::scope_applies(&r.namespace, &r.selection, target, root))
    }

    fn shadow_matches(&self, target: &Target, env: &Env, layer: Layer) -> Vec<String> {
        let mut out = Vec::new();
        for ix in self.scopes(target.namespace).iter() {
            for &pi in &ix.shadow_policies {
                if !self.applies(pi, target) {
                    continue;
                }
                let p = self.policy(pi);
                for (ri, r) in p.rules.iter().enumerate() {
                    // At L4 an ALLOW rule with L7 attributes never matches; DENY and AUDIT
                    // rules keep their L4 part (Istio widens both: `checkError`).
                    if layer == Layer::L4 && r.has_l7 && !matches!(p.action, Action::Deny | Action::Audit) {
                        continue;
                    }
                    if rule_matches(r, env) {
                        let kind = if p.dry_run { format!("dry-run {}", p.action) } else { p.action.to_string() };
                        out.push(format!("{kind} policy {} rule {ri} matched (not enforced)", p.key()));
                        break;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn clock_gives_minute_and_weekday() {
        // 2026-11-24T10:00:00Z, a Tuesday (1 when Monday is 0).
        let t = UNIX_EPOCH + Duration::from_secs(1_795_514_400);
        assert_eq!(clock(t, 0), (600, 1));
        assert_eq!(clock(t, -11 * 60), (23 * 60, 0)); // Monday 23:00 at UTC-11
        assert_eq!(clock(t, 14 * 60), (0, 2)); // Wednesday 00:00 at UTC+14
        assert_eq!(clock(UNIX_EPOCH, 0), (0, 3)); // 1970-01-01 was a Thursday
    }

    #[test]
    fn principal_parts_parses_spiffe_paths() {
        assert_eq!(principal_parts("cluster.local/ns/a/sa/b"), Some(("a", "b")));
        assert_eq!(principal_parts("cluster.local/ns/a/sa/b/c"), None);
        assert_eq!(principal_parts("cluster.local/x/a/sa/b"), None);
        assert_eq!(principal_parts("garbage"), None);
    }

    #[test]
    fn regions_are_inside_the_cidrs_that_contain_them() {
        let n = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let r = Addr::Region(Some(n("10.1.0.0/16")));
        assert!(r.within(&n("10.0.0.0/8")) && r.within(&n("10.1.0.0/16")));
        assert!(!r.within(&n("10.1.2.0/24")) && !r.within(&n("11.0.0.0/8")));
        assert!(!Addr::Region(None).within(&n("0.0.0.0/0")) && !Addr::Unknown.within(&n("0.0.0.0/0")));
        assert!(Addr::Ip("10.1.2.3".parse().unwrap()).within(&n("10.1.2.0/24")));
    }
}
