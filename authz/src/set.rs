//! A loaded, indexed set of policies: which policies apply to a workload, candidate rules for a
//! peer (indexed by exact principal / namespace so one decision does not scan every rule), and
//! PeerAuthentication resolution.

use crate::error::{LoadError, LoadErrors};
use crate::matcher::StrMatch;
use crate::model::*;
use std::collections::{BTreeMap, HashMap};

/// Index maps hash short strings on every decision: a fast non-cryptographic hasher (the keys
/// come from trusted configuration, not from the network).
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::net::Ipv4Addr;

/// Loading options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Policies in this namespace apply mesh-wide. Default `istio-system`.
    pub root_namespace: String,
    /// Offset from UTC, in minutes, for `custom.time_of_day` / `custom.day_of_week`. Default 0.
    pub utc_offset_minutes: i32,
    /// The mesh's trust domain. A principal a policy writes as `cluster.local/ns/NS/sa/SA` names
    /// this trust domain, as in Istio. Default `cluster.local`.
    pub trust_domain: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            root_namespace: "istio-system".to_string(),
            utc_offset_minutes: 0,
            trust_domain: crate::matcher::CLUSTER_LOCAL.to_string(),
        }
    }
}

/// Rewrites the principals of `p`'s rules (`principals`, `notPrincipals`, `source.principal`)
/// with [`crate::matcher::localize_principal`].
fn localize_principals(p: &mut AuthzPolicy, trust_domain: &str) {
    let localize = |v: &mut Vec<StrMatch>| {
        for m in v.iter_mut() {
            *m = crate::matcher::localize_principal(m, trust_domain);
        }
    };
    for r in &mut p.rules {
        for s in &mut r.from {
            localize(&mut s.principals);
            localize(&mut s.not_principals);
        }
        for c in r.when.iter_mut().filter(|c| c.key == Key::SourcePrincipal) {
            for v in [&mut c.values, &mut c.not_values] {
                if let Values::Strs(m) = v {
                    localize(m);
                }
            }
        }
    }
}

/// A workload as the policy engine sees it (a destination, or a remote peer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    /// Names of the Services (in the workload's namespace) that select it, for policies bound
    /// with `targetRefs` (kind Service / ServiceEntry). Empty when unknown.
    pub services: Vec<String>,
}

/// What a policy needs to know about the workload it may apply to.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub services: &'a [String],
}

impl<'a> From<&'a Workload> for Target<'a> {
    fn from(w: &'a Workload) -> Self {
        Target { namespace: &w.namespace, labels: &w.labels, services: &w.services }
    }
}

/// Label of the pods of a Gateway API gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Does a policy of namespace `ns` that selects `sel` apply to the workload `t`? A policy applies
/// in its own namespace and, from the `root` namespace, in every namespace; a selector narrows
/// that. A policy bound with `targetRefs` applies only to its targets in its own namespace, the
/// root namespace included: Istio attaches a Service or Gateway by name in the policy's namespace
/// (`ShouldAttachPolicy`), so the root scope does not widen it.
pub(crate) fn scope_applies(ns: &str, sel: &Selection, t: &Target, root: &str) -> bool {
    let in_scope = match sel {
        Selection::TargetRefs(_) => ns == t.namespace,
        Selection::All | Selection::Labels(_) => ns == root || ns == t.namespace,
    };
    in_scope && selection_applies(sel, t)
}

fn selection_applies(sel: &Selection, t: &Target) -> bool {
    match sel {
        Selection::All => true,
        Selection::Labels(l) => l.iter().all(|(k, v)| t.labels.get(k) == Some(v)),
        Selection::TargetRefs(refs) => refs.iter().any(|r| match r.kind.as_str() {
            "Gateway" => t.labels.get(GATEWAY_NAME_LABEL) == Some(&r.name),
            _ => t.services.contains(&r.name),
        }),
    }
}

/// label key -> label value -> items.
pub(crate) type LabelIndex<T> = FastMap<String, FastMap<String, Vec<T>>>;

fn label_get<'a, T>(ix: &'a LabelIndex<T>, labels: &'a BTreeMap<String, String>) -> impl Iterator<Item = &'a T> + 'a {
    let labels = if ix.is_empty() { None } else { Some(labels) };
    labels.into_iter().flatten().filter_map(|(k, v)| ix.get(k.as_str())?.get(v.as_str())).flatten()
}

/// A rule, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct RuleRef {
    /// Evaluation rank: CUSTOM 0, DENY 1, ALLOW 2 (AUDIT and dry-run rules are not indexed).
    pub rank: u8,
    pub policy: u32,
    pub rule: u32,
}

/// Per namespace: candidate rules by the exact principals / namespaces / service accounts their
/// sources require. A rule is indexed only when *every* source of it requires one of those
/// (otherwise it is in `unindexed`); it is then listed under each key any source names.
#[derive(Clone, Debug, Default)]
pub(crate) struct NsIndex {
    pub by_principal: FastMap<String, Vec<RuleRef>>,
    pub by_namespace: FastMap<String, Vec<RuleRef>>,
    /// Key `namespace/serviceAccount`.
    pub by_service_account: FastMap<String, Vec<RuleRef>>,
    /// Rules of policies that select by label, by the policy's first (key, value) label.
    pub unindexed_by_label: LabelIndex<RuleRef>,
    /// Rules of policies that select every workload of the scope, or by targetRefs.
    pub unindexed: Vec<RuleRef>,
    /// Enforced ALLOW policies with a label selector, by their first (key, value) label, and the
    /// others (targetRefs): to answer "does an ALLOW policy apply?" without a scan.
    pub allow_by_label: LabelIndex<u32>,
    pub allow_other: Vec<u32>,
    /// Enforced ALLOW policies that select every workload of the namespace.
    pub allow_all: Vec<u32>,
    /// Dry-run and AUDIT policies (reported, never enforced).
    pub shadow_policies: Vec<u32>,
}

/// A workload's base mTLS mode (and the policy that set it), and its per-port modes.
pub(crate) type MtlsPorts<'a> = (MtlsMode, Option<&'a PeerAuth>, Vec<(u16, MtlsMode, Option<&'a PeerAuth>)>);

/// The (root, own) namespace indexes of one evaluation.
#[derive(Clone, Copy)]
pub(crate) struct Scopes<'a>([Option<&'a NsIndex>; 2]);

impl<'a> Scopes<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a NsIndex> + '_ {
        self.0.iter().flatten().copied()
    }
}

/// The loaded policies, sorted by (namespace, name), with their indexes.
#[derive(Clone, Debug)]
pub struct PolicySet {
    pub(crate) options: Options,
    pub(crate) authz: Vec<AuthzPolicy>,
    pub(crate) peer: Vec<PeerAuth>,
    pub(crate) request_auth: Vec<RequestAuth>,
    pub(crate) warnings: Vec<String>,
    pub(crate) index: FastMap<String, NsIndex>,
}

fn rank(a: Action) -> Option<u8> {
    match a {
        Action::Custom => Some(0),
        Action::Deny => Some(1),
        Action::Allow => Some(2),
        Action::Audit => None,
    }
}

impl PolicySet {
    /// Builds a set from validated resources. Fails when two resources of one kind share a
    /// namespace/name.
    pub fn from_resources(resources: Vec<Resource>, options: &Options) -> Result<PolicySet, LoadErrors> {
        let mut authz = Vec::new();
        let mut peer = Vec::new();
        let mut request_auth = Vec::new();
        for r in resources {
            match r {
                Resource::AuthorizationPolicy(mut p) => {
                    localize_principals(&mut p, &options.trust_domain);
                    authz.push(p)
                }
                Resource::PeerAuthentication(p) => peer.push(p),
                Resource::RequestAuthentication(p) => request_auth.push(p),
            }
        }
        let mut errors = Vec::new();
        let mut dup = |kind: &str, key: String, first: &str, second: &str| {
            let (origin, doc) = second
                .rsplit_once(": document ")
                .map(|(o, d)| (o.to_string(), d.parse().ok()))
                .unwrap_or((second.to_string(), None));
            errors.push(LoadError {
                origin,
                document: doc,
                resource: Some(key.clone()),
                field: "metadata.name".into(),
                reason: format!("duplicate {kind} {key} (first defined in {first})"),
            });
        };
        authz.sort_by(|a: &AuthzPolicy, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for w in authz.windows(2) {
            if w[0].namespace == w[1].namespace && w[0].name == w[1].name {
                dup("AuthorizationPolicy", w[1].key(), &w[0].origin, &w[1].origin);
            }
        }
        peer.sort_by(|a: &PeerAuth, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for w in peer.windows(2) {
            if w[0].namespace == w[1].namespace && w[0].name == w[1].name {
                dup("PeerAuthentication", w[1].key(), &w[0].origin, &w[1].origin);
            }
        }
        request_auth.sort_by(|a: &RequestAuth, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        if !errors.is_empty() {
            return Err(LoadErrors(errors));
        }
        let mut set = PolicySet {
            options: options.clone(),
            authz,
            peer,
            request_auth,
            warnings: Vec::new(),
            index: FastMap::default(),
        };
        set.build_index();
        set.check_peer_conflicts();
        Ok(set)
    }

    fn build_index(&mut self) {
        let mut index: FastMap<String, NsIndex> = FastMap::default();
        for (pi, p) in self.authz.iter().enumerate() {
            let ns = index.entry(p.namespace.clone()).or_default();
            let enforced_rank = if p.dry_run { None } else { rank(p.action) };
            let Some(rk) = enforced_rank else {
                ns.shadow_policies.push(pi as u32);
                continue;
            };
            if p.action == Action::Allow {
                match &p.selection {
                    Selection::All => ns.allow_all.push(pi as u32),
                    Selection::Labels(l) => {
                        let (k, v) = l.iter().next().expect("a label selector is never empty");
                        ns.allow_by_label.entry(k.clone()).or_default().entry(v.clone()).or_default().push(pi as u32);
                    }
                    Selection::TargetRefs(_) => ns.allow_other.push(pi as u32),
                }
            }
            for (ri, r) in p.rules.iter().enumerate() {
                let rr = RuleRef { rank: rk, policy: pi as u32, rule: ri as u32 };
                let indexable = !r.from.is_empty()
                    && r.from.iter().all(|s| {
                        let exact_p = !s.principals.is_empty() && s.principals.iter().all(|m| m.exact().is_some());
                        let exact_n = !s.namespaces.is_empty() && s.namespaces.iter().all(|m| m.exact().is_some());
                        let sa = !s.service_accounts.is_empty();
                        exact_p || exact_n || sa
                    });
                if !indexable {
                    match &p.selection {
                        Selection::Labels(l) => {
                            let (k, v) = l.iter().next().expect("a label selector is never empty");
                            ns.unindexed_by_label.entry(k.clone()).or_default().entry(v.clone()).or_default().push(rr);
                        }
                        _ => ns.unindexed.push(rr),
                    }
                    continue;
                }
                for s in &r.from {
                    // Prefer the narrowest key each source offers.
                    if !s.principals.is_empty() && s.principals.iter().all(|m| m.exact().is_some()) {
                        for m in &s.principals {
                            ns.by_principal.entry(m.exact().unwrap_or_default().to_string()).or_default().push(rr);
                        }
                    } else if !s.service_accounts.is_empty() {
                        for (n, a) in &s.service_accounts {
                            ns.by_service_account.entry(format!("{n}/{a}")).or_default().push(rr);
                        }
                    } else {
                        for m in &s.namespaces {
                            if let StrMatch::Exact(n) = m {
                                ns.by_namespace.entry(n.clone()).or_default().push(rr);
                            }
                        }
                    }
                }
            }
        }
        self.index = index;
    }

    fn check_peer_conflicts(&mut self) {
        let mut ns_level: HashMap<&str, Vec<&PeerAuth>> = HashMap::new();
        for p in &self.peer {
            if p.selector.is_none() {
                ns_level.entry(&p.namespace).or_default().push(p);
            }
        }
        let mut w = Vec::new();
        for (ns, list) in ns_level {
            if list.len() > 1 {
                w.push(format!(
                    "warning: namespace {ns} has {} PeerAuthentications without selector ({}); the first by name, {}, is used",
                    list.len(),
                    list.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
                    list[0].key()
                ));
            }
        }
        w.sort();
        self.warnings.extend(w);
    }

    pub(crate) fn add_warnings(&mut self, w: Vec<String>) {
        let mut w = w;
        w.append(&mut self.warnings);
        self.warnings = w;
    }

    pub fn options(&self) -> &Options {
        &self.options
    }
    pub fn root_namespace(&self) -> &str {
        &self.options.root_namespace
    }
    /// Validation warnings (non-portable extensions, L7 attributes at L4, ...).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
    pub fn authorization_policies(&self) -> &[AuthzPolicy] {
        &self.authz
    }
    pub fn peer_authentications(&self) -> &[PeerAuth] {
        &self.peer
    }
    pub fn request_authentications(&self) -> &[RequestAuth] {
        &self.request_auth
    }
    pub fn len(&self) -> usize {
        self.authz.len() + self.peer.len() + self.request_auth.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Does policy `pi` apply to the workload `t`?
    pub(crate) fn applies(&self, pi: u32, t: &Target) -> bool {
        let p = &self.authz[pi as usize];
        scope_applies(&p.namespace, &p.selection, t, &self.options.root_namespace)
    }

    /// The indexes of the namespaces whose policies can apply to a workload of `ns`: the root
    /// namespace and `ns`.
    pub(crate) fn scopes<'a>(&'a self, ns: &str) -> Scopes<'a> {
        let root = self.index.get(self.options.root_namespace.as_str());
        let own = if ns == self.options.root_namespace { None } else { self.index.get(ns) };
        Scopes([root, own])
    }

    /// Does an enforced ALLOW policy apply to `t`?
    pub(crate) fn allow_applies(&self, t: &Target, scopes: &Scopes) -> bool {
        self.allow_policies(t, scopes).next().is_some()
    }

    /// The enforced ALLOW policies that apply to `t`, each at least once.
    pub(crate) fn allow_policies<'a>(&'a self, t: &'a Target, scopes: &'a Scopes) -> impl Iterator<Item = u32> + 'a {
        scopes.iter().flat_map(move |ix| {
            ix.allow_all
                .iter()
                .copied()
                .chain(ix.allow_other.iter().copied().filter(move |&pi| self.applies(pi, t)))
                .chain(label_get(&ix.allow_by_label, t.labels).copied().filter(move |&pi| self.applies(pi, t)))
        })
    }

    /// Candidate enforced rules for a peer, sorted by (rank, policy, rule), deduplicated. Rules
    /// of policies that do not apply to `t` are left out.
    pub(crate) fn candidates(
        &self,
        t: &Target,
        scopes: &Scopes,
        principal: Option<&str>,
        peer_ns: Option<&str>,
        peer_sa: Option<(&str, &str)>,
        out: &mut Vec<RuleRef>,
    ) {
        out.clear();
        for ix in scopes.iter() {
            out.extend(ix.unindexed.iter().copied());
            out.extend(label_get(&ix.unindexed_by_label, t.labels).copied());
            if let Some(p) = principal
                && let Some(v) = ix.by_principal.get(p)
            {
                out.extend(v.iter().copied());
            }
            if let Some(n) = peer_ns
                && let Some(v) = ix.by_namespace.get(n)
            {
                out.extend(v.iter().copied());
            }
            if let Some((n, a)) = peer_sa
                && !ix.by_service_account.is_empty()
                && let Some(v) = ix.by_service_account.get(&format!("{n}/{a}"))
            {
                out.extend(v.iter().copied());
            }
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|r| self.applies(r.policy, t));
    }

    pub(crate) fn policy(&self, pi: u32) -> &AuthzPolicy {
        &self.authz[pi as usize]
    }

    /// Effective mTLS mode for a workload and port, with the PeerAuthentication that set it.
    /// Precedence: workload (selector) > namespace > root namespace; UNSET inherits; the
    /// mesh default is PERMISSIVE. `portLevelMtls` of the workload-level policy overrides per port.
    pub fn mtls_mode(&self, t: &Target, port: Option<u16>) -> (MtlsMode, Option<&PeerAuth>) {
        let root = &self.options.root_namespace;
        let workload = self.workload_peer_auth(t);
        let namespace = self.peer.iter().find(|p| p.namespace == t.namespace && p.selector.is_none());
        let mesh = self.peer.iter().find(|p| &p.namespace == root && p.selector.is_none());
        let mut mode = MtlsMode::Permissive;
        let mut by = None;
        for p in [mesh, namespace, workload].into_iter().flatten() {
            if p.mode != MtlsMode::Unset {
                mode = p.mode;
                by = Some(p);
            }
        }
        if let (Some(w), Some(port)) = (workload, port)
            && let Some(m) = w.port_level.get(&port)
            && *m != MtlsMode::Unset
        {
            mode = *m;
            by = Some(w);
        }
        (mode, by)
    }

    /// The workload-level PeerAuthentication of `t`: one with a selector that matches it, in its
    /// namespace. One in the root namespace is not: Istio takes a PeerAuthentication with a
    /// selector as workload-level only outside the root namespace (`ComposePeerAuthentication`),
    /// and ignores it there.
    fn workload_peer_auth(&self, t: &Target) -> Option<&PeerAuth> {
        self.peer.iter().find(|p| {
            p.namespace == t.namespace
                && p.namespace != self.options.root_namespace
                && p.selector.as_ref().is_some_and(|s| s.iter().all(|(k, v)| t.labels.get(k) == Some(v)))
        })
    }

    /// The PeerAuthentication decisions for a workload: the base mode (with its policy) and the
    /// per-port overrides that differ from it.
    pub(crate) fn mtls_ports(&self, t: &Target) -> MtlsPorts<'_> {
        let (base, by) = self.mtls_mode(t, None);
        let workload = self.workload_peer_auth(t);
        let mut ports = Vec::new();
        if let Some(w) = workload {
            for &port in w.port_level.keys() {
                let (m, b) = self.mtls_mode(t, Some(port));
                ports.push((port, m, b));
            }
        }
        (base, by, ports)
    }
}
