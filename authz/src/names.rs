//! Kubernetes' rules for names, as the API server applies them: what a policy's metadata and a
//! workload file's entries must follow.

/// A DNS-1123 label: at most 63 lower-case alphanumerics and '-', starting and ending with an
/// alphanumeric (a namespace).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: DNS labels joined by '.', at most 253 characters (a pod, a service
/// account, most objects' names).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_` and `.`, starting and ending alphanumeric.
pub fn label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return Err(format!("{k:?}: the prefix before '/' is not a DNS-1123 subdomain"));
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{k:?} is not a label key (at most 63 alphanumerics, '-', '_' and '.', starting and ending alphanumeric, after an optional DNS prefix and '/')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_subdomains_and_label_keys() {
        assert!(is_dns_label("a-1") && !is_dns_label("A") && !is_dns_label("-a") && !is_dns_label("a.b"));
        assert!(is_dns_label(&"a".repeat(63)) && !is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("web.v2") && !is_dns_subdomain("a.") && !is_dns_subdomain(".a"));
        assert!(label_key("app").is_ok() && label_key("app.kubernetes.io/name").is_ok() && label_key("A_b.c").is_ok());
        assert!(label_key("bad key!").is_err() && label_key("Bad/x").is_err() && label_key("x/").is_err());
    }
}
