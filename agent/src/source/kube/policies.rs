//! The Istio security resources of the cluster: each object is validated on its own with the
//! same parser as `warden policy validate`. A valid object is put in force; an invalid one is
//! reported (log, Event, status) and ignored, and the last good version of it, when this agent
//! saw one, stays in force. An invalid ALLOW AuthorizationPolicy without one (after a restart, or
//! created invalid) is not simply absent: a placeholder that matches nothing stands in for it,
//! so its workloads deny by default, as Istio skips the rules of a policy it cannot translate
//! and still applies the policy. One bad object never takes down the others.

use std::collections::{BTreeMap, HashMap, HashSet};

use kube::{ResourceExt as _, api::DynamicObject};
use serde_json::{Value, json};
use warden_authz::{
    LoadError, Resource,
    model::{Action, AuthzPolicy, Selection},
    validate::DRY_RUN_ANNOTATION,
};

/// The kinds watched, all in `security.istio.io`.
pub const KINDS: [(&str, &str); 3] = [
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("PeerAuthentication", "peerauthentications"),
    ("RequestAuthentication", "requestauthentications"),
];
pub const GROUP: &str = "security.istio.io";

/// The status condition warden writes on the resources it validates.
pub const CONDITION: &str = "Accepted";
/// The code of warden's validation message in `status.validationMessages` (Istio's analyzers
/// use `IST####`; warden's own are `WDN####`).
pub const INVALID_CODE: &str = "WDN0001";

/// An object's identity and version: reports are made once per generation (status writes do not
/// bump it, so they do not cause new reports).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    pub uid: String,
    pub generation: i64,
}

fn version(o: &DynamicObject) -> Version {
    Version { uid: o.metadata.uid.clone().unwrap_or_default(), generation: o.metadata.generation.unwrap_or(0) }
}

/// `Kind namespace/name`, how every message names a resource.
pub fn display_name(kind: &str, o: &DynamicObject) -> String {
    format!("{kind} {}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// The object as the document `warden policy validate` would read: apiVersion, kind, the
/// user's metadata, spec and any other top-level field; never the server's bookkeeping or status.
pub fn as_document(kind: &str, o: &DynamicObject) -> Value {
    let mut doc = serde_json::Map::new();
    let api_version = o.types.as_ref().map(|t| t.api_version.clone()).unwrap_or_default();
    doc.insert("apiVersion".into(), api_version.into());
    doc.insert("kind".into(), kind.into());
    let mut md = serde_json::Map::new();
    md.insert("name".into(), o.name_any().into());
    if let Some(ns) = o.namespace() {
        md.insert("namespace".into(), ns.into());
    }
    if let Some(l) = &o.metadata.labels {
        md.insert("labels".into(), json!(l));
    }
    let annotations: BTreeMap<&String, &String> =
        o.annotations().iter().filter(|(k, _)| *k != "kubectl.kubernetes.io/last-applied-configuration").collect();
    if !annotations.is_empty() {
        md.insert("annotations".into(), json!(annotations));
    }
    doc.insert("metadata".into(), Value::Object(md));
    if let Value::Object(data) = &o.data {
        for (k, v) in data {
            if k != "status" {
                doc.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(doc)
}

/// Validate one object: its resources and warnings, or every problem (field and reason).
pub fn validate(kind: &str, o: &DynamicObject) -> Result<(Vec<Resource>, Vec<String>), Vec<LoadError>> {
    let name = display_name(kind, o);
    let yaml = serde_yaml::to_string(&as_document(kind, o)).map_err(|e| {
        vec![LoadError {
            origin: name.clone(),
            document: None,
            resource: None,
            field: String::new(),
            reason: format!("cannot convert to YAML: {e}"),
        }]
    })?;
    warden_authz::parse_str_with_warnings(&yaml, &name).map(|p| (p.resources, p.warnings)).map_err(|e| e.0)
}

/// One problem as an operator reads it: `field: reason`.
pub fn problem_text(e: &LoadError) -> String {
    if e.field.is_empty() { e.reason.clone() } else { format!("{}: {}", e.field, e.reason) }
}

/// What is in force for an invalid object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InForce {
    /// The last valid version of the same object (same UID) this agent saw.
    Previous,
    /// An ALLOW AuthorizationPolicy with no previous version: a placeholder under its name that
    /// applies where it does and matches nothing ([`placeholder`]), so its workloads deny by
    /// default.
    Placeholder {
        /// Its `selector`/`targetRef(s)` could not be read either: it applies to its whole
        /// namespace (the mesh, in the root namespace), the more restrictive choice.
        namespace_wide: bool,
        /// `istio.io/dry-run: "true"`: the placeholder is a dry run too (reported, not enforced).
        dry_run: bool,
    },
    /// Nothing: the object has no effect (an invalid DENY, AUDIT or CUSTOM policy, whose rules
    /// Istio skips; a PeerAuthentication or RequestAuthentication).
    Nothing,
}

/// Something to tell the API server about an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub kind: &'static str,
    pub object: DynamicObject,
    /// `None`: the object is valid (its stale invalid status is cleared). `Some`: every problem.
    pub problems: Option<Vec<String>>,
    /// An invalid object whose previous version stays in force (`in_force == Some(Previous)`).
    pub kept_previous: bool,
    /// For an invalid object (`problems` is `Some`), what is in force in its place.
    pub in_force: Option<InForce>,
}

impl Report {
    /// What is in force for an invalid object, as the messages say it; `None` when nothing
    /// needs saying (a valid object; an invalid PeerAuthentication or RequestAuthentication).
    pub fn in_force_text(&self) -> Option<String> {
        match self.in_force? {
            InForce::Previous => Some("the previous version stays in force".into()),
            InForce::Placeholder { namespace_wide, dry_run } => {
                let mut text = if dry_run {
                    "in force as a dry run: matches nothing, its workloads would deny by default (reported, not enforced) until it is fixed".to_string()
                } else {
                    "in force: matches nothing, its workloads deny by default until it is fixed".to_string()
                };
                if namespace_wide {
                    text.push_str(
                        " (its selector or targetRefs cannot be read either: it applies to every workload of its namespace, of the mesh in the root namespace)",
                    );
                }
                Some(text)
            }
            InForce::Nothing if self.kind == "AuthorizationPolicy" => {
                let action = self.object.data["spec"]["action"].as_str().unwrap_or("DENY");
                Some(format!("not in force: Istio skips the rules of an invalid {action} policy"))
            }
            InForce::Nothing => None,
        }
    }

    /// The message of the `Accepted=False` condition: what is in force, then every problem.
    /// `None` for a valid object.
    pub fn message(&self) -> Option<String> {
        let problems = self.problems.as_ref()?.join("; ");
        Some(match self.in_force_text() {
            Some(in_force) => format!("ignored, {in_force}: {problems}"),
            None => format!("ignored: {problems}"),
        })
    }
}

/// Whether an invalid AuthorizationPolicy fails closed: its action is ALLOW, unset, or one
/// warden cannot read (only a readable DENY, AUDIT or CUSTOM is let go).
fn fails_closed(o: &DynamicObject) -> bool {
    !matches!(o.data["spec"]["action"].as_str(), Some("DENY" | "AUDIT" | "CUSTOM"))
}

/// The stand-in for an invalid ALLOW AuthorizationPolicy that has no valid version in force:
/// the equivalent of `spec: {}` under the same namespace/name, with the policy's
/// `selector`/`targetRef(s)` when they are valid on their own, otherwise namespace-wide (the
/// more restrictive choice), and its `istio.io/dry-run` annotation when valid. An ALLOW policy
/// without rules matches nothing, so the workloads it applies to deny by default, as in Istio,
/// which skips the rules it cannot translate and still applies the policy. The parts are read
/// by the same parser as the policy (`warden policy validate`). Also says whether the selection
/// fell back to namespace-wide.
pub fn placeholder(o: &DynamicObject) -> (AuthzPolicy, bool) {
    let name = o.name_any();
    let namespace = o.namespace().unwrap_or_else(|| "default".to_string());
    let origin = format!("{} (invalid: a placeholder that matches nothing)", display_name("AuthorizationPolicy", o));
    let parse = |metadata: Value, spec: Value| -> Option<AuthzPolicy> {
        let doc = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                         "metadata": metadata, "spec": spec});
        let yaml = serde_yaml::to_string(&doc).ok()?;
        match warden_authz::parse_str(&yaml, &origin).ok()?.pop()? {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        }
    };
    let spec = &o.data["spec"];
    let selecting: serde_json::Map<String, Value> = ["selector", "targetRef", "targetRefs"]
        .into_iter()
        .filter_map(|k| Some((k.to_string(), spec.get(k).filter(|v| !v.is_null())?.clone())))
        .collect();
    let written = !selecting.is_empty();
    let selection = parse(json!({"name": name, "namespace": namespace}), Value::Object(selecting)).map(|p| p.selection);
    let namespace_wide = written && selection.is_none();
    let dry_run = o.annotations().get(DRY_RUN_ANNOTATION).is_some_and(|v| {
        let md = json!({"name": name, "namespace": namespace, "annotations": {DRY_RUN_ANNOTATION: v}});
        parse(md, json!({})).is_some_and(|p| p.dry_run)
    });
    let policy = AuthzPolicy {
        namespace,
        name,
        action: Action::Allow,
        provider: None,
        dry_run,
        selection: selection.unwrap_or(Selection::All),
        rules: Vec::new(),
        origin,
    };
    (policy, namespace_wide)
}

struct Good {
    version: Version,
    resources: Vec<Resource>,
}

/// The resources in force, by `Kind/namespace/name`, and what was already reported.
#[derive(Default)]
pub struct PolicyBook {
    good: HashMap<String, Good>,
    reported: HashSet<Version>,
}

impl PolicyBook {
    /// The resources in force for the current objects, and the reports to make (new invalid
    /// versions; valid objects still carrying warden's invalid status).
    pub fn resolve<'a>(
        &mut self,
        objects: impl Iterator<Item = (&'static str, &'a DynamicObject)>,
    ) -> (Vec<Resource>, Vec<Report>) {
        let mut resources = Vec::new();
        let mut reports = Vec::new();
        let mut seen = HashSet::new();
        let mut uids = HashSet::new();
        for (kind, o) in objects {
            let key = format!("{kind}/{}/{}", o.namespace().unwrap_or_default(), o.name_any());
            seen.insert(key.clone());
            let v = version(o);
            uids.insert(v.uid.clone());
            let cached = self.good.get(&key).is_some_and(|g| g.version == v);
            if !cached {
                match validate(kind, o) {
                    Ok((r, warnings)) => {
                        for w in warnings {
                            tracing::warn!(resource = %display_name(kind, o), "{w}");
                        }
                        self.good.insert(key.clone(), Good { version: v.clone(), resources: r });
                        if has_invalid_status(o) {
                            reports.push(Report {
                                kind,
                                object: o.clone(),
                                problems: None,
                                kept_previous: false,
                                in_force: None,
                            });
                        }
                    }
                    Err(errors) => {
                        // A previous good version of the same object stays; a recreated object
                        // (new UID) does not inherit its namesake's.
                        let kept = match self.good.get(&key) {
                            Some(g) if g.version.uid == v.uid => true,
                            Some(_) => {
                                self.good.remove(&key);
                                false
                            }
                            None => false,
                        };
                        // Without one, an ALLOW policy fails closed: a placeholder matching
                        // nothing stands in for it (not kept in `good`: it is no valid version).
                        let in_force = if kept {
                            InForce::Previous
                        } else if kind == "AuthorizationPolicy" && fails_closed(o) {
                            let (p, namespace_wide) = placeholder(o);
                            let dry_run = p.dry_run;
                            resources.push(Resource::AuthorizationPolicy(p));
                            InForce::Placeholder { namespace_wide, dry_run }
                        } else {
                            InForce::Nothing
                        };
                        if self.reported.insert(v.clone()) {
                            let problems: Vec<String> = errors.iter().map(problem_text).collect();
                            let report = Report {
                                kind,
                                object: o.clone(),
                                problems: Some(problems),
                                kept_previous: kept,
                                in_force: Some(in_force),
                            };
                            tracing::error!(
                                resource = %display_name(kind, o),
                                generation = v.generation,
                                in_force = report.in_force_text().as_deref().unwrap_or("nothing"),
                                "invalid resource ignored: {}",
                                report.problems.as_deref().unwrap_or_default().join("; ")
                            );
                            reports.push(report);
                        }
                    }
                }
            }
            if let Some(g) = self.good.get(&key) {
                resources.extend(g.resources.iter().cloned());
            }
        }
        self.good.retain(|k, _| seen.contains(k));
        self.reported.retain(|v| uids.contains(&v.uid));
        (resources, reports)
    }
}

/// Whether warden marked this object invalid in its status.
pub fn has_invalid_status(o: &DynamicObject) -> bool {
    o.data["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == CONDITION && c["status"] == "False"))
}

/// The status warden writes: Istio's `validationMessages` shape plus a condition carrying the
/// message (Istio's message base has no text field).
pub fn status_patch(r: &Report, now: &str) -> Value {
    let generation = r.object.metadata.generation;
    match &r.problems {
        Some(problems) => {
            let message = problems.join("; ");
            let condition = r.message().unwrap_or_default();
            json!({"status": {
                "observedGeneration": generation,
                "validationMessages": [{
                    "level": "ERROR",
                    "type": {"code": INVALID_CODE, "name": "InvalidResource"},
                    "message": message,
                }],
                "conditions": [{
                    "type": CONDITION, "status": "False", "reason": "Invalid",
                    "message": condition,
                    "lastTransitionTime": now,
                }],
            }})
        }
        None => json!({"status": {
            "observedGeneration": generation,
            "validationMessages": null,
            "conditions": [{"type": CONDITION, "status": "True", "reason": "Valid", "message": "in force", "lastTransitionTime": now}],
        }}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, uid: &str, generation: i64, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "team", "uid": uid, "generation": generation, "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}],
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": spec,
        }))
        .unwrap()
    }

    const KIND: &str = "AuthorizationPolicy";

    fn good_spec() -> Value {
        json!({"selector": {"matchLabels": {"app": "b"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/team/sa/a"]}}]}]})
    }
    fn bad_spec() -> Value {
        json!({"action": "ALLOW", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]})
    }

    #[test]
    fn the_document_is_what_policy_validate_reads() {
        let d = as_document(KIND, &obj("p", "u1", 1, good_spec()));
        assert_eq!(d["apiVersion"], "security.istio.io/v1");
        assert_eq!(d["metadata"], json!({"name": "p", "namespace": "team"}));
        assert!(d.get("status").is_none());
        let (r, _) = validate(KIND, &obj("p", "u1", 1, good_spec())).unwrap();
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn an_invalid_object_is_reported_once_and_its_last_good_version_stays() {
        let mut book = PolicyBook::default();
        let other = obj("other", "u2", 1, good_spec());
        let v1 = obj("p", "u1", 1, good_spec());
        let (r, reports) = book.resolve([(KIND, &v1), (KIND, &other)].into_iter());
        assert_eq!((r.len(), reports.len()), (2, 0));

        let v2 = obj("p", "u1", 2, bad_spec());
        let (r, reports) = book.resolve([(KIND, &v2), (KIND, &other)].into_iter());
        assert_eq!(r.len(), 2, "v1 of p stays in force next to other");
        assert_eq!(reports.len(), 1);
        assert!(reports[0].kept_previous);
        assert_eq!(reports[0].in_force, Some(InForce::Previous));
        assert!(r.contains(&validate(KIND, &v1).unwrap().0[0]), "the previous version itself, not a placeholder");
        let problems = reports[0].problems.as_ref().unwrap();
        assert!(problems[0].starts_with("spec.rules[0].from[0].source.ipBlocks[0]: "), "{problems:?}");
        let status = status_patch(&reports[0], "2026-01-01T00:00:00Z");
        assert_eq!(status["status"]["validationMessages"][0]["type"]["code"], INVALID_CODE);
        assert_eq!(status["status"]["observedGeneration"], 2);
        let message = status["status"]["conditions"][0]["message"].as_str().unwrap();
        assert!(message.starts_with("ignored, the previous version stays in force: spec.rules[0]"), "{message}");

        // The same generation again (e.g. after a status write): no second report.
        let (_, reports) = book.resolve([(KIND, &v2), (KIND, &other)].into_iter());
        assert!(reports.is_empty());

        // Deleted and recreated invalid under the same name: nothing of the old one survives;
        // an ALLOW policy, it is replaced by a placeholder that matches nothing.
        let v3 = obj("p", "u9", 1, bad_spec());
        let (r, reports) = book.resolve([(KIND, &v3), (KIND, &other)].into_iter());
        assert_eq!(r.len(), 2);
        assert!(!reports[0].kept_previous);
        assert_eq!(reports[0].in_force, Some(InForce::Placeholder { namespace_wide: false, dry_run: false }));
        assert!(matches!(&r[0], Resource::AuthorizationPolicy(p) if p.key() == "team/p" && p.rules.is_empty()));

        // Fixed: in force again; its invalid status is cleared.
        let mut v4 = obj("p", "u9", 2, good_spec());
        v4.data["status"] = status_patch(&reports[0], "t")["status"].clone();
        let (r, reports) = book.resolve([(KIND, &v4)].into_iter());
        assert_eq!(r.len(), 1, "other was deleted");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].problems, None);
    }

    fn authz(r: &Resource) -> &AuthzPolicy {
        match r {
            Resource::AuthorizationPolicy(p) => p,
            other => panic!("not an AuthorizationPolicy: {other:?}"),
        }
    }

    /// Decides a TCP connection from `from` (a service account of `team`) to a workload of
    /// `team` labelled `app: to`, port 8080.
    fn decide(resources: &[Resource], from: &str, to: &str) -> warden_authz::Verdict {
        let set = warden_authz::PolicySet::from_resources(resources.to_vec(), &Default::default()).unwrap();
        let req = warden_authz::Request {
            source: warden_authz::Peer {
                principal: Some(format!("cluster.local/ns/team/sa/{from}")),
                ..Default::default()
            },
            destination: warden_authz::Destination {
                namespace: "team".into(),
                labels: [("app".to_string(), to.to_string())].into(),
                port: 8080,
                ..Default::default()
            },
            ..Default::default()
        };
        set.evaluate(&req).decision
    }

    /// The audit's reproducer: `team/b-access` (ALLOW for b, only a on 8080) made invalid
    /// (port "80800"), then the agent restarts: a new book has no previous version of it. b
    /// must not become allow-all: a placeholder that matches nothing applies to b, which denies
    /// by default, as Istio skips the rules it cannot translate and still applies the policy.
    #[test]
    fn an_invalid_allow_policy_without_a_previous_version_fails_closed() {
        let b_access = |ports: &str| {
            json!({"selector": {"matchLabels": {"app": "b"}}, "action": "ALLOW",
                   "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/team/sa/a"]}}],
                              "to": [{"operation": {"ports": [ports]}}]}]})
        };
        let valid = obj("b-access", "u1", 1, b_access("8080"));
        let (r, _) = PolicyBook::default().resolve([(KIND, &valid)].into_iter());
        assert_eq!(decide(&r, "a", "b"), warden_authz::Verdict::Allow);
        assert_eq!(decide(&r, "c", "b"), warden_authz::Verdict::Deny);

        // After a restart, with the invalid version only.
        let invalid = obj("b-access", "u1", 2, b_access("80800"));
        let mut book = PolicyBook::default();
        let (r, reports) = book.resolve([(KIND, &invalid)].into_iter());
        assert_eq!(r.len(), 1, "a placeholder stands in for b-access");
        let p = authz(&r[0]);
        assert_eq!((p.key(), p.action, p.dry_run), ("team/b-access".to_string(), Action::Allow, false));
        assert_eq!(p.selection, Selection::Labels([("app".to_string(), "b".to_string())].into()), "b only");
        assert!(p.rules.is_empty(), "matches nothing");
        assert_eq!(decide(&r, "a", "b"), warden_authz::Verdict::Deny, "b denies by default");
        assert_eq!(decide(&r, "c", "b"), warden_authz::Verdict::Deny);
        assert_eq!(decide(&r, "a", "c"), warden_authz::Verdict::Allow, "c is not selected");

        // Reported as before (once), saying what is in force.
        assert_eq!(reports.len(), 1);
        assert!(!reports[0].kept_previous);
        assert_eq!(reports[0].in_force, Some(InForce::Placeholder { namespace_wide: false, dry_run: false }));
        let problems = reports[0].problems.as_ref().unwrap();
        assert!(problems[0].starts_with("spec.rules[0].to[0].operation.ports[0]: "), "{problems:?}");
        let status = status_patch(&reports[0], "t");
        assert_eq!(status["status"]["conditions"][0]["status"], "False");
        let message = status["status"]["conditions"][0]["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "ignored, in force: matches nothing, its workloads deny by default until it is fixed: spec.rules[0]"
            ),
            "{message}"
        );
        assert_eq!(status["status"]["validationMessages"][0]["message"], problems.join("; "), "the problems only");
        let (r, reports) = book.resolve([(KIND, &invalid)].into_iter());
        assert_eq!((r.len(), reports.len()), (1, 0), "still in force, not reported again");

        // Fixed: the policy itself replaces the placeholder.
        let fixed = obj("b-access", "u1", 3, b_access("8080"));
        let (r, _) = book.resolve([(KIND, &fixed)].into_iter());
        assert_eq!(r.len(), 1);
        assert_eq!(decide(&r, "a", "b"), warden_authz::Verdict::Allow);
        // Deleted: the placeholder goes with it.
        let (r, _) = book.resolve(std::iter::empty());
        assert!(r.is_empty());
    }

    #[test]
    fn a_placeholder_keeps_the_policys_selection_when_valid_and_is_namespace_wide_otherwise() {
        let bad_rules = json!([{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]);
        let cases = [
            (json!({"rules": bad_rules}), Selection::All, false),
            (
                json!({"targetRefs": [{"kind": "Service", "group": "", "name": "b-svc"}], "rules": bad_rules}),
                Selection::TargetRefs(vec![warden_authz::model::TargetRef {
                    group: String::new(),
                    kind: "Service".into(),
                    name: "b-svc".into(),
                }]),
                false,
            ),
            // The selection itself is invalid: namespace-wide.
            (json!({"selector": {"matchLabels": {"app": "b*"}}, "rules": bad_rules}), Selection::All, true),
            (
                json!({"selector": {"matchLabels": {"app": "b"}}, "targetRefs": [{"kind": "Service", "name": "s"}]}),
                Selection::All,
                true,
            ),
            (json!({"selector": {"matchLabel": {"app": "b"}}, "action": "ALLOW"}), Selection::All, true),
            // An action warden cannot read fails closed too.
            (
                json!({"selector": {"matchLabels": {"app": "b"}}, "action": "ALOW"}),
                Selection::Labels([("app".to_string(), "b".to_string())].into()),
                false,
            ),
        ];
        for (spec, selection, namespace_wide) in cases {
            let o = obj("p", "u1", 1, spec.clone());
            let (r, reports) = PolicyBook::default().resolve([(KIND, &o)].into_iter());
            assert_eq!(r.len(), 1, "{spec}");
            assert_eq!(authz(&r[0]).selection, selection, "{spec}");
            assert_eq!(reports[0].in_force, Some(InForce::Placeholder { namespace_wide, dry_run: false }), "{spec}");
            let message = reports[0].message().unwrap();
            assert_eq!(message.contains("applies to every workload of its namespace"), namespace_wide, "{message}");
            if selection == Selection::All {
                assert_eq!(decide(&r, "a", "anyone"), warden_authz::Verdict::Deny, "{spec}");
            }
        }
    }

    #[test]
    fn a_placeholder_for_a_dry_run_policy_is_a_dry_run() {
        let mut o = obj("p", "u1", 1, bad_spec());
        o.metadata.annotations.get_or_insert_default().insert(DRY_RUN_ANNOTATION.into(), "true".into());
        let (r, reports) = PolicyBook::default().resolve([(KIND, &o)].into_iter());
        assert!(authz(&r[0]).dry_run);
        assert_eq!(decide(&r, "a", "b"), warden_authz::Verdict::Allow, "a dry run is not enforced");
        assert!(reports[0].message().unwrap().starts_with("ignored, in force as a dry run: matches nothing"));
        // An annotation that cannot be read does not make it a dry run (fails closed).
        o.metadata.annotations.get_or_insert_default().insert(DRY_RUN_ANNOTATION.into(), "yes".into());
        let (r, _) = PolicyBook::default().resolve([(KIND, &o)].into_iter());
        assert!(!authz(&r[0]).dry_run);
        assert_eq!(decide(&r, "a", "b"), warden_authz::Verdict::Deny);
    }

    /// Istio skips the rules of an invalid DENY (AUDIT, CUSTOM) policy: it is not enforced, and
    /// the messages say so. Other kinds without a previous version have no effect either.
    #[test]
    fn an_invalid_deny_policy_without_a_previous_version_is_absent() {
        for action in ["DENY", "AUDIT", "CUSTOM"] {
            let spec = json!({"selector": {"matchLabels": {"app": "b"}}, "action": action, "provider": {"name": "ext"},
                              "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]});
            let o = obj("p", "u1", 1, spec);
            let (r, reports) = PolicyBook::default().resolve([(KIND, &o)].into_iter());
            assert!(r.is_empty(), "{action}");
            assert_eq!(reports[0].in_force, Some(InForce::Nothing));
            let message = reports[0].message().unwrap();
            assert!(
                message.starts_with(&format!(
                    "ignored, not in force: Istio skips the rules of an invalid {action} policy: "
                )),
                "{message}"
            );
            assert_eq!(decide(&r, "a", "b"), warden_authz::Verdict::Allow);
        }
        let mut pa = obj("pa", "u2", 1, json!({"mtls": {"mode": "STRICTER"}}));
        pa.types.as_mut().unwrap().kind = "PeerAuthentication".into();
        let (r, reports) = PolicyBook::default().resolve([("PeerAuthentication", &pa)].into_iter());
        assert!(r.is_empty());
        assert!(reports[0].message().unwrap().starts_with("ignored: spec.mtls.mode"), "{:?}", reports[0].message());
    }
}
