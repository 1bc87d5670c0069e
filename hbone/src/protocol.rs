//! The wire protocol: port, ALPN, headers, status codes and HTTP/2 settings, with ztunnel's values.
//!
//! Everything a peer can observe is named here, so that interoperability questions have one place
//! to look.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::StatusCode;

/// The HBONE port: mTLS HTTP/2 CONNECT terminates here on the destination.
pub const HBONE_PORT: u16 = 15008;

/// The one ALPN protocol offered and accepted on HBONE connections.
pub const ALPN_H2: &[u8] = b"h2";

/// `forwarded` (RFC 7239): the client puts the original source in `for=` and, when the traffic was
/// addressed to a service, its hostname in `host=`.
pub const FORWARDED: &str = "forwarded";
/// `baggage` (W3C): the client's workload metadata, for telemetry on the destination.
pub const BAGGAGE: &str = "baggage";
/// `traceparent` (W3C trace context): one fresh trace per tunnel, for correlating both sides' logs.
pub const TRACEPARENT: &str = "traceparent";

/// Status of an accepted tunnel.
pub const STATUS_OK: StatusCode = StatusCode::OK;
/// Status when the destination's authorization policy denies the connection (ztunnel:
/// `AuthorizationPolicyDenied` -> 401).
pub const STATUS_DENIED: StatusCode = StatusCode::UNAUTHORIZED;
/// Status when the destination could not connect to the workload (ztunnel: `ConnectionFailure` ->
/// 503).
pub const STATUS_UPSTREAM_UNREACHABLE: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
/// Status of a malformed request: not CONNECT, or an authority that is not `ip:port` (ztunnel: 400).
pub const STATUS_BAD_REQUEST: StatusCode = StatusCode::BAD_REQUEST;

/// Per-stream receive window (ztunnel `HTTP2_STREAM_WINDOW_SIZE`: 4 MiB).
pub const DEFAULT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window (ztunnel `HTTP2_CONNECTION_WINDOW_SIZE`: 16 MiB, four streams'
/// worth, so one stream that is not read cannot starve the others).
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest frame the peer may send us (ztunnel `HTTP2_FRAME_SIZE`: 1 MiB).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Concurrent streams a server accepts per connection (ztunnel's server: 200, hyper's default).
pub const DEFAULT_SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Streams a client puts on one connection before opening another (ztunnel
/// `POOL_MAX_STREAMS_PER_CONNECTION`: 100).
pub const DEFAULT_POOL_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// How long an unused pooled connection stays open (ztunnel `POOL_UNUSED_RELEASE_TIMEOUT`: 5 min).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Interval of HTTP/2 keepalive PINGs on both sides (ztunnel: 10 s).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A PING unanswered for this long tears the connection down (ztunnel: 20 s).
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How often each side of an open connection checks its peer's certificate again (see
/// [`crate::ServerTls::recheck`]).
pub const DEFAULT_RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on the TCP connect, TLS handshake and HTTP/2 SETTINGS exchange (ztunnel: 10 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest header block a server accepts (ztunnel's server: 64 KiB; HBONE headers are few).
pub(crate) const SERVER_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Largest header block a client accepts (ztunnel's client: 16 KiB).
pub(crate) const CLIENT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Data a server buffers per stream before waiting for the peer's window (ztunnel: 400 KiB).
pub(crate) const SERVER_MAX_SEND_BUFFER: usize = 400 * 1024;

/// HTTP/2 flow-control settings. Large windows are what make a tunnel fast: a stream can have a
/// full window in flight per round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowControl {
    /// Initial receive window of each stream.
    pub stream_window: u32,
    /// Receive window of the whole connection.
    pub connection_window: u32,
    /// Largest DATA frame the peer may send.
    pub max_frame_size: u32,
}

impl Default for FlowControl {
    fn default() -> Self {
        Self {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
        }
    }
}

/// The parsed `forwarded` header of a CONNECT request (first element only: the original client).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Address of the original source (`for=`), if it is an IP address.
    pub for_ip: Option<IpAddr>,
    /// Port of the original source, when `for=` carries one (ztunnel sends `ip:port`).
    pub for_port: Option<u16>,
    /// The service hostname the client addressed (`host=`), if any.
    pub host: Option<String>,
}

impl Forwarded {
    /// The original source as a socket address, when `for=` has both address and port.
    pub fn for_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.for_ip?, self.for_port?))
    }

    /// Parses a `forwarded` value. Unknown parameters, obfuscated or `unknown` nodes and malformed
    /// pairs are ignored (as ztunnel does): the header is informational, the peer is authenticated
    /// by its certificate.
    pub fn parse(value: &str) -> Self {
        let mut out = Forwarded::default();
        // Elements are comma-separated; the first is the original client.
        let Some(first) = split_unquoted(value, ',').into_iter().next() else {
            return out;
        };
        for pair in split_unquoted(first, ';') {
            let Some((name, raw)) = pair.split_once('=') else {
                continue;
            };
            let value = unquote(raw.trim());
            match name.trim().to_ascii_lowercase().as_str() {
                "for" => (out.for_ip, out.for_port) = parse_node(&value),
                "host" if !value.is_empty() => out.host = Some(value),
                _ => {}
            }
        }
        out
    }

    /// The header value ztunnel sends: `for="<ip:port>"`, then `;host=<hostname>` if known.
    pub(crate) fn header_value(source: Option<SocketAddr>, host: Option<&str>) -> Option<String> {
        let mut parts = Vec::with_capacity(2);
        if let Some(src) = source {
            parts.push(format!("for=\"{src}\""));
        }
        if let Some(host) = host {
            parts.push(format!("host={}", token_or_quoted(host)));
        }
        (!parts.is_empty()).then(|| parts.join(";"))
    }
}

/// `value` as an RFC 7239 token when it is one (a service hostname always is), else quoted.
fn token_or_quoted(value: &str) -> String {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !value.is_empty() && value.chars().all(is_tchar) {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(s: &str) -> String {
    match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if escaped || c != '\\' {
                    out.push(c);
                    escaped = false;
                } else {
                    escaped = true;
                }
            }
            out
        }
        None => s.to_owned(),
    }
}

/// An RFC 7239 node: `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80` (or `unknown`/obfuscated: none).
fn parse_node(node: &str) -> (Option<IpAddr>, Option<u16>) {
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return (Some(addr.ip()), Some(addr.port()));
    }
    let bare = node.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(node);
    match bare.parse::<IpAddr>() {
        Ok(ip) => (Some(ip), None),
        Err(_) => (None, None),
    }
}

/// A W3C `traceparent`: version 00, random trace and span ids, not sampled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: u128,
    span_id: u64,
}

impl TraceParent {
    /// A new random trace.
    pub fn random() -> Self {
        // Both ids must be non-zero to be valid.
        Self { trace_id: rand::random::<u128>() | 1, span_id: rand::random::<u64>() | 1 }
    }

    /// The trace id, as logs show it.
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-00", self.trace_id, self.span_id)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_as_ztunnel_sends_it() {
        let f = Forwarded::parse("for=\"10.0.0.7:43210\"");
        assert_eq!(f.for_addr(), Some("10.0.0.7:43210".parse().unwrap()));
        assert_eq!(f.host, None);
        let f = Forwarded::parse("for=\"[fd00::7]:43210\";host=reviews.default.svc.cluster.local");
        assert_eq!(f.for_addr(), Some("[fd00::7]:43210".parse().unwrap()));
        assert_eq!(f.host.as_deref(), Some("reviews.default.svc.cluster.local"));
    }

    #[test]
    fn forwarded_rfc7239_forms() {
        let f = Forwarded::parse("For=192.0.2.60;proto=http;by=203.0.113.43");
        assert_eq!((f.for_ip, f.for_port), (Some("192.0.2.60".parse().unwrap()), None));
        let f = Forwarded::parse("for=\"[2001:db8:cafe::17]\", for=192.0.2.1");
        assert_eq!((f.for_ip, f.for_port), (Some("2001:db8:cafe::17".parse().unwrap()), None));
        assert_eq!(Forwarded::parse("for=unknown").for_ip, None);
        assert_eq!(Forwarded::parse("for=_hidden;host=\"a;b\"").host.as_deref(), Some("a;b"));
        assert_eq!(Forwarded::parse("garbage"), Forwarded::default());
        assert_eq!(Forwarded::parse(""), Forwarded::default());
    }

    #[test]
    fn forwarded_round_trips_the_value_the_client_builds() {
        for src in ["10.1.2.3:5555", "[::1]:80"] {
            let src: SocketAddr = src.parse().unwrap();
            let value = Forwarded::header_value(Some(src), Some("svc.ns.svc.cluster.local")).unwrap();
            let parsed = Forwarded::parse(&value);
            assert_eq!(parsed.for_addr(), Some(src), "{value}");
            assert_eq!(parsed.host.as_deref(), Some("svc.ns.svc.cluster.local"));
        }
        assert_eq!(Forwarded::header_value(None, None), None);
        let odd = Forwarded::header_value(None, Some("a;b=\"c\"")).unwrap();
        assert_eq!(Forwarded::parse(&odd).host.as_deref(), Some("a;b=\"c\""), "{odd}");
    }

    #[test]
    fn traceparent_has_the_w3c_shape() {
        let t = TraceParent::random().to_string();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 32, 16, 2], "{t}");
        assert_eq!(parts[0], "00");
        assert_ne!(TraceParent::random(), TraceParent::random());
    }
}
