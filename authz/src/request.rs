//! The request file of `warden authz check`: one connection (no `http`) or one HTTP request.
//!
//! ```yaml
//! source: {principal: cluster.local/ns/fintech-core/sa/order-service, ip: 10.0.2.3}
//! destination: {namespace: fintech-core, labels: {app: payment-processor}, ip: 10.0.1.5, port: 8443}
//! http: {method: POST, path: /api/v2/payments/process, headers: {x-request-id: abc},
//!        jwt: {iss: https://auth.company.com, sub: alice, aud: [api.company.com], claims: {role: admin}}}
//! time: 2026-11-24T10:00:00Z
//! ```
//! `source.principal` absent = plaintext peer; `source.namespace` defaults from the principal;
//! `http` absent = L4; `jwt` = claims of the token the request carries (seen by the policies only
//! when a RequestAuthentication applies to the destination).
//! An optional `expect` block (ignored here) lets example files carry their expected decision.

use crate::eval::{Destination, Http, Jwt, Peer, Request, principal_parts};
use crate::resource::Scalar;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use warden_common::{PROTO_TCP, PROTO_UDP};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRequest {
    #[serde(default)]
    source: RawSource,
    destination: RawDestination,
    #[serde(default)]
    http: Option<RawHttp>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    expect: Option<serde_yaml::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    ip: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDestination {
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    port: u32,
    #[serde(default)]
    services: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, Scalar>,
    #[serde(default)]
    jwt: Option<RawJwt>,
    #[serde(default)]
    remote_ip: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "expected a string or a list of strings")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawJwt {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<OneOrMany>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    claims: serde_json::Map<String, serde_json::Value>,
}

/// Parses a request file. Errors are `field: reason`.
pub fn parse_request(yaml: &str) -> Result<Request, String> {
    let raw: RawRequest = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(yaml)).map_err(|e| {
        // serde_yaml starts some errors with (part of) the path itself: name the field once.
        let (p, inner) = (e.path().to_string(), e.inner().to_string());
        let reason = match inner.split_once(": ") {
            Some((q, rest)) if !q.contains(' ') && p.starts_with(q) => rest.to_string(),
            _ => inner,
        };
        if p == "." { reason } else { format!("{p}: {reason}") }
    })?;
    let ip = |field: &str, s: &Option<String>| -> Result<Option<Ipv4Addr>, String> {
        s.as_deref()
            .map(|s| s.trim().parse::<Ipv4Addr>().map_err(|_| format!("{field}: {s:?} is not an IPv4 address")))
            .transpose()
    };
    let principal = raw.source.principal.as_deref().map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_string());
    if principal.as_deref() == Some("") {
        return Err("source.principal: empty (omit it for a plaintext peer)".into());
    }
    let derived = principal.as_deref().and_then(principal_parts).map(|(n, _)| n.to_string());
    match (&principal, &raw.source.namespace, &derived) {
        (None, Some(_), _) => {
            return Err("source.namespace: a plaintext peer (no principal) has no namespace; Istio derives the namespace from the peer's certificate".into());
        }
        (Some(_), Some(n), Some(d)) if n != d => {
            return Err(format!("source.namespace: {n:?} contradicts the principal's namespace {d:?}"));
        }
        _ => {}
    }
    let port = match raw.destination.port {
        p @ 1..=65535 => p as u16,
        p => return Err(format!("destination.port: {p} is not in range 1..65535")),
    };
    let protocol = match raw.protocol.as_deref().map(|s| s.to_ascii_uppercase()) {
        None => PROTO_TCP,
        Some(p) if p == "TCP" => PROTO_TCP,
        Some(p) if p == "UDP" => PROTO_UDP,
        Some(p) => return Err(format!("protocol: {p:?} is not TCP or UDP")),
    };
    let http = match raw.http {
        None => None,
        Some(h) => {
            let jwt = h.jwt.map(|j| {
                let aud = match j.aud {
                    None => Vec::new(),
                    Some(OneOrMany::One(a)) => vec![a],
                    Some(OneOrMany::Many(a)) => a,
                };
                let mut claims = j.claims;
                let mut put = |k: &str, v: serde_json::Value| {
                    claims.entry(k.to_string()).or_insert(v);
                };
                if let Some(i) = &j.iss {
                    put("iss", i.clone().into());
                }
                if let Some(s) = &j.sub {
                    put("sub", s.clone().into());
                }
                if !aud.is_empty() {
                    put("aud", serde_json::Value::Array(aud.iter().cloned().map(Into::into).collect()));
                }
                if let Some(a) = &j.azp {
                    put("azp", a.clone().into());
                }
                Jwt { iss: j.iss, sub: j.sub, aud, azp: j.azp, claims }
            });
            Some(Http {
                method: h.method.unwrap_or_default(),
                path: h.path.unwrap_or_default(),
                host: h.host.unwrap_or_default(),
                headers: h.headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_string())).collect(),
                jwt,
                remote_ip: ip("http.remoteIp", &h.remote_ip)?,
            })
        }
    };
    let time = match raw.time {
        None => None,
        Some(t) => {
            let dt = time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("time: {t:?} is not an RFC 3339 time ({e})"))?;
            let nanos = dt.unix_timestamp_nanos();
            let t = if nanos >= 0 {
                UNIX_EPOCH + Duration::from_nanos(nanos as u64)
            } else {
                UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs() as u64)
            };
            Some::<SystemTime>(t)
        }
    };
    Ok(Request {
        source: Peer { principal, namespace: raw.source.namespace.or(derived), ip: ip("source.ip", &raw.source.ip)? },
        destination: Destination {
            namespace: raw.destination.namespace,
            labels: raw.destination.labels,
            service_account: raw.destination.service_account,
            ip: ip("destination.ip", &raw.destination.ip)?,
            port,
            services: raw.destination.services,
        },
        protocol,
        sni: raw.sni,
        http,
        time,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_request;

    #[test]
    fn a_type_error_names_its_field_once() {
        let e =
            parse_request("source: {principal: cluster.local/ns/a/sa/b}\ndestination: {namespace: t, port: \"80\"}\n")
                .unwrap_err();
        assert!(e.starts_with("destination.port: invalid type: string \"80\", expected u32"), "{e}");
        let e =
            parse_request("destination: {namespace: t, port: 80}\nhttp: {method: GET, path: /, headers: {x: [[1]]}}\n")
                .unwrap_err();
        assert!(e.starts_with("http.headers.x: expected a string or a number"), "{e}");
    }
}
