//! The Istio security resources of the cluster: each object is validated on its own with the
//! same parser as `warden policy validate`. A valid object is put in force; an invalid one is
//! reported (log, Event, status) and ignored, and the last good version of it, when this agent
//! saw one, stays in force. One bad object never takes down the others.

use std::collections::{BTreeMap, HashMap, HashSet};

use kube::{ResourceExt as _, api::DynamicObject};
use serde_json::{Value, json};
use warden_authz::{LoadError, Resource};

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

/// Something to tell the API server about an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub kind: &'static str,
    pub object: DynamicObject,
    /// `None`: the object is valid (its stale invalid status is cleared). `Some`: every problem.
    pub problems: Option<Vec<String>>,
    /// An invalid object whose previous version stays in force.
    pub kept_previous: bool,
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
                            reports.push(Report { kind, object: o.clone(), problems: None, kept_previous: false });
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
                        if self.reported.insert(v.clone()) {
                            let problems: Vec<String> = errors.iter().map(problem_text).collect();
                            tracing::error!(
                                resource = %display_name(kind, o),
                                generation = v.generation,
                                kept_previous = kept,
                                "invalid resource ignored: {}",
                                problems.join("; ")
                            );
                            reports.push(Report {
                                kind,
                                object: o.clone(),
                                problems: Some(problems),
                                kept_previous: kept,
                            });
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
            json!({"status": {
                "observedGeneration": generation,
                "validationMessages": [{
                    "level": "ERROR",
                    "type": {"code": INVALID_CODE, "name": "InvalidResource"},
                    "message": message,
                }],
                "conditions": [{
                    "type": CONDITION, "status": "False", "reason": "Invalid",
                    "message": if r.kept_previous { format!("ignored, the previous version stays in force: {message}") } else { format!("ignored: {message}") },
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
        let problems = reports[0].problems.as_ref().unwrap();
        assert!(problems[0].starts_with("spec.rules[0].from[0].source.ipBlocks[0]: "), "{problems:?}");
        let status = status_patch(&reports[0], "2026-01-01T00:00:00Z");
        assert_eq!(status["status"]["validationMessages"][0]["type"]["code"], INVALID_CODE);
        assert_eq!(status["status"]["observedGeneration"], 2);

        // The same generation again (e.g. after a status write): no second report.
        let (_, reports) = book.resolve([(KIND, &v2), (KIND, &other)].into_iter());
        assert!(reports.is_empty());

        // Deleted and recreated invalid under the same name: nothing of the old one survives.
        let v3 = obj("p", "u9", 1, bad_spec());
        let (r, reports) = book.resolve([(KIND, &v3), (KIND, &other)].into_iter());
        assert_eq!(r.len(), 1);
        assert!(!reports[0].kept_previous);

        // Fixed: in force again; its invalid status is cleared.
        let mut v4 = obj("p", "u9", 2, good_spec());
        v4.data["status"] = status_patch(&reports[0], "t")["status"].clone();
        let (r, reports) = book.resolve([(KIND, &v4)].into_iter());
        assert_eq!(r.len(), 1, "other was deleted");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].problems, None);
    }
}
