//! Precompiled value matchers: Istio string matching, path templates, CIDRs, and warden's
//! extensions (numeric header comparisons, time-of-day windows, days of the week).

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

/// Istio string match: exact, prefix (`abc*`), suffix (`*abc`), presence (`*`).
/// A `*` anywhere else is a literal character.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: the attribute is present and not empty.
    Presence,
}

impl StrMatch {
    pub fn parse(s: &str) -> StrMatch {
        if s == "*" {
            StrMatch::Presence
        } else if let Some(rest) = s.strip_prefix('*') {
            StrMatch::Suffix(rest.to_string())
        } else if let Some(rest) = s.strip_suffix('*') {
            StrMatch::Prefix(rest.to_string())
        } else {
            StrMatch::Exact(s.to_string())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Presence => !v.is_empty(),
        }
    }

    /// Case-insensitive variant (hosts).
    pub fn matches_ignore_case(&self, v: &str) -> bool {
        let lower = v.to_ascii_lowercase();
        match self {
            StrMatch::Exact(e) => lower == e.to_ascii_lowercase(),
            StrMatch::Prefix(p) => lower.starts_with(&p.to_ascii_lowercase()),
            StrMatch::Suffix(s) => lower.ends_with(&s.to_ascii_lowercase()),
            StrMatch::Presence => !v.is_empty(),
        }
    }

    /// The pattern as written (`abc`, `abc*`, `*abc`, `*`).
    pub fn pattern(&self) -> String {
        match self {
            StrMatch::Exact(e) => e.clone(),
            StrMatch::Prefix(p) => format!("{p}*"),
            StrMatch::Suffix(s) => format!("*{s}"),
            StrMatch::Presence => "*".to_string(),
        }
    }

    pub fn exact(&self) -> Option<&str> {
        match self {
            StrMatch::Exact(e) => Some(e),
            _ => None,
        }
    }
}

/// A header value matcher: an Istio string match, or (warden extension) a numeric comparison.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueMatch {
    Str(StrMatch),
    /// `>N`, `>=N`, `<N`, `<=N`: matches only when the value parses as a number.
    Num(NumOp, f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumOp {
    Gt,
    Ge,
    Lt,
    Le,
}

impl ValueMatch {
    /// Parses a header value pattern. Returns the matcher and whether it is the numeric
    /// extension (not portable to Istio, which compares the text `>100` literally).
    pub fn parse_header(s: &str) -> (ValueMatch, bool) {
        let t = s.trim();
        let (op, rest) = if let Some(r) = t.strip_prefix(">=") {
            (Some(NumOp::Ge), r)
        } else if let Some(r) = t.strip_prefix("<=") {
            (Some(NumOp::Le), r)
        } else if let Some(r) = t.strip_prefix('>') {
            (Some(NumOp::Gt), r)
        } else if let Some(r) = t.strip_prefix('<') {
            (Some(NumOp::Lt), r)
        } else {
            (None, t)
        };
        if let Some(op) = op
            && let Ok(n) = rest.trim().parse::<f64>()
            && n.is_finite()
        {
            return (ValueMatch::Num(op, n), true);
        }
        (ValueMatch::Str(StrMatch::parse(s)), false)
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Str(m) => m.matches(v),
            ValueMatch::Num(op, n) => match v.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => match op {
                    NumOp::Gt => x > *n,
                    NumOp::Ge => x >= *n,
                    NumOp::Lt => x < *n,
                    NumOp::Le => x <= *n,
                },
                _ => false,
            },
        }
    }
}

/// Parses an IPv4 address or CIDR as Istio accepts it (`10.0.0.1` is `10.0.0.1/32`). The
/// network is truncated (`10.0.0.1/8` is `10.0.0.0/8`), as Envoy does.
pub fn parse_cidr(s: &str) -> Result<Ipv4Net, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<Ipv4Net>() {
        return Ok(n.trunc());
    }
    if let Ok(a) = t.parse::<Ipv4Addr>() {
        return Ok(Ipv4Net::from(a));
    }
    if t.contains(':') {
        return Err(format!("{s:?} is an IPv6 address or CIDR; warden enforces IPv4 only"));
    }
    Err(format!("{s:?} is not a CIDR"))
}

/// One segment of a path template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(String),
    /// `{*}`: exactly one segment.
    One,
    /// `{**}`: one or more segments; only literal segments may follow it.
    Rest,
}

/// A path matcher: an Istio string match, or a `{*}` / `{**}` template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Str(StrMatch),
    Template(Vec<SegT>),
}

/// Public wrapper to keep `Seg` private.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegT(Seg);

impl PathMatch {
    /// Parses a path pattern; errors follow Istio's template rules.
    pub fn parse(s: &str) -> Result<PathMatch, String> {
        if !s.contains('{') && !s.contains('}') {
            return Ok(PathMatch::Str(StrMatch::parse(s)));
        }
        if s.starts_with('*') || s.ends_with('*') {
            return Err(format!("{s:?} mixes a path template with a `*` prefix/suffix wildcard"));
        }
        if !s.starts_with('/') {
            return Err(format!("{s:?}: a path template must start with `/`"));
        }
        let parts: Vec<&str> = s[1..].split('/').collect();
        let mut segs = Vec::with_capacity(parts.len());
        let mut rest_seen = false;
        for p in &parts {
            let seg = match *p {
                // `{**}` must be the last operator; literal segments may follow it (Istio's
                // `CheckValidPathTemplate`).
                "{*}" | "{**}" if rest_seen => {
                    return Err(format!("{s:?}: `{{**}}` must be the last operator of a path template"));
                }
                "{*}" => Seg::One,
                "{**}" => {
                    rest_seen = true;
                    Seg::Rest
                }
                lit if lit.contains('{') || lit.contains('}') => {
                    return Err(format!(
                        "{s:?}: segment {lit:?} is not a valid template operator (only whole segments `{{*}}` and `{{**}}`)"
                    ));
                }
                lit => Seg::Lit(lit.to_string()),
            };
            segs.push(SegT(seg));
        }
        Ok(PathMatch::Template(segs))
    }

    pub fn matches(&self, path: &str) -> bool {
        // The query and fragment are not part of the path Istio matches.
        let path = path.split(['?', '#']).next().unwrap_or("");
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(segs) => {
                let Some(rest) = path.strip_prefix('/') else { return false };
                let parts: Vec<&str> = rest.split('/').collect();
                let mut i = 0;
                for (si, SegT(seg)) in segs.iter().enumerate() {
                    match seg {
                        Seg::Rest => {
                            // `{**}` matches one or more characters of path up to the literal
                            // segments that follow it (only literals can), which end the path.
                            let tail = &segs[si + 1..];
                            let Some(end) = parts.len().checked_sub(tail.len()).filter(|&e| e > i) else {
                                return false;
                            };
                            let tail_matches =
                                tail.iter().zip(&parts[end..]).all(|(SegT(t), p)| matches!(t, Seg::Lit(l) if l == p));
                            return tail_matches && !parts[i..end].join("/").is_empty();
                        }
                        Seg::One => {
                            if i >= parts.len() || parts[i].is_empty() {
                                return false;
                            }
                        }
                        Seg::Lit(l) => {
                            if i >= parts.len() || parts[i] != l {
                                return false;
                            }
                        }
                    }
                    i += 1;
                }
                i == parts.len()
            }
        }
    }
}

/// A window of the day in minutes since midnight, `[start, end)`; across midnight when
/// `start > end`. (warden extension `custom.time_of_day`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWindow {
    pub start: u32,
    pub end: u32,
}

impl TimeWindow {
    pub fn parse(s: &str) -> Result<TimeWindow, String> {
        let bad = || format!("{s:?} is not a time window HH:MM-HH:MM");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let hm = |x: &str| -> Option<u32> {
            let (h, m) = x.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            // 24:00 is allowed as an end of day.
            if (h < 24 && m < 60) || (h == 24 && m == 0) { Some(h * 60 + m) } else { None }
        };
        let (start, end) = (hm(a).ok_or_else(bad)?, hm(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!("{s:?} is an empty time window (start equals end)"));
        }
        if start == 24 * 60 {
            return Err(bad());
        }
        Ok(TimeWindow { start, end })
    }

    pub fn contains(&self, minute: u32) -> bool {
        if self.start < self.end {
            minute >= self.start && minute < self.end
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// 0 = Monday .. 6 = Sunday.
pub fn parse_weekday(s: &str) -> Result<u8, String> {
    const NAMES: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    let l = s.trim().to_ascii_lowercase();
    NAMES
        .iter()
        .position(|n| *n == l || (l.len() == 3 && n.starts_with(&l)))
        .map(|i| i as u8)
        .ok_or_else(|| format!("{s:?} is not a day of the week (monday..sunday)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! table {
        ($name:ident, $f:expr, $( $pat:expr, $v:expr => $want:expr );+ $(;)?) => {
            #[test]
            fn $name() {
                $( assert_eq!($f($pat, $v), $want, "pattern {:?} value {:?}", $pat, $v); )+
            }
        };
    }

    table!(string_match, |p: &str, v: &str| StrMatch::parse(p).matches(v),
        "abc", "abc" => true; "abc", "abcd" => false; "abc*", "abcd" => true; "abc*", "xabc" => false;
        "*abc", "xabc" => true; "*abc", "abcx" => false; "*", "x" => true; "*", "" => false;
        "a*c", "abc" => false; "a*c", "a*c" => true);

    table!(header_match, |p: &str, v: &str| ValueMatch::parse_header(p).0.matches(v),
        ">100", "101" => true; ">100", "100" => false; ">=100", "100" => true; "<0.8", "0.5" => true;
        "<=5", "5.0" => true; ">100", "abc" => false; ">100", "" => false; ">abc", ">abc" => true);

    table!(path_match, |p: &str, v: &str| PathMatch::parse(p).unwrap().matches(v),
        "/a/{*}/c", "/a/b/c" => true; "/a/{*}/c", "/a//c" => false; "/a/{*}/c", "/a/b/x/c" => false;
        "/a/{**}", "/a/b/c" => true; "/a/{**}", "/a/" => false; "/a/{**}", "/a" => false;
        "/a/{**}/b", "/a/x/b" => true; "/a/{**}/b", "/a/x/y/b" => true; "/a/{**}/b", "/a/b" => false;
        "/a/{**}/b", "/a/x/y" => false; "/a/{**}/b/c", "/a/x/b/c" => true; "/a/{**}/b/c", "/a/x/c/c" => false;
        "/{*}/{**}/v1", "/s/x/y/v1" => true; "/{*}/{**}/v1", "/s/v1" => false;
        "/api/*", "/api/x?y=1" => true; "/a*b", "/a*b" => true; "/a*b", "/axb" => false);

    #[test]
    fn template_errors() {
        assert!(PathMatch::parse("/a/{**}/{*}").is_err());
        assert!(PathMatch::parse("/a/{**}/b/{**}").is_err());
        assert!(PathMatch::parse("/a/x{*}").is_err());
        assert!(PathMatch::parse("*/a/{*}").is_err());
    }

    #[test]
    fn time_windows() {
        let w = TimeWindow::parse("08:00-18:00").unwrap();
        assert!(w.contains(8 * 60) && w.contains(18 * 60 - 1) && !w.contains(18 * 60) && !w.contains(7 * 60 + 59));
        let n = TimeWindow::parse("22:00-06:00").unwrap();
        assert!(
            n.contains(23 * 60)
                && n.contains(0)
                && n.contains(5 * 60 + 59)
                && !n.contains(6 * 60)
                && !n.contains(12 * 60)
        );
        assert!(TimeWindow::parse("25:00-26:00").is_err());
        assert!(TimeWindow::parse("8-18").is_err());
        assert!(TimeWindow::parse("08:00-08:00").is_err());
        assert_eq!(parse_weekday("Friday"), Ok(4));
        assert_eq!(parse_weekday("sun"), Ok(6));
        assert!(parse_weekday("funday").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.0.0.0/33").unwrap_err(), "\"10.0.0.0/33\" is not a CIDR");
        assert!(parse_cidr("::1/128").unwrap_err().contains("IPv6"));
    }
}

/// The trust domain a principal written as `cluster.local/ns/NS/sa/SA` stands for.
pub const CLUSTER_LOCAL: &str = "cluster.local";

/// A principal pattern of a policy, with Istio's reading of `cluster.local`: a pointer to the
/// local trust domain (`ReplaceTrustDomainAliases`), so a policy written for the default trust
/// domain keeps working in a mesh with another one. Only a pattern of five `/`-separated parts
/// whose first is not `*` names a trust domain; any other is kept as written, and so is a
/// principal of another trust domain.
pub fn localize_principal(m: &StrMatch, trust_domain: &str) -> StrMatch {
    if trust_domain == CLUSTER_LOCAL {
        return m.clone();
    }
    let pattern = m.pattern();
    let parts: Vec<&str> = pattern.split('/').collect();
    if parts.len() != 5 || parts[0] != CLUSTER_LOCAL {
        return m.clone();
    }
    StrMatch::parse(&format!("{trust_domain}/{}", parts[1..].join("/")))
}

#[cfg(test)]
mod trust_domain_tests {
    use super::*;

    fn local(p: &str, td: &str) -> String {
        localize_principal(&StrMatch::parse(p), td).pattern()
    }

    #[test]
    fn cluster_local_stands_for_the_local_trust_domain() {
        assert_eq!(local("cluster.local/ns/a/sa/b", "corp.example"), "corp.example/ns/a/sa/b");
        assert_eq!(local("cluster.local/ns/a/sa/*", "corp.example"), "corp.example/ns/a/sa/*");
        // Not five parts, a wildcard trust domain, another trust domain: as written (Istio).
        assert_eq!(local("cluster.local/ns/a/*", "corp.example"), "cluster.local/ns/a/*");
        assert_eq!(local("*/ns/a/sa/b", "corp.example"), "*/ns/a/sa/b");
        assert_eq!(local("*", "corp.example"), "*");
        assert_eq!(local("other.example/ns/a/sa/b", "corp.example"), "other.example/ns/a/sa/b");
        assert_eq!(local("cluster.local/ns/a/sa/b", "cluster.local"), "cluster.local/ns/a/sa/b");
    }

    #[test]
    fn a_pattern_reads_back_as_written() {
        for p in ["a", "a*", "*a", "*", "a*b"] {
            assert_eq!(StrMatch::parse(p).pattern(), p);
        }
    }
}
